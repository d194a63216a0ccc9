"""WorkerMetrics and MainMetrics: what a worker counts, and the snapshots it publishes."""

from __future__ import annotations

import bisect
import marshal
import math
from typing import Any

import pytest

from ferryman.metrics.recorder import (
    BUCKETS,
    SNAPSHOT_VERSION,
    MainMetrics,
    WorkerMetrics,
    bucket_index,
    status_class,
)

NBUCKETS = len(BUCKETS) + 1


def rec(
    m: WorkerMetrics,
    status: int = 200,
    duration: float = 0.001,
    *,
    listener: str = "main",
    route: str = "api",
    upstream: str = "backend",
    upstream_header: float = -1.0,
    bytes_in: int = 0,
    bytes_out: int = 0,
    upstream_used: bool = False,
    reused: bool = False,
    retries: int = 0,
) -> None:
    m.record(
        listener, route, upstream, status, duration, upstream_header, bytes_in, bytes_out,
        upstream_used, reused, retries,
    )  # fmt: skip


def one_hot(index: int) -> list[int]:
    counts = [0] * NBUCKETS
    counts[index] = 1
    return counts


def requests_of(snap: dict[str, Any]) -> dict[tuple[str, str, str, str], int]:
    return {(a, b, c, d): n for a, b, c, d, n in snap["requests"]}


def test_buckets_are_prometheus_defaults() -> None:
    assert BUCKETS == (
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0
    )  # fmt: skip
    assert list(BUCKETS) == sorted(BUCKETS)


def test_bucket_index_agrees_with_bisect_on_every_edge() -> None:
    values = [-1.0, 0.0, 1e-9, math.inf, 11.0, 1e9]
    for bound in BUCKETS:
        values += [bound, math.nextafter(bound, 0.0), math.nextafter(bound, math.inf)]
        values += [bound * 0.999, bound * 1.001]
    for value in values:
        assert bucket_index(value) == bisect.bisect_left(BUCKETS, value), value
    assert bucket_index(math.nan) == 0


@pytest.mark.parametrize(
    ("status", "klass"),
    [
        (100, "1xx"), (101, "1xx"), (199, "1xx"), (200, "2xx"), (204, "2xx"), (301, "3xx"),
        (404, "4xx"), (499, "4xx"), (500, "5xx"), (599, "5xx"),
        (0, "other"), (99, "other"), (600, "other"), (999, "other"), (-1, "other"),
    ],
)  # fmt: skip
def test_status_class(status: int, klass: str) -> None:
    assert status_class(status) == klass


def test_counts_by_key_and_status_class() -> None:
    m = WorkerMetrics()
    rec(m, 200)
    rec(m, 204)
    rec(m, 200)
    rec(m, 503)
    rec(m, 0)
    rec(m, 200, route="static", upstream="")
    rec(m, 404, listener="admin")
    assert requests_of(m.snapshot()) == {
        ("main", "api", "backend", "2xx"): 3,
        ("main", "api", "backend", "5xx"): 1,
        ("main", "api", "backend", "other"): 1,
        ("main", "static", "", "2xx"): 1,
        ("admin", "api", "backend", "4xx"): 1,
    }
    assert m.version == 7


def test_histogram_le_semantics_and_sums() -> None:
    m = WorkerMetrics()
    rec(m, duration=0.005)  # exactly on the first edge: the first bucket
    rec(m, duration=math.nextafter(0.005, 1.0))  # just above: the second
    rec(m, duration=10.0)  # the last finite bucket
    rec(m, duration=10.5)  # +Inf
    rec(m, duration=0.25)
    [(listener, route, counts, total)] = m.snapshot()["request_duration"]
    assert (listener, route) == ("main", "api")
    expected = [0] * NBUCKETS
    expected[0] = expected[1] = expected[13] = expected[14] = expected[6] = 1
    assert counts == expected
    assert total == pytest.approx(0.005 + 0.005 + 10.0 + 10.5 + 0.25)


