"""End to end: the HTTP cache (issue 8) through the real ``ferryman run`` CLI.

A programmable origin (``cache_origin.CacheOrigin``) counts the requests per path and
records what it was asked; ferryman runs with route ``cache:`` blocks in front of it; real
clients (http.client, curl) ask. Each test asserts what the origin saw and the exact
``Cache-Status`` of every answer (``ttl=`` is exact where the age is known to the second;
the origin sends no ``Date``, so a response's age is the time ferryman held it).

Most tests share one ferryman process (``env``) whose routes have different cache
configs, each test using paths of its own; tests that stop the origin, or need memory
shared by processes (Redis, disk), start their own.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cache_origin import CacheOrigin, Seen
from e2e_util import (
    ProxyProcess,
    RawConn,
    ferryman_cmd,
    raw_exchange,
    start_ferryman,
    wait_for_port,
)

from origin import free_port

pytestmark = pytest.mark.timeout(60)

MAX_AGE_60 = [("Cache-Control", "max-age=60"), ("Content-Type", "text/plain")]
MISS_STORED = "ferryman; fwd=uri-miss; fwd-status=200; stored"
PASSED = "ferryman; fwd=miss; fwd-status=200; detail=uncacheable"
MISS_NOT_STORED = "ferryman; fwd=uri-miss; fwd-status=200"
HIT_59 = "ferryman; hit; ttl=59"


# -- clients ------------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    elapsed: float

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def cs(self) -> str | None:
        """The Cache-Status value."""
        return self.header("Cache-Status")


def request(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    source: str | None = None,
    timeout: float = 10.0,
) -> Resp:
    """One request on a new connection."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Resp(resp.status, resp.getheaders(), data, time.monotonic() - started)
    finally:
        conn.close()


def ttl_of(cs: str | None) -> tuple[str, int]:
    """A Cache-Status with its ``ttl=N`` replaced by ``ttl=*``, and N."""
    assert cs is not None
    found = re.search(r"ttl=(-?\d+)", cs)
    assert found is not None, cs
    return cs.replace(found.group(0), "ttl=*"), int(found.group(1))


def stale_by(seconds: float = 1.3) -> None:
    """Wait until a ``max-age=1`` response stored just now is stale."""
    time.sleep(seconds)


# -- the shared ferryman ------------------------------------------------------------------


def _yaml(port: int, origin: str, routes: str, workers: int = 1, read: str = "5s") -> str:
    return (
        f"server: {{workers: {workers}, grace_period: 2s}}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        "    routes:\n"
        f"{routes}"
        f'upstreams: {{app: {{servers: ["{origin}"], max_retries: 0, '
        f"timeouts: {{connect: 1s, read: {read}}}}}}}\n"
    )


def _route(prefix: str, cache: str) -> str:
    return (
        f"      - match: {{path_prefix: {prefix}}}\n"
        "        upstream: app\n"
        f"        cache: {cache}\n"
    )


SHARED_ROUTES = (
    _route("/ttl/", "{max_size: 16MiB, default_ttl: 30s}")
    + _route("/lt/", "{max_size: 16MiB, lock_timeout: 1s}")
    + _route("/ign/", "{max_size: 16MiB, ignore: [set-cookie]}")
    + _route("/nopurge/", "{max_size: 16MiB, purge: [10.9.9.9]}")
    + _route("/", "{max_size: 16MiB, purge: [127.0.0.1], stale_while_revalidate: 0s}")
)


@dataclass
class Env:
    origin: CacheOrigin
    proxy: ProxyProcess

    @property
    def port(self) -> int:
        return self.proxy.port


def _stop_clean(proxy: ProxyProcess) -> None:
    code = proxy.stop(signal.SIGINT)
    log = proxy.log_text()
    assert code == 0, f"ferryman exited with {code}:\n{log}"
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    origin = CacheOrigin().start()
    port = free_port()
    proxy = start_ferryman(
        tmp_path_factory.mktemp("cache-shared"), _yaml(port, origin.address, SHARED_ROUTES),
        port,
    )
    yield Env(origin, proxy)
    try:
        _stop_clean(proxy)
    finally:
        origin.stop()


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Env]:
    """An origin and a ferryman of this test's own (the origin may be stopped)."""
    origin = CacheOrigin().start()
    port = free_port()
    proxy = start_ferryman(
        tmp_path / "ferryman",
        _yaml(port, origin.address, _route("/", "{max_size: 16MiB, purge: [127.0.0.1]}"),
              read="1s"),
        port,
    )
    yield Env(origin, proxy)
    try:
        _stop_clean(proxy)
    finally:
        try:
            origin.stop()
        except OSError:
            pass


# -- 1. hits --------------------------------------------------------------------------------


def test_second_identical_get_is_a_hit_the_origin_never_sees(env: Env) -> None:
    env.origin.route("/hit/a", headers=MAX_AGE_60, body=b"the body of a\n")
    first = request(env.port, "/hit/a")
    assert (first.status, first.body, first.cs) == (200, b"the body of a\n", MISS_STORED)
    assert first.header("Age") is None
    second = request(env.port, "/hit/a")
    assert (second.status, second.body, second.cs) == (200, b"the body of a\n", HIT_59)
    assert second.header("Age") == "0"
    assert second.header("Content-Length") == "14"
    assert second.header("Content-Type") == "text/plain"
    assert env.origin.count("/hit/a") == 1
    # a different query string is a different key
    third = request(env.port, "/hit/a?x=1")
    assert third.cs == MISS_STORED
    assert env.origin.count("/hit/a") == 2


def test_curl_sees_the_hit(env: Env) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env.origin.route("/hit/curl", headers=MAX_AGE_60, body=b"curl body")
    url = f"http://127.0.0.1:{env.port}/hit/curl"
    for expected in (MISS_STORED, HIT_59):
        out = subprocess.run(["curl", "-s", "-i", "--max-time", "10", url],
                             capture_output=True, timeout=15, check=True).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert f"\r\nCache-Status: {expected}".encode() in head
        assert body == b"curl body"
    assert env.origin.count("/hit/curl") == 1


def test_pipelined_hits_and_misses_are_answered_in_order(env: Env) -> None:
    """Hits behind a slow miss on one keep-alive connection wait their turn."""
    env.origin.route("/pipe/hit", headers=MAX_AGE_60, body=b"HITBODY")
    env.origin.route("/pipe/slow", headers=[("Cache-Control", "no-store")], body=b"SLOW",
                     delay=0.5)
    head = b" HTTP/1.1\r\nHost: pipe.example\r\n\r\n"
    first = b"GET /pipe/hit" + head
    assert raw_exchange(env.port, first, wait_close=False)[0].header("Cache-Status") == (
        MISS_STORED.encode()
    )
    with RawConn(env.port, timeout=10) as conn:
        conn.send(b"GET /pipe/slow" + head + first + b"HEAD /pipe/hit" + head + first)
        got = [conn.read_response(method) for method in (b"GET", b"GET", b"HEAD", b"GET")]
    assert [(r.status, r.body, r.header("Cache-Status")) for r in got] == [
        (200, b"SLOW", MISS_NOT_STORED.encode()),
        (200, b"HITBODY", HIT_59.encode()),
        (200, b"", HIT_59.encode()),
        (200, b"HITBODY", HIT_59.encode()),
    ]
    assert env.origin.count("/pipe/hit") == 1


# -- 2. the cache lock -----------------------------------------------------------------------


