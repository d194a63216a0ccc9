"""ConfigProxy: the proxy that ``ferryman run`` serves, built from a Config.

It is an ordinary :class:`~ferryman.ProxyHttp` subclass using only the public API: each
listener sends its requests to one upstream group, whose servers are chosen round robin;
a retry moves on to the next server.
"""

from __future__ import annotations

from typing import Any

from ferryman.config import Config, UpstreamConfig
from ferryman.proxy.hooks import ProxyHttp
from ferryman.proxy.session import Session
from ferryman.upstream.peer import HttpPeer


class UpstreamGroup:
    """A named group of peers with round-robin selection."""

    __slots__ = ("name", "peers", "max_retries", "_next")

    def __init__(self, name: str, peers: list[HttpPeer], max_retries: int) -> None:
        self.name = name
        self.peers = peers
        self.max_retries = max_retries
        self._next = 0

    @classmethod
    def from_config(cls, upstream: UpstreamConfig) -> UpstreamGroup:
        """Build the group (and its peers) for one ``upstreams`` entry."""
        tls = upstream.tls
        timeouts = upstream.timeouts
        peers = [
            HttpPeer(
                (host, port),
                tls=tls is not None,
                sni=tls.sni if tls is not None else None,
                verify_cert=tls.verify if tls is not None else True,
                verify_hostname=tls.verify_hostname if tls is not None else True,
                ca=tls.ca if tls is not None else None,
                client_cert=tls.cert if tls is not None else None,
                client_key=tls.key if tls is not None else None,
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.read,
                write_timeout=timeouts.write,
                idle_timeout=min(timeouts.idle, upstream.pool.idle_timeout),
                max_idle=upstream.pool.max_idle,
            )
            for host, port in upstream.servers
        ]
        return cls(upstream.name, peers, upstream.max_retries)

    def select(self) -> HttpPeer:
        """The next peer, round robin."""
        peers = self.peers
        i = self._next
        self._next = (i + 1) % len(peers)
        return peers[i]


class ConfigProxy(ProxyHttp):
    """Routes each listener's requests to its configured upstream group."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.groups = {name: UpstreamGroup.from_config(u) for name, u in config.upstreams.items()}
        self.by_listener: dict[tuple[str, int], UpstreamGroup] = {}
        for listener in config.listeners:
            if listener.upstream is not None:
                self.by_listener[(listener.bind[0], listener.bind[1])] = self.groups[
                    listener.upstream
                ]
        self._only = next(iter(self.by_listener.values())) if len(self.by_listener) == 1 else None

    @classmethod
    def from_config(cls, config: Any) -> ProxyHttp:
        """Build from a validated :class:`~ferryman.config.Config`."""
        return cls(config)

    def group_for(self, session: Session) -> UpstreamGroup:
        """The upstream group serving the listener ``session`` arrived on."""
        if self._only is not None:
            return self._only
        listener = session.listener
        if listener is None or listener.address not in self.by_listener:
            raise LookupError("no upstream group for this listener")
        return self.by_listener[listener.address]

    def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:  # type: ignore[override]
        """Round robin within the listener's group; retries move to the next server."""
        group = self.group_for(session)
        session.max_retries = group.max_retries
        return group.select()
