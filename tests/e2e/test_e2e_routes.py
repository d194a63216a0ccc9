"""End to end: routes of a gateway config served by ``ferryman run`` — host, path, method
and header matching; strip_prefix and header edits as the origin sees them; redirects,
fixed responses and static files; 404 when no route matches. Some requests go through
curl (``--resolve`` and ``-H Host:``), the rest through http.client or a raw socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_util import ProxyProcess, raw_exchange
from lb_util import OriginProcess, Procs, get

from origin import free_port

GATEWAY = """\
server: {{workers: 1, grace_period: 2s}}
listeners:
  - bind: "127.0.0.1:{port}"
    routes:
      - name: api
        match: {{host: api.example.com, path_prefix: /v1}}
        upstream: api
        strip_prefix: /v1
        request_headers:
          remove: [X-Debug]
          set: {{X-Env: prod}}
          add: {{X-Tag: edge}}
        response_headers:
          remove: [Server]
          set: {{X-Frame-Options: DENY}}
          add: {{X-Gateway: ferryman}}
      - name: tenants
        match: {{host: "*.tenants.example.com"}}
        upstream: tenants
        response_headers: {{set: {{X-Route: tenants}}}}
      - name: files
        match: {{host: files.example.com}}
        static: {{root: www, max_age: 1m}}
      - name: items
        match: {{path_regex: "^/items/[0-9]+$"}}
        upstream: api
        response_headers: {{set: {{X-Route: items}}}}
      - name: submit
        match: {{path: /submit, methods: POST}}
        upstream: api
      - name: submit-other-methods
        match: {{path: /submit}}
        respond: {{status: 405, body: "POST only\\n", headers: {{Allow: POST}}}}
      - name: beta-canary
        match:
          path_prefix: /beta
          headers: {{X-Canary: "1", X-Trace: {{regex: "^[0-9a-f]+$"}}, X-Block: false}}
        upstream: canary
      - name: beta
        match: {{path_prefix: /beta}}
        upstream: api
      - name: old
        match: {{path_prefix: /old}}
        redirect: {{to: /new, status: 301}}
      - name: docs
        match: {{path_prefix: /docs}}
        redirect: {{to: "https://docs.example.com$path$query", status: 308}}
      - name: moved
        match: {{path_prefix: /moved}}
        redirect: {{to: "https://new.example.com$path"}}
      - name: healthz
        match: {{path: /healthz, methods: [GET, HEAD]}}
        respond: {{body: "ok\\n"}}
      - name: teapot
        match: {{path: /teapot}}
        respond:
          status: 418
          body: '{{"error": "teapot"}}'
          content_type: application/json
          headers: {{Cache-Control: no-store}}
        response_headers: {{add: {{X-Route: teapot}}}}
      - name: static
        match: {{path_prefix: /static}}
        static: {{root: www}}
upstreams:
  api: {{servers: ["{api}"], timeouts: {{connect: 1s, read: 5s}}}}
  tenants: {{servers: ["{tenants}"], timeouts: {{connect: 1s, read: 5s}}}}
  canary: {{servers: ["{canary}"], timeouts: {{connect: 1s, read: 5s}}}}