def test_concurrent_misses_for_one_key_reach_the_origin_once(env: Env) -> None:
    env.origin.route("/lock/a", headers=MAX_AGE_60, body=b"x" * 5000, delay=0.8)
    n = 100
    barrier = threading.Barrier(n)
    results: list[Resp | BaseException] = [RuntimeError("not run")] * n

    def one(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = request(env.port, "/lock/a", timeout=20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [r for r in results if not isinstance(r, Resp)]
    assert not errors, errors[:3]
    resps = [r for r in results if isinstance(r, Resp)]
    assert env.origin.count("/lock/a") == 1
    assert {(r.status, r.body) for r in resps} == {(200, b"x" * 5000)}
    statuses = [r.cs for r in resps]
    assert statuses.count(MISS_STORED) == 1
    collapsed = [ttl_of(s) for s in statuses if s != MISS_STORED]
    assert len(collapsed) == 99
    assert {s for s, _ in collapsed} == {"ferryman; hit; ttl=*; collapsed"}
    assert {t for _, t in collapsed} <= {58, 59}  # (the fetch took 0.8 s of its age)


def test_waiters_go_upstream_themselves_after_lock_timeout(env: Env) -> None:
    """``lock_timeout: 1s`` and an origin taking 1.4 s: the waiters stop waiting and
    fetch themselves (a stuck fill never stalls them for long)."""
    path = "/lt/a"
    env.origin.route(path, headers=MAX_AGE_60, body=b"slow fill", delay=1.4)
    results: list[Resp] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        barrier.wait(10)
        results.append(request(env.port, path, timeout=20))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4
    assert {(r.status, r.body) for r in results} == {(200, b"slow fill")}
    assert sorted(r.cs or "" for r in results) == [MISS_STORED] + [
        MISS_STORED + "; collapsed"
    ] * 3
    assert env.origin.count(path) == 4
    assert ttl_of(request(env.port, path).cs)[0] == "ferryman; hit; ttl=*"


# -- 3. stale-while-revalidate ------------------------------------------------------------


def test_stale_while_revalidate_answers_at_once_and_refreshes_once(env: Env) -> None:
    path = "/swr/a"
    env.origin.route(path, headers=[("Cache-Control", "max-age=1, stale-while-revalidate=30")],
                     body=b"old")
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    env.origin.route(path, headers=MAX_AGE_60, body=b"new", delay=2.0)
    started = time.monotonic()
    answers = [request(env.port, path) for _ in range(5)]  # all within the refresh window
    assert time.monotonic() - started < 1.0
    for resp in answers:
        assert (resp.status, resp.body) == (200, b"old")
        shape, ttl = ttl_of(resp.cs)
        assert shape == "ferryman; hit; ttl=*; detail=stale-while-revalidate"
        assert -2 <= ttl <= 0
        assert int(resp.header("Age") or "-1") >= 1
    time.sleep(2.6)  # the refresh (2 s at the origin) is done
    assert env.origin.count(path) == 2  # the fill and exactly one refresh
    after = request(env.port, path)
    assert (after.status, after.body) == (200, b"new")
    shape, ttl = ttl_of(after.cs)
    assert shape == "ferryman; hit; ttl=*"
    assert 55 <= ttl <= 57  # (the refresh's 2 s count in its age)
    assert env.origin.count(path) == 2


def test_stale_while_revalidate_window_over_means_a_wait(env: Env) -> None:
    """Past ``stale-while-revalidate`` the request waits for the origin."""
    path = "/swr/over"
    env.origin.route(path, headers=[("Cache-Control", "max-age=1, stale-while-revalidate=1")],
                     body=b"old")
    assert request(env.port, path).cs == MISS_STORED
    stale_by(2.3)
    env.origin.route(path, headers=MAX_AGE_60, body=b"new")
    resp = request(env.port, path)
    assert (resp.status, resp.body, resp.cs) == (
        200, b"new", "ferryman; fwd=stale; fwd-status=200; stored"
    )
    assert env.origin.count(path) == 2


def test_stale_while_revalidate_refresh_revalidates_with_the_etag(env: Env) -> None:
    """The background refresh is conditional; its 304 makes the entry fresh again."""
    path = "/swr/etag"
    env.origin.route(
        path, headers=[("Cache-Control", "max-age=1, stale-while-revalidate=30"),
                       ("ETag", '"s1"')],
        body=b"kept", not_modified_headers=[("Cache-Control", "max-age=60")],
    )
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    env.origin.replies[path].delay = 1.0
    resp = request(env.port, path)
    assert (resp.status, resp.body) == (200, b"kept")
    assert resp.elapsed < 0.9
    assert ttl_of(resp.cs)[0] == "ferryman; hit; ttl=*; detail=stale-while-revalidate"
    time.sleep(1.5)
    assert [s.header("if-none-match") for s in env.origin.requests(path)] == [None, '"s1"']
    resp = request(env.port, path)
    assert (resp.status, resp.body, resp.header("Cache-Control")) == (200, b"kept", "max-age=60")
    shape, ttl = ttl_of(resp.cs)
    assert (shape, 57 <= ttl <= 59) == ("ferryman; hit; ttl=*", True)
    assert env.origin.count(path) == 2


# -- 4. stale-if-error --------------------------------------------------------------------


def test_stale_if_error_answers_when_the_origin_fails_with_503(env: Env) -> None:
    sie, plain = "/sie/a", "/sie/plain"
    env.origin.route(sie, headers=[("Cache-Control", "max-age=1, stale-if-error=60")],
                     body=b"kept")
    env.origin.route(plain, headers=[("Cache-Control", "max-age=1")], body=b"plain")
    assert request(env.port, sie).cs == MISS_STORED
    assert request(env.port, plain).cs == MISS_STORED
    stale_by()
    env.origin.route(sie, status=503, body=b"down")
    env.origin.route(plain, status=503, body=b"down")
    resp = request(env.port, sie)
    assert (resp.status, resp.body) == (200, b"kept")
    shape, ttl = ttl_of(resp.cs)
    assert shape == "ferryman; fwd=stale; fwd-status=503; ttl=*; detail=stale-if-error"
    assert -2 <= ttl <= 0
    assert env.origin.count(sie) == 2
    # without stale-if-error the 503 passes through; the stale entry is kept (a 5xx is
    # transient), so the next request revalidates it
    resp = request(env.port, plain)
    assert (resp.status, resp.body, resp.cs) == (
        503, b"down", "ferryman; fwd=stale; fwd-status=503"
    )
    env.origin.route(plain, headers=[("Cache-Control", "max-age=60")], body=b"back")
    resp = request(env.port, plain)
    assert (resp.status, resp.body, resp.cs) == (
        200, b"back", "ferryman; fwd=stale; fwd-status=200; stored"
    )


def test_stale_if_error_answers_when_the_origin_is_down(private: Env) -> None:
    origin = private.origin
    origin.route("/sie/b", headers=[("Cache-Control", "max-age=1, stale-if-error=60")],
                 body=b"kept b")
    origin.route("/sie/none", headers=[("Cache-Control", "max-age=1")], body=b"gone")
    assert request(private.port, "/sie/b").cs == MISS_STORED
    assert request(private.port, "/sie/none").cs == MISS_STORED
    stale_by()
    # the origin too slow (past the 1 s read timeout)
    origin.route("/sie/b", headers=[("Cache-Control", "max-age=1, stale-if-error=60")],
                 body=b"too late", delay=1.5)
    resp = request(private.port, "/sie/b")
    assert (resp.status, resp.body) == (200, b"kept b")
    assert ttl_of(resp.cs)[0] == "ferryman; fwd=stale; ttl=*; detail=stale-if-error"
    origin.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", origin.port), timeout=1).close()
    resp = request(private.port, "/sie/b")
    assert (resp.status, resp.body) == (200, b"kept b")
    shape, _ = ttl_of(resp.cs)
    assert shape == "ferryman; fwd=stale; ttl=*; detail=stale-if-error"
    resp = request(private.port, "/sie/none")
    assert resp.status == 502
    # a fresh miss with the origin down is an error too, never a cached answer
    assert request(private.port, "/sie/never").status == 502


# -- 5. Vary -----------------------------------------------------------------------------------


def test_vary_accept_encoding_keeps_variants_apart(env: Env) -> None:
    path = "/vary/a"

    def body(seen: Seen) -> bytes:
        return b"GZIP-BODY" if "gzip" in (seen.header("accept-encoding") or "") else (
            b"IDENTITY-BODY"
        )

    env.origin.route(path, headers=[*MAX_AGE_60, ("Vary", "Accept-Encoding")], body=body)
    gz = {"Accept-Encoding": "gzip"}
    ident = {"Accept-Encoding": "identity"}
    first = request(env.port, path, headers=gz)
    assert (first.body, first.cs) == (b"GZIP-BODY", MISS_STORED)
    second = request(env.port, path, headers=ident)
    assert (second.body, second.cs) == (
        b"IDENTITY-BODY", "ferryman; fwd=vary-miss; fwd-status=200; stored"
    )
    for headers, expected in ((gz, b"GZIP-BODY"), (ident, b"IDENTITY-BODY")) * 2:
        resp = request(env.port, path, headers=headers)
        assert (resp.status, resp.body, resp.cs) == (200, expected, HIT_59)
        assert resp.header("Vary") == "Accept-Encoding"
    assert env.origin.count(path) == 2
    assert [s.header("accept-encoding") for s in env.origin.requests(path)] == [
        "gzip", "identity"
    ]


# -- 6. PURGE ----------------------------------------------------------------------------------


def test_purge_removes_the_url(env: Env) -> None:
    env.origin.route("/purge/a", headers=MAX_AGE_60, body=b"a")
    assert request(env.port, "/purge/a").cs == MISS_STORED
    assert request(env.port, "/purge/a").cs == HIT_59
    resp = request(env.port, "/purge/a", method="PURGE")
    assert (resp.status, resp.body) == (200, b'{"purged": 1}\n')
    assert resp.header("Content-Type") == "application/json"
    assert request(env.port, "/purge/a").cs == MISS_STORED
    assert env.origin.count("/purge/a") == 2  # (PURGE never reaches the origin)


def test_purge_of_nothing_is_404(env: Env) -> None:
    for path, headers in (("/purge/never-stored", {}), ("/purge/none/*", {}),
                          ("/", {"Surrogate-Key": "nosuchtag"})):
        resp = request(env.port, path, method="PURGE", headers=headers)
        assert (resp.status, resp.body) == (404, b'{"purged": 0}\n'), (path, headers)
    assert env.origin.count("/purge/never-stored") == 0


def test_purge_of_a_prefix(env: Env) -> None:
    for path in ("/p/a", "/p/b?q=1", "/q/c", "/pp/d"):
        env.origin.route(path.split("?")[0], headers=MAX_AGE_60)
        assert request(env.port, path).cs == MISS_STORED
    resp = request(env.port, "/p/*", method="PURGE")
    assert (resp.status, resp.body) == (200, b'{"purged": 2}\n')
    assert request(env.port, "/p/a").cs == MISS_STORED
    assert request(env.port, "/p/b?q=1").cs == MISS_STORED
    assert request(env.port, "/q/c").cs == HIT_59
    assert request(env.port, "/pp/d").cs == HIT_59


def test_purge_by_tag(env: Env) -> None:
    env.origin.route("/tag/a", headers=[*MAX_AGE_60, ("Cache-Tag", "t1, t2")])
    env.origin.route("/tag/b", headers=[*MAX_AGE_60, ("Surrogate-Key", "t1")])
    env.origin.route("/tag/c", headers=[*MAX_AGE_60, ("Cache-Tag", "t2")])
    for path in ("/tag/a", "/tag/b", "/tag/c"):
        assert request(env.port, path).cs == MISS_STORED
    resp = request(env.port, "/", method="PURGE", headers={"Cache-Tag": "t1"})
    assert (resp.status, resp.body) == (200, b'{"purged": 2}\n')
    assert request(env.port, "/tag/a").cs == MISS_STORED
    assert request(env.port, "/tag/b").cs == MISS_STORED
    assert request(env.port, "/tag/c").cs == HIT_59


def test_purge_refused_from_other_addresses(env: Env) -> None:
    env.origin.route("/nopurge/a", headers=MAX_AGE_60)
    env.origin.route("/purge/src", headers=MAX_AGE_60)
    assert request(env.port, "/nopurge/a").cs == MISS_STORED
    assert request(env.port, "/purge/src").cs == MISS_STORED
    # allowed only from 10.9.9.9
    resp = request(env.port, "/nopurge/a", method="PURGE")
    assert (resp.status, resp.body) == (403, b"purge not allowed from this address\n")
    # allowed from 127.0.0.1 only; this client is 127.0.0.2
    resp = request(env.port, "/purge/src", method="PURGE", source="127.0.0.2")
    assert (resp.status, resp.body) == (403, b"purge not allowed from this address\n")
    spoofed = {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1",
               "X-Real-IP": "127.0.0.1"}
    resp = request(env.port, "/purge/src", method="PURGE", source="127.0.0.2", headers=spoofed)
    assert (resp.status, resp.body) == (403, b"purge not allowed from this address\n")
    assert request(env.port, "/nopurge/a").cs == HIT_59
    assert request(env.port, "/purge/src").cs == HIT_59
    assert env.origin.count("/nopurge/a") == env.origin.count("/purge/src") == 1


# -- 7. RFC 9111 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "headers", "request_headers"),
    [
        ("no-store", [("Cache-Control", "no-store, max-age=60")], {}),
        ("private", [("Cache-Control", "private, max-age=60")], {}),
        ("set-cookie", [*MAX_AGE_60, ("Set-Cookie", "sid=1")], {}),
        ("authorization", MAX_AGE_60, {"Authorization": "Bearer x"}),
        ("expires-past", [("Expires", "Thu, 01 Jan 1970 00:00:00 GMT")], {}),
        ("no-headers", [("Content-Type", "text/plain")], {}),
        ("client-no-store", MAX_AGE_60, {"Cache-Control": "no-store"}),
        ("vary-star", [*MAX_AGE_60, ("Vary", "*")], {}),
    ],
)
def test_responses_that_are_not_stored(
    env: Env, name: str, headers: list[tuple[str, str]], request_headers: dict[str, str]
) -> None:
    path = f"/rfc/not-stored/{name}"
    env.origin.route(path, headers=headers, body=name.encode())
    resp = request(env.port, path, headers=request_headers)
    assert (resp.status, resp.body, resp.cs) == (200, name.encode(), MISS_NOT_STORED)
    # a response that forbids storing it whoever asks sends the next requests of its
    # URL straight through for a while (hit-for-miss: no cache lock, the client's Range
    # and conditionals kept); one kept from being stored by the request, or by a
    # Set-Cookie (an origin may set one for some clients only), does not
    resp = request(env.port, path, headers=request_headers)
    by_request = name in ("authorization", "client-no-store", "set-cookie")
    assert (resp.status, resp.body, resp.cs) == (
        200, name.encode(), MISS_NOT_STORED if by_request else PASSED
    )
    assert env.origin.count(path) == 2


def test_set_cookie_ignored_stores_without_the_cookie(env: Env) -> None:
    path = "/ign/cookie"
    env.origin.route(path, headers=[*MAX_AGE_60, ("Set-Cookie", "sid=secret")], body=b"c")
    first = request(env.port, path)
    assert (first.cs, first.header("Set-Cookie")) == (MISS_STORED, "sid=secret")
    hit = request(env.port, path)
    assert (hit.status, hit.body, hit.cs) == (200, b"c", HIT_59)
    assert hit.header("Set-Cookie") is None
    assert env.origin.count(path) == 1


@pytest.mark.parametrize("directive", ["public, max-age=60", "s-maxage=60"])
def test_authorization_stored_when_the_response_allows(env: Env, directive: str) -> None:
    path = "/rfc/auth/" + directive.split(",")[0]
    env.origin.route(path, headers=[("Cache-Control", directive)], body=b"auth")
    auth = {"Authorization": "Bearer x"}
    assert request(env.port, path, headers=auth).cs == MISS_STORED
    assert request(env.port, path, headers=auth).cs == HIT_59
    assert env.origin.count(path) == 1


def test_s_maxage_wins_over_max_age(env: Env) -> None:
    path = "/rfc/smaxage"
    env.origin.route(path, headers=[("Cache-Control", "max-age=1, s-maxage=60")])
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    assert request(env.port, path).cs == "ferryman; hit; ttl=58"
    assert env.origin.count(path) == 1


def test_no_cache_response_is_revalidated_every_time(env: Env) -> None:
    path = "/rfc/no-cache"
    env.origin.route(path, headers=[("Cache-Control", "no-cache"), ("ETag", '"nc1"')],
                     body=b"validated")
    assert request(env.port, path).cs == MISS_STORED
    for n in (2, 3):
        resp = request(env.port, path)
        assert (resp.status, resp.body) == (200, b"validated")
        shape, ttl = ttl_of(resp.cs)  # (stale at once: ttl rounds to 0 or -1)
        assert (shape, ttl in (0, -1)) == ("ferryman; fwd=stale; fwd-status=304; ttl=*", True)
        assert env.origin.count(path) == n
        assert env.origin.requests(path)[-1].header("if-none-match") == '"nc1"'
    assert env.origin.requests(path)[0].header("if-none-match") is None


@pytest.mark.parametrize(
    "client", [{"Cache-Control": "no-cache"}, {"Cache-Control": "max-age=0"},
               {"Pragma": "no-cache"}],
)
def test_client_forces_revalidation(env: Env, client: dict[str, str]) -> None:
    path = "/rfc/client/" + "-".join(f"{k}-{v}" for k, v in client.items()).replace("=", "")
    lm = email.utils.formatdate(time.time() - 3600, usegmt=True)
    env.origin.route(path, headers=[*MAX_AGE_60, ("ETag", '"cl1"'), ("Last-Modified", lm)],
                     body=b"fresh")
    assert request(env.port, path).cs == MISS_STORED
    assert request(env.port, path).cs == HIT_59
    resp = request(env.port, path, headers=client)
    assert (resp.status, resp.body, resp.cs) == (
        200, b"fresh", "ferryman; fwd=request; fwd-status=304; ttl=59"
    )
    seen = env.origin.requests(path)
    assert len(seen) == 2
    assert (seen[1].header("if-none-match"), seen[1].header("if-modified-since")) == (
        '"cl1"', lm
    )


def test_only_if_cached(env: Env) -> None:
    path = "/rfc/only-if-cached"
    env.origin.route(path, headers=MAX_AGE_60, body=b"oic")
    oic = {"Cache-Control": "only-if-cached"}
    resp = request(env.port, path, headers=oic)
    assert resp.status == 504
    assert env.origin.count(path) == 0
    assert request(env.port, path).cs == MISS_STORED
    resp = request(env.port, path, headers=oic)
    assert (resp.status, resp.body, resp.cs) == (200, b"oic", HIT_59)
    assert env.origin.count(path) == 1


def test_default_ttl_for_a_response_without_caching_headers(env: Env) -> None:
    path = "/ttl/plain"
    env.origin.route(path, headers=[("Content-Type", "text/plain")], body=b"plain")
    assert request(env.port, path).cs == MISS_STORED
    assert request(env.port, path).cs == "ferryman; hit; ttl=29"
    # the same response on a route without default_ttl is not stored
    env.origin.route("/rfc/plain", headers=[("Content-Type", "text/plain")], body=b"plain")
    assert request(env.port, "/rfc/plain").cs == MISS_NOT_STORED
    # default_ttl never overrides no-store
    env.origin.route("/ttl/no-store", headers=[("Cache-Control", "no-store")])
    assert request(env.port, "/ttl/no-store").cs == MISS_NOT_STORED
    assert request(env.port, "/ttl/no-store").cs == PASSED
    assert env.origin.count(path) == 1


def test_heuristic_freshness_from_last_modified(env: Env) -> None:
    path = "/rfc/heuristic"
    lm = email.utils.formatdate(int(time.time()) - 1000, usegmt=True)  # 10% of it: 100 s
    env.origin.route(path, headers=[("Last-Modified", lm)], body=b"h")
    assert request(env.port, path).cs == MISS_STORED
    shape, ttl = ttl_of(request(env.port, path).cs)
    assert shape == "ferryman; hit; ttl=*"
    assert 99 <= ttl <= 100
    assert env.origin.count(path) == 1


@pytest.mark.parametrize(
    ("status", "extra", "stored"),
    [
        (404, [], True),
        (301, [("Location", "/elsewhere")], True),
        (500, [], True),  # (explicit freshness: a shared cache may keep it)
        (206, [("Content-Range", "bytes 0-1/10")], False),  # partial: never stored
    ],
)
def test_statuses_with_explicit_freshness(
    env: Env, status: int, extra: list[tuple[str, str]], stored: bool
) -> None:
    path = f"/rfc/status/{status}"
    env.origin.route(path, status=status, headers=[*MAX_AGE_60, *extra], body=b"ab")
    first = request(env.port, path)
    assert (first.status, first.body) == (status, b"ab")
    assert first.cs == f"ferryman; fwd=uri-miss; fwd-status={status}" + (
        "; stored" if stored else ""
    )
    second = request(env.port, path)
    assert (second.status, second.body) == (status, b"ab")
    if stored:
        assert second.cs == HIT_59
        assert env.origin.count(path) == 1
    else:  # (then straight through for a while: hit-for-miss)
        assert second.cs == f"ferryman; fwd=miss; fwd-status={status}; detail=uncacheable"
        assert env.origin.count(path) == 2


def test_500_without_freshness_is_not_stored(env: Env) -> None:
    path = "/rfc/status/500-plain"
    env.origin.route(path, status=500, body=b"oops")
    for _ in range(2):
        resp = request(env.port, path)
        assert (resp.status, resp.cs) == (500, "ferryman; fwd=uri-miss; fwd-status=500")
    assert env.origin.count(path) == 2


def test_client_max_stale_and_min_fresh(env: Env) -> None:
    path = "/rfc/max-stale"
    env.origin.route(path, headers=[("Cache-Control", "max-age=1")], body=b"ms")
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    resp = request(env.port, path, headers={"Cache-Control": "max-stale=60"})
    assert (resp.status, resp.body) == (200, b"ms")
    assert ttl_of(resp.cs)[0] == "ferryman; hit; ttl=*"
    assert ttl_of(resp.cs)[1] <= 0
    assert env.origin.count(path) == 1
    # min-fresh asks for more freshness than a max-age=60 response has: revalidated
    env.origin.route("/rfc/min-fresh", headers=MAX_AGE_60, body=b"mf")
    assert request(env.port, "/rfc/min-fresh").cs == MISS_STORED
    resp = request(env.port, "/rfc/min-fresh", headers={"Cache-Control": "min-fresh=120"})
    assert resp.cs == "ferryman; fwd=request; fwd-status=200; stored"
    assert env.origin.count("/rfc/min-fresh") == 2


# -- 8. 304 merges ------------------------------------------------------------------------


def test_304_revalidation_merges_headers_and_keeps_the_body(env: Env) -> None:
    path = "/merge/a"
    env.origin.route(
        path, headers=[("Cache-Control", "max-age=1"), ("ETag", '"m1"'), ("X-Version", "1")],
        body=b"merged body",
        not_modified_headers=[("Cache-Control", "max-age=60"), ("X-Version", "2")],
    )
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    resp = request(env.port, path)
    assert (resp.status, resp.body, resp.header("X-Version")) == (200, b"merged body", "2")
    assert resp.cs == "ferryman; fwd=stale; fwd-status=304; ttl=59"
    assert env.origin.requests(path)[1].header("if-none-match") == '"m1"'
    hit = request(env.port, path)
    assert (hit.status, hit.body, hit.cs) == (200, b"merged body", HIT_59)
    assert hit.header_all("X-Version") == ["2"]
    assert hit.header_all("Cache-Control") == ["max-age=60"]
    assert hit.header("ETag") == '"m1"'
    assert env.origin.count(path) == 2


def test_set_cookie_of_a_304_is_not_replayed_with_ignore_set_cookie(env: Env) -> None:
    """A 304 may carry a Set-Cookie for the client that revalidated; it must not be
    merged into the stored response and replayed to every later client."""
    path = "/ign/cookie304"
    env.origin.route(
        path, headers=[("Cache-Control", "max-age=1"), ("ETag", '"k1"')], body=b"k",
        not_modified_headers=[("Cache-Control", "max-age=60"), ("Set-Cookie", "sid=alice")],
    )
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    alice = request(env.port, path)  # revalidated: 304 with alice's cookie
    assert alice.cs == "ferryman; fwd=stale; fwd-status=304; ttl=59"
    bob = request(env.port, path)
    assert (bob.status, bob.body, bob.cs) == (200, b"k", HIT_59)
    assert bob.header("Set-Cookie") is None, "alice's cookie was served to bob"


def test_set_cookie_of_a_304_is_not_replayed(env: Env) -> None:
    path = "/cookie304/a"
    env.origin.route(
        path, headers=[("Cache-Control", "max-age=1"), ("ETag", '"k2"')], body=b"k",
        not_modified_headers=[("Cache-Control", "max-age=1"), ("Set-Cookie", "sid=alice")],
    )
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    shape, _ = ttl_of(request(env.port, path).cs)
    assert shape == "ferryman; fwd=stale; fwd-status=304; ttl=*"
    # later 304s carry no cookie, and make the response fresh for a minute
    env.origin.route(
        path, headers=[("Cache-Control", "max-age=1"), ("ETag", '"k2"')], body=b"k",
        not_modified_headers=[("Cache-Control", "max-age=60")],
    )
    stale_by()
    bob = request(env.port, path)
    assert (bob.status, bob.body) == (200, b"k")
    assert bob.header("Set-Cookie") is None, "alice's cookie was served to bob"
    assert bob.cs == "ferryman; fwd=stale; fwd-status=304; ttl=59"
    assert request(env.port, path).cs == HIT_59


# -- storing: sizes and broken bodies ---------------------------------------------------------


def test_a_body_up_to_the_default_max_entry_is_stored(env: Env) -> None:
    """A memory cache's ``max_entry`` defaults to ``max_size``/64 (CacheConfig): 256 KiB
    here."""
    path = "/size/250k"
    env.origin.route(path, headers=MAX_AGE_60, body=b"m" * 250_000)
    assert request(env.port, path).cs == MISS_STORED
    resp = request(env.port, path)
    assert (resp.status, len(resp.body), resp.cs) == (200, 250_000, HIT_59)
    assert env.origin.count(path) == 1


def test_a_body_past_max_entry_is_not_stored_and_not_said_to_be(env: Env) -> None:
    path = "/size/3m"
    env.origin.route(path, headers=MAX_AGE_60, body=b"m" * 3_000_000)
    for _ in range(2):
        resp = request(env.port, path)
        assert (resp.status, len(resp.body)) == (200, 3_000_000)
        assert resp.cs == MISS_NOT_STORED
    assert env.origin.count(path) == 2


def test_a_truncated_upstream_body_is_never_served_from_the_cache(env: Env) -> None:
    path = "/broken/a"
    env.origin.route(path, headers=MAX_AGE_60, body=b"t" * 100_000, truncate_at=40_000)
    with pytest.raises(http.client.IncompleteRead):
        request(env.port, path)
    env.origin.route(path, headers=MAX_AGE_60, body=b"t" * 100_000)
    resp = request(env.port, path)
    assert (resp.status, resp.body, resp.cs) == (200, b"t" * 100_000, MISS_STORED)
    assert request(env.port, path).cs == HIT_59
    assert env.origin.count(path) == 2


def test_a_client_leaving_mid_fill_leaves_no_truncated_entry(env: Env) -> None:
    path = "/broken/client-left"
    body = os.urandom(200_000)
    env.origin.route(path, headers=MAX_AGE_60, body=body, chunk_size=20_000,
                     chunk_delay=0.05)
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.read(30_000) == body[:30_000]
    assert conn.sock is not None
    conn.sock.close()
    conn.close()
    for _ in range(2):  # whatever happened to the fill, answers are complete
        again = request(env.port, path)
        assert (again.status, again.body) == (200, body)
    assert request(env.port, path).cs == HIT_59


# -- 9. HEAD -----------------------------------------------------------------------------------


def test_head_answered_from_a_cached_get(env: Env) -> None:
    path = "/head/a"
    env.origin.route(path, headers=MAX_AGE_60, body=b"0123456789")
    assert request(env.port, path).cs == MISS_STORED
    resp = request(env.port, path, method="HEAD")
    assert (resp.status, resp.body, resp.cs) == (200, b"", HIT_59)
    assert resp.header("Content-Length") == "10"
    assert env.origin.count(path) == 1


def test_head_miss_fills_the_cache_for_get(env: Env) -> None:
    path = "/head/b"
    env.origin.route(path, headers=MAX_AGE_60, body=b"filled by a HEAD")
    resp = request(env.port, path, method="HEAD")
    assert (resp.status, resp.body, resp.cs) == (200, b"", MISS_STORED)
    assert resp.header("Content-Length") == "16"
    assert [s.method for s in env.origin.requests(path)] == ["GET"]
    resp = request(env.port, path)
    assert (resp.status, resp.body, resp.cs) == (200, b"filled by a HEAD", HIT_59)
    assert env.origin.count(path) == 1


# -- 10. Range ---------------------------------------------------------------------------------

RANGE_BODY = bytes(range(256)) * 4  # 1024 bytes


def _parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, payload) of each part of a multipart/byteranges body."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    assert msg.is_multipart()
    return [(str(part["Content-Range"]), part.get_payload(decode=True))
            for part in msg.iter_parts()]


