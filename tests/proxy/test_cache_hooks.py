"""The cache phase's hooks, as a library user overrides them (plain and async forms),
over real sockets: a proxy in a thread, a counting origin, http.client."""

from __future__ import annotations

import asyncio
import http.client
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from ferryman import HttpPeer, ProxyHttp
from ferryman.cache.http_cache import HttpCache
from ferryman.cache.memory import MemoryStorage


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingOrigin

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.server.lock:
            self.server.seen.append((url.path, dict(self.headers.items())))
            n = sum(1 for p, _ in self.server.seen if p == url.path)
        if self.server.failing:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = f"{url.path} #{n} ae={self.headers.get('Accept-Encoding')}\n".encode()
        etag = '"e1"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Cache-Control", q.get("cc", "max-age=60"))
        self.send_header("ETag", etag)
        if "vary" in q:
            self.send_header("Vary", q["vary"])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class CountingOrigin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.failing = False

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.seen if p == path)


@pytest.fixture
def counting_origin() -> Iterator[CountingOrigin]:
    server = CountingOrigin()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.headers
    finally:
        conn.close()


class CachingProxy(ProxyHttp):
    """Caches everything under /c/; plain hooks (the engine's sync mode)."""

    def __init__(self, origin: CountingOrigin) -> None:
        self.peer = HttpPeer(f"127.0.0.1:{origin.server_port}")
        self.cache = HttpCache(MemoryStorage(1 << 22))
        self.misses: list[str] = []

    def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer

    def request_cache_filter(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.cache if session.req_header.path.startswith("/c/") else None

    def cache_key_callback(self, session, ctx):  # type: ignore[no-untyped-def]
        # the query does not count, except its "v"
        path, _, query = session.req_header.raw_path.partition(b"?")
        version = [p for p in query.split(b"&") if p.startswith(b"v=")]
        return path + b"|" + b"".join(version)

    def cache_hit_filter(self, session, meta, ctx):  # type: ignore[no-untyped-def]
        return session.req_header.headers.get(b"x-force") is not None

    def cache_miss(self, session, ctx):  # type: ignore[no-untyped-def]
        self.misses.append(session.req_header.path.partition("?")[0])

    def response_cache_filter(self, session, response, ctx):  # type: ignore[no-untyped-def]
        if session.req_header.path.startswith("/c/forced"):
            return 30.0  # stored whatever the origin says
        cc = response.headers.get(b"cache-control") or b""
        if b"no-store" in cc:
            return None
        return 60.0

    def cache_vary_filter(self, session, fields, ctx):  # type: ignore[no-untyped-def]
        ae = session.req_header.headers.get(b"accept-encoding") or b""
        return b"gzip" if b"gzip" in ae else b"identity"

    def should_serve_stale(self, session, ctx, error):  # type: ignore[no-untyped-def]
        return error is not None  # stale on any failure, never stale-while-revalidate


class AsyncCachingProxy(CachingProxy):
    """The same hooks as ``async def`` (the engine's task mode)."""

    async def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return CachingProxy.upstream_peer(self, session, ctx)

    async def request_cache_filter(self, session, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return CachingProxy.request_cache_filter(self, session, ctx)

    async def cache_key_callback(self, session, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return CachingProxy.cache_key_callback(self, session, ctx)

    async def cache_hit_filter(self, session, meta, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return CachingProxy.cache_hit_filter(self, session, meta, ctx)

    async def cache_miss(self, session, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        CachingProxy.cache_miss(self, session, ctx)

    async def response_cache_filter(self, session, response, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return CachingProxy.response_cache_filter(self, session, response, ctx)

    async def should_serve_stale(self, session, ctx, error):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        return CachingProxy.should_serve_stale(self, session, ctx, error)


@pytest.fixture(params=["sync", "async"])
def caching(request, counting_origin, start_proxy):  # type: ignore[no-untyped-def]
    cls = CachingProxy if request.param == "sync" else AsyncCachingProxy
    proxy = cls(counting_origin)
    assert (proxy.async_hooks == frozenset()) is (request.param == "sync")
    harness = start_proxy(proxy)
    return proxy, harness, counting_origin


def test_async_cache_vary_filter_is_refused() -> None:
    with pytest.raises(TypeError, match="cache_vary_filter must be a plain function"):

        class Bad(ProxyHttp):
            async def cache_vary_filter(self, session, fields, ctx):  # type: ignore[no-untyped-def]
                return b""


def test_without_request_cache_filter_nothing_is_cached(caching) -> None:  # type: ignore[no-untyped-def]
    proxy, harness, origin = caching
    for _ in range(2):
        status, _, headers = get(harness.port, "/n/a")
        assert status == 200 and headers["Cache-Status"] is None
    assert origin.count("/n/a") == 2


def test_cache_key_callback_and_cache_miss(caching) -> None:  # type: ignore[no-untyped-def]
    proxy, harness, origin = caching
    first = get(harness.port, "/c/k?utm=1")
    second = get(harness.port, "/c/k?utm=2")
    third = get(harness.port, "/c/k?v=2")
    assert first[1] == second[1] == b"/c/k #1 ae=identity\n"
    assert re.fullmatch(r"ferryman; hit; ttl=5[89]", second[2]["Cache-Status"])
    assert third[1] == b"/c/k #2 ae=identity\n"  # another key
    assert origin.count("/c/k") == 2
    assert proxy.misses == ["/c/k", "/c/k"]


def test_cache_hit_filter_forces_a_revalidation(caching) -> None:  # type: ignore[no-untyped-def]
    proxy, harness, origin = caching
    get(harness.port, "/c/h")
    status, body, headers = get(harness.port, "/c/h", {"X-Force": "1"})
    assert (status, body) == (200, b"/c/h #1 ae=identity\n")
    assert re.fullmatch(
        r"ferryman; fwd=request; fwd-status=304; ttl=5[89]", headers["Cache-Status"]
    )
    assert origin.seen[-1][1].get("If-None-Match") == '"e1"'
    assert origin.count("/c/h") == 2


def test_response_cache_filter_decides(caching) -> None:  # type: ignore[no-untyped-def]
    proxy, harness, origin = caching
    for _ in range(2):
        get(harness.port, "/c/never?cc=no-store")
        get(harness.port, "/c/forced?cc=no-store")
        status, _, headers = get(harness.port, "/c/short?cc=max-age%3D1")
    assert origin.count("/c/never") == 2
    assert origin.count("/c/forced") == 1
    assert origin.count("/c/short") == 1  # the hook's 60 s, not the origin's 1 s
    assert re.fullmatch(r"ferryman; hit; ttl=5[89]", headers["Cache-Status"])


def test_cache_vary_filter_normalises_variants(caching) -> None:  # type: ignore[no-untyped-def]
    proxy, harness, origin = caching
    path = "/c/v?vary=Accept-Encoding"
    a = get(harness.port, path, {"Accept-Encoding": "gzip, br"})
    b = get(harness.port, path, {"Accept-Encoding": "gzip"})
    c = get(harness.port, path, {"Accept-Encoding": "br"})
    d = get(harness.port, path)
    assert a[1] == b[1] == b"/c/v #1 ae=gzip, br\n"
    assert c[1] == d[1] == b"/c/v #2 ae=br\n"
    assert origin.count("/c/v") == 2


def test_should_serve_stale_on_error(caching) -> None:  # type: ignore[no-untyped-def]
    proxy, harness, origin = caching
    get(harness.port, "/c/forced-stale")  # 30 s fresh (response_cache_filter)
    harness.call(lambda: _age_everything(proxy.cache, 100.0))
    origin.failing = True
    status, body, headers = get(harness.port, "/c/forced-stale")
    assert (status, body) == (200, b"/c/forced-stale #1 ae=identity\n")
    assert re.fullmatch(
        r"ferryman; fwd=stale; fwd-status=503; ttl=-7[01]; detail=stale-if-error",
        headers["Cache-Status"],
    )


def _age_everything(cache: HttpCache, seconds: float) -> None:
    storage = cache.storage
    assert isinstance(storage, MemoryStorage)
    for shard in storage._shards:
        for node in shard.index.values():
            meta = node.entry.meta
            meta.request_time -= seconds
            meta.response_time -= seconds
            meta.headers = [(n, v) for n, v in meta.headers if n.lower() != b"date"]


def test_purge_api_from_python(caching) -> None:  # type: ignore[no-untyped-def]
    proxy, harness, origin = caching
    get(harness.port, "/c/p1")
    get(harness.port, "/c/p2")

    async def purge() -> int:
        return await proxy.cache.purge_key(b"/c/p1|")

    assert asyncio.run_coroutine_threadsafe(purge(), harness.loop).result(5) == 1
    get(harness.port, "/c/p1")
    get(harness.port, "/c/p2")
    assert (origin.count("/c/p1"), origin.count("/c/p2")) == (2, 1)


class FilteringProxy(AsyncCachingProxy):
    async def response_filter(self, session, response, ctx):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        response.headers.set(b"X-Filtered", session.cache_status or "none")


def test_an_async_response_filter_runs_on_hits_too(counting_origin, start_proxy) -> None:  # type: ignore[no-untyped-def]
    harness = start_proxy(FilteringProxy(counting_origin))
    first = get(harness.port, "/c/f")
    second = get(harness.port, "/c/f")
    assert (first[2]["X-Filtered"], second[2]["X-Filtered"]) == ("MISS", "HIT")
    assert counting_origin.count("/c/f") == 1
