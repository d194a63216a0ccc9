"""The config-driven proxy in-process: route matching, hook narrowing, failover, fail-open
messages and in-flight accounting (real origins and clients on 127.0.0.1)."""

from __future__ import annotations

import http.client
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryman import Listener
from ferryman.app import ConfigProxy
from ferryman.app.routes import Route, Router, match_path, plain_path_end, request_host
from ferryman.config import RouteConfig, RouteMatch, parse_config
from ferryman.protocols.headers import Headers, RequestHeader
from harness import ProxyHarness
from origin import OriginServer, free_port


def req(method: str, path: str, **headers: str) -> RequestHeader:
    return RequestHeader(method, path, Headers(list(headers.items())))


# -- routes (sans sockets) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/a/b?x=1", b"/a/b"),
        (b"/%61dmin", b"/admin"),
        (b"/x/../admin", b"/admin"),
        (b"/x/./y//z/", b"/x/y/z/"),
        (b"//admin", b"/admin"),
        (b"/..", None),
        (b"/a/%2e%2e/%2e%2e/etc", None),
        (b"/", b"/"),
    ],
)
def test_match_path_normalises_like_nginx(raw: bytes, expected: bytes | None) -> None:
    assert match_path(raw) == expected


def test_request_host_strips_port_case_and_dot() -> None:
    assert request_host(req("GET", "/", Host="API.Example.com.:8080")) == "api.example.com"
    assert request_host(req("GET", "/", Host="[::1]:80")) == "[::1]"
    assert request_host(req("GET", "/")) == ""


def route(name: str, **match: object) -> Route:
    return Route(RouteConfig(match=RouteMatch(**match), name=name))  # type: ignore[arg-type]


def test_router_first_match_wins_with_every_condition() -> None:
    router = Router(
        [
            route("api-post", hosts=("api.example.com",), path_prefix="/v1", methods=("POST",)),
            route("api", hosts=("api.example.com",), path_prefix="/v1"),
            route("wild", hosts=("*.example.com",), path_regex=r"/item/\d+$"),
            route("beta", headers=()),
        ]
    )
    assert router.route(req("POST", "/v1/x", Host="api.example.com")).name == "api-post"
    assert router.route(req("GET", "/v1/x", Host="api.example.com")).name == "api"
    assert router.route(req("GET", "/v1", Host="api.example.com")).name == "api"
    # prefix on a segment boundary: /v10 is not under /v1
    assert router.route(req("GET", "/v10", Host="api.example.com")).name == "beta"
    assert router.route(req("GET", "/item/42", Host="a.b.example.com")).name == "wild"
    assert router.route(req("GET", "/item/42x", Host="a.example.com")).name == "beta"
    assert router.route(req("GET", "/item/42", Host="example.com")).name == "beta"


def test_router_header_conditions_and_no_match() -> None:
    from ferryman.config import HeaderMatch

    router = Router(
        [
            route("exact", headers=(HeaderMatch("x-beta", value="1"),)),
            route("regex", headers=(HeaderMatch("user-agent", regex="curl/"),)),
            route("absent", headers=(HeaderMatch("authorization", absent=True),), path="/x"),
        ]
    )
    assert router.route(req("GET", "/", **{"X-Beta": "1"})).name == "exact"
    assert router.route(req("GET", "/", **{"User-Agent": "curl/8.0"})).name == "regex"
    assert router.route(req("GET", "/x")).name == "absent"
    assert router.route(req("GET", "/x", Authorization="Bearer t")) is None
    assert router.route(req("GET", "/", **{"X-Beta": "2"})) is None


def test_router_caches_host_candidates_boundedly() -> None:
    router = Router([route("a", hosts=("a.example",)), route("any")])
    for i in range(5000):
        router.route(req("GET", "/", Host=f"h{i}.example"))
    assert len(router._by_host) <= 4096
    assert router.route(req("GET", "/", Host="a.example")).name == "a"


# -- the proxy over sockets ----------------------------------------------------------------


@pytest.fixture
def origins() -> Iterator[tuple[OriginServer, OriginServer]]:
    a, b = OriginServer().start(), OriginServer().start()
    yield a, b
    a.stop()
    b.stop()


def run(text: str, tmp_path: Path) -> tuple[ConfigProxy, ProxyHarness]:
    config = parse_config(text, str(tmp_path / "ferryman.yaml"))
    proxy = ConfigProxy(config)
    harness = ProxyHarness(proxy, listeners=[Listener(f"127.0.0.1:{config.listeners[0].bind[1]}")])
    return proxy, harness.start()


def get(port: int, path: str = "/", **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_unneeded_hooks_are_not_called(tmp_path: Path, origins: tuple[OriginServer, ...]) -> None:
    port = free_port()
    plain, _ = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{origins[0].address}"]}}}}\n',
        tmp_path,
    )
    assert "upstream_request_filter" not in plain.overridden
    assert "response_filter" not in plain.overridden
    assert "upstream_peer" in plain.overridden and "logging" in plain.overridden

    class Sub(ConfigProxy):
        def response_filter(self, session, response, ctx):  # type: ignore[no-untyped-def]
            response.headers.set("X-Sub", "1")

    sub = Sub(plain.config)
    assert "response_filter" in sub.overridden  # a subclass's own override is kept


