"""Backend: one server of an upstream group, with the live state balancing decisions use."""

from __future__ import annotations

from typing import Any

from mypy_extensions import mypyc_attr

from ferryman.upstream.peer import HttpPeer

__all__ = ["Backend"]


@mypyc_attr(allow_interpreted_subclasses=True)
class Backend:
    """One server of an upstream group as the balancer sees it.

    Attributes:
        address: ``(host, port)`` of the server.
        weight: its relative share of traffic (>= 1).
        name: ``"host:port"`` (IPv6 hosts in brackets); stable, used by hashing algorithms.
        peer: the :class:`HttpPeer` requests to it use (its pool key is what keeps pooled
            connections when membership changes), or None for pure selection use.
        healthy: the active health checks' verdict (True until a check says otherwise).
        reason: why it is unhealthy (last check failure), or ``""``.
        inflight: requests currently sent to it (maintained by whoever selects: the config
            proxy increments on selection and decrements when the request ends).
        ewma: the peak-EWMA of its response latency in seconds (``p2c_ewma``).
        ewma_time: when ``ewma`` was last updated (``time.monotonic()``), 0.0 if never.
        fails: consecutive passive failures.
        ejected_until: monotonic time until which passive checks keep it out, 0.0 if not.
        ejections: how many times in a row it was ejected (grows the backoff).
        ext: free slot for user code.
    """

    __slots__ = (
        "address",
        "weight",
        "name",
        "peer",
        "healthy",
        "reason",
        "inflight",
        "ewma",
        "ewma_time",
        "fails",
        "ejected_until",
        "ejections",
        "ext",
    )

    def __init__(
        self,
        address: tuple[str, int],
        weight: int = 1,
        peer: HttpPeer | None = None,
    ) -> None:
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        self.address = (address[0], int(address[1]))
        self.weight = weight
        host = self.address[0]
        self.name = f"[{host}]:{self.address[1]}" if ":" in host else f"{host}:{self.address[1]}"
        self.peer = peer
        self.healthy = True
        self.reason = ""
        self.inflight = 0
        self.ewma = 0.0
        self.ewma_time = 0.0
        self.fails = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.ext: Any = None

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return f"Backend({self.name}, weight={self.weight}, {state})"
