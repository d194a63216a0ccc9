"""``Cache-Status`` (RFC 9211) members: parameters, their order and their syntax."""

from __future__ import annotations

import pytest

from ferryman.cache.status import cache_status

CASES = [
    ({"hit": True, "ttl": 376.4}, b"ferryman; hit; ttl=376", "a hit with freshness left"),
    ({"hit": True, "ttl": -12.5}, b"ferryman; hit; ttl=-13", "a stale hit"),
    ({"fwd": "uri-miss", "fwd_status": 200, "stored": True},
     b"ferryman; fwd=uri-miss; fwd-status=200; stored", "a miss, stored"),
    ({"fwd": "vary-miss", "fwd_status": 200}, b"ferryman; fwd=vary-miss; fwd-status=200",
     "another variant"),
    ({"fwd": "stale", "fwd_status": 304, "ttl": 60},
     b"ferryman; fwd=stale; fwd-status=304; ttl=60", "revalidated"),
    ({"hit": True, "collapsed": True}, b"ferryman; hit; collapsed",
     "served from a fetch it waited for"),
    ({"fwd": "bypass", "detail": "no-store"}, b"ferryman; fwd=bypass; detail=no-store",
     "a token detail"),
    ({"fwd": "miss", "detail": "storage down"}, b'ferryman; fwd=miss; detail="storage down"',
     "a string detail"),
]


@pytest.mark.parametrize(("kwargs", "expected", "why"), CASES, ids=[c[-1] for c in CASES])
def test_cache_status(kwargs: dict[str, object], expected: bytes, why: str) -> None:
    assert cache_status("ferryman", **kwargs) == expected  # type: ignore[arg-type]


def test_a_name_that_is_not_a_token_is_quoted() -> None:
    assert cache_status("edge cache", hit=True) == b'"edge cache"; hit'


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hit": True, "fwd": "miss"}, "either a hit or forwarded"),
    ({"fwd": "nope"}, "fwd must be one of"),
])
def test_contradictions_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cache_status("ferryman", **kwargs)  # type: ignore[arg-type]