def test_bad_durations_count_as_zero() -> None:
    m = WorkerMetrics()
    rec(m, duration=-0.5)  # the wall clock stepped back
    rec(m, duration=math.nan)
    [(_, _, counts, total)] = m.snapshot()["request_duration"]
    assert counts == [2] + [0] * (NBUCKETS - 1)
    assert total == 0.0


def test_duration_histogram_per_listener_and_route() -> None:
    m = WorkerMetrics()
    rec(m, duration=0.001, upstream="a")
    rec(m, 500, duration=0.2, upstream="b")  # same listener+route, other upstream and class
    rec(m, duration=0.03, route="other")
    hists = {(lst, rt): (c, t) for lst, rt, c, t in m.snapshot()["request_duration"]}
    assert hists[("main", "api")][0] == [1, 0, 0, 0, 0, 0, 1] + [0] * 8
    assert hists[("main", "api")][1] == pytest.approx(0.201)
    assert hists[("main", "other")] == (one_hot(3), 0.03)


def test_upstream_response_histogram() -> None:
    m = WorkerMetrics()
    rec(m, upstream_header=-1.0)  # no upstream answered: not observed
    rec(m, upstream_header=0.0)
    rec(m, upstream_header=0.075)
    rec(m, upstream="other", upstream_header=-0.0001)
    snap = m.snapshot()
    assert snap["upstream_response"] == [("backend", [1, 0, 0, 0, 1] + [0] * 10, 0.075)]


def test_connects_reuses_retries_and_bytes() -> None:
    m = WorkerMetrics()
    rec(m, upstream_used=True, reused=False, bytes_in=10, bytes_out=100)
    rec(m, upstream_used=True, reused=True, bytes_out=50)
    rec(m, upstream_used=True, reused=True, retries=2)
    rec(m, upstream_used=False, reused=True)  # no upstream connection: neither
    rec(m, upstream="b", upstream_used=True, listener="admin", bytes_in=7)
    snap = m.snapshot()
    assert sorted(snap["upstreams"]) == [("b", 1, 0, 0), ("backend", 1, 2, 2)]
    assert sorted(snap["traffic"]) == [("admin", 7, 0), ("main", 10, 150)]


def test_gauges() -> None:
    m = WorkerMetrics()
    assert m.snapshot()["active_connections"] == 0
    m.set_active_connections(3)
    assert m.snapshot()["active_connections"] == 3
    conns = [1, 2, 3, 4]
    m.set_connections_source(lambda: len(conns))
    assert m.snapshot()["active_connections"] == 4
    conns.pop()
    assert m.snapshot()["active_connections"] == 3
    m.set_connections_source(lambda: 1 // 0)
    assert m.snapshot()["active_connections"] == 0  # a broken source: 0, no exception
    m.set_connections_source(None)
    assert m.snapshot()["active_connections"] == 3

    m.set_health("api", "10.0.0.1:80", True)
    m.set_health("api", "10.0.0.2:80", False)
    assert m.snapshot()["health"] == [("api", "10.0.0.1:80", 1), ("api", "10.0.0.2:80", 0)]
    states = [("api", "10.0.0.1:80", False), ("web", "w:80", True)]
    m.set_health_source(lambda: states)
    assert m.snapshot()["health"] == [
        ("api", "10.0.0.1:80", 0), ("api", "10.0.0.2:80", 0), ("web", "w:80", 1)
    ]  # fmt: skip
    stopped = m.snapshot(gauges=False)
    assert stopped["active_connections"] == 0
    assert stopped["health"] == []


def test_version_moves_with_records_and_gauges() -> None:
    m = WorkerMetrics()
    v0 = m.version
    rec(m)
    assert m.version == v0 + 1
    m.set_active_connections(1)
    m.set_health("a", "s", True)
    assert m.version == v0 + 3
    m.snapshot()
    assert m.version == v0 + 3  # taking a snapshot changes nothing


def test_snapshot_marshal_round_trip() -> None:
    m = WorkerMetrics()
    rec(m, upstream_used=True, upstream_header=0.01, bytes_in=5, bytes_out=6, retries=1)
    rec(m, 502, upstream_used=True, reused=True, duration=3.0)
    m.set_health("api", "s1", True)
    m.set_active_connections(2)
    snap = m.snapshot()

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list | tuple):
            return all(plain(v) for v in value)
        return type(value) in (str, int, float)

    assert plain(snap)
    assert snap["version"] == SNAPSHOT_VERSION and snap["kind"] == "worker"
    assert marshal.loads(marshal.dumps(snap)) == snap