"""

HELLO = b"Hello, static world!\n"


@dataclass
class Gateway:
    proxy: ProxyProcess
    api: OriginProcess
    tenants: OriginProcess
    canary: OriginProcess
    www: Path

    @property
    def port(self) -> int:
        return self.proxy.port


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gateway")
    procs = Procs(tmp)
    try:
        api, tenants, canary = procs.origin("api"), procs.origin("tenants"), procs.origin("canary")
        port = free_port()
        workdir = tmp / "ferryman-0"
        www = workdir / "www"
        (www / "static" / "docs").mkdir(parents=True)
        (www / "static" / "hello.txt").write_bytes(HELLO)
        (www / "static" / "docs" / "index.html").write_text("<h1>docs</h1>\n")
        (workdir / "secret.txt").write_text("secret\n")
        os.symlink(workdir / "secret.txt", www / "static" / "link.txt")
        proxy = procs.ferryman(
            GATEWAY.format(port=port, api=api.address, tenants=tenants.address,
                           canary=canary.address),
            port,
        )
        yield Gateway(proxy, api, tenants, canary, www)
    finally:
        problems = procs.close()
    assert not problems, "\n".join(problems)


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """Run curl with ``-s -i``; returns status, headers (lowercased names) and body."""
    result = subprocess.run(["curl", "-s", "-i", "--max-time", "10", *args],
                            capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


# --------------------------------------------------------------------------------------
# host matching


@needs_curl
def test_exact_host_with_curl_resolve(gateway: Gateway) -> None:
    port = gateway.port
    status, headers, body = curl(
        "--resolve", f"api.example.com:{port}:127.0.0.1", f"http://api.example.com:{port}/v1/users?id=7"
    )
    assert status == 200
    assert headers["x-origin"] == "api"
    # strip_prefix: the origin sees the path without /v1 (query kept)
    assert body == b"hello from api /users?id=7\n"
    assert gateway.api.requests()[-1] == "/users?id=7"


@needs_curl
def test_wildcard_host_with_curl_host_header(gateway: Gateway) -> None:
    status, headers, body = curl(
        "-H", "Host: acme.tenants.example.com", f"http://127.0.0.1:{gateway.port}/dashboard"
    )
    assert status == 200 and headers["x-origin"] == "tenants"
    assert headers["x-route"] == "tenants"
    assert body == b"hello from tenants /dashboard\n"
    status, headers, _ = curl(
        "-H", "Host: a.b.tenants.example.com", f"http://127.0.0.1:{gateway.port}/"
    )
    assert status == 200 and headers["x-origin"] == "tenants"


def test_host_is_matched_without_port_case_or_trailing_dot(gateway: Gateway) -> None:
    for host in ("api.example.com", f"API.Example.COM:{gateway.port}", "api.example.com."):
        status, headers, body = get(gateway.port, "/v1/x", {"Host": host})
        assert status == 200, host
        assert body == b"hello from api /x\n", host


def test_wildcard_does_not_match_the_bare_suffix(gateway: Gateway) -> None:
    status, _, body = get(gateway.port, "/dashboard", {"Host": "tenants.example.com"})
    assert status == 404
    assert body == b"404 Not Found: no route for this request\n"


def test_other_host_does_not_reach_the_host_routes(gateway: Gateway) -> None:
    status, _, _ = get(gateway.port, "/v1/users", {"Host": "www.example.com"})
    assert status == 404


# --------------------------------------------------------------------------------------
# paths, methods, headers


def test_path_prefix_is_a_segment_prefix_and_strips_to_root(gateway: Gateway) -> None:
    host = {"Host": "api.example.com"}
    status, _, body = get(gateway.port, "/v1", host)
    assert status == 200 and body == b"hello from api /\n"
    status, _, body = get(gateway.port, "/v1/", host)
    assert status == 200 and body == b"hello from api /\n"
    status, _, _ = get(gateway.port, "/v10/users", host)
    assert status == 404  # "/v1" does not cover "/v10"


def test_path_regex(gateway: Gateway) -> None:
    status, headers, body = get(gateway.port, "/items/42")
    assert status == 200 and headers["x-route"] == "items"
    assert body == b"hello from api /items/42\n"
    status, _, _ = get(gateway.port, "/items/42x")
    assert status == 404
    status, _, _ = get(gateway.port, "/items/")
    assert status == 404


def test_method_condition_falls_through_to_the_next_route(gateway: Gateway) -> None:
    status, headers, body = get(gateway.port, "/submit", method="POST", body=b"data")
    assert status == 200 and headers["x-origin"] == "api"
    assert body == b"hello from api /submit\n"
    status, headers, body = get(gateway.port, "/submit")
    assert status == 405
    assert body == b"POST only\n"
    assert headers["allow"] == "POST"
    assert "x-origin" not in headers


def test_header_conditions(gateway: Gateway) -> None:
    canary = {"X-Canary": "1", "X-Trace": "00ff"}
    status, headers, _ = get(gateway.port, "/beta/app", canary)
    assert status == 200 and headers["x-origin"] == "canary"
    # each condition that fails sends the request to the next route
    for changed in ({"X-Canary": "2"}, {"X-Trace": "xyz"}, {"X-Block": "yes"}):
        status, headers, _ = get(gateway.port, "/beta/app", {**canary, **changed})
        assert status == 200 and headers["x-origin"] == "api", changed
    status, headers, _ = get(gateway.port, "/beta/app", {"X-Trace": "00ff"})
    assert status == 200 and headers["x-origin"] == "api"


# --------------------------------------------------------------------------------------
# header edits


def test_request_header_edits_as_the_origin_sees_them(gateway: Gateway) -> None:
    status, _, body = get(
        gateway.port, "/v1/headers",
        {"Host": "api.example.com", "X-Debug": "1", "X-Env": "dev", "X-Tag": "client"},
    )
    assert status == 200
    seen = json.loads(body)
    names = [k.lower() for k, _ in seen]
    assert "x-debug" not in names
    assert [v for k, v in seen if k.lower() == "x-env"] == ["prod"]
    assert [v for k, v in seen if k.lower() == "x-tag"] == ["client", "edge"]
    assert gateway.api.requests()[-1] == "/headers"


def test_response_header_edits_as_the_client_sees_them(gateway: Gateway) -> None:
    resp, _ = raw_exchange(
        gateway.port, b"GET /v1/ HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
    )
    assert resp.status == 200
    assert resp.header("server") is None  # the origin's Server header was removed
    assert resp.header_all("x-frame-options") == [b"DENY"]
    assert resp.header_all("x-gateway") == [b"ferryman"]
    assert resp.header_all("x-origin") == [b"api"]  # untouched headers pass through


# --------------------------------------------------------------------------------------
# local answers: redirect, fixed response, static files


@needs_curl
def test_redirect_keeps_the_query(gateway: Gateway) -> None:
    status, headers, body = curl(f"http://127.0.0.1:{gateway.port}/old/page?a=1&b=2")
    assert status == 301
    assert headers["location"] == "/new?a=1&b=2"
    assert body == b""
    status, headers, _ = get(gateway.port, "/old")
    assert status == 301 and headers["location"] == "/new"
    assert not any(p.startswith("/old") for p in gateway.api.requests())


def test_templated_redirect(gateway: Gateway) -> None:
    status, headers, _ = get(gateway.port, "/docs/intro?lang=en")
    assert status == 308
    assert headers["location"] == "https://docs.example.com/docs/intro?lang=en"


def test_templated_redirect_with_path_only_keeps_the_query(gateway: Gateway) -> None:
    status, headers, _ = get(gateway.port, "/moved/page?a=1")
    assert status == 302
    assert headers["location"] == "https://new.example.com/moved/page?a=1"


def test_fixed_responses(gateway: Gateway) -> None:
    status, headers, body = get(gateway.port, "/healthz")
    assert status == 200 and body == b"ok\n"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["content-length"] == "3"
    status, headers, body = get(gateway.port, "/teapot", method="DELETE")
    assert status == 418
    assert json.loads(body) == {"error": "teapot"}
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert headers["x-route"] == "teapot"  # response_headers apply to local answers too
    status, _, _ = get(gateway.port, "/healthz", method="POST")
    assert status == 404  # the methods condition fails and no later route matches


def test_static_file_etag_and_range(gateway: Gateway) -> None:
    status, headers, body = get(gateway.port, "/static/hello.txt")
    assert status == 200 and body == HELLO
    assert headers["content-type"] == "text/plain; charset=utf-8"
    etag = headers["etag"]
    status, headers, body = get(gateway.port, "/static/hello.txt", {"If-None-Match": etag})
    assert status == 304 and body == b""
    assert headers["etag"] == etag
    status, headers, body = get(gateway.port, "/static/hello.txt", {"Range": "bytes=0-4"})
    assert status == 206 and body == b"Hello"
    assert headers["content-range"] == f"bytes 0-4/{len(HELLO)}"
    status, headers, body = get(gateway.port, "/static/docs/")
    assert status == 200 and body == b"<h1>docs</h1>\n"
    status, headers, _ = get(gateway.port, "/static/docs?x=1")
    assert status == 301 and headers["location"] == "/static/docs/?x=1"
    status, _, _ = get(gateway.port, "/static/missing.txt")
    assert status == 404


@needs_curl
def test_static_with_curl_and_max_age(gateway: Gateway) -> None:
    port = gateway.port
    status, headers, body = curl(
        "--resolve", f"files.example.com:{port}:127.0.0.1",
        f"http://files.example.com:{port}/static/hello.txt",
    )
    assert status == 200 and body == HELLO
    assert headers["cache-control"] == "max-age=60"


def test_static_traversal_is_refused(gateway: Gateway) -> None:
    host = b"Host: files.example.com\r\nConnection: close\r\n\r\n"
    # paths climbing above the root are refused before routing (400, as nginx does)
    for target in (b"/../secret.txt", b"/static/../../secret.txt",
                   b"/%2e%2e/secret.txt", b"/static/%2E%2E/%2e%2e/secret.txt"):
        resp, _ = raw_exchange(gateway.port, b"GET " + target + b" HTTP/1.1\r\n" + host)
        assert resp.status == 400, target
        assert b"secret" not in resp.body, target
    # a symbolic link leading out of the root is not followed
    resp, _ = raw_exchange(gateway.port, b"GET /static/link.txt HTTP/1.1\r\n" + host)
    assert resp.status == 404 and b"secret" not in resp.body
    # dot segments that stay inside the root are fine
    resp, _ = raw_exchange(
        gateway.port, b"GET /static/docs/../hello.txt HTTP/1.1\r\n" + host
    )
    assert resp.status == 200 and resp.body == HELLO
    # on any host, whatever the routes' conditions
    resp, _ = raw_exchange(
        gateway.port,
        b"GET /static/../../secret.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert resp.status == 400
    assert resp.body == b"400 Bad Request: the path climbs above the root\n"


def test_static_refuses_other_methods(gateway: Gateway) -> None:
    status, headers, _ = get(gateway.port, "/static/hello.txt", method="PUT", body=b"x")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_no_route_is_404(gateway: Gateway) -> None:
    status, headers, body = get(gateway.port, "/nothing/here")
    assert status == 404
    assert body == b"404 Not Found: no route for this request\n"
    assert headers["content-type"] == "text/plain; charset=utf-8"