def test_ranges_answered_from_a_stored_body(env: Env) -> None:
    path = "/range/a"
    env.origin.route(path, headers=[*MAX_AGE_60, ("ETag", '"r1"')], body=RANGE_BODY)
    assert request(env.port, path).cs == MISS_STORED
    one = request(env.port, path, headers={"Range": "bytes=10-19"})
    assert (one.status, one.body, one.cs) == (206, RANGE_BODY[10:20], HIT_59)
    assert one.header("Content-Range") == "bytes 10-19/1024"
    assert one.header("Content-Length") == "10"
    suffix = request(env.port, path, headers={"Range": "bytes=-4"})
    assert (suffix.status, suffix.body) == (206, RANGE_BODY[-4:])
    assert suffix.header("Content-Range") == "bytes 1020-1023/1024"
    multi = request(env.port, path, headers={"Range": "bytes=0-1,100-103"})
    assert multi.status == 206
    content_type = multi.header("Content-Type") or ""
    assert content_type.startswith("multipart/byteranges; boundary=")
    assert multi.header("Content-Length") == str(len(multi.body))
    assert _parse_multipart(content_type, multi.body) == [
        ("bytes 0-1/1024", RANGE_BODY[0:2]), ("bytes 100-103/1024", RANGE_BODY[100:104]),
    ]
    bad = request(env.port, path, headers={"Range": "bytes=5000-6000"})
    assert (bad.status, bad.body) == (416, b"")
    assert bad.header("Content-Range") == "bytes */1024"
    assert env.origin.count(path) == 1


