"""HttpCache, sans-IO: keys, what is stored and for how long, what a stored response is
good for, purge addresses. Tables of header lists and times; no sockets."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from ferryman.cache.http_cache import HttpCache, key_part_valid
from ferryman.cache.memory import MemoryStorage
from ferryman.cache.policy import CacheControl, parse_cache_control
from ferryman.cache.storage import CacheMeta

NOW = 1_800_000_000.0
DATE = b"Fri, 15 Jan 2027 08:00:00 GMT"  # = NOW


def cache(**kwargs: object) -> HttpCache:
    return HttpCache(MemoryStorage(1 << 20), **kwargs)  # type: ignore[arg-type]


def fields(**values: list[bytes]) -> Callable[[bytes], list[bytes]]:
    table = {name.replace("_", "-").encode(): v for name, v in values.items()}
    return lambda name: table.get(name, [])


# keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "method", "target", "headers", "key"),
    [
        (("scheme", "host", "uri"), b"GET", b"/a?b=1", {"host": [b"Example.COM"]},
         b"http|example.com|/a?b=1"),
        (("scheme", "host", "uri"), b"HEAD", b"/a", {"host": [b"x"]}, b"http|x|/a"),
        (("host", "path"), b"GET", b"/a?b=1", {"host": [b"x:8080"]}, b"x:8080|/a"),
        (("path", "query"), b"GET", b"/a?b=1&c", {}, b"/a|b=1&c"),
        (("method", "uri"), b"HEAD", b"/a", {}, b"GET|/a"),
        (("method", "uri"), b"POST", b"/a", {}, b"POST|/a"),
        (("uri", "header:X-Tenant"), b"GET", b"/a", {"x_tenant": [b"t1", b"t2"]},
         b"/a|t1,t2"),
        (("uri", "header:x-tenant"), b"GET", b"/a", {}, b"/a|"),
        (("uri", "cookie:lang"), b"GET", b"/a", {"cookie": [b"a=1; lang=fr", b"lang=de"]},
         b"/a|fr"),
        (("path", "arg:v"), b"GET", b"/a?x=1&v=2&v=3", {}, b"/a|2"),
        (("path", "arg:v"), b"GET", b"/a?x=1", {}, b"/a|"),
        (("host",), b"GET", b"/", {}, b""),
    ],
)
def test_primary_key(parts, method, target, headers, key) -> None:
    c = cache(key=parts)
    assert c.primary_key(scheme=b"http", method=method, target=target,
                         header=fields(**headers)) == key  # fmt: skip


def test_url_key_matches_the_request_key() -> None:
    c = cache()
    request = c.primary_key(
        scheme=b"https", method=b"GET", target=b"/a/b?c=d", header=fields(host=[b"Ex.com"])
    )
    assert c.url_key("https://ex.com/a/b?c=d") == request
    assert c.url_key("http://ex.com") == b"http|ex.com|/"
    assert c.url_prefix("http://ex.com/static/") == b"http|ex.com|/static/"


def test_url_prefix_needs_a_key_ending_with_the_uri() -> None:
    with pytest.raises(ValueError, match="ending with uri or path"):
        cache(key=("uri", "host")).url_prefix("http://x/a")
    with pytest.raises(ValueError, match="ending with uri or path"):
        cache(key=("header:x", "uri")).url_prefix("http://x/a")
    assert cache(key=("path",)).url_prefix("http://x/a") == b"/a"


@pytest.mark.parametrize(
    ("part", "valid"),
    [("scheme", True), ("uri", True), ("header:X-A", True), ("cookie:s", True),
     ("arg:q", True), ("header:", False), ("Host", False), ("url", False), ("", False)],
)
def test_key_parts(part: str, valid: bool) -> None:
    assert key_part_valid(part) is valid


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown cache key part 'url'"):
        cache(key=("url",))
    with pytest.raises(ValueError, match="cannot ignore"):
        cache(ignore=frozenset({"etag"}))


def test_variant_keys_extend_the_primary_key() -> None:
    a = HttpCache.variant_key(b"k", b"accept-encoding=gzip")
    b = HttpCache.variant_key(b"k", b"accept-encoding!")
    assert a.startswith(b"k#") and b.startswith(b"k#") and a != b
    assert HttpCache.variant_key(b"k", b"accept-encoding=gzip") == a


def test_vary_of() -> None:
    c = cache()
    assert c.vary_of([(b"Vary", b"Accept-Encoding, Origin")]) == (b"accept-encoding", b"origin")
    assert c.vary_of([(b"Vary", b"*")]) is None
    assert c.vary_of([]) == ()
    assert cache(ignore=frozenset({"vary"})).vary_of([(b"Vary", b"*")]) == ()


# what is stored, for how long (RFC 9111 §3, §4.2) ------------------------------------------


def decide(c: HttpCache, status: int, headers: list[tuple[bytes, bytes]], *,
           method: bytes = b"GET", request: CacheControl | None = None,
           authorization: bool = False) -> float | None:  # fmt: skip
    return c.decide(method=method, status=status, headers=[(b"Date", DATE)] + headers,
                    request_cc=request or CacheControl(), authorization=authorization,
                    now=NOW)  # fmt: skip


CC = b"Cache-Control"


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [(CC, b"max-age=60")], 60.0),
        (200, [(CC, b"max-age=60, s-maxage=5")], 5.0),  # §5.2.2.10: shared caches
        (200, [(CC, b"public")], None),  # storable, but no freshness and no validators
        (200, [(CC, b"public"), (b"ETag", b'"a"')], 0.0),  # kept to revalidate
        (200, [(CC, b"no-store, max-age=60")], None),
        (200, [(CC, b"private, max-age=60")], None),
        (200, [(CC, b'private="x-user", max-age=60')], 60.0),  # qualified: storable
        (200, [(CC, b"no-cache, max-age=60")], 60.0),  # stored, revalidated on use
        (200, [(b"Expires", b"Fri, 15 Jan 2027 09:00:00 GMT")], 3600.0),
        (200, [(b"Expires", b"Fri, 15 Jan 2027 07:00:00 GMT"), (b"ETag", b'"a"')], 0.0),
        (200, [(b"Expires", b"0"), (b"ETag", b'"a"')], 0.0),  # invalid Expires: expired
        (200, [(b"Last-Modified", b"Fri, 05 Jan 2027 08:00:00 GMT")], 86400.0),  # 10%
        (200, [(b"Last-Modified", b"Fri, 15 Jan 2027 07:00:00 GMT")], 360.0),
        (200, [], None),
        (206, [(CC, b"max-age=60")], None),  # partial responses are not stored
        (302, [(CC, b"max-age=60")], 60.0),
        (302, [(b"Last-Modified", b"Fri, 15 Jan 2027 07:00:00 GMT")], None),  # not default
        (404, [(b"Last-Modified", b"Fri, 15 Jan 2027 07:00:00 GMT")], 360.0),
        (599, [(CC, b"max-age=60")], None),  # not understood
        (200, [(CC, b"max-age=60"), (b"Set-Cookie", b"s=1")], None),
        (200, [(CC, b"max-age=60"), (b"Vary", b"*")], None),
        (200, [(CC, b"max-age=60"), (b"Vary", b"Accept-Encoding")], 60.0),
        (200, [(CC, b"max-age=0")], None),
        (200, [(CC, b"max-age=0, stale-if-error=60")], 0.0),  # stale use possible
    ],
)
def test_decide(status, headers, expected) -> None:
    assert decide(cache(), status, headers) == expected


def test_decide_with_the_request() -> None:
    c = cache()
    cc = [(CC, b"max-age=60")]
    assert decide(c, 200, cc, method=b"POST") is None
    assert decide(c, 200, cc, method=b"HEAD") == 60.0
    assert decide(c, 200, cc, request=parse_cache_control([b"no-store"])) is None
    assert decide(c, 200, cc, authorization=True) is None  # §3.5
    assert decide(c, 200, [(CC, b"public, max-age=60")], authorization=True) == 60.0
    assert decide(c, 200, [(CC, b"s-maxage=9")], authorization=True) == 9.0


def test_default_ttl_only_without_stated_freshness() -> None:
    c = cache(default_ttl=30.0)
    assert decide(c, 200, []) == 30.0
    assert decide(c, 404, []) == 30.0
    assert decide(c, 302, []) is None  # not cacheable by default
    assert decide(c, 200, [(CC, b"max-age=5")]) == 5.0
    assert decide(c, 200, [(CC, b"no-store")]) is None
    assert decide(c, 200, [(CC, b"private")]) is None
    assert decide(c, 200, [], method=b"POST") is None
    assert decide(c, 200, [], request=parse_cache_control([b"no-store"])) is None


@pytest.mark.parametrize(
    ("ignore", "headers", "expected"),
    [
        ({"cache-control"}, [(CC, b"no-store"), (b"Last-Modified",
                                                  b"Fri, 15 Jan 2027 07:00:00 GMT")], 360.0),
        ({"expires"}, [(b"Expires", b"Fri, 15 Jan 2027 09:00:00 GMT")], None),
        ({"set-cookie"}, [(CC, b"max-age=60"), (b"Set-Cookie", b"s=1")], 60.0),
        ({"vary"}, [(CC, b"max-age=60"), (b"Vary", b"*")], 60.0),
    ],
)
def test_ignore(ignore, headers, expected) -> None:
    assert decide(cache(ignore=frozenset(ignore)), 200, headers) == expected


def test_client_cache_control_ignored() -> None:
    c = cache(ignore=frozenset({"client-cache-control"}))
    assert c.request_cc(fields(cache_control=[b"no-cache"], pragma=[b"no-cache"])) == (
        CacheControl(), False
    )
    cc, pragma = cache().request_cc(fields(cache_control=[b"max-age=5"], pragma=[b"no-cache"]))
    assert cc.max_age == 5 and pragma


def test_meta_for() -> None:
    c = cache(stale_if_error=100.0)
    meta = c.meta_for(
        status=200,
        headers=[(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"s=1"), (b"Age", b"7"),
                 (b"Content-Length", b"12"), (b"Cache-Tag", b"a, b"), (b"Surrogate-Key", b"c"),
                 (b"ETag", b'"x"'), (CC, b"max-age=60, stale-while-revalidate=10"),
                 (b"Vary", b"Accept-Encoding")],
        lifetime=60.0, variant=b"v", request_time=NOW - 1, response_time=NOW,
    )  # fmt: skip
    names = [n for n, _ in meta.headers]
    assert b"Set-Cookie" not in names and names[-1] == b"Age"  # (the age it came with)
    assert (b"Content-Type", b"text/plain") in meta.headers
    assert meta.length == 12 and meta.tags == (b"a", b"b", b"c")
    assert meta.vary == (b"accept-encoding",) and meta.variant == b"v"
    assert meta.fresh_for == 60.0
    assert meta.keep_for == 60.0 + 100.0 + 3600.0  # stale window, then validators
    assert (meta.request_time, meta.response_time, meta.stored_at) == (NOW - 1, NOW, NOW)


# what a stored response is good for (RFC 9111 §4, RFC 5861) --------------------------------


def stored(lifetime: float, cc: bytes = b"", age: bytes | None = None) -> CacheMeta:
    headers = [(b"Date", DATE)]
    if cc:
        headers.append((CC, cc))
    if age is not None:
        headers.append((b"Age", age))
    return CacheMeta(200, headers, stored_at=NOW, request_time=NOW, response_time=NOW,
                     fresh_for=lifetime)  # fmt: skip


@pytest.mark.parametrize(
    ("meta", "req", "later", "verdict", "age"),
    [
        (stored(60), b"", 10, "fresh", 10),
        (stored(60), b"", 61, "stale", 61),
        (stored(60, age=b"55"), b"", 10, "stale", 65),  # Age counts (§4.2.3)
        (stored(60, b"stale-while-revalidate=30"), b"", 80, "stale-while-revalidate", 80),
        (stored(60, b"stale-while-revalidate=30"), b"", 100, "stale", 100),
        (stored(60, b"must-revalidate, stale-while-revalidate=30"), b"", 80, "revalidate", 80),
        (stored(60), b"no-cache", 1, "revalidate", 1),
        (stored(60), b"max-age=5", 10, "revalidate", 10),
        (stored(60), b"min-fresh=55", 10, "stale", 10),
        (stored(60), b"max-stale=30", 80, "fresh", 80),
        (stored(60, b"no-cache"), b"", 1, "revalidate", 1),
    ],
)
def test_judge(meta, req, later, verdict, age) -> None:
    j = cache().judge(meta, parse_cache_control([req] if req else []), False,
                      now=NOW + later)  # fmt: skip
    assert (j.verdict, j.age) == (verdict, age)
    assert j.ttl == meta.fresh_for - age


def test_judge_with_pragma_and_config_windows() -> None:
    assert cache().judge(stored(60), CacheControl(), True, now=NOW).verdict == "revalidate"
    c = cache(stale_while_revalidate=30.0, stale_if_error=100.0)
    j = c.judge(stored(60), CacheControl(), False, now=NOW + 80)
    assert j.verdict == "stale-while-revalidate"
    assert j.stored.response_cc.stale_if_error == 100
    # the response's own directive wins over the config's default
    j = c.judge(stored(60, b"stale-while-revalidate=5"), CacheControl(), False, now=NOW + 80)
    assert j.verdict == "stale"


def test_relifetime_after_a_304() -> None:
    meta = stored(0, b"max-age=120")
    assert cache().relifetime(meta, now=NOW) == 120.0
    assert cache().relifetime(stored(0, b"no-store"), now=NOW) is None


# purge ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "ip", "allowed"),
    [
        (("127.0.0.1/32",), b"127.0.0.1", True),
        (("127.0.0.1/32",), b"127.0.0.2", False),
        (("10.0.0.0/8", "::1/128"), b"::1", True),
        (("10.0.0.0/8",), b"::ffff:10.1.2.3", True),  # IPv4-mapped
        (("10.0.0.0/8",), b"", False),
        (("10.0.0.0/8",), b"garbage", False),
        (None, b"127.0.0.1", False),
    ],
)
def test_purge_allowed(networks, ip, allowed) -> None:
    purge = None if networks is None else tuple(ipaddress.ip_network(n) for n in networks)
    assert cache(purge_from=purge).purge_allowed(ip) is allowed


def test_purge_api() -> None:
    import asyncio

    async def main() -> None:
        c = cache()
        for key, tags in [(b"http|x|/a", (b"t",)), (b"http|x|/a#v1", ()),
                          (b"http|x|/ab", ()), (b"http|x|/b", (b"t",))]:  # fmt: skip
            writer = await c.storage.begin(key, CacheMeta(200, [], tags=tags))
            writer.write(b"body")
            writer.finish()
        assert await c.purge_url("http://x/a") == 2  # the key and its variant
        assert await c.purge_prefix("http://x/a") == 1  # /ab
        assert await c.purge_tag("t") == 1  # /b
        assert len(c.storage) == 0  # type: ignore[arg-type]
        assert c.counts == {"purge": 3}

    asyncio.run(main())


def test_default_ttl_never_shares_an_authorized_response() -> None:
    c = cache(default_ttl=30.0)
    assert decide(c, 200, [], authorization=True) is None  # §3.5
    assert decide(c, 200, [(CC, b"public")], authorization=True) == 30.0


def test_fields_of_one_client_are_not_stored() -> None:
    meta = cache().meta_for(
        status=200,
        headers=[(CC, b'max-age=60, private="X-Secret", no-cache="X-Fresh"'),
                 (b"X-Secret", b"alice"), (b"X-Fresh", b"1"), (b"X-Kept", b"k")],
        lifetime=60.0, variant=b"", request_time=NOW, response_time=NOW,
    )  # fmt: skip
    assert [n for n, _ in meta.headers] == [CC, b"X-Kept"]


def test_hit_for_miss_is_remembered_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    import ferryman.cache.http_cache as module

    c = cache()
    assert not c.passes(b"k")
    c.pass_for(b"k")
    assert c.passes(b"k")
    clock = module.time.monotonic() + module.PASS_TIME + 1
    monkeypatch.setattr(module.time, "monotonic", lambda: clock)
    assert not c.passes(b"k")
    monkeypatch.setattr(module, "PASS_KEYS", 3)
    for i in range(5):
        c.pass_for(b"k%d" % i)
    assert [c.passes(b"k%d" % i) for i in range(5)] == [False, False, True, True, True]


def test_a_namespace_keeps_routes_sharing_a_storage_apart() -> None:
    c = cache(namespace=b"static")
    header = fields(host=[b"x"])
    assert c.primary_key(scheme=b"http", method=b"GET", target=b"/a", header=header) == (
        b"static|http|x|/a"
    )
    assert c.fast_key(b"http", b"/a", b"X") == b"static|http|x|/a"
    assert c.url_key("http://x/a") == b"static|http|x|/a"
    assert c.url_prefix("http://x/s/") == b"static|http|x|/s/"


def test_tags_are_namespaced_too() -> None:
    import asyncio

    async def main() -> None:
        storage = MemoryStorage(1 << 20)
        a = HttpCache(storage, namespace=b"a")
        b = HttpCache(storage, namespace=b"b")
        for c, key in ((a, b"a|k"), (b, b"b|k")):
            meta = c.meta_for(status=200, headers=[(b"Cache-Tag", b"t")], lifetime=9.0,
                              variant=b"", request_time=NOW, response_time=NOW)  # fmt: skip
            writer = await storage.begin(key, meta)
            writer.finish()
        assert await a.purge_tag("t") == 1
        assert await storage.lookup(b"a|k") is None
        assert await storage.lookup(b"b|k") is not None

    asyncio.run(main())


def test_routes_sharing_a_storage_get_distinct_namespaces(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ferryman.app.caches import CacheRegistry
    from ferryman.config.model import CacheConfig

    disk = CacheConfig(storage="disk", path=str(tmp_path))
    memory = CacheConfig()
    registry = CacheRegistry([(disk, "api"), (disk, "api"), (disk, "static"), (memory, "m")])
    first = registry.cache(disk, "127.0.0.1:80/api", "api")
    second = registry.cache(disk, "127.0.0.1:81/api", "api")
    static = registry.cache(disk, "127.0.0.1:80/static", "static")
    assert (first.namespace, second.namespace, static.namespace) == (
        b"127.0.0.1:80/api", b"127.0.0.1:81/api", b"static"
    )
    assert first.storage is second.storage is static.storage
    assert registry.cache(memory, "127.0.0.1:80/m", "m").namespace == b""
