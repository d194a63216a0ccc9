"""Rate limiting from hooks (Pingora's rate_limiter example): each client application,
named by its ``appid`` header, may send 3 requests per second; more get 429 with
``Retry-After`` and ``RateLimit-*`` fields. Requests without ``appid`` are refused (400).

    python examples/rate_limiter.py --listen 127.0.0.1:6193 --upstream 127.0.0.1:9001 \
        --workers 2

The :class:`ferryman.limits.Limiter` is made in ``__init__``, which runs before the
workers are forked, so its counts are shared: the limit holds for the server as a whole,
whatever the number of workers. The check is a plain function call (no I/O), so the hook
stays a plain ``def`` and requests keep the engine's task-free fast path.
"""

from __future__ import annotations

import argparse
from typing import Any

import ferryman
from ferryman.limits import Limiter


class RateLimitedProxy(ferryman.ProxyHttp):
    """Proxies everything to one upstream, at most ``rate`` per ``appid``."""

    def __init__(self, upstream: str, rate: str = "3/s") -> None:
        self.peer = ferryman.HttpPeer(upstream)
        self.limiter = Limiter(rate, name="rate_limiter.appid")

    def request_filter(self, session: ferryman.Session, ctx: Any) -> bool:
        appid = session.req_header.headers.get(b"appid")
        if not appid:
            session.send_response(400, b"an appid header is required\n")
            return True
        verdict = self.limiter.check(appid)
        if not verdict.admitted:
            headers = verdict.headers()
            headers.append((b"Retry-After", verdict.retry_after_value()))
            session.send_response(429, b"slow down\n", headers, content_type="text/plain")
            return True
        ctx["ratelimit"] = verdict.headers()
        return False

    def upstream_peer(self, session: ferryman.Session, ctx: Any) -> ferryman.HttpPeer:
        return self.peer

    def response_filter(
        self, session: ferryman.Session, response: ferryman.ResponseHeader, ctx: Any
    ) -> None:
        for name, value in ctx.get("ratelimit", ()):
            response.headers.set(name, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:6193")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--rate", default="3/s")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    server = ferryman.Server(workers=args.workers)
    proxy = RateLimitedProxy(args.upstream, args.rate)
    server.add_service(ferryman.HttpProxyService(proxy, [ferryman.Listener(args.listen)]))
    raise SystemExit(server.run_forever())


if __name__ == "__main__":
    main()