def test_retry_fails_over_and_inflight_returns_to_zero(
    tmp_path: Path, origins: tuple[OriginServer, ...]
) -> None:
    port, dead = free_port(), free_port()
    proxy, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        "upstreams: {app: {lb: least_conn, max_retries: 1, "
        f'servers: ["127.0.0.1:{dead}", "{origins[0].address}"]}}}}\n',
        tmp_path,
    )
    try:
        for _ in range(10):
            assert get(harness.port)[0] == 200
        backends = proxy.groups["app"].balancer.backends
        assert [b.inflight for b in backends] == [0, 0]
        dead_backend = proxy.groups["app"].balancer.get(f"127.0.0.1:{dead}")
        assert dead_backend is not None
        # passive health: 3 consecutive refused connects ejected it
        assert dead_backend.ejected_until > time.monotonic()
    finally:
        harness.stop()


def test_all_servers_down_response_says_why(tmp_path: Path) -> None:
    port, d1, d2 = free_port(), free_port(), free_port()
    proxy, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        "upstreams: {app: {max_retries: 1, "
        f'servers: ["127.0.0.1:{d1}", "127.0.0.1:{d2}"], '
        "health_check: {type: tcp, interval: 100ms, timeout: 100ms, fall: 1, rise: 1}}}\n",
        tmp_path,
    )
    try:
        balancer = proxy.groups["app"].balancer
        deadline = time.monotonic() + 5
        while any(b.healthy for b in balancer.backends) and time.monotonic() < deadline:
            time.sleep(0.05)
        status, headers, body = get(harness.port)
        assert status == 502
        text = body.decode()
        assert text.startswith("502 Bad Gateway\n")
        assert 'upstream "app"' in text
        assert "every server of the group was marked down, tried anyway" in text
        assert f"127.0.0.1:{d1} down: connection refused" in text
        assert f"127.0.0.1:{d2} down: connection refused" in text
        assert "also tried: " in text
    finally:
        harness.stop()


def test_subclass_that_skips_routing_still_proxies(
    tmp_path: Path, origins: tuple[OriginServer, ...]
) -> None:
    port = free_port()
    config = parse_config(
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{origins[0].address}"]}}}}\n',
        "x.yaml",
    )

    class Own(ConfigProxy):
        def request_filter(self, session, ctx):  # type: ignore[no-untyped-def]
            return False  # does not call ConfigProxy.request_filter

    harness = ProxyHarness(Own(config), listeners=[Listener(f"127.0.0.1:{port}")]).start()
    try:
        assert get(harness.port)[0] == 200
    finally:
        harness.stop()


def test_no_route_is_404_and_local_actions(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "a.txt").write_text("file a\n")
    _, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", routes: [\n'
        '  {match: {path: "/r"}, redirect: {to: "/new$path", status: 308}},\n'
        '  {match: {path: "/f"}, respond: {status: 418, body: "tea\\n"},'
        "   response_headers: {add: {X-A: '1'}}},\n"
        '  {match: {path_prefix: "/files"}, static: {root: site}},\n'
        '  {match: {path_prefix: "/"}, static: {root: site}},\n'
        "]}]\n",
        tmp_path,
    )
    try:
        status, headers, _ = get(harness.port, "/r?q=1")
        assert status == 308 and headers["location"] == "/new/r?q=1"
        status, headers, body = get(harness.port, "/f")
        assert (status, body, headers["x-a"]) == (418, b"tea\n", "1")
        assert headers["content-type"] == "text/plain; charset=utf-8"
        status, _, body = get(harness.port, "/a.txt")
        assert (status, body) == (200, b"file a\n")
    finally:
        harness.stop()
    port2 = free_port()
    _, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port2}", routes: ['
        '{match: {path: "/only"}, respond: {status: 204}}]}]\n',
        tmp_path,
    )
    try:
        status, _, body = get(harness.port, "/other")
        assert status == 404 and body == b"404 Not Found: no route for this request\n"
        assert get(harness.port, "/only")[0] == 204
    finally:
        harness.stop()


# -- review findings: routing cannot be bypassed, paths and Locations are normalised -------


def raw_request(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_absolute_form_and_climbing_paths_cannot_bypass_a_route(
    tmp_path: Path, origins: tuple[OriginServer, ...]
) -> None:
    port = free_port()
    _, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", routes: [\n'
        '  {match: {path_prefix: "/admin"}, respond: {status: 403, body: "no\\n"}},\n'
        '  {match: {host: "internal.example"}, respond: {status: 403, body: "internal\\n"}},\n'
        f'  {{match: {{path_prefix: "/"}}, upstream: app}}]}}]\n'
        f'upstreams: {{app: {{servers: ["{origins[0].address}"]}}}}\n',
        tmp_path,
    )
    try:
        def ask(target: bytes, host: bytes = b"x") -> bytes:
            return raw_request(
                harness.port,
                b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
            )

        assert ask(b"http://a/admin").startswith(b"HTTP/1.1 403")
        assert ask(b"http://internal.example/x").startswith(b"HTTP/1.1 403")
        assert ask(b"/x/../admin").startswith(b"HTTP/1.1 403")
        assert ask(b"/%61dmin").startswith(b"HTTP/1.1 403")
        assert ask(b"/../admin").startswith(b"HTTP/1.1 400")
        assert ask(b"/%2e%2e/admin").startswith(b"HTTP/1.1 400")
        ok = ask(b"http://a/public?x=1")
        assert ok.startswith(b"HTTP/1.1 200")
        # the origin got origin-form with the URL's authority as Host
        method, path, headers = origins[0].requests[-1]
        assert path == "/public?x=1" and dict(headers)["Host"] == "a"
        assert not any("admin" in p for _, p, _ in origins[0].requests)
    finally:
        harness.stop()


