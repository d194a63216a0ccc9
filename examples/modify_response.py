"""Rewrite response bodies: JSON from the upstream becomes YAML (Pingora's modify_response).

    python examples/modify_response.py --listen 127.0.0.1:6190 --upstream 127.0.0.1:9001

For ``application/json`` responses the body is collected in ``response_body_filter``
(per-request state lives in ``ctx``), converted at end of stream and sent as YAML.
``response_filter`` fixes the head: the length changes, so Content-Length goes and the
body is sent chunked; Content-Type becomes ``application/yaml``. A JSON body the origin
compressed (gzip, deflate, br, zstd) is decoded first
(``ferryman.modules.compression.decode_response``, bounded against decompression bombs).
Other responses pass through untouched.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

import ferryman
from ferryman.modules.compression import DecodeError, decode_response


class JsonToYaml(ferryman.ProxyHttp):
    """Converts JSON response bodies to YAML."""

    def __init__(self, upstream: str) -> None:
        self.peer = ferryman.HttpPeer(upstream)

    def new_ctx(self) -> dict[str, Any]:
        return {"json": False, "buf": [], "decoder": None}

    def upstream_peer(self, session: ferryman.Session, ctx: Any) -> ferryman.HttpPeer:
        return self.peer

    def response_filter(
        self, session: ferryman.Session, response: ferryman.ResponseHeader, ctx: Any
    ) -> None:
        ctype = response.headers.get("content-type") or b""
        if ctype.split(b";")[0].strip().lower() == b"application/json":
            ctx["json"] = True
            # (None: not encoded)
            ctx["decoder"] = decode_response(response, request_method=session.req_header.method)
            response.headers.remove("Content-Length")
            response.headers.set("Content-Type", "application/yaml")

    def response_body_filter(
        self, session: ferryman.Session, body: bytes, end_of_stream: bool, ctx: Any
    ) -> bytes | None:
        if not ctx["json"]:
            return body
        decoder = ctx["decoder"]
        try:
            ctx["buf"].append(decoder.decompress(body) if decoder is not None else body)
            if not end_of_stream:
                return None  # hold everything until the whole document is here
            if decoder is not None:
                ctx["buf"].append(decoder.finish())
        except DecodeError as exc:  # corrupt, truncated, or a bomb
            raise ferryman.ProxyError(
                ferryman.ErrorKind.INVALID_RESPONSE, ferryman.ErrorSource.UPSTREAM,
                f"cannot decode the JSON body: {exc}",
            ) from exc
        try:
            data = json.loads(b"".join(ctx["buf"]))
        except ValueError:
            return b"".join(ctx["buf"])  # not valid JSON after all: pass it on unchanged
        return yaml.safe_dump(data, sort_keys=False).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:6190")
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    server = ferryman.Server(workers=1)
    proxy = JsonToYaml(args.upstream)
    server.add_service(ferryman.HttpProxyService(proxy, [ferryman.Listener(args.listen)]))
    raise SystemExit(server.run_forever())


if __name__ == "__main__":
    main()
