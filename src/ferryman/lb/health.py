"""Active health checks: TCP connect or an HTTP request, with rise/fall thresholds.

A check is an object with ``async check(address) -> str | None``: ``None`` when the server
is healthy, else a short reason (``"connection refused"``, ``"status 503"``...).
:class:`HealthState` turns a series of results into an up/down verdict the way HAProxy
does: ``fall`` consecutive failures mark an up server down, ``rise`` consecutive successes
mark a down server up. Running the checks on a schedule is
:class:`~ferryman.lb.monitor.GroupMonitor`'s job.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Collection
from dataclasses import dataclass, field

import httptools

__all__ = ["HealthCheck", "HealthState", "HttpHealthCheck", "TcpHealthCheck"]

#: A health response larger than this is not read further (the check fails if the body
#: substring was not found in it).
MAX_CHECK_RESPONSE = 64 * 1024


class HealthCheck:
    """Base class of active checks. Subclass and implement :meth:`check`.

    Attributes:
        interval: seconds between two checks of one server.
        timeout: seconds one check may take; longer counts as a failure.
        rise: consecutive successes that mark a down server up.
        fall: consecutive failures that mark an up server down.
        tls: an SSL context to check over TLS, or None for plain TCP.
        server_hostname: the name sent in SNI and checked against the certificate, or None
            for the server's host.

    A subclass may set any of them as class attributes; arguments given to the constructor
    win.
    """

    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None

    def __init__(
        self,
        *,
        interval: float | None = None,
        timeout: float | None = None,
        rise: int | None = None,
        fall: int | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        if interval is not None:
            self.interval = interval
        if timeout is not None:
            self.timeout = timeout
        if rise is not None:
            self.rise = rise
        if fall is not None:
            self.fall = fall
        if tls is not None:
            self.tls = tls
        if server_hostname is not None:
            self.server_hostname = server_hostname

    async def _open(
        self, address: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = address
        hostname = (self.server_hostname or host) if self.tls is not None else None
        return await asyncio.open_connection(
            host, port, ssl=self.tls, server_hostname=hostname
        )

    async def check(self, address: tuple[str, int]) -> str | None:
        """Probe ``address``; None if healthy, else why not (an exception counts as a
        failure too). Subclasses must provide it; the base class has no probe to run."""
        raise NotImplementedError(f"{type(self).__name__} does not implement check()")

    async def run(self, address: tuple[str, int]) -> str | None:
        """:meth:`check` bounded by ``timeout``, any exception turned into a reason."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.check(address)
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except OSError as exc:
            return _os_reason(exc)
        except Exception as exc:  # noqa: BLE001 - a check never takes the monitor down
            return f"check failed: {exc!r}"


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return exc.strerror or str(exc) or type(exc).__name__


class TcpHealthCheck(HealthCheck):
    """Healthy when a TCP connection (and the TLS handshake, with ``tls``) succeeds.

    Takes the keyword arguments of :class:`HealthCheck`.
    """

    async def check(self, address: tuple[str, int]) -> str | None:
        """Connect, then close at once."""
        _, writer = await self._open(address)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return None


class _ResponseCollector:
    """httptools callbacks gathering the status and (a bounded prefix of) the body."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.complete = False
        self.headers_done = False

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if len(self.body) < MAX_CHECK_RESPONSE:
            self.body += body[: MAX_CHECK_RESPONSE - len(self.body)]

    def on_message_complete(self) -> None:
        self.complete = True


class HttpHealthCheck(HealthCheck):
    """Healthy when ``method path`` is answered with an expected status (and body).

    Args:
        method: request method. Default ``"GET"``.
        path: request target. Default ``"/"``.
        host: the ``Host`` header; default the server's ``host:port``.
        expect_status: statuses that count as healthy. Default 200..399.
        body_contains: bytes the response body must contain, or None.
        interval, timeout, rise, fall, tls, server_hostname: see :class:`HealthCheck`.
    """

    def __init__(
        self,
        *,
        method: str = "GET",
        path: str = "/",
        host: str | None = None,
        expect_status: Collection[int] = range(200, 400),
        body_contains: bytes | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(
            interval=interval, timeout=timeout, rise=rise, fall=fall,
            tls=tls, server_hostname=server_hostname,
        )
        self.method = method
        self.path = path
        self.host = host
        self.expect_status = frozenset(expect_status)
        self.body_contains = body_contains

    def request_bytes(self, address: tuple[str, int]) -> bytes:
        """The request sent to ``address``."""
        host = self.host
        if host is None:
            h, port = address
            host = f"[{h}]:{port}" if ":" in h else f"{h}:{port}"
        return (
            f"{self.method} {self.path} HTTP/1.1\r\nHost: {host}\r\n"
            "User-Agent: ferryman-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")

    async def check(self, address: tuple[str, int]) -> str | None:
        """Send the request, read the response (status, and body when it is checked)."""
        reader, writer = await self._open(address)
        try:
            writer.write(self.request_bytes(address))
            collector = _ResponseCollector()
            parser = httptools.HttpResponseParser(collector)
            need_body = self.body_contains is not None and self.method != "HEAD"
            while True:
                data = await reader.read(65536)
                if not data:
                    try:
                        parser.feed_data(b"")
                    except httptools.HttpParserError:
                        pass
                    if not collector.headers_done:
                        return "connection closed before a response"
                    break
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    break
                except httptools.HttpParserError as exc:
                    return f"invalid response: {exc}"
                if collector.complete:
                    break
                if collector.headers_done and not need_body:
                    break
                if len(collector.body) >= MAX_CHECK_RESPONSE:
                    break
            status = parser.get_status_code()
            if status not in self.expect_status:
                return f"status {status}"
            wanted = self.body_contains
            if need_body and wanted is not None and wanted not in collector.body:
                return f"body lacks {self.body_contains!r}"
            return None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


@dataclass(slots=True)
class HealthState:
    """The up/down verdict on one server from successive check results.

    A server starts ``healthy`` (as in nginx; HAProxy's default too once checks pass) with
    no history. ``fall`` consecutive failures make it unhealthy, ``rise`` consecutive
    successes make it healthy again.
    """

    rise: int = 2
    fall: int = 3
    healthy: bool = True
    reason: str = ""
    successes: int = 0
    failures: int = 0
    checks: int = field(default=0)

    def record(self, failure: str | None) -> bool:
        """Add one result (None = success, else the reason); True if the verdict changed."""
        self.checks += 1
        if failure is None:
            self.failures = 0
            self.successes += 1
            if not self.healthy and self.successes >= self.rise:
                self.healthy = True
                self.reason = ""
                return True
            return False
        self.successes = 0
        self.failures += 1
        if self.healthy:
            if self.failures >= self.fall:
                self.healthy = False
                self.reason = failure
                return True
            return False
        changed = failure != self.reason
        self.reason = failure
        return changed
