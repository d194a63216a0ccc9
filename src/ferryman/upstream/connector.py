"""Connector: opens upstream connections and keeps idle ones in a pool keyed by peer."""

from __future__ import annotations

import asyncio
import errno
import ssl
from typing import Any

from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.timeouts import sweep_for
from ferryman.upstream.connection import UpstreamChannel, UpstreamConnection
from ferryman.upstream.h2_connection import H2UpstreamConnection
from ferryman.upstream.peer import HttpPeer


class Connector:
    """A per-event-loop upstream connector with a connection pool.

    ``get_idle(peer)`` returns a pooled connection (most recently used first) or ``None``;
    ``connect(peer)`` opens a new one. Connections come back through
    :meth:`UpstreamConnection.release`; the pool keeps at most ``peer.max_idle`` idle
    connections per pool key and closes those idle longer than ``peer.idle_timeout``.

    Peers with ``multiplexed`` set (HTTP/2) are served differently: their connections are
    shared, not lent. ``get_idle`` returns a channel (a stream) on an open connection
    with room; ``connect`` waits for a connection already being opened to the same peer
    before opening another, so a burst of requests does not open one connection each.
    A connection whose TLS handshake did not pick ``h2`` becomes an HTTP/1.1 connection
    and is pooled like one.

    Counters ``connects`` and ``reuses`` give the connection reuse ratio (a request
    sharing an HTTP/2 connection counts as a reuse).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.sweep = sweep_for(self.loop)
        self._idle: dict[int, list[UpstreamConnection]] = {}
        self._ssl: dict[tuple[Any, ...], ssl.SSLContext] = {}
        self.connects = 0
        self.reuses = 0
        self.open: set[UpstreamConnection] = set()
        #: open HTTP/2 connections taking new streams, per pool key
        self._shared: dict[int, list[H2UpstreamConnection]] = {}
        #: every open HTTP/2 connection (also those going away)
        self.shared_open: set[H2UpstreamConnection] = set()
        #: an HTTP/2 connection being opened, per pool key: later requests wait for it
        self._opening: dict[int, asyncio.Future[H2UpstreamConnection | ProxyError]] = {}
        #: pool keys of "h2" peers whose server picked HTTP/1.1 in ALPN last time
        self._fell_back: set[int] = set()

    def get_idle(self, peer: HttpPeer) -> UpstreamChannel | None:
        """A clean idle pooled connection for ``peer`` (for HTTP/2: a stream on an open
        connection with room), or ``None``."""
        if peer.multiplexed:
            channel = self._shared_channel(peer)
            if channel is not None:
                self.reuses += 1
                return channel
        idle = self._idle.get(peer.key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                self.reuses += 1
                conn.reused = True
                conn.deadline = 0.0
                return conn
        return None

    async def connect(self, peer: HttpPeer) -> UpstreamChannel:
        """Open a new connection to ``peer`` (TCP, then TLS if asked).

        Raises a retryable :class:`ProxyError`: CONNECT_REFUSED, CONNECT_TIMEOUT,
        TLS_HANDSHAKE or CONNECT_ERROR (and UPSTREAM_PROTOCOL for an HTTP/2 server that
        sent no SETTINGS).
        """
        if peer.multiplexed:
            return await self._connect_shared(peer)
        conn = await self._open(peer, lambda: UpstreamConnection(peer, self))
        self.connects += 1
        self.open.add(conn)
        return conn

    async def _open(self, peer: HttpPeer, factory: Any) -> Any:
        """TCP (and TLS) to ``peer`` with ``factory``'s protocol; errors as for connect."""
        ctx = self._ssl_context(peer) if peer.tls else None
        try:
            async with asyncio.timeout(peer.connect_timeout):
                _, conn = await self.loop.create_connection(
                    factory,
                    peer.host,
                    peer.port,
                    ssl=ctx,
                    server_hostname=peer.sni if ctx is not None else None,
                )
        except TimeoutError as timeout:
            raise ProxyError(
                ErrorKind.CONNECT_TIMEOUT,
                ErrorSource.UPSTREAM,
                f"timed out connecting to {peer.name}",
                retryable=True,
                cause=timeout,
            ) from None
        except ssl.SSLError as tls_error:
            raise ProxyError(
                ErrorKind.TLS_HANDSHAKE,
                ErrorSource.UPSTREAM,
                f"TLS handshake with {peer.name} failed: {tls_error}",
                retryable=True,
                cause=tls_error,
            ) from None
        except OSError as exc:
            kind = (
                ErrorKind.CONNECT_REFUSED
                if exc.errno == errno.ECONNREFUSED
                else ErrorKind.CONNECT_ERROR
            )
            raise ProxyError(
                kind,
                ErrorSource.UPSTREAM,
                f"cannot connect to {peer.name}: {exc.strerror or exc}",
                retryable=True,
                cause=exc,
            ) from None
        return conn

    # HTTP/2: shared connections ---------------------------------------------------------

    def _shared_channel(self, peer: HttpPeer) -> UpstreamChannel | None:
        conns = self._shared.get(peer.key)
        if conns:
            for conn in conns:
                channel = conn.open_channel(True)
                if channel is not None:
                    return channel
        return None

    async def _connect_shared(self, peer: HttpPeer) -> UpstreamChannel:
        key = peer.key
        if key not in self._fell_back:
            try:
                # (another request's connect, and the wait, take at most connect_timeout)
                async with asyncio.timeout(peer.connect_timeout):
                    channel = await self._wait_for_opening(peer)
            except TimeoutError:
                raise ProxyError(
                    ErrorKind.CONNECT_TIMEOUT,
                    ErrorSource.UPSTREAM,
                    f"timed out waiting for a connection to {peer.name}",
                    retryable=True,
                ) from None
            if channel is not None:
                return channel
        if key in self._fell_back:
            # the server speaks HTTP/1.1: connections are not shared, so not waited for
            return self._adopt(peer, await self._open_shared(peer), None)
        opening = self._opening[key] = self.loop.create_future()
        try:
            conn = await self._open_shared(peer)
        except BaseException as exc:
            del self._opening[key]
            opening.set_result(
                exc
                if isinstance(exc, ProxyError)
                else ProxyError(
                    ErrorKind.CONNECT_ERROR,
                    ErrorSource.UPSTREAM,
                    f"connecting to {peer.name} failed: {exc!r}",
                    retryable=True,
                )
            )
            raise
        del self._opening[key]
        return self._adopt(peer, conn, opening)

    async def _wait_for_opening(self, peer: HttpPeer) -> UpstreamChannel | None:
        """While a connection to ``peer`` is being opened, wait for it and take a stream
        on it; ``None`` when there is none to wait for (or it went HTTP/1.1)."""
        key = peer.key
        while True:
            opening = self._opening.get(key)
            if opening is None:
                return None
            outcome = await asyncio.shield(opening)
            if isinstance(outcome, ProxyError):
                raise ProxyError(
                    outcome.kind,
                    outcome.source,
                    outcome.detail,
                    retryable=outcome.retryable,
                    cause=outcome.cause,
                )
            channel = self._shared_channel(peer)
            if channel is not None:
                self.reuses += 1
                return channel
            if key in self._fell_back:
                return None
            # full already: wait for the next one being opened, or open it

    def _adopt(
        self,
        peer: HttpPeer,
        conn: H2UpstreamConnection,
        opening: asyncio.Future[H2UpstreamConnection | ProxyError] | None,
    ) -> UpstreamChannel:
        """A new connection: shared if it speaks HTTP/2, else pooled as HTTP/1.1."""
        self.connects += 1
        if conn.downgraded:
            # the server did not pick h2 in ALPN: speak HTTP/1.1 on this connection, and
            # stop making requests to it wait for each other's connects
            self._fell_back.add(peer.key)
            h1 = UpstreamConnection(peer, self)
            transport = conn.transport
            assert transport is not None
            transport.set_protocol(h1)
            h1.connection_made(transport)
            self.open.add(h1)
            if opening is not None:
                opening.set_result(conn)
            return h1
        self._fell_back.discard(peer.key)
        self._shared.setdefault(peer.key, []).append(conn)
        self.shared_open.add(conn)
        if opening is not None:
            opening.set_result(conn)
        channel = conn.open_channel(False)
        if channel is None:  # (a server allowing no streams at all)
            raise ProxyError(
                ErrorKind.UPSTREAM_PROTOCOL,
                ErrorSource.UPSTREAM,
                f"upstream {peer.name} allows no HTTP/2 streams",
                retryable=True,
            )
        return channel

    async def _open_shared(self, peer: HttpPeer) -> H2UpstreamConnection:
        """Open an HTTP/2 connection and wait for the server's SETTINGS."""
        conn: H2UpstreamConnection = await self._open(
            peer, lambda: H2UpstreamConnection(peer, self)
        )
        try:
            async with asyncio.timeout(peer.connect_timeout):
                await conn.ready
        except TimeoutError:
            conn.close()
            raise ProxyError(
                ErrorKind.CONNECT_TIMEOUT,
                ErrorSource.UPSTREAM,
                f"{peer.name} sent no HTTP/2 SETTINGS in time",
                retryable=True,
            ) from None
        except BaseException:
            conn.close()  # (cancelled: the connection would be left open, unused)
            raise
        if conn.closed:
            raise ProxyError(
                ErrorKind.UPSTREAM_PROTOCOL,
                ErrorSource.UPSTREAM,
                f"{peer.name} closed the connection instead of speaking HTTP/2",
                retryable=True,
            )
        return conn

    def forget_shared(self, conn: H2UpstreamConnection) -> None:
        """``conn`` takes no new streams (going away or closed): stop handing it out."""
        conns = self._shared.get(conn.peer.key)
        if conns and conn in conns:
            conns.remove(conn)
        if conn.closed:
            self.shared_open.discard(conn)

    def shared_count(self, peer: HttpPeer | None = None) -> int:
        """Open HTTP/2 connections taking new streams, for ``peer`` or in total."""
        if peer is not None:
            return len(self._shared.get(peer.key, ()))
        return sum(len(v) for v in self._shared.values())

    def release(self, conn: UpstreamConnection) -> None:
        """Put a clean connection back in the pool, or close it if the pool is full."""
        peer = conn.peer
        if peer.retired:
            conn.close()  # its server left its group: never reused
            return
        idle = self._idle.get(peer.key)
        if idle is None:
            idle = self._idle[peer.key] = []
        if len(idle) >= peer.max_idle:
            conn.close()
            return
        conn.deadline = self.sweep.now + peer.idle_timeout
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop a closed connection from the pool and the bookkeeping."""
        self.open.discard(conn)
        self.sweep.discard(conn)
        idle = self._idle.get(conn.peer.key)
        if idle and conn in idle:
            idle.remove(conn)

    def idle_count(self, peer: HttpPeer | None = None) -> int:
        """Idle pooled connections, for ``peer`` or in total."""
        if peer is not None:
            return len(self._idle.get(peer.key, ()))
        return sum(len(v) for v in self._idle.values())

    def retire(self, peer: HttpPeer) -> int:
        """``peer``'s server left its group: close its idle pooled connections now, and
        its connections in use when they are released (``peer.retired``). Connections
        made for another peer object with the same pool key (the same server in another
        group) are kept. Returns how many idle connections were closed."""
        peer.retired = True
        for shared in [c for c in self._shared.get(peer.key, ()) if c.peer is peer]:
            shared.retire()
        idle = self._idle.get(peer.key)
        if not idle:
            return 0
        mine = [conn for conn in idle if conn.peer is peer]
        if mine:
            idle[:] = [conn for conn in idle if conn.peer is not peer]
            for conn in mine:
                conn.close()
        return len(mine)

    def forget_tls(self) -> None:
        """Drop the cached client TLS contexts (a reload: CA and client certificate files
        are read again on the next connect). Pooled connections are kept."""
        self._ssl = {}

    def close_all(self) -> None:
        """Close every pooled and open connection (used at shutdown)."""
        for conn in list(self.open):
            conn.close()
        for shared in list(self.shared_open):
            shared.close()
        self._idle.clear()
        self._shared.clear()

    def _ssl_context(self, peer: HttpPeer) -> ssl.SSLContext:
        key = (
            peer.verify_cert,
            peer.verify_hostname,
            peer.ca,
            peer.client_cert,
            peer.client_key,
            peer.protocol,
        )
        ctx = self._ssl.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=peer.ca)
            if not peer.verify_cert:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif not peer.verify_hostname:
                ctx.check_hostname = False
            if peer.client_cert:
                ctx.load_cert_chain(peer.client_cert, peer.client_key)
            ctx.set_alpn_protocols(["h2", "http/1.1"] if peer.protocol == "h2" else ["http/1.1"])
            self._ssl[key] = ctx
        return ctx