def test_if_range_matching(env: Env) -> None:
    path = "/range/if"
    env.origin.route(path, headers=[*MAX_AGE_60, ("ETag", '"ir1"')], body=RANGE_BODY)
    assert request(env.port, path).cs == MISS_STORED
    same = request(env.port, path, headers={"Range": "bytes=0-3", "If-Range": '"ir1"'})
    assert (same.status, same.body, same.header("Content-Range")) == (
        206, RANGE_BODY[:4], "bytes 0-3/1024"
    )
    assert env.origin.count(path) == 1


def test_if_range_not_matching_gets_the_whole_body(env: Env) -> None:
    path = "/range/if-not"
    env.origin.route(path, headers=[*MAX_AGE_60, ("ETag", '"ir2"')], body=RANGE_BODY)
    assert request(env.port, path).cs == MISS_STORED
    other = request(env.port, path, headers={"Range": "bytes=0-3", "If-Range": '"old"'},
                    timeout=3)
    assert (other.status, other.body, other.cs) == (200, RANGE_BODY, HIT_59)
    assert other.header("Content-Range") is None
    assert env.origin.count(path) == 1


def test_ignored_range_gets_the_whole_body(env: Env) -> None:
    """A Range that is not ``bytes=`` or is malformed is ignored (RFC 9110 §14.2)."""
    path = "/range/ignored"
    env.origin.route(path, headers=MAX_AGE_60, body=RANGE_BODY)
    assert request(env.port, path).cs == MISS_STORED
    for value in ("items=0-3", "bytes=5-2"):
        resp = request(env.port, path, headers={"Range": value}, timeout=3)
        assert (resp.status, resp.body, resp.cs) == (200, RANGE_BODY, HIT_59)
    assert env.origin.count(path) == 1


def test_range_miss_is_fetched_whole(env: Env) -> None:
    path = "/range/miss"
    env.origin.route(path, headers=MAX_AGE_60, body=RANGE_BODY)
    resp = request(env.port, path, headers={"Range": "bytes=5-9"})
    assert (resp.status, resp.body, resp.cs) == (206, RANGE_BODY[5:10], MISS_STORED)
    assert resp.header("Content-Range") == "bytes 5-9/1024"
    assert env.origin.requests(path)[0].header("range") is None
    full = request(env.port, path)
    assert (full.status, full.body, full.cs) == (200, RANGE_BODY, HIT_59)
    assert env.origin.count(path) == 1


# -- 11. client conditionals ---------------------------------------------------------------


def test_client_conditionals_answered_from_the_cache(env: Env) -> None:
    path = "/cond/a"
    lm = email.utils.formatdate(time.time() - 86400, usegmt=True)
    earlier = email.utils.formatdate(time.time() - 2 * 86400, usegmt=True)
    env.origin.route(path, headers=[*MAX_AGE_60, ("ETag", '"c1"'), ("Last-Modified", lm)],
                     body=b"conditional body")
    assert request(env.port, path).cs == MISS_STORED
    for conditional in ({"If-None-Match": '"c1"'}, {"If-None-Match": 'W/"c1", "x"'},
                        {"If-Modified-Since": lm}):
        resp = request(env.port, path, headers=conditional)
        assert (resp.status, resp.body, resp.cs) == (304, b"", HIT_59), conditional
        assert resp.header("ETag") == '"c1"'
        assert resp.header("Content-Length") is None
    for conditional in ({"If-None-Match": '"other"'}, {"If-Modified-Since": earlier}):
        resp = request(env.port, path, headers=conditional)
        assert (resp.status, resp.body, resp.cs) == (200, b"conditional body", HIT_59)
    assert env.origin.count(path) == 1
    assert all(s.header("if-none-match") is None for s in env.origin.requests(path))


