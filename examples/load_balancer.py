"""Round-robin load balancer with failover (Pingora's load_balancer example, in Python).

    python examples/load_balancer.py --listen 127.0.0.1:6188 \
        --upstream 127.0.0.1:9001 --upstream 127.0.0.1:9002

Every request goes to the next upstream in turn. If connecting fails, the request is
retried on the next one (``fail_to_connect`` keeps the error retryable and
``upstream_peer`` is asked again). Hooks are plain functions, so the engine runs each
request without creating a task.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import ferryman


class LoadBalancer(ferryman.ProxyHttp):
    """Round robin over ``upstreams``; a failed connect moves on to the next one."""

    def __init__(self, upstreams: list[str]) -> None:
        self.peers = [ferryman.HttpPeer(u, connect_timeout=2.0) for u in upstreams]
        self._cycle = itertools.cycle(self.peers)

    def new_ctx(self) -> dict[str, Any]:
        return {"tried": []}

    def upstream_peer(self, session: ferryman.Session, ctx: Any) -> ferryman.HttpPeer:
        session.max_retries = len(self.peers) - 1  # try each server at most once
        peer = next(self._cycle)
        ctx["tried"].append(peer.name)
        return peer

    def fail_to_connect(
        self,
        session: ferryman.Session,
        peer: ferryman.HttpPeer,
        ctx: Any,
        error: ferryman.ProxyError,
    ) -> ferryman.ProxyError:
        error.retryable = True  # another server may be up
        return error

    def upstream_request_filter(
        self, session: ferryman.Session, upstream_request: ferryman.RequestHeader, ctx: Any
    ) -> None:
        upstream_request.headers.set("X-Tried", ",".join(ctx["tried"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:6188")
    ap.add_argument("--upstream", action="append", required=True)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    server = ferryman.Server(workers=args.workers)
    proxy = LoadBalancer(args.upstream)
    server.add_service(ferryman.HttpProxyService(proxy, [ferryman.Listener(args.listen)]))
    raise SystemExit(server.run_forever())


if __name__ == "__main__":
    main()
