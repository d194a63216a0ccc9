"""An origin that parses what it receives with h11, an HTTP/1.1 parser independent of
ferryman's, and records it: the differential half of the smuggling tests.

It answers every well-framed request with ``200``, an ``X-Target`` header and the request
target as the body, so that a client can tell which request each response belongs to.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import h11
from e2e_util import ScriptedOrigin


@dataclass
class Seen:
    """What the origin read since the last :meth:`H11Origin.take` (all connections)."""

    #: (method, target, body, headers) of each complete request
    requests: list[tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]] = field(
        default_factory=list
    )
    #: targets of requests whose connection ended before their end
    partial: list[bytes] = field(default_factory=list)
    #: h11 errors, each with the start of what was left unparsed
    errors: list[str] = field(default_factory=list)


class H11Origin:
    """Answers every well-framed request with ``200``, ``X-Target`` and its target as body."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = Seen()
        self.server = ScriptedOrigin(self._handle)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def take(self) -> Seen:
        with self.lock:
            seen, self.seen = self.seen, Seen()
        return seen

    def _handle(self, conn: socket.socket) -> None:
        h = h11.Connection(h11.SERVER)
        req: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                rest = bytes(h.trailing_data[0])[:200]
                with self.lock:
                    self.seen.errors.append(f"{exc}; unparsed: {rest!r}")
                return
            if event is h11.NEED_DATA:
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    if req is not None:
                        with self.lock:
                            self.seen.partial.append(bytes(req.target))
                    return
                h.receive_data(data)
            elif isinstance(event, h11.Request):
                req = event
                body.clear()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                target = bytes(req.target)
                with self.lock:
                    self.seen.requests.append(
                        (bytes(req.method), target, bytes(body), list(req.headers))
                    )
                req = None
                head = h11.Response(
                    status_code=200,
                    headers=[("X-Target", target), ("Content-Length", str(len(target)))],
                )
                out = h.send(head) or b""
                out += h.send(h11.Data(data=target)) or b""
                out += h.send(h11.EndOfMessage()) or b""
                conn.sendall(out)
                try:
                    h.start_next_cycle()
                except h11.LocalProtocolError:
                    return
            else:  # ConnectionClosed, or PAUSED after a CONNECT that was not answered
                return

    def stop(self) -> None:
        self.server.stop()
