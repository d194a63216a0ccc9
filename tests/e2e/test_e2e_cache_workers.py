"""The cache across the worker processes of one server: a disk storage shared by the
workers (also when they run as another user), the cross-worker cache lock, and the
cache's counters in /metrics. The real ``ferryman run`` CLI, a real origin, real clients."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import pwd
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from e2e_util import ProxyProcess, start_ferryman
from prometheus_client.parser import text_string_to_metric_families

from origin import free_port


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SlowOrigin

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.server.lock:
            self.server.counts[url.path] = self.server.counts.get(url.path, 0) + 1
            n = self.server.counts[url.path]
        time.sleep(float(q.get("delay", "0")))
        body = f"{url.path} #{n}\n".encode() * 100
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=300")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class SlowOrigin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}


@pytest.fixture
def slow_origin() -> Iterator[SlowOrigin]:
    server = SlowOrigin()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _get(port: int, path: str) -> tuple[int, bytes, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Cache-Status")
    finally:
        conn.close()


def _start(tmp_path: Path, origin: SlowOrigin, cache: str, server: str = "") -> ProxyProcess:
    port = free_port()
    text = (
        f"server: {{workers: 2{server}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", routes: [{{name: cached, upstream: app, '
        f"cache: {cache}}}]}}]\n"
        f'upstreams: {{app: {{servers: ["127.0.0.1:{origin.server_port}"], '
        f"timeouts: {{read: 10s}}}}}}\n"
    )
    return start_ferryman(tmp_path / "ferryman", text, port)


def _stop(proxy: ProxyProcess) -> None:
    code = proxy.stop(signal.SIGTERM)
    log = proxy.log_text()
    assert code == 0 and "Traceback" not in log, log


def test_concurrent_misses_across_workers_reach_the_origin_once(
    tmp_path: Path, slow_origin: SlowOrigin
) -> None:
    cache_dir = tmp_path / "cache"
    proxy = _start(tmp_path, slow_origin, f"{{storage: disk, path: {cache_dir}}}")
    try:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            results = list(pool.map(lambda _: _get(proxy.port, "/one?delay=1"), range(100)))
        bodies = {body for _, body, _ in results}
        assert {status for status, _, _ in results} == {200}
        assert bodies == {b"/one #1\n" * 100}
        assert slow_origin.counts == {"/one": 1}
        stored = [s for _, _, s in results if s and s.endswith("stored")]
        assert len(stored) == 1, [s for _, _, s in results]
        # the other 99 waited for the fetch: in its worker on the cache lock, in the other
        # worker on the disk storage's fill lock
        assert all("collapsed" in s for _, _, s in results if s not in stored)
    finally:
        _stop(proxy)


def test_disk_cache_made_by_root_serves_workers_running_as_nobody(
    tmp_path: Path, slow_origin: SlowOrigin
) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    if os.geteuid() != 0:
        pytest.skip("needs root (server.user)")
    # (pytest's tmp_path is in a root-only directory: nobody could not reach it)
    top = Path(tempfile.mkdtemp(prefix="ferryman-cache-"))
    top.chmod(0o755)
    cache_dir = top / "cache"
    cache_dir.mkdir()
    (cache_dir / "x").mkdir()  # (made by root before: handed over too)
    proxy = _start(tmp_path, slow_origin, f"{{storage: disk, path: {cache_dir}}}",
                   ", user: nobody")  # fmt: skip
    try:
        first = _get(proxy.port, "/owned")
        assert first[0] == 200 and first[2] is not None and first[2].endswith("stored")
        for _ in range(6):  # new connections: both workers
            status, body, cache_status = _get(proxy.port, "/owned")
            assert (status, body) == (200, b"/owned #1\n" * 100)
            assert cache_status is not None and "; hit; " in cache_status
        assert slow_origin.counts == {"/owned": 1}
        files = [p for p in cache_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert files and all(p.stat().st_uid == nobody.pw_uid for p in files)
        assert (cache_dir / "x").stat().st_uid == nobody.pw_uid
    finally:
        _stop(proxy)
        shutil.rmtree(top, ignore_errors=True)


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def test_cache_results_are_counted_in_the_metrics(
    tmp_path: Path, slow_origin: SlowOrigin
) -> None:
    metrics_port = free_port()
    proxy = _start(tmp_path, slow_origin, "{storage: memory, purge: [127.0.0.1]}",
                   f", metrics: 127.0.0.1:{metrics_port}")  # fmt: skip
    try:
        outcomes: dict[str, int] = {}
        for i in range(30):
            _, _, cache_status = _get(proxy.port, f"/m{i % 3}")
            assert cache_status is not None
            kind = "hit" if "; hit" in cache_status else "miss"
            outcomes[kind] = outcomes.get(kind, 0) + 1
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        conn.request("PURGE", "/m0")
        assert conn.getresponse().status == 200
        conn.close()

        def counted(result: str) -> float:
            key = frozenset({("route", "cached"), ("result", result)})
            return _scrape(metrics_port).get(("ferryman_cache_requests_total", key), 0.0)

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and counted("purge") < 1:
            time.sleep(0.1)
        assert counted("hit") == outcomes["hit"]
        assert counted("miss") == outcomes["miss"] and 3 <= outcomes["miss"] <= 6
        assert counted("purge") == 1
    finally:
        _stop(proxy)
