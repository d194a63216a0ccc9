"""LoadBalancer: selection with health, fail-open, exclude, passive ejection, membership."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from ferryman.lb.algorithms import ALGORITHMS, RoundRobin
from ferryman.lb.backend import Backend
from ferryman.lb.balancer import LoadBalancer, NoBackendError, PassiveHealth
from ferryman.upstream.peer import HttpPeer

NAMES = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
PICKS = 300


Members = list[tuple[tuple[str, int], int]]


def members(n: int = 3, weights: tuple[int, ...] | None = None) -> Members:
    ws = weights or (1,) * n
    return [((f"10.0.0.{i + 1}", 80), ws[i]) for i in range(n)]


def make(algorithm: str = "round_robin", n: int = 3, **kw: Any) -> LoadBalancer:
    return LoadBalancer("api", members(n), algorithm, **kw)


def key(i: int) -> bytes:
    return b"client-%d" % i


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(12345)


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# selection and health ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_all_healthy_uses_every_backend(algorithm: str) -> None:
    lb = make(algorithm)
    seen: Counter[str] = Counter()
    for i in range(PICKS):
        b = lb.select(key(i))
        assert not lb.last_fail_open
        seen[b.name] += 1
    assert set(seen) == set(NAMES)


def test_round_robin_fast_path_order() -> None:
    lb = make("round_robin")
    assert [lb.select().name for _ in range(6)] == NAMES + NAMES


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_unhealthy_backend_is_skipped(algorithm: str) -> None:
    lb = make(algorithm)
    assert lb.set_health("10.0.0.2:80", False, "connection refused")
    seen: Counter[str] = Counter()
    for i in range(PICKS):
        b = lb.select(key(i))
        assert not lb.last_fail_open
        seen[b.name] += 1
    assert set(seen) == {"10.0.0.1:80", "10.0.0.3:80"}
    assert lb.get("10.0.0.2:80").reason == "connection refused"  # type: ignore[union-attr]

    assert lb.set_health("10.0.0.2:80", True, "ignored")
    assert lb.get("10.0.0.2:80").reason == ""  # type: ignore[union-attr]
    back = {lb.select(key(i)).name for i in range(PICKS)}
    assert back == set(NAMES)


def test_set_health_unknown_backend() -> None:
    lb = make()
    assert lb.set_health("10.9.9.9:80", False) is False


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_all_unhealthy_fails_open(algorithm: str) -> None:
    lb = make(algorithm)
    for name in NAMES:
        lb.set_health(name, False, "down")
    seen = set()
    for i in range(PICKS):
        b = lb.select(key(i))
        assert lb.last_fail_open
        seen.add(b.name)
    assert seen <= set(NAMES) and seen
    lb.set_health("10.0.0.3:80", True)
    for i in range(50):
        assert lb.select(key(i)).name == "10.0.0.3:80"
        assert not lb.last_fail_open


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_exclude_fails_over(algorithm: str) -> None:
    lb = make(algorithm)
    for i in range(PICKS):
        first = lb.select(key(i))
        second = lb.select(key(i), exclude=[first])
        assert second is not first
        third = lb.select(key(i), exclude=[first, second])
        assert third not in (first, second)
        assert not lb.last_fail_open


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_exclude_skips_unhealthy_too(algorithm: str) -> None:
    lb = make(algorithm)
    lb.set_health("10.0.0.2:80", False, "down")
    one = lb.get("10.0.0.1:80")
    for i in range(PICKS):
        b = lb.select(key(i), exclude=[one])  # type: ignore[list-item]
        assert b.name == "10.0.0.3:80"
        assert not lb.last_fail_open


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_no_retry_onto_a_down_server_while_one_is_up(algorithm: str) -> None:
    """As nginx: once every available server was tried, a retry does not go to a server
    known to be down; the caller answers with the last failure instead."""
    lb = make(algorithm)
    everything = list(lb.backends)
    for i in range(5):
        with pytest.raises(NoBackendError, match="every available server was tried"):
            lb.select(key(i), exclude=everything)
    lb.set_health("10.0.0.1:80", False, "down")
    lb.set_health("10.0.0.2:80", False, "down")
    three = lb.get("10.0.0.3:80")
    with pytest.raises(NoBackendError, match="every available server was tried"):
        lb.select(b"k", exclude=[three])  # type: ignore[list-item]
    lb.set_health("10.0.0.3:80", False, "down")  # now nothing is up: fail open
    b = lb.select(b"k", exclude=[three])  # type: ignore[list-item]
    assert b.name != "10.0.0.3:80" and lb.last_fail_open


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_all_unhealthy_and_all_excluded(algorithm: str) -> None:
    lb = make(algorithm, n=2)
    for name in NAMES[:2]:
        lb.set_health(name, False, "down")
    b = lb.select(b"k", exclude=list(lb.backends))
    assert b in lb.backends
    assert lb.last_fail_open


def test_no_backend_error() -> None:
    lb = LoadBalancer("empty", [])
    with pytest.raises(NoBackendError, match='upstream "empty" has no servers'):
        lb.select()
    lb2 = make()
    lb2.set_members([])
    with pytest.raises(NoBackendError):
        lb2.select(b"k")
    with pytest.raises(NoBackendError):
        lb2.select(b"k", exclude=[Backend(("10.0.0.1", 80))])


def test_unknown_algorithm() -> None:
    message = r"unknown algorithm 'nope'; expected one of .*round_robin"
    with pytest.raises(ValueError, match=message):
        LoadBalancer("api", members(), "nope")


def test_selector_class_as_algorithm() -> None:
    lb = LoadBalancer("api", members(), RoundRobin)
    assert lb.algorithm is RoundRobin
    assert lb.select().name == "10.0.0.1:80"


def test_pairs_built_with_peer_factory() -> None:
    lb = LoadBalancer(
        "api", [(("::1", 8080), 2), (("10.0.0.1", 80), 1)], peer_factory=lambda a: HttpPeer(a)
    )
    assert [b.name for b in lb.backends] == ["[::1]:8080", "10.0.0.1:80"]
    assert [b.weight for b in lb.backends] == [2, 1]
    peer = lb.backends[0].peer
    assert peer is not None and (peer.host, peer.port) == ("::1", 8080)
    plain = LoadBalancer("api", members())
    assert all(b.peer is None for b in plain.backends)


# passive health ---------------------------------------------------------------------------


def passive_lb(max_fails: int = 3, eject: float = 0.2, max_eject: float = 10.0) -> LoadBalancer:
    return make(
        "round_robin", n=2, passive=PassiveHealth(max_fails=max_fails, eject=eject,
                                                   max_eject=max_eject)
    )


def test_ejection_after_max_fails_and_expiry() -> None:
    lb = passive_lb()
    a = lb.get("10.0.0.1:80")
    assert a is not None
    assert lb.report_failure(a, "status 502") is False
    assert lb.report_failure(a, "status 502") is False
    before = time.monotonic()
    assert lb.report_failure(a, "status 502") is True
    assert 0.15 < a.ejected_until - before <= 0.2 + 0.05
    assert a.reason == "status 502"
    for _ in range(20):
        assert lb.select().name == "10.0.0.2:80"
        assert not lb.last_fail_open
    # failures of requests that were in flight when it was ejected do not count
    until = a.ejected_until
    assert lb.report_failure(a) is False
    assert a.ejected_until == until
    assert "10.0.0.1:80 ejected for" in lb.down_report()
    assert wait_until(lambda: time.monotonic() > a.ejected_until, timeout=2.0)
    assert {lb.select().name for _ in range(4)} == {"10.0.0.1:80", "10.0.0.2:80"}
    assert lb.down_report() == ""


def test_failure_right_after_ejection_reejects_with_doubled_time() -> None:
    lb = passive_lb(max_fails=3, eject=0.2, max_eject=0.3)
    a = lb.get("10.0.0.1:80")
    assert a is not None
    for _ in range(3):
        lb.report_failure(a)
    assert a.ejections == 1
    assert wait_until(lambda: time.monotonic() > a.ejected_until, timeout=2.0)
    lb.select()
    # one failure right after coming back ejects it again, for twice as long (capped)
    before = time.monotonic()
    assert lb.report_failure(a, "timeout") is True
    assert a.ejections == 2
    assert 0.25 < a.ejected_until - before <= 0.3 + 0.05  # min(0.4, max_eject=0.3)
    assert all(lb.select().name == "10.0.0.2:80" for _ in range(10))


def test_backoff_doubles() -> None:
    lb = passive_lb(max_fails=1, eject=0.05, max_eject=100.0)
    a = lb.get("10.0.0.1:80")
    assert a is not None
    durations = []
    for _ in range(4):
        before = time.monotonic()
        assert lb.report_failure(a) is True
        durations.append(a.ejected_until - before)
        assert wait_until(lambda: time.monotonic() > a.ejected_until, timeout=2.0)
    for got, want in zip(durations, [0.05, 0.1, 0.2, 0.4], strict=True):
        assert want - 0.01 < got <= want + 0.01


def test_success_resets() -> None:
    lb = passive_lb()
    a = lb.get("10.0.0.1:80")
    assert a is not None
    lb.report_failure(a)
    lb.report_failure(a)
    lb.report_success(a)
    assert a.fails == 0
    assert lb.report_failure(a) is False
    assert lb.report_failure(a) is False
    assert lb.report_failure(a) is True
    assert wait_until(lambda: time.monotonic() > a.ejected_until, timeout=2.0)
    lb.report_success(a)
    assert (a.fails, a.ejections, a.ejected_until) == (0, 0, 0.0)
    # back to max_fails failures before the next ejection, with the base duration
    assert lb.report_failure(a) is False
    assert lb.report_failure(a) is False
    before = time.monotonic()
    assert lb.report_failure(a) is True
    assert a.ejected_until - before <= 0.25


def test_success_while_ejected_keeps_ejection() -> None:
    lb = passive_lb(eject=5.0)
    a = lb.get("10.0.0.1:80")
    assert a is not None
    for _ in range(3):
        lb.report_failure(a)
    lb.report_success(a)  # a request that was in flight before the ejection
    assert a.ejected_until > time.monotonic()
    assert all(lb.select().name == "10.0.0.2:80" for _ in range(10))


def test_max_fails_zero_disables_ejection() -> None:
    lb = passive_lb(max_fails=0)
    a = lb.get("10.0.0.1:80")
    assert a is not None
    assert not any(lb.report_failure(a, "x") for _ in range(100))
    assert a.ejected_until == 0.0
    assert {lb.select().name for _ in range(4)} == {"10.0.0.1:80", "10.0.0.2:80"}


def test_all_ejected_fails_open() -> None:
    lb = passive_lb(max_fails=1, eject=5.0)
    for b in lb.backends:
        lb.report_failure(b, "refused")
    b = lb.select()
    assert b in lb.backends
    assert lb.last_fail_open


# membership -------------------------------------------------------------------------------


def test_set_members_keeps_state_of_servers_that_stay() -> None:
    made: list[tuple[str, int]] = []

    def factory(address: tuple[str, int]) -> HttpPeer:
        made.append(address)
        return HttpPeer(address)

    lb = LoadBalancer("api", members(3), "least_conn", peer_factory=factory)
    assert made == [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)]
    b1, b2, b3 = lb.backends
    peer2 = b2.peer
    b2.inflight = 4
    lb.set_health(b2.name, False, "refused")
    version = lb.version

    removed = lb.set_members(
        [(("10.0.0.2", 80), 1), (("10.0.0.4", 80), 1), (("10.0.0.3", 80), 1)]
    )
    assert removed == [b1]
    assert made[3:] == [("10.0.0.4", 80)]
    assert [b.name for b in lb.backends] == ["10.0.0.2:80", "10.0.0.4:80", "10.0.0.3:80"]
    assert lb.backends[0] is b2 and lb.backends[2] is b3
    assert b2.peer is peer2 and b2.inflight == 4 and not b2.healthy and b2.reason == "refused"
    assert lb.get("10.0.0.1:80") is None
    assert lb.version == version + 1
    assert lb.selector.backends == lb.backends
    # health is still honoured after the change
    assert all(lb.select().name != "10.0.0.2:80" for _ in range(20))


def test_set_members_unchanged_is_a_no_op() -> None:
    lb = make()
    selector, version = lb.selector, lb.version
    assert lb.set_members(members(3)) == []
    assert lb.selector is selector and lb.version == version


def test_set_members_applies_weight_changes() -> None:
    lb = make("round_robin", n=2)
    a = lb.get("10.0.0.1:80")
    version = lb.version
    assert lb.set_members(members(2, (3, 1))) == []
    assert lb.get("10.0.0.1:80") is a
    assert a is not None and a.weight == 3
    assert lb.version == version + 1
    picks = Counter(lb.select().name for _ in range(400))
    assert picks == {"10.0.0.1:80": 300, "10.0.0.2:80": 100}


def test_set_members_duplicates_and_order() -> None:
    lb = make("round_robin", n=2)
    a, b = lb.backends
    removed = lb.set_members([(("10.0.0.2", 80), 1), (("10.0.0.1", 80), 1), (("10.0.0.2", 80), 5)])
    assert removed == []
    assert lb.backends == (b, a)
    assert b.weight == 1


def test_set_members_applies_weight_change_with_duplicates() -> None:
    lb = make("round_robin", n=2)
    lb.set_members([(("10.0.0.1", 80), 1), (("10.0.0.1", 80), 1), (("10.0.0.2", 80), 3)])
    assert [b.weight for b in lb.backends] == [1, 3]
    picks = Counter(lb.select().name for _ in range(400))
    assert picks == {"10.0.0.1:80": 100, "10.0.0.2:80": 300}


# reporting --------------------------------------------------------------------------------


def test_down_report() -> None:
    lb = LoadBalancer(
        "api", members(3), passive=PassiveHealth(max_fails=1, eject=30.0, max_eject=60.0)
    )
    assert lb.down_report() == ""
    lb.set_health("10.0.0.1:80", False, "connection refused")
    lb.set_health("10.0.0.2:80", False)
    b3 = lb.get("10.0.0.3:80")
    assert b3 is not None
    lb.report_failure(b3, "status 502")
    assert lb.down_report() == (
        "10.0.0.1:80 down: connection refused; "
        "10.0.0.2:80 down: health check failed; "
        "10.0.0.3:80 ejected for 30s more after failures, last failure: status 502"
    )


def test_down_report_ejected_without_reason() -> None:
    lb = LoadBalancer("api", members(1), passive=PassiveHealth(max_fails=1, eject=30.0))
    lb.report_failure(lb.backends[0])
    assert lb.down_report() == "10.0.0.1:80 ejected for 30s more after failures"


def test_repr() -> None:
    lb = make(n=1)
    lb.set_health("10.0.0.1:80", False)
    assert repr(lb) == "LoadBalancer('api', round_robin, [Backend(10.0.0.1:80, weight=1, down)])"


def test_ejection_backoff_never_overflows() -> None:
    lb = make(passive=PassiveHealth(max_fails=1, eject=1.0, max_eject=5.0))
    b = lb.backends[0]
    b.ejections = 5000  # a server that has been failing for days
    assert lb.report_failure(b, "refused")
    assert 4.0 < b.ejected_until - time.monotonic() <= 5.0