def test_snapshot_is_a_copy() -> None:
    m = WorkerMetrics()
    rec(m)
    snap = m.snapshot()
    rec(m)
    assert requests_of(snap) == {("main", "api", "backend", "2xx"): 1}
    assert snap["request_duration"][0][2][0] == 1


def test_load_base_continues_counters() -> None:
    old = WorkerMetrics()
    rec(old, upstream_used=True, bytes_in=3, bytes_out=4, upstream_header=0.002, retries=1)
    rec(old, 500, duration=0.3, upstream_used=True, reused=True)
    old.set_active_connections(9)
    old.set_health("api", "s1", False)
    base = marshal.loads(marshal.dumps(old.snapshot()))

    new = WorkerMetrics()
    new.load_base(base)
    rec(new, upstream_used=True, reused=True, bytes_out=1, upstream_header=0.002)
    snap = new.snapshot()
    assert requests_of(snap) == {
        ("main", "api", "backend", "2xx"): 2,
        ("main", "api", "backend", "5xx"): 1,
    }
    [(_, _, counts, total)] = snap["request_duration"]
    assert counts[0] == 2 and counts[7] == 1 and sum(counts) == 3
    assert total == pytest.approx(0.302)
    assert snap["upstreams"] == [("backend", 1, 2, 1)]
    assert snap["traffic"] == [("main", 3, 5)]
    assert snap["upstream_response"] == [("backend", [2] + [0] * 14, pytest.approx(0.004))]
    # gauges are not carried over
    assert snap["active_connections"] == 0
    assert snap["health"] == []


def test_load_base_ignores_other_layouts() -> None:
    m = WorkerMetrics()
    rec(m)
    snap = m.snapshot()
    other = WorkerMetrics()
    other.load_base(dict(snap, version=SNAPSHOT_VERSION + 1))
    other.load_base(MainMetrics().snapshot())
    assert other.snapshot()["requests"] == []
    odd = dict(snap, request_duration=[("main", "api", [1, 2, 3], 1.0)])
    other.load_base(odd)  # histograms of other buckets are not merged
    assert other.snapshot()["request_duration"] == [("main", "api", [0] * NBUCKETS, 0.0)]


def test_int_arguments_where_floats_are_expected() -> None:
    m = WorkerMetrics()
    rec(m, duration=1, upstream_header=0)  # ints from Python callers
    [(_, _, counts, total)] = m.snapshot()["request_duration"]
    assert counts[9] == 1 and total == 1.0


def test_main_metrics() -> None:
    main = MainMetrics(loaded_at=100.0)
    assert main.snapshot() == {
        "version": SNAPSHOT_VERSION,
        "kind": "main",
        "reloads_success": 0,
        "reloads_failure": 0,
        "last_reload_success": 100.0,
    }
    main.record_reload(True, when=200.0)
    main.record_reload(False)
    main.record_reload(False)
    snap = main.snapshot()
    assert (snap["reloads_success"], snap["reloads_failure"]) == (1, 2)
    assert snap["last_reload_success"] == 200.0
    main.record_reload(True)
    assert main.snapshot()["last_reload_success"] > 1e9  # now

    again = MainMetrics(loaded_at=50.0)
    again.load_base(snap)
    assert again.snapshot()["reloads_failure"] == 2
    assert again.snapshot()["last_reload_success"] == 200.0
    assert marshal.loads(marshal.dumps(snap)) == snap