# -- 12. invalidation ----------------------------------------------------------------------


def test_unsafe_method_that_succeeds_invalidates_the_url(env: Env) -> None:
    path = "/inv/a"
    env.origin.route(path, headers=MAX_AGE_60, body=b"inv")
    env.origin.route(path, method="POST", status=204)
    env.origin.route(path, method="DELETE", status=500, body=b"no")
    assert request(env.port, path).cs == MISS_STORED
    failed = request(env.port, path, method="DELETE")
    assert (failed.status, failed.cs) == (500, "ferryman; fwd=method; fwd-status=500")
    assert request(env.port, path).cs == HIT_59  # a failed unsafe request invalidates nothing
    posted = request(env.port, path, method="POST", body=b"x=1")
    assert (posted.status, posted.cs) == (204, "ferryman; fwd=method; fwd-status=204")
    assert request(env.port, path).cs == MISS_STORED
    assert [s.method for s in env.origin.requests(path)] == ["GET", "DELETE", "POST", "GET"]


def test_location_and_content_location_on_the_same_host_are_invalidated(env: Env) -> None:
    host = f"127.0.0.1:{env.port}"
    for path in ("/inv/item", "/inv/other", "/inv/third"):
        env.origin.route(path, headers=MAX_AGE_60)
        assert request(env.port, path).cs == MISS_STORED
    env.origin.route("/inv/form", method="POST", status=201, headers=[
        ("Location", "/inv/item"),
        ("Content-Location", f"http://{host}/inv/other"),
    ])
    env.origin.route("/inv/form2", method="POST", status=200, headers=[
        ("Location", "http://elsewhere.example/inv/third"),
    ])
    assert request(env.port, "/inv/form", method="POST", body=b"").status == 201
    assert request(env.port, "/inv/form2", method="POST", body=b"").status == 200
    assert request(env.port, "/inv/item").cs == MISS_STORED
    assert request(env.port, "/inv/other").cs == MISS_STORED
    assert request(env.port, "/inv/third").cs == HIT_59


# -- 13. config errors ---------------------------------------------------------------------

ROUTE_HEAD = (
    "listeners:\n"
    '  - bind: "127.0.0.1:18080"\n'
    "    routes:\n"
    "      - match: {path_prefix: /}\n"
)
UPSTREAM = 'upstreams: {app: {servers: ["127.0.0.1:9001"]}}\n'
P = "bad.yaml:6: listeners[0].routes[0].cache"


def _check(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "bad.yaml").write_text(text)
    result = subprocess.run(ferryman_cmd("check", "-c", "bad.yaml"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "ferryman: invalid config:", result.stderr
    return lines[1:]


@pytest.mark.parametrize(
    ("cache", "expected"),
    [
        ("{storage: bogus}",
         f"{P}.storage: expected one of memory, disk, redis, got 'bogus'"),
        ("{storage: disk}", f"{P}.path: a disk cache needs a path"),
        ("{storage: redis}", f"{P}.redis: a redis cache needs a redis URL"),
        ("{key: [nonsense]}",
         f"{P}.key[0]: expected a key part: scheme, host, method, path, query, uri, "
         "header:NAME, cookie:NAME or arg:NAME, got 'nonsense'"),
        ("{key: []}",
         f"{P}.key: expected a list of key parts: scheme, host, method, path, query, uri, "
         "header:NAME, cookie:NAME or arg:NAME, got an empty list"),
        ("{ignore: [foo]}",
         f"{P}.ignore[0]: expected one of cache-control, expires, set-cookie, vary, "
         "client-cache-control, got 'foo'"),
        ("{purge: [not-an-ip]}",
         f'{P}.purge[0]: expected an address or network such as "127.0.0.1" or '
         "\"10.0.0.0/8\", got 'not-an-ip'"),
        ("{storage: memory, path: /tmp}",
         f"{P}.path: path is only used with storage: disk (this cache uses memory)"),
        ("{max_size: 0}",
         f'{P}.max_size: expected a positive size such as "8KiB", "512k" or "1m", got 0'),
        ("{lock_timeout: 0s}",
         f'{P}.lock_timeout: expected a positive duration such as "2s" or "500ms", '
         "got '0s'"),
        ("{colour: blue}",
         f'{P}.colour: unknown key "colour"; expected one of: storage, path, redis, '
         "max_size, max_entry, default_ttl, key, ignore, stale_while_revalidate, "
         "stale_if_error, lock_timeout, purge, status_header"),
    ],
    ids=lambda v: v if v.startswith("{") else "",
)
def test_config_errors(tmp_path: Path, cache: str, expected: str) -> None:
    text = ROUTE_HEAD + "        upstream: app\n" + f"        cache: {cache}\n" + UPSTREAM
    assert _check(tmp_path, text) == [expected]


def test_config_error_disk_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    text = ROUTE_HEAD + "        upstream: app\n        cache: {storage: disk, path: afile/c}\n"
    assert _check(tmp_path, text + UPSTREAM) == [
        f"{P}.path: expected a directory path for the disk cache, got 'afile/c' "
        f"({tmp_path / 'afile'} is not a directory)"
    ]


def test_config_error_every_problem_of_a_cache_block(tmp_path: Path) -> None:
    text = (ROUTE_HEAD + "        upstream: app\n"
            + "        cache: {storage: disk, ignore: [foo], purge: [not-an-ip]}\n" + UPSTREAM)
    assert _check(tmp_path, text) == [
        f"{P}.path: a disk cache needs a path",
        f"{P}.ignore[0]: expected one of cache-control, expires, set-cookie, vary, "
        "client-cache-control, got 'foo'",
        f'{P}.purge[0]: expected an address or network such as "127.0.0.1" or '
        "\"10.0.0.0/8\", got 'not-an-ip'",
    ]


def test_config_error_cache_on_a_respond_route(tmp_path: Path) -> None:
    text = (ROUTE_HEAD + "        respond: {status: 200, body: hi}\n"
            + "        cache: {max_size: 1MiB}\n" + UPSTREAM)
    assert _check(tmp_path, text) == [
        f"{P}: cache is only used with upstream (it stores upstream responses; "
        "this route uses respond)"
    ]


# -- 14. Redis ---------------------------------------------------------------------------------


class Redis:
    """A throwaway ``redis-server`` on a free port (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10.0)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def entry_keys(self) -> list[bytes]:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return [k for k in client.scan_iter(match=b"ferryman:m:*") if b"#" not in k]
        finally:
            client.close()

    def wait_entry(self, fragment: bytes, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(fragment in k for k in self.entry_keys()):
            assert time.monotonic() < deadline, f"{fragment!r} never reached Redis"
            time.sleep(0.05)


def test_redis_shared_by_two_servers_and_survives_redis_dying(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    redis_server = Redis(tmp_path).start()
    origin = CacheOrigin().start()
    proxies: list[ProxyProcess] = []
    try:
        cache = (f"{{storage: redis, redis: 'redis://127.0.0.1:{redis_server.port}/0', "
                 "purge: [127.0.0.1]}")
        for name in ("a", "b"):
            port = free_port()
            proxies.append(start_ferryman(
                tmp_path / name, _yaml(port, origin.address, _route("/", cache)), port
            ))
        a, b = (p.port for p in proxies)

        def ask(port: int, path: str, method: str = "GET") -> Resp:
            # (the same Host through both servers: the Host is part of the key)
            return request(port, path, method, headers={"Host": "cache.example"})

        origin.route("/r/one", headers=MAX_AGE_60, body=b"shared " * 100)
        assert ask(a, "/r/one").cs == MISS_STORED
        redis_server.wait_entry(b"/r/one")
        resp = ask(b, "/r/one")
        assert (resp.status, resp.body, resp.cs) == (200, b"shared " * 100, HIT_59)
        assert ask(a, "/r/one").cs == HIT_59
        assert origin.count("/r/one") == 1
        # a purge through one server is seen by the other
        resp = ask(b, "/r/one", method="PURGE")
        assert (resp.status, resp.body) == (200, b'{"purged": 1}\n')
        resp = ask(a, "/r/one", method="PURGE")  # (nothing left: every server knows)
        assert (resp.status, resp.body) == (404, b'{"purged": 0}\n')
        assert ask(a, "/r/one").cs == MISS_STORED
        redis_server.wait_entry(b"/r/one")

        redis_server.kill()
        for i in range(20):
            for port in (a, b):
                path = "/r/one" if i % 2 else f"/r/down{i}"
                resp = ask(port, path)
                assert resp.status == 200, (port, path, resp.status, resp.body)
                assert resp.body == (b"shared " * 100 if path == "/r/one"
                                     else f"body of {path}\n".encode())
        assert origin.count("/r/one") >= 3  # (Redis gone: misses go to the origin)

        old_port = redis_server.port
        redis_server = Redis(tmp_path)
        redis_server.port = old_port  # (the same port: the servers' URL)
        redis_server.start()
        origin.route("/r/two", headers=MAX_AGE_60, body=b"after restart")
        deadline = time.monotonic() + 10
        while True:  # until the breaker lets a fill through (about 1 s)
            assert time.monotonic() < deadline, "caching never resumed"
            ask(a, "/r/two")
            if any(b"/r/two" in k for k in redis_server.entry_keys()):
                break
            time.sleep(0.3)
        before = origin.count("/r/two")
        resp = ask(b, "/r/two")
        deadline = time.monotonic() + 10
        while not (resp.cs or "").startswith("ferryman; hit; "):  # (b's breaker: a moment)
            assert time.monotonic() < deadline, resp.cs
            time.sleep(0.3)
            before = origin.count("/r/two")
            resp = ask(b, "/r/two")
        assert resp.body == b"after restart"
        assert origin.count("/r/two") == before
    finally:
        for proxy in proxies:
            proxy.stop(signal.SIGINT)
        redis_server.kill()
        origin.stop()
    for proxy in proxies:
        assert "Traceback" not in proxy.log_text(), proxy.log_text()


# -- 15. disk ----------------------------------------------------------------------------------


def _disk_ready() -> bool:
    try:
        from ferryman.cache.disk import DiskStorage  # noqa: F401
    except Exception:  # noqa: BLE001 - being written by someone else
        return False
    return True


disk_only = pytest.mark.skipif(not _disk_ready(), reason="ferryman.cache.disk is not there yet")


def _disk_proxy(workdir: Path, origin: CacheOrigin, cache_dir: Path, port: int,
                workers: int = 2) -> ProxyProcess:
    cache = f"{{storage: disk, path: '{cache_dir}', max_size: 64MiB, purge: [127.0.0.1]}}"
    proxy = start_ferryman(workdir, _yaml(port, origin.address, _route("/", cache),
                                          workers=workers, read="20s"), port)
    deadline = time.monotonic() + 10
    while len(proxy.worker_pids()) < workers:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    return proxy


def _serving_pid(port: int, path: str) -> tuple[Resp, int]:
    """A request on a new connection, and the pid of the worker that accepted it (the
    server end of the connection is found in /proc)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        local = conn.sock.getsockname()
        conn.request("GET", path)
        r = conn.getresponse()
        resp = Resp(r.status, r.getheaders(), r.read(), 0.0)
        pid = _pid_with_peer(local)
        return resp, pid
    finally:
        conn.close()


def _pid_with_peer(client: tuple[str, int]) -> int:
    """The pid owning the TCP socket whose remote end is ``client`` (127.0.0.1 only)."""
    want = f"0100007F:{client[1]:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == want:
            inode = fields[9]
    assert inode is not None, "the server end of the connection is not in /proc/net/tcp"
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(proc.name)
        except OSError:
            continue
    raise AssertionError("no process owns the server end of the connection")


@disk_only
def test_disk_hit_across_workers_and_across_restart(tmp_path: Path) -> None:
    origin = CacheOrigin().start()
    cache_dir = tmp_path / "cache"
    port = free_port()
    proxy = _disk_proxy(tmp_path / "f1", origin, cache_dir, port)
    try:
        origin.route("/d/a", headers=MAX_AGE_60, body=b"on disk " * 1000)
        first = request(port, "/d/a")
        assert first.cs == MISS_STORED
        workers = set(proxy.worker_pids())
        served: set[int] = set()
        for _ in range(200):
            resp, pid = _serving_pid(port, "/d/a")
            assert (resp.status, resp.body) == (200, b"on disk " * 1000)
            shape, _ = ttl_of(resp.header("Cache-Status"))
            assert shape == "ferryman; hit; ttl=*"
            served.add(pid)
            if served == workers:
                break
        assert served == workers, "one worker answered every connection"
        assert origin.count("/d/a") == 1
        _stop_clean(proxy)  # SIGINT here; SIGTERM below
        proxy = _disk_proxy(tmp_path / "f2", origin, cache_dir, port)
        resp = request(port, "/d/a")
        assert (resp.status, resp.body) == (200, b"on disk " * 1000)
        assert ttl_of(resp.cs)[0] == "ferryman; hit; ttl=*"
        code = proxy.stop(signal.SIGTERM)
        assert code == 0, proxy.log_text()
        proxy = _disk_proxy(tmp_path / "f3", origin, cache_dir, port)
        assert ttl_of(request(port, "/d/a").cs)[0] == "ferryman; hit; ttl=*"
        assert origin.count("/d/a") == 1
    finally:
        proxy.stop(signal.SIGINT)
        origin.stop()
    assert "Traceback" not in proxy.log_text(), proxy.log_text()


@disk_only
def test_disk_kill_during_a_write_never_serves_a_truncated_entry(tmp_path: Path) -> None:
    origin = CacheOrigin().start()
    cache_dir = tmp_path / "cache"
    port = free_port()
    big = os.urandom(4 * 1024 * 1024)
    origin.route("/d/big", headers=MAX_AGE_60, body=big, chunk_size=64 * 1024,
                 chunk_delay=0.05)  # about 3.2 s in all
    proxy = _disk_proxy(tmp_path / "f1", origin, cache_dir, port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/d/big")
        resp = conn.getresponse()
        assert resp.getheader("Cache-Status") == MISS_STORED
        got = resp.read(1024 * 1024)  # a quarter is through: the write is under way
        assert got == big[: len(got)]
        assert any(p.name.endswith(".tmp") for p in cache_dir.rglob("*"))
        os.killpg(proxy.pid, signal.SIGKILL)
        proxy.proc.wait(5)
        conn.close()
        origin.route("/d/big", headers=MAX_AGE_60, body=big)  # fast from now on
        proxy = _disk_proxy(tmp_path / "f2", origin, cache_dir, port)
        again = request(port, "/d/big", timeout=30)
        assert (again.status, again.cs) == (200, MISS_STORED)
        assert again.body == big
        assert origin.count("/d/big") == 2
        hit = request(port, "/d/big", timeout=30)
        assert hit.status == 200
        assert ttl_of(hit.cs)[0] == "ferryman; hit; ttl=*"
        assert hit.body == big
        entries = [p for p in cache_dir.rglob("*") if p.is_file()
                   and not p.name.startswith(".") and "." not in p.name]
        assert len(entries) == 1
    finally:
        proxy.stop(signal.SIGINT)
        origin.stop()
    assert "Traceback" not in proxy.log_text(), proxy.log_text()


# -- found by review ----------------------------------------------------------------------


def test_a_client_cannot_purge_by_asking_for_what_is_not_stored(env: Env) -> None:
    """A request whose own directives keep the answer from being stored (no-store,
    Authorization) revalidates the entry but never removes it for everyone."""
    path = "/review/keep"
    env.origin.route(path, headers=MAX_AGE_60, body=b"shared")
    assert request(env.port, path).cs == MISS_STORED
    for headers in ({"Cache-Control": "no-cache, no-store"},
                    {"Cache-Control": "no-cache", "Authorization": "Bearer x"}):  # fmt: skip
        resp = request(env.port, path, headers=headers)
        assert (resp.status, resp.body) == (200, b"shared")
        assert resp.cs == "ferryman; fwd=request; fwd-status=200"
        assert request(env.port, path).cs == HIT_59  # still there
    assert env.origin.count(path) == 3


def test_default_ttl_never_shares_an_authorized_response(env: Env) -> None:
    path = "/ttl/auth"
    env.origin.route(path, headers=[("Content-Type", "text/plain")], body=b"alice's")
    resp = request(env.port, path, headers={"Authorization": "Bearer alice"})
    assert (resp.body, resp.cs) == (b"alice's", MISS_NOT_STORED)
    env.origin.route(path, headers=[("Content-Type", "text/plain")], body=b"anyone's")
    resp = request(env.port, path)
    assert (resp.body, resp.cs) == (b"anyone's", MISS_STORED)


def test_fields_private_to_one_client_are_not_replayed(env: Env) -> None:
    path = "/review/private-field"
    env.origin.route(path, headers=[("Cache-Control", 'max-age=60, private="X-Secret"'),
                                    ("X-Secret", "alice-token"), ("X-Public", "p")],
                     body=b"page")  # fmt: skip
    first = request(env.port, path)
    assert first.header("X-Secret") == "alice-token"  # (the client it was for gets it)
    second = request(env.port, path)
    assert second.cs == HIT_59
    assert (second.header("X-Secret"), second.header("X-Public")) == (None, "p")


def test_a_range_miss_with_an_outdated_if_range_gets_the_whole_body(env: Env) -> None:
    path = "/review/if-range"
    body = bytes(range(256)) * 4
    env.origin.route(path, headers=[*MAX_AGE_60, ("ETag", '"new"')], body=body)
    resp = request(env.port, path, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert (resp.status, resp.body) == (200, body)
    resp = request(env.port, path, headers={"Range": "bytes=0-9", "If-Range": '"new"'})
    assert (resp.status, resp.body, resp.header("Content-Range")) == (
        206, body[:10], "bytes 0-9/1024"
    )
    assert env.origin.count(path) == 1


def test_private_fields_of_a_304_are_not_stored(env: Env) -> None:
    path = "/review/private-304"
    private = ("Cache-Control", 'max-age=1, private="X-Secret"')
    env.origin.route(path, headers=[private, ("ETag", '"p"')], body=b"page",
                     not_modified_headers=[private, ("X-Secret", "alice-token")])  # fmt: skip
    assert request(env.port, path).cs == MISS_STORED
    stale_by()
    alice = request(env.port, path)  # revalidated: the 304 carries alice's field
    assert alice.cs is not None and alice.cs.startswith("ferryman; fwd=stale; fwd-status=304")
    bob = request(env.port, path)
    assert (bob.body, bob.header("X-Secret")) == (b"page", None)


def test_a_client_cannot_keep_a_url_out_of_the_cache(env: Env) -> None:
    """An origin that sets a cookie for clients without one makes their responses
    unstorable; a cookieless client forcing revalidation neither purges the entry nor
    sends everyone else to the origin."""
    path = "/review/cookie-for-some"
    env.origin.route(path, headers=MAX_AGE_60, body=b"page")
    assert request(env.port, path).cs == MISS_STORED
    env.origin.route(path, headers=[*MAX_AGE_60, ("Set-Cookie", "sid=new")], body=b"page")
    resp = request(env.port, path, headers={"Cache-Control": "max-age=0"})
    assert resp.cs == "ferryman; fwd=request; fwd-status=200"
    for _ in range(3):
        assert request(env.port, path).cs == HIT_59
    assert env.origin.count(path) == 2


def test_purge_ends_hit_for_miss(env: Env) -> None:
    path = "/purge/pass"
    env.origin.route(path, headers=[("Cache-Control", "no-store")], body=b"x")
    assert request(env.port, path).cs == MISS_NOT_STORED
    assert request(env.port, path).cs == PASSED
    assert request(env.port, path, method="PURGE").status == 404
    env.origin.route(path, headers=MAX_AGE_60, body=b"y")
    assert request(env.port, path).cs == MISS_STORED  # (straight away, not in a minute)