def test_strip_prefix_works_on_the_normalised_path(
    tmp_path: Path, origins: tuple[OriginServer, ...]
) -> None:
    port = free_port()
    _, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", routes: [\n'
        '  {match: {path_prefix: "/api"}, upstream: app, strip_prefix: "/api"}]}]\n'
        f'upstreams: {{app: {{servers: ["{origins[0].address}"]}}}}\n',
        tmp_path,
    )
    try:
        for target in (b"/api/x?q=1", b"/%61pi/x?q=1", b"/api/./x?q=1", b"/api//x?q=1"):
            head = b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            reply = raw_request(harness.port, b"GET " + target + head)
            assert reply.startswith(b"HTTP/1.1 200"), target
            assert origins[0].requests[-1][1] == "/x?q=1", target
    finally:
        harness.stop()


def test_locations_never_point_to_another_host(tmp_path: Path) -> None:
    port = free_port()
    site = tmp_path / "site"
    (site / "assets").mkdir(parents=True)
    _, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", routes: [\n'
        '  {match: {path_prefix: "/go"}, redirect: {to: "/$path", status: 302}},\n'
        '  {match: {path_prefix: "/"}, static: {root: site}}]}]\n',
        tmp_path,
    )
    try:
        reply = raw_request(
            harness.port,
            b"GET //evil.example/%2e%2e/assets HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 301")
        assert b"\r\nLocation: /assets/\r\n" in reply
        status, headers, _ = get(harness.port, "/go/x?a=1")
        assert status == 302 and headers["location"] == "/go/x?a=1"
    finally:
        harness.stop()


def test_204_has_no_content_length(tmp_path: Path) -> None:
    port = free_port()
    _, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", routes: ['
        '{match: {path: "/n"}, respond: {status: 204}}]}]\n',
        tmp_path,
    )
    try:
        head = b"GET /n HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        reply = raw_request(harness.port, head)
        assert reply.startswith(b"HTTP/1.1 204")
        assert b"content-length" not in reply.lower()
    finally:
        harness.stop()


class HangUp:
    """Accepts, reads a request, closes without answering (a server dying mid-request)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    if conn.recv(65536):
                        self.requests += 1
                except OSError:
                    pass

    def stop(self) -> None:
        self.sock.close()


def test_idempotent_request_moves_on_when_a_server_fails_before_answering(
    tmp_path: Path, origins: tuple[OriginServer, ...]
) -> None:
    hangup = HangUp()
    port = free_port()
    proxy, harness = run(
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        "upstreams: {app: {max_retries: 1, passive: {max_fails: 0}, "
        f'servers: ["127.0.0.1:{hangup.port}", "{origins[0].address}"]}}}}\n',
        tmp_path,
    )
    try:
        for _ in range(4):  # round robin: the hanging server is tried first in turn
            assert get(harness.port)[0] == 200
        assert hangup.requests >= 2  # ...and each time the request moved on to the origin
        before_hangup = hangup.requests
        posts_before = sum(1 for m, _, _ in origins[0].requests if m == "POST")
        statuses = []
        for _ in range(4):  # a POST may have been acted on: never sent twice
            conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=10)
            conn.request("POST", "/echo", body=b"x")
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            conn.close()
        posts = sum(1 for m, _, _ in origins[0].requests if m == "POST") - posts_before
        failed = hangup.requests - before_hangup
        assert failed >= 1 and posts + failed == 4
        assert statuses.count(502) == failed and statuses.count(200) == posts
    finally:
        harness.stop()
        hangup.stop()


def _plain_path_end_by_find(raw: bytes) -> int:
    """The definition plain_path_end implements, spelled with bytes.find."""
    if raw[:1] != b"/":
        return -1
    q = raw.find(b"?")
    path = raw if q < 0 else raw[:q]
    if path.find(b"%") >= 0 or path.find(b"/.") >= 0 or path.find(b"//") >= 0:
        return -1
    return len(path)


def test_plain_path_end_agrees_with_its_definition() -> None:
    rng = random.Random(7)
    alphabet = b"/.%?ab=&"
    cases = [b"", b"/", b"*", b"a/b", b"/?", b"/a?b/../c", b"/a//b", b"/a/.b", b"/%2e", b"//"]
    for _ in range(5000):
        cases.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
    for raw in cases:
        assert plain_path_end(raw) == _plain_path_end_by_find(raw), raw
