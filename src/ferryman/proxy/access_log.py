"""AccessLog: one line per request, per listener, as combined-log text or JSON lines.

Lines are gathered in memory and written with one ``os.write`` when ``buffer_size`` bytes
have gathered or ``flush_interval`` seconds have passed (nginx's ``access_log ... buffer=
flush=``), to a file opened ``O_APPEND`` (so that the workers' writes never overwrite each
other) or to standard output. :meth:`reopen` opens the file again under the same name
after a log rotation.

Fields (the JSON keys; the text format is the "combined" format followed by the rest as
``key=value``):

* ``time`` (ISO 8601, UTC, milliseconds), ``client`` (address), ``method``, ``path``,
  ``protocol`` (``HTTP/1.1``, ``HTTP/2``), ``status``, ``bytes_sent`` (response body),
  ``bytes_received`` (request body), ``referer``, ``user_agent``;
* ``request_time``: seconds from the request head to the end of the response;
* ``upstream_connect_time``: seconds to open the upstream connection (0 for a reused
  one, absent when no upstream was used); ``upstream_header_time``: seconds from the
  request head to the upstream's response head;
* ``upstream_addr``, ``upstream_status``, ``retries``, ``reused`` (the upstream
  connection carried requests before), ``request_id``, and ``error`` (the error kind
  when the request failed).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ferryman.errors import ProxyError
    from ferryman.proxy.session import Session

FORMATS: Final = ("combined", "json")
_MONTHS: Final = (
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
)


class AccessLog:
    """The access log of one listener (see the module docstring).

    Args:
        path: the file to append to, or ``None`` (or ``"-"``) for standard output.
        format: ``"combined"`` or ``"json"``.
        buffer_size: bytes gathered before a write.
        flush_interval: longest time a line waits in the buffer (seconds).
    """

    def __init__(
        self,
        path: str | None = None,
        format: str = "combined",  # noqa: A002 - the config key's name
        buffer_size: int = 64 * 1024,
        flush_interval: float = 1.0,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}, got {format!r}")
        self.path = None if path in (None, "-") else path
        self.format = format
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self._fd = -1
        self._lines: list[bytes] = []
        self._size = 0
        self._oldest = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._line = self._json_line if format == "json" else self._combined_line

    # lifecycle --------------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open the file (in each worker; standard output needs nothing); with ``loop``,
        write what waited ``flush_interval`` on that loop's timer."""
        if self.path is not None and self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if loop is not None and self._timer is None:
            self._loop = loop
            self._timer = loop.call_later(self.flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self.tick()
        if self._loop is not None and self._timer is not None:
            self._timer = self._loop.call_later(self.flush_interval, self._on_timer)

    def reopen(self) -> None:
        """After a rotation: write what is buffered, then open the path afresh."""
        self.flush()
        if self.path is not None:
            old, self._fd = self._fd, -1
            self.open()
            if old >= 0:
                os.close(old)

    def close(self) -> None:
        """Write what is buffered and close the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # writing ----------------------------------------------------------------------------

    def record(self, session: Session, error: ProxyError | None) -> None:
        """Add the line of a finished request; write the buffer when it is full."""
        line = self._line(session, error)
        if not self._lines:
            self._oldest = time.monotonic()
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.buffer_size:
            self.flush()

    def tick(self) -> None:
        """Called periodically: write lines that have waited ``flush_interval``."""
        if self._lines and time.monotonic() - self._oldest >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write every buffered line now."""
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines = []
        self._size = 0
        fd = self._fd if self.path is not None else sys.stdout.fileno()
        if fd < 0:
            return  # (not opened: a log that was never started)
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                continue  # (a non-blocking stdout pipe that is full: keep trying)
            except OSError:
                return  # a full disk must not take requests down with it
            view = view[written:]

    # formats ----------------------------------------------------------------------------

    def _fields(self, session: Session, error: ProxyError | None) -> dict[str, Any]:
        req = session.req_header
        headers = req.headers
        now = time.time()
        fields: dict[str, Any] = {
            "time": _iso_time(session.start_time),
            "client": session.client_ip.decode("latin-1") or None,
            "method": req.method,
            "path": req.path,
            "protocol": "HTTP/" + req.version,
            "status": session.status,
            "bytes_sent": session.response_body_bytes,
            "bytes_received": session.request_body_bytes,
            "referer": _text(headers.get(b"referer")),
            "user_agent": _text(headers.get(b"user-agent")),
            "request_time": round(now - session.start_time, 6),
        }
        peer = session.peer
        if peer is not None:
            if session.upstream_connect_time >= 0.0:
                fields["upstream_connect_time"] = round(session.upstream_connect_time, 6)
            if session.upstream_header_at:
                fields["upstream_header_time"] = round(
                    session.upstream_header_at - session.start_time, 6
                )
            fields["upstream_addr"] = peer.name
            fields["upstream_status"] = session.upstream_status
            fields["reused"] = session.upstream_reused
        fields["retries"] = session.retries
        fields["request_id"] = session.request_id
        if error is not None:
            fields["error"] = error.kind.value
        return fields

    def _json_line(self, session: Session, error: ProxyError | None) -> bytes:
        return (
            json.dumps(self._fields(session, error), separators=(",", ":"), ensure_ascii=True)
            + "\n"
        ).encode()

    def _combined_line(self, session: Session, error: ProxyError | None) -> bytes:
        f = self._fields(session, error)
        first = (
            f'{f["client"] or "-"} - - [{_clf_time(session.start_time)}] '
            f'"{_quoted(f["method"])} {_quoted(f["path"])} {f["protocol"]}" {f["status"]} '
            f'{f["bytes_sent"]} "{_quoted(f["referer"] or "-")}" '
            f'"{_quoted(f["user_agent"] or "-")}"'
        )
        rest = " ".join(
            f"{key}={_value(f[key])}"
            for key in (
                "request_time",
                "upstream_connect_time",
                "upstream_header_time",
                "upstream_addr",
                "upstream_status",
                "reused",
                "retries",
                "request_id",
                "error",
            )
            if key in f
        )
        return (first + " " + rest + "\n").encode("utf-8", "backslashreplace")


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _quoted(text: str) -> str:
    """Inside double quotes: escape quotes, backslashes and control bytes (log injection)."""
    out = []
    for ch in text:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "1" if value else "0"
    return _quoted(str(value)).replace(" ", "\\x20")


def _iso_time(when: float) -> str:
    t = time.gmtime(when)
    millis = int(when % 1 * 1000)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{millis:03d}Z"
    )


def _clf_time(when: float) -> str:
    t = time.gmtime(when)
    return (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )
