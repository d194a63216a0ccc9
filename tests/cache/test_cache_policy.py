"""RFC 9111 rules of ``ferryman.cache.policy``, one table per section or directive."""

from __future__ import annotations

import pytest

from ferryman.cache.policy import (
    CacheControl,
    Stored,
    current_age,
    freshness_lifetime,
    http_date,
    parse_cache_control,
    stale_if_error_allows,
    storable,
    usable,
)

CC = parse_cache_control

# -- §5.2: parsing Cache-Control ---------------------------------------------------------

PARSE_CASES = [
    ([b"max-age=60"], CacheControl(max_age=60)),
    ([b"MAX-AGE=60"], CacheControl(max_age=60)),  # directive names are case-insensitive
    ([b'max-age="60"'], CacheControl(max_age=60)),  # quoted form tolerated (§5.2)
    ([b"max-age=abc"], CacheControl(max_age=0)),  # invalid: stale (§4.2.1)
    ([b"max-age"], CacheControl(max_age=0)),
    ([b"max-age=99999999999"], CacheControl(max_age=2**31)),  # §1.2.2
    ([b"max-age=10, max-age=20"], CacheControl(max_age=10)),  # the first one
    ([b"public, s-maxage=30"], CacheControl(public=True, s_maxage=30)),
    ([b"no-store"], CacheControl(no_store=True)),
    ([b"no-cache"], CacheControl(no_cache=True)),
    ([b'no-cache="Set-Cookie, X-A"'], CacheControl(no_cache=True,
                                                   no_cache_fields=("set-cookie", "x-a"))),
    ([b'private="Set-Cookie"'], CacheControl(private=True, private_fields=("set-cookie",))),
    ([b"private"], CacheControl(private=True)),
    ([b"must-revalidate, proxy-revalidate"], CacheControl(must_revalidate=True,
                                                          proxy_revalidate=True)),
    ([b"max-stale"], CacheControl(max_stale=-1)),
    ([b"max-stale=5"], CacheControl(max_stale=5)),
    ([b"min-fresh=7", b"only-if-cached"], CacheControl(min_fresh=7, only_if_cached=True)),
    ([b"stale-while-revalidate=30, stale-if-error=600"],
     CacheControl(stale_while_revalidate=30, stale_if_error=600)),
    ([b"immutable, no-transform, must-understand"],
     CacheControl(immutable=True, no_transform=True, must_understand=True)),
    ([b"community=UCI, max-age=5"], CacheControl(max_age=5)),  # unknown: ignored (§5.2.3)
    ([b"", b" , ,"], CacheControl()),
]


@pytest.mark.parametrize(("lines", "expected"), PARSE_CASES)
def test_parse_cache_control(lines: list[bytes], expected: CacheControl) -> None:
    assert parse_cache_control(lines) == expected


# -- §3: storing responses ---------------------------------------------------------------

NONE = CacheControl()

STORE_CASES = [
    # method
    ("GET", 200, NONE, NONE, False, None, True, "GET 200: cacheable by default"),
    ("HEAD", 200, NONE, NONE, False, None, True, "HEAD too"),
    ("POST", 200, NONE, CC(["max-age=60"]), False, None, False, "POST: not stored"),
    ("PUT", 200, NONE, NONE, False, None, False, "PUT"),
    # status
    ("GET", 404, NONE, NONE, False, None, True, "404 cacheable by default"),
    ("GET", 302, NONE, NONE, False, None, False, "302 needs explicit freshness"),
    ("GET", 302, NONE, CC(["max-age=60"]), False, None, True, "302 with max-age"),
    ("GET", 299, NONE, CC(["max-age=60"]), False, None, False, "unknown status"),
    ("GET", 500, NONE, NONE, False, None, False, "500 without freshness"),
    # no-store, must-understand
    ("GET", 200, NONE, CC(["no-store"]), False, None, False, "response no-store"),
    ("GET", 200, CC(["no-store"]), NONE, False, None, False, "request no-store"),
    ("GET", 200, NONE, CC(["no-store, must-understand, max-age=5"]), False, None, True,
     "must-understand with an understood status ignores no-store"),
    ("GET", 299, NONE, CC(["no-store, must-understand"]), False, None, False,
     "must-understand with a status not understood"),
    # private
    ("GET", 200, NONE, CC(["private"]), False, None, False, "private: not in a shared cache"),
    ("GET", 200, NONE, CC(['private="Set-Cookie", max-age=5']), False, None, True,
     "qualified private: stored without those fields"),
    # Authorization (§3.5)
    ("GET", 200, NONE, CC(["max-age=60"]), True, None, False, "Authorization, max-age"),
    ("GET", 200, NONE, CC(["public"]), True, None, True, "Authorization, public"),
    ("GET", 200, NONE, CC(["s-maxage=5"]), True, None, True, "Authorization, s-maxage"),
    ("GET", 200, NONE, CC(["must-revalidate"]), True, None, True,
     "Authorization, must-revalidate"),
    # Expires
    ("GET", 302, NONE, NONE, False, b"Thu, 01 Jan 2037 00:00:00 GMT", True, "302 with Expires"),
    ("GET", 302, NONE, NONE, False, b"0", True, "an invalid Expires is explicit (expired)"),
    ("GET", 307, NONE, CC(["public"]), False, None, True, "public"),
]


@pytest.mark.parametrize(
    ("method", "status", "req", "resp", "auth", "expires", "expected", "why"),
    STORE_CASES, ids=[c[-1] for c in STORE_CASES],
)
def test_storable(
    method: str, status: int, req: CacheControl, resp: CacheControl, auth: bool,
    expires: bytes | None, expected: bool, why: str,
) -> None:
    assert storable(method, status, req, resp, authorization=auth, expires=expires) is expected


# -- §4.2.1 / §4.2.2: freshness lifetime -------------------------------------------------

DATE = http_date(b"Sun, 06 Nov 1994 08:49:37 GMT")
assert DATE is not None

LIFETIME_CASES = [
    (200, CC(["s-maxage=10, max-age=60"]), None, None, 10.0, "s-maxage wins (shared cache)"),
    (200, CC(["max-age=60"]), b"Sun, 06 Nov 1994 09:49:37 GMT", None, 60.0,
     "max-age wins over Expires"),
    (200, NONE, b"Sun, 06 Nov 1994 09:49:37 GMT", None, 3600.0, "Expires - Date"),
    (200, NONE, b"Sun, 06 Nov 1994 07:49:37 GMT", None, 0.0, "Expires before Date"),
    (200, NONE, b"0", None, 0.0, "invalid Expires: expired"),
    (200, NONE, None, DATE - 100_000, 10_000.0, "heuristic: 10% since Last-Modified"),
    (200, NONE, None, DATE - 10_000_000, 86_400.0, "heuristic: at most a day"),
    (302, NONE, None, DATE - 100_000, 0.0, "no heuristic for 302"),
    (200, NONE, None, None, 0.0, "nothing to go on"),
    (200, CC(["max-age=0"]), None, DATE - 100_000, 0.0, "explicit 0 beats heuristic"),
]


@pytest.mark.parametrize(
    ("status", "cc", "expires", "last_modified", "expected", "why"),
    LIFETIME_CASES, ids=[c[-1] for c in LIFETIME_CASES],
)
def test_freshness_lifetime(
    status: int, cc: CacheControl, expires: bytes | None, last_modified: float | None,
    expected: float, why: str,
) -> None:
    got = freshness_lifetime(
        status, cc, date=DATE, expires=expires, last_modified=last_modified
    )
    assert got == pytest.approx(expected)


# -- RFC 9110 §5.6.7: dates ---------------------------------------------------------------

@pytest.mark.parametrize(("text", "ok"), [
    (b"Sun, 06 Nov 1994 08:49:37 GMT", True),    # IMF-fixdate
    (b"Sunday, 06-Nov-94 08:49:37 GMT", True),   # obsolete RFC 850
    (b"Sun Nov  6 08:49:37 1994", True),         # obsolete asctime
    (b"yesterday", False),
    (b"0", False),
    (None, False),
])
def test_http_date(text: bytes | None, ok: bool) -> None:
    got = http_date(text)
    if ok:
        assert got == DATE
    else:
        assert got is None


# -- §4.2.3: age ---------------------------------------------------------------------------

AGE_CASES = [
    # age_value, date, request_time, response_time, now, expected
    (0.0, 1000.0, 1000.0, 1000.0, 1000.0, 0.0, "just fetched"),
    (0.0, 1000.0, 1000.0, 1000.0, 1030.0, 30.0, "resident 30 s"),
    (20.0, 1000.0, 1000.0, 1002.0, 1002.0, 22.0, "Age plus the response delay"),
    (0.0, 990.0, 1000.0, 1000.0, 1000.0, 10.0, "apparent age from Date"),
    (5.0, 1010.0, 1000.0, 1000.0, 1000.0, 5.0, "a Date in the future counts as 0"),
    (0.0, None, 1000.0, 1001.0, 1011.0, 11.0, "no Date"),
]


