"""The hook pipeline over HTTP/2, both engine modes: an HTTP/2 client's stream and an
HTTP/2 upstream's stream run the same hooks as HTTP/1.1, and ``session.http_version``
tells them apart (issue 6, items 1 and 2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from proxy_util import variant

from ferryman import HttpPeer, Listener, ProxyHttp
from h2_origin import H2Origin


@pytest.fixture
def h2_origin() -> Iterator[H2Origin]:
    server = H2Origin().start()
    yield server
    server.stop()


class Recorder(ProxyHttp):
    """Records what the hooks saw; adds a request and a response header."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen: list[tuple[str, str, Any]] = []

    def request_filter(self, session, ctx):
        self.seen.append(("request_filter", session.http_version, session.req_header.host))
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address, protocol="h2c")

    def connected_to_upstream(self, session, reused, peer, ctx):
        self.seen.append(("connected", peer.protocol, reused))

    def upstream_request_filter(self, session, upstream_request, ctx):
        upstream_request.headers.set(b"X-Hooked", b"yes")

    def response_filter(self, session, upstream_response, ctx):
        self.seen.append(("response_filter", str(upstream_response.status), None))
        upstream_response.headers.set(b"X-Version", session.http_version.encode())

    def logging(self, session, error, ctx):
        self.seen.append(("logging", str(session.status), error))


@pytest.mark.parametrize("client_http2", [True, False], ids=["h2-client", "h1-client"])
def test_hooks_run_for_http2_streams_both_sides(
    mode: str, h2_origin: H2Origin, start_proxy, client_http2: bool
) -> None:
    proxy = variant(mode, Recorder)(h2_origin.address)
    harness = start_proxy(proxy, listeners=[Listener("127.0.0.1:0", h2c=True)])
    with httpx.Client(http2=client_http2, http1=not client_http2, timeout=10) as client:
        for _ in range(2):
            r = client.get(f"{harness.url}/headers")
            assert r.status_code == 200
            assert r.http_version == ("HTTP/2" if client_http2 else "HTTP/1.1")
            assert r.headers["x-version"] == ("2" if client_http2 else "1.1")
            fields = [tuple(f) for f in json.loads(r.content)]
            assert ("x-hooked", "yes") in fields
    version = "2" if client_http2 else "1.1"
    assert proxy.seen[0] == ("request_filter", version, f"127.0.0.1:{harness.port}")
    assert proxy.seen[1] == ("connected", "h2c", False)
    assert proxy.seen[2] == ("response_filter", "200", None)
    assert proxy.seen[3] == ("logging", "200", None)
    assert proxy.seen[5] == ("connected", "h2c", True)  # the second request shares it
    assert h2_origin.connections == 1
