"""A load balancer written against ``ferryman.lb``: least connections, active health checks
and failover — what the config's ``upstreams`` do, in a dozen lines of Python.

    python examples/health_checked_lb.py --listen 127.0.0.1:6188 \
        --upstream 127.0.0.1:9001 --upstream 127.0.0.1:9002=3

``HOST:PORT=W`` gives a server weight W. Every worker probes ``/healthz`` itself here (the
``ferryman run`` server instead probes once per server in its control process); servers
failing 2 checks in a row get no traffic until 2 checks pass. A failed connect is retried
on a server not tried yet.
"""

from __future__ import annotations

import argparse
from typing import Any

import ferryman
from ferryman.lb import Backend, GroupMonitor, HttpHealthCheck, LoadBalancer, StaticDiscovery


class HealthCheckedBalancer(ferryman.ProxyHttp):
    """``least_conn`` over weighted servers, with HTTP health checks and failover."""

    def __init__(self, servers: list[tuple[tuple[str, int], int]], interval: float = 2.0) -> None:
        self.servers = servers
        self.interval = interval
        self.lb = LoadBalancer("app", servers, "least_conn", peer_factory=ferryman.HttpPeer)
        self.monitor: GroupMonitor | None = None

    def worker_start(self, service: ferryman.HttpProxyService) -> None:
        check = HttpHealthCheck(path="/healthz", interval=self.interval, timeout=1.0, fall=2)
        self.monitor = GroupMonitor("app", StaticDiscovery(self.servers), check)
        self.monitor.attach(self.lb, service.loop)

    def worker_stop(self, service: ferryman.HttpProxyService) -> None:
        if self.monitor is not None:
            self.monitor.stop()

    def new_ctx(self) -> dict[str, Any]:
        return {"backend": None, "tried": ()}

    def upstream_peer(self, session: ferryman.Session, ctx: Any) -> ferryman.HttpPeer:
        previous: Backend | None = ctx["backend"]
        if previous is not None:  # a retry: do not go back to the server that failed
            ctx["tried"] += (previous,)
            previous.inflight -= 1
        session.max_retries = len(self.lb.backends) - 1
        backend = ctx["backend"] = self.lb.select(exclude=ctx["tried"])
        backend.inflight += 1  # least_conn balances on requests in flight
        assert backend.peer is not None
        return backend.peer

    def logging(
        self, session: ferryman.Session, error: ferryman.ProxyError | None, ctx: Any
    ) -> None:
        if ctx["backend"] is not None:
            ctx["backend"].inflight -= 1


def parse_server(text: str) -> tuple[tuple[str, int], int]:
    """``HOST:PORT`` or ``HOST:PORT=WEIGHT``."""
    address, _, weight = text.partition("=")
    host, _, port = address.rpartition(":")
    return (host, int(port)), int(weight or 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:6188")
    ap.add_argument("--upstream", action="append", required=True, type=parse_server)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    server = ferryman.Server(workers=args.workers)
    proxy = HealthCheckedBalancer(args.upstream)
    server.add_service(ferryman.HttpProxyService(proxy, [ferryman.Listener(args.listen)]))
    raise SystemExit(server.run_forever())


if __name__ == "__main__":
    main()
