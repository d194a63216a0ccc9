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
  connection carried requests before), ``request_id``, ``cache`` (what a route's cache
  did: HIT, MISS, EXPIRED, STALE, UPDATING, REVALIDATED, BYPASS, PURGE; absent without a
  cache), ``limited`` (why a route's limit refused the request: rate, concurrency,
  unavailable; absent otherwise), and ``error`` (the error kind when the request failed).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
from typing import TYPE_CHECKING, Final

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
        self._pipe = False
        #: bytes of lines that could not be written (full disk, full pipe)
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._clock = _Clock()
        self._line = self._json_line if format == "json" else self._combined_line

    # lifecycle --------------------------------------------------------------------------

    def settings(self) -> tuple[str | None, str, int, float]:
        """What this log was configured with (a reload keeps a log whose settings did not
        change open, with its buffer)."""
        return (self.path, self.format, self.buffer_size, self.flush_interval)

    def open(self, loop: asyncio.AbstractEventLoop | None = None, fd: int = -1) -> None:
        """Open the file (in each worker; standard output needs nothing), or use ``fd``,
        already open on it (given by the main process on a reload); with ``loop``, write
        what waited ``flush_interval`` on that loop's timer."""
        if self.path is not None and self._fd < 0:
            if fd >= 0:
                self._fd = fd
            else:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fd = self._fd if self.path is not None else sys.stdout.fileno()
        try:
            self._pipe = not stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self._pipe = True
        if loop is not None and self._timer is None:
            self._loop = loop
            self._timer = loop.call_later(self.flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self.tick()
        if self._loop is not None and self._timer is not None:
            self._timer = self._loop.call_later(self.flush_interval, self._on_timer)

    def reopen(self) -> None:
        """After a rotation: write what is buffered, then open the path afresh. If it
        cannot be opened the old file is kept (and the error raised to be logged)."""
        self.flush()
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            old, self._fd = self._fd, fd
            self._pipe = not stat.S_ISREG(os.fstat(fd).st_mode)
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
        self._add(self._line(session, error))

    def _add(self, line: bytes) -> None:
        if not self._lines:
            self._oldest = time.monotonic()
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.buffer_size:
            self.flush()

    def record_reject(self, client_ip: bytes, status: int, error: ProxyError) -> None:
        """Add the line of a request refused before it could be parsed (400, 408, 414,
        431...): no method, path or request id, as nginx logs ``"-"``."""
        now = time.time()
        if self.format == "json":
            line = b"".join(
                [
                    b'{"time":"', self._clock.iso(now),
                    b'","client":', _json_str(client_ip) if client_ip else b"null",
                    b',"method":null,"path":null,"protocol":null,"status":%d,"bytes_sent":0,'
                    b'"bytes_received":0,"referer":null,"user_agent":null,"request_time":0.0,'
                    b'"retries":0,"request_id":null,"error":"%s"}\n'
                    % (status, error.kind.value.encode()),
                ]
            )
        else:
            line = b"".join(
                [
                    client_ip or b"-", b" - - [", self._clock.clf(now),
                    b'] "-" %d 0 "-" "-" request_time=0.000000 retries=0 request_id=- error=%s\n'
                    % (status, error.kind.value.encode()),
                ]
            )
        self._add(line)

    def tick(self) -> None:
        """Called every ``flush_interval``: write what is buffered (so no line waits
        longer than that)."""
        if self._lines:
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
        if self._pipe and len(data) > PIPE_BUF:
            # a pipe (or terminal) shared by the workers: only writes of up to PIPE_BUF
            # bytes stay whole, so write whole lines in pieces no larger than that
            pieces = _line_pieces(data)
        else:
            pieces = [data]  # (appends to a regular file are whole whatever their size)
        for piece in pieces:
            view = memoryview(piece)
            while view:
                try:
                    written = os.write(fd, view)
                except OSError:
                    # a full disk, or a full non-blocking pipe: the lines are dropped,
                    # never the requests (nor the event loop, spinning)
                    self.dropped += len(view)
                    return
                view = view[written:]

    # formats ----------------------------------------------------------------------------
    #
    # Lines are built from bytes with few allocations: a request's line costs a few
    # microseconds (benchmarks/observability.py). Field values taken from the request are
    # escaped only when they hold a byte outside printable ASCII, a quote or a backslash.

    def _json_line(self, session: Session, error: ProxyError | None) -> bytes:
        req = session.req_header
        headers = req.headers
        start = session.start_time
        parts = [
            b'{"time":"', self._clock.iso(start),
            b'","client":', _json_str(session.client_ip) if session.client_ip else b"null",
            b',"method":', _json_str(req.raw_method),
            b',"path":', _json_str(req.raw_path),
            b',"protocol":"HTTP/', req.version.encode(),
            b'","status":%d,"bytes_sent":%d,"bytes_received":%d,"referer":'
            % (session.status, session.response_body_bytes, session.request_body_bytes),
            _json_opt(headers.get(b"referer")),
            b',"user_agent":', _json_opt(headers.get(b"user-agent")),
            b',"request_time":%.6f' % (time.time() - start),
        ]
        peer = session.peer
        if peer is not None:
            if session.upstream_connect_time >= 0.0:
                parts.append(b',"upstream_connect_time":%.6f' % session.upstream_connect_time)
            if session.upstream_header_at:
                parts.append(b',"upstream_header_time":%.6f' % (session.upstream_header_at - start))
            status = session.upstream_status
            parts.append(
                b',"upstream_addr":%s,"upstream_status":%s,"reused":%s'
                % (
                    _json_str(peer.name.encode()),
                    b"null" if status is None else b"%d" % status,
                    b"true" if session.upstream_reused else b"false",
                )
            )
        parts.append(b',"retries":%d,"request_id":' % session.retries)
        parts.append(_json_str(session.request_id_bytes()))
        if session.cache_status:
            parts.append(b',"cache":"%s"' % session.cache_status.encode())
        if session.limit_status:
            parts.append(b',"limited":"%s"' % session.limit_status.encode())
        if error is not None:
            parts.append(b',"error":"%s"' % error.kind.value.encode())
        parts.append(b"}\n")
        return b"".join(parts)

    def _combined_line(self, session: Session, error: ProxyError | None) -> bytes:
        req = session.req_header
        headers = req.headers
        start = session.start_time
        parts = [
            session.client_ip or b"-", b" - - [", self._clock.clf(start), b'] "',
            _text_escaped(req.raw_method), b" ", _text_escaped(req.raw_path),
            b" HTTP/", req.version.encode(),
            b'" %d %d "' % (session.status, session.response_body_bytes),
            _text_escaped(headers.get(b"referer") or b"-"), b'" "',
            _text_escaped(headers.get(b"user-agent") or b"-"),
            b'" request_time=%.6f' % (time.time() - start),
        ]
        peer = session.peer
        if peer is not None:
            if session.upstream_connect_time >= 0.0:
                parts.append(b" upstream_connect_time=%.6f" % session.upstream_connect_time)
            if session.upstream_header_at:
                parts.append(b" upstream_header_time=%.6f" % (session.upstream_header_at - start))
            status = session.upstream_status
            parts.append(
                b" upstream_addr=%s upstream_status=%s reused=%d"
                % (
                    _text_escaped(peer.name.encode()).replace(b" ", b"\\x20"),
                    b"-" if status is None else b"%d" % status,
                    session.upstream_reused,
                )
            )
        parts.append(b" retries=%d request_id=" % session.retries)
        parts.append(_text_escaped(session.request_id_bytes()))
        if session.cache_status:
            parts.append(b" cache=" + session.cache_status.encode())
        if session.limit_status:
            parts.append(b" limited=" + session.limit_status.encode())
        if error is not None:
            parts.append(b" error=" + error.kind.value.encode())
        parts.append(b"\n")
        return b"".join(parts)


#: Writes to a pipe up to this size are atomic (Linux's PIPE_BUF).
PIPE_BUF: Final = 4096


def _line_pieces(data: bytes) -> list[bytes]:
    """``data`` (whole lines) cut at line ends into pieces of at most PIPE_BUF bytes (a
    longer line is a piece of its own)."""
    pieces = []
    start = 0
    end = len(data)
    while start < end:
        stop = min(start + PIPE_BUF, end)
        if stop < end:
            cut = data.rfind(b"\n", start, stop)
            stop = cut + 1 if cut >= start else data.find(b"\n", stop) + 1 or end
        pieces.append(data[start:stop])
        start = stop
    return pieces


#: Bytes that go into a line as they are: printable ASCII but the quote and backslash.
_PLAIN: Final = bytes(b for b in range(0x20, 0x7F) if b not in (0x22, 0x5C))


def _text_escaped(value: bytes) -> bytes:
    """For the text format: quotes, backslashes and bytes outside printable ASCII escaped
    (``\\"``, ``\\\\``, ``\\xNN``), so a client cannot forge a line or a field."""
    if not value.translate(None, _PLAIN):
        return value
    out = bytearray()
    for byte in value:
        if byte == 0x22 or byte == 0x5C:
            out += b"\\" + bytes((byte,))
        elif 0x20 <= byte < 0x7F:
            out.append(byte)
        else:
            out += b"\\x%02x" % byte
    return bytes(out)


def _json_str(value: bytes) -> bytes:
    """A JSON string of ``value`` (bytes read as Latin-1, as HTTP fields are)."""
    if not value.translate(None, _PLAIN):
        return b'"' + value + b'"'
    return json.dumps(value.decode("latin-1"), ensure_ascii=True).encode()


def _json_opt(value: bytes | None) -> bytes:
    return b"null" if value is None else _json_str(value)


class _Clock:
    """The two time formats, made once per second."""

    __slots__ = ("_second", "_iso", "_clf")

    def __init__(self) -> None:
        self._second = -1
        self._iso = b""
        self._clf = b""

    def _update(self, second: int) -> None:
        t = time.gmtime(second)
        self._second = second
        self._iso = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        ).encode()
        self._clf = (
            f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        ).encode()

    def iso(self, when: float) -> bytes:
        """ISO 8601 in UTC with milliseconds: ``2026-11-27T16:50:01.123Z``."""
        second = int(when)
        if second != self._second:
            self._update(second)
        return self._iso + b".%03dZ" % min(999, round((when - second) * 1000))

    def clf(self, when: float) -> bytes:
        """The common log format's time: ``27/Nov/2026:16:50:01 +0000``."""
        second = int(when)
        if second != self._second:
            self._update(second)
        return self._clf
