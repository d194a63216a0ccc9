"""API gateway: authentication, routing and header rewriting (Pingora's gateway example).

    python examples/gateway.py --listen 127.0.0.1:6191 \
        --api 127.0.0.1:9001 --default 127.0.0.1:9002 --token secret

* ``/login`` requires ``Authorization: Bearer <token>``; without it: 403.
* ``/api/...`` goes to the ``--api`` upstream, everything else to ``--default``.
* Responses get ``Server: ferryman-gateway`` and lose ``Alt-Svc``.
* Every request is logged with its status once it is over.

The hooks are ``async def`` (as a gateway's usually are: a real one would call an auth
service), so each request runs as one asyncio task.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import ferryman

log = logging.getLogger("gateway")


class Gateway(ferryman.ProxyHttp):
    """Token check on /login, path-based routing, response header rewriting."""

    def __init__(self, api: str, default: str, token: str) -> None:
        self.api = ferryman.HttpPeer(api)
        self.default = ferryman.HttpPeer(default)
        self.expected = f"Bearer {token}".encode()

    async def request_filter(self, session: ferryman.Session, ctx: Any) -> bool:
        req = session.req_header
        if req.path.startswith("/login") and req.headers.get("authorization") != self.expected:
            await session.respond(403, b"forbidden\n", content_type="text/plain")
            return True
        return False

    async def upstream_peer(self, session: ferryman.Session, ctx: Any) -> ferryman.HttpPeer:
        return self.api if session.req_header.path.startswith("/api/") else self.default

    async def response_filter(
        self, session: ferryman.Session, response: ferryman.ResponseHeader, ctx: Any
    ) -> None:
        response.headers.set("Server", "ferryman-gateway")
        response.headers.remove("Alt-Svc")

    async def logging(
        self, session: ferryman.Session, error: ferryman.ProxyError | None, ctx: Any
    ) -> None:
        req = session.req_header
        log.info("%s %s -> %d%s", req.method, req.path, session.status,
                 f" ({error.kind.value})" if error else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:6191")
    ap.add_argument("--api", required=True)
    ap.add_argument("--default", required=True)
    ap.add_argument("--token", default="secret")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = ferryman.Server(workers=1)
    proxy = Gateway(args.api, args.default, args.token)
    server.add_service(ferryman.HttpProxyService(proxy, [ferryman.Listener(args.listen)]))
    raise SystemExit(server.run_forever())


if __name__ == "__main__":
    main()