@pytest.mark.parametrize(
    ("age_value", "date", "req_t", "resp_t", "now", "expected", "why"),
    AGE_CASES, ids=[c[-1] for c in AGE_CASES],
)
def test_current_age(
    age_value: float, date: float | None, req_t: float, resp_t: float, now: float,
    expected: float, why: str,
) -> None:
    got = current_age(
        age_value=age_value, date_value=date, request_time=req_t, response_time=resp_t,
        now=now,
    )
    assert got == pytest.approx(expected)


# -- §4, §4.2.4, §5.2.1, RFC 5861: may a stored response answer? --------------------------

USE_CASES = [
    # lifetime, age, response directives, request directives, pragma, expected
    (60, 10, NONE, NONE, False, "fresh", "fresh"),
    (60, 70, NONE, NONE, False, "stale", "stale"),
    (60, 10, CC(["no-cache"]), NONE, False, "revalidate", "response no-cache"),
    (60, 10, CC(['no-cache="Set-Cookie"']), NONE, False, "fresh",
     "qualified no-cache: served without those fields"),
    (60, 10, NONE, CC(["no-cache"]), False, "revalidate", "request no-cache"),
    (60, 10, NONE, NONE, True, "revalidate", "Pragma: no-cache without Cache-Control"),
    (60, 10, NONE, CC(["max-stale"]), True, "fresh",
     "Pragma ignored when Cache-Control is present"),
    (60, 30, NONE, CC(["max-age=20"]), False, "revalidate", "request max-age exceeded"),
    (60, 10, NONE, CC(["max-age=20"]), False, "fresh", "request max-age met"),
    (60, 50, NONE, CC(["min-fresh=20"]), False, "stale", "min-fresh not met"),
    (60, 30, NONE, CC(["min-fresh=20"]), False, "fresh", "min-fresh met"),
    (60, 70, NONE, CC(["max-stale=20"]), False, "fresh", "max-stale covers it"),
    (60, 90, NONE, CC(["max-stale=20"]), False, "stale", "max-stale exceeded"),
    (60, 900, NONE, CC(["max-stale"]), False, "fresh", "any staleness accepted"),
    (60, 70, CC(["must-revalidate"]), CC(["max-stale"]), False, "revalidate",
     "must-revalidate beats max-stale"),
    (60, 70, CC(["proxy-revalidate"]), NONE, False, "revalidate", "proxy-revalidate"),
    (60, 70, CC(["s-maxage=60"]), NONE, False, "revalidate",
     "s-maxage implies proxy-revalidate"),
    (60, 80, CC(["stale-while-revalidate=30"]), NONE, False, "stale-while-revalidate",
     "within stale-while-revalidate"),
    (60, 100, CC(["stale-while-revalidate=30"]), NONE, False, "stale",
     "past stale-while-revalidate"),
]


@pytest.mark.parametrize(
    ("lifetime", "age", "resp", "req", "pragma", "expected", "why"),
    USE_CASES, ids=[c[-1] for c in USE_CASES],
)
def test_usable(
    lifetime: float, age: float, resp: CacheControl, req: CacheControl, pragma: bool,
    expected: str, why: str,
) -> None:
    stored = Stored(lifetime=lifetime, age=age, response_cc=resp)
    assert usable(stored, req, request_pragma_no_cache=pragma) == expected


SIE_CASES = [
    (60, 100, CC(["stale-if-error=60"]), NONE, True, "within the response's window"),
    (60, 200, CC(["stale-if-error=60"]), NONE, False, "past it"),
    (60, 100, NONE, CC(["stale-if-error=60"]), True, "the request's window"),
    (60, 100, NONE, NONE, False, "no window"),
    (60, 100, CC(["stale-if-error=60, must-revalidate"]), NONE, False,
     "must-revalidate forbids it"),
]


@pytest.mark.parametrize(
    ("lifetime", "age", "resp", "req", "expected", "why"),
    SIE_CASES, ids=[c[-1] for c in SIE_CASES],
)
def test_stale_if_error(
    lifetime: float, age: float, resp: CacheControl, req: CacheControl, expected: bool,
    why: str,
) -> None:
    stored = Stored(lifetime=lifetime, age=age, response_cc=resp)
    assert stale_if_error_allows(stored, req) is expected
