"""The runnable examples in examples/ behave as their docstrings say."""

from __future__ import annotations

import http.client
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from harness import ProxyHarness
from origin import OriginServer, free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def two_origins() -> Iterator[tuple[OriginServer, OriginServer]]:
    a, b = OriginServer().start(), OriginServer().start()
    yield a, b
    a.stop()
    b.stop()


def test_load_balancer_round_robin_and_failover(
    two_origins: tuple[OriginServer, OriginServer],
) -> None:
    a, b = two_origins
    lb = load_example("load_balancer")
    dead = f"127.0.0.1:{free_port()}"
    proxy = lb.LoadBalancer([a.address, dead, b.address])
    harness = ProxyHarness(proxy).start()
    try:
        for _ in range(6):
            status, _, body = get(harness.port, "/")
            assert status == 200 and body == b"hello world\n"
        # the dead server is skipped by failover: both live origins got requests
        assert len(a.requests) >= 2 and len(b.requests) >= 2
        assert len(a.requests) + len(b.requests) == 6
        tried = [dict(h).get("X-Tried", "") for _, _, h in a.requests + b.requests]
        assert any(dead in t for t in tried), tried
    finally:
        harness.stop()


def test_gateway_auth_routing_and_headers(two_origins: tuple[OriginServer, OriginServer]) -> None:
    api, default = two_origins
    gw = load_example("gateway")
    harness = ProxyHarness(gw.Gateway(api.address, default.address, "secret")).start()
    try:
        status, headers, body = get(harness.port, "/login")
        assert status == 403 and body == b"forbidden\n"
        assert not api.requests and not default.requests
        status, headers, _ = get(harness.port, "/login", {"Authorization": "Bearer secret"})
        assert status == 200 and headers["server"] == "ferryman-gateway"
        assert [p for _, p, _ in default.requests] == ["/login"]
        status, _, _ = get(harness.port, "/api/users")
        assert status == 200 and [p for _, p, _ in api.requests] == ["/api/users"]
    finally:
        harness.stop()


def test_modify_response_json_to_yaml() -> None:
    mr = load_example("modify_response")
    origin = OriginServer().start()  # /headers answers application/json
    harness = ProxyHarness(mr.JsonToYaml(origin.address)).start()
    try:
        status, headers, body = get(harness.port, "/headers")
        assert status == 200
        assert headers["content-type"] == "application/yaml"
        assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
        data = yaml.safe_load(body)
        assert ["Host", f"127.0.0.1:{harness.port}"] in data
        json.dumps(data)  # it is the same document, as YAML
        status, headers, body = get(harness.port, "/")  # text/plain passes untouched
        assert status == 200 and body == b"hello world\n"
        assert headers["content-type"] == "text/plain"
    finally:
        harness.stop()
        origin.stop()


def test_health_checked_lb_skips_a_dead_server(
    two_origins: tuple[OriginServer, OriginServer],
) -> None:
    a, b = two_origins
    ex = load_example("health_checked_lb")
    dead = ("127.0.0.1", free_port())
    servers = [(("127.0.0.1", a.port), 1), (dead, 1), (("127.0.0.1", b.port), 1)]
    proxy = ex.HealthCheckedBalancer(servers, interval=0.1)
    harness = ProxyHarness(proxy).start()
    try:
        # failover covers the dead server before the checks have marked it down...
        for _ in range(6):
            status, _, body = get(harness.port, "/")
            assert status == 200 and body == b"hello world\n"
        # ...and once they have (fall=2 at 0.1 s), it gets no attempts at all
        deadline = time.monotonic() + 5
        dead_backend = proxy.lb.get(f"127.0.0.1:{dead[1]}")
        while dead_backend.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dead_backend.healthy and "refused" in dead_backend.reason
        before = len(a.requests) + len(b.requests)
        for _ in range(10):
            assert get(harness.port, "/")[0] == 200
        served = [p for _, p, _ in a.requests + b.requests if p == "/"]
        assert len(a.requests) + len(b.requests) - before >= 10 and len(served) == 16
        assert all(backend.inflight == 0 for backend in proxy.lb.backends)
    finally:
        harness.stop()


def test_rate_limiter_in_process() -> None:
    """The hook-based limiter: 3 per window per appid, 429 with Retry-After and
    RateLimit-* beyond, another appid unaffected, no appid: 400; admitted responses carry
    the fields too."""
    origin = OriginServer().start()
    rl = load_example("rate_limiter")
    harness = ProxyHarness(rl.RateLimitedProxy(origin.address, "3/m")).start()
    try:
        got = [get(harness.port, "/", {"appid": "inproc-a"}) for _ in range(4)]
        assert [s for s, _, _ in got] == [200, 200, 200, 429]
        assert [h["ratelimit-remaining"] for _, h, _ in got] == ["2", "1", "0", "0"]
        assert got[0][2] == b"hello world\n" and got[3][2] == b"slow down\n"
        assert 1 <= int(got[3][1]["retry-after"]) <= 60
        assert got[3][1]["ratelimit-policy"] == "3;w=60"
        assert get(harness.port, "/", {"appid": "inproc-b"})[0] == 200
        status, _, body = get(harness.port, "/")
        assert (status, body) == (400, b"an appid header is required\n")
        assert len(origin.requests) == 4
    finally:
        harness.stop()
        origin.stop()


def test_rate_limiter_shared_by_two_workers() -> None:
    """Run as the docstring says, with two workers: the limiter made in __init__ (before
    the fork) counts for the server as a whole — 3 of 12 requests on new connections
    pass, not 3 per worker."""
    origin = OriginServer().start()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "rate_limiter.py"), "--listen", f"127.0.0.1:{port}",
         "--upstream", origin.address, "--rate", "3/m", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the example did not start"
                time.sleep(0.05)
        statuses = [
            get(port, "/", {"appid": "forked", "Connection": "close"})[0] for _ in range(12)
        ]
        assert statuses == [200] * 3 + [429] * 9
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        origin.stop()
    assert proc.returncode == 0 and b"Traceback" not in err, err


def test_modify_response_decodes_a_compressed_json_body() -> None:
    """The origin sends gzip-encoded JSON: the example decodes it (decode_response) and
    answers plain YAML; a corrupt gzip body breaks the response off (its head was sent
    already), never passes as a complete one."""
    import gzip
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    document = {"name": "ferryman", "items": list(range(50))}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = gzip.compress(json.dumps(document).encode())
            if self.path == "/corrupt":
                body = body[:10] + b"garbage" + body[17:]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mr = load_example("modify_response")
    harness = ProxyHarness(mr.JsonToYaml(f"127.0.0.1:{server.server_port}")).start()
    try:
        status, headers, body = get(harness.port, "/doc")
        assert status == 200 and headers["content-type"] == "application/yaml"
        assert "content-encoding" not in headers
        assert yaml.safe_load(body) == document
        with pytest.raises(http.client.IncompleteRead):
            get(harness.port, "/corrupt")
    finally:
        harness.stop()
        server.shutdown()
        server.server_close()
