"""The board's slots summed and rendered, read back with prometheus_client's parser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ferryman.metrics.board import MetricsBoard, SlotRecord
from ferryman.metrics.exposition import (
    CONTENT_TYPE,
    aggregate,
    families,
    make_registry,
    render,
)
from ferryman.metrics.recorder import BUCKETS, MainMetrics, WorkerMetrics

NAMES = {
    "ferryman_requests_total": "counter",
    "ferryman_request_duration_seconds": "histogram",
    "ferryman_upstream_response_seconds": "histogram",
    "ferryman_received_bytes_total": "counter",
    "ferryman_sent_bytes_total": "counter",
    "ferryman_active_connections": "gauge",
    "ferryman_workers": "gauge",
    "ferryman_upstream_connects_total": "counter",
    "ferryman_upstream_reuses_total": "counter",
    "ferryman_upstream_reuse_ratio": "gauge",
    "ferryman_upstream_retries_total": "counter",
    "ferryman_upstream_server_healthy": "gauge",
    "ferryman_config_reloads_total": "counter",
    "ferryman_config_last_reload_success_timestamp_seconds": "gauge",
    "ferryman_cache_requests_total": "counter",
    "ferryman_limited_requests_total": "counter",
}


def rec(m: WorkerMetrics, status: int, duration: float, **kw: Any) -> None:
    args: dict[str, Any] = {
        "listener": "main", "route": "api", "upstream": "backend", "upstream_header": -1.0,
        "bytes_in": 0, "bytes_out": 0, "upstream_used": False, "reused": False, "retries": 0,
    }  # fmt: skip
    args.update(kw)
    m.record(
        args["listener"], args["route"], args["upstream"], status, duration,
        args["upstream_header"], args["bytes_in"], args["bytes_out"], args["upstream_used"],
        args["reused"], args["retries"],
    )  # fmt: skip


class RecordsCollector:
    """Renders hand-made slot records (pids of our choosing), as the board's collector
    renders the board's."""

    def __init__(self, records: list[SlotRecord], live: set[int]) -> None:
        self.records = records
        self.live = live

    def collect(self) -> Iterator[Metric]:
        yield from families(aggregate(self.records, lambda pid: pid in self.live))


def render_records(records: list[SlotRecord], live: Iterable[int]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RecordsCollector(records, set(live)))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``text``: (name, labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


@pytest.fixture
def three_slots() -> list[SlotRecord]:
    """The main process (pid 100) and two workers: pid 101 alive, pid 102 dead."""
    w1 = WorkerMetrics()
    rec(w1, 200, 0.004, upstream_header=0.003, upstream_used=True, bytes_in=100, bytes_out=1000)
    rec(w1, 200, 0.02, upstream_header=0.01, upstream_used=True, reused=True, bytes_out=500)
    rec(w1, 502, 1.0, upstream_used=True, retries=2)
    rec(w1, 200, 0.001, route="static", upstream="", bytes_out=10)
    w1.set_active_connections(3)
    w1.set_health("backend", "10.0.0.1:80", True)
    w1.set_health("backend", "10.0.0.2:80", True)
    w1.set_health("backend", "10.0.0.3:80", False)

    w2 = WorkerMetrics()
    rec(w2, 200, 0.005, upstream_header=0.005, upstream_used=True, reused=True, bytes_in=1)
    rec(w2, 404, 12.0, listener="admin", route="api", upstream_used=True, reused=True)
    w2.set_active_connections(5)
    w2.set_health("backend", "10.0.0.1:80", False)

    w3 = WorkerMetrics()  # dead: its counters count, its gauges do not
    rec(w3, 200, 0.3, upstream_used=True, reused=True, bytes_out=1)
    w3.set_active_connections(50)
    w3.set_health("backend", "10.0.0.1:80", True)
    w3.set_health("backend", "10.0.0.9:80", True)

    main = MainMetrics(loaded_at=1000.0)
    main.record_reload(True, when=2000.0)
    main.record_reload(False)
    return [
        SlotRecord(0, 100, main.snapshot(), False, 0.0),
        SlotRecord(1, 101, w1.snapshot(), False, 0.0),
        SlotRecord(2, 101, w2.snapshot(), False, 0.0),  # (same live pid: fine)
        SlotRecord(3, 102, w3.snapshot(), False, 0.0),
    ]


def test_values(three_slots: list[SlotRecord]) -> None:
    parsed = samples(render_records(three_slots, live={100, 101}))
    req = "ferryman_requests_total"
    assert value(parsed, req, listener="main", route="api", upstream="backend",
                 status_class="2xx") == 4  # fmt: skip
    assert value(parsed, req, listener="main", route="api", upstream="backend",
                 status_class="5xx") == 1  # fmt: skip
    assert value(parsed, req, listener="admin", route="api", upstream="backend",
                 status_class="4xx") == 1  # fmt: skip
    assert value(parsed, req, listener="main", route="static", upstream="",
                 status_class="2xx") == 1  # fmt: skip
    assert sum(v for (n, _), v in parsed.items() if n == req) == 7

    assert value(parsed, "ferryman_received_bytes_total", listener="main") == 101
    assert value(parsed, "ferryman_sent_bytes_total", listener="main") == 1511
    assert value(parsed, "ferryman_sent_bytes_total", listener="admin") == 0

    assert value(parsed, "ferryman_upstream_connects_total", upstream="backend") == 2
    assert value(parsed, "ferryman_upstream_reuses_total", upstream="backend") == 4
    assert value(parsed, "ferryman_upstream_retries_total", upstream="backend") == 2
    assert value(parsed, "ferryman_upstream_reuse_ratio", upstream="backend") == pytest.approx(
        4 / 6
    )
    # requests no upstream served: no per-upstream series
    assert not [k for k in parsed if k[0].startswith("ferryman_upstream_") and
                ("upstream", "") in k[1]]  # fmt: skip

    # gauges: live workers only
    assert value(parsed, "ferryman_active_connections") == 8
    assert value(parsed, "ferryman_workers") == 2
    healthy = "ferryman_upstream_server_healthy"
    assert value(parsed, healthy, upstream="backend", server="10.0.0.1:80") == 0  # 1 ∧ 0
    assert value(parsed, healthy, upstream="backend", server="10.0.0.2:80") == 1
    assert value(parsed, healthy, upstream="backend", server="10.0.0.3:80") == 0
    assert (healthy, frozenset({("upstream", "backend"), ("server", "10.0.0.9:80")})) not in (
        parsed
    )  # reported by the dead worker only

    assert value(parsed, "ferryman_config_reloads_total", result="success") == 1
    assert value(parsed, "ferryman_config_reloads_total", result="failure") == 1
    assert value(parsed, "ferryman_config_last_reload_success_timestamp_seconds") == 2000.0


def test_histograms(three_slots: list[SlotRecord]) -> None:
    parsed = samples(render_records(three_slots, live={100, 101}))
    name = "ferryman_request_duration_seconds"
    les = [str(b) for b in BUCKETS] + ["+Inf"]
    main_api = [
        value(parsed, name + "_bucket", listener="main", route="api", le=le) for le in les
    ]
    # 0.004, 0.02, 1.0, 0.005 (edge: le=0.005), 0.3 (dead worker: still counted)
    assert main_api == [2, 2, 3, 3, 3, 3, 3, 4, 4, 5, 5, 5, 5, 5, 5]
    assert value(parsed, name + "_count", listener="main", route="api") == 5
    assert value(parsed, name + "_sum", listener="main", route="api") == pytest.approx(1.329)
    admin = [value(parsed, name + "_bucket", listener="admin", route="api", le=le) for le in les]
    assert admin == [0] * 14 + [1]  # 12 s: only +Inf
    assert value(parsed, name + "_sum", listener="admin", route="api") == 12.0

    up = "ferryman_upstream_response_seconds"
    ups = [value(parsed, up + "_bucket", upstream="backend", le=le) for le in les]
    assert ups == [2, 3] + [3] * 13  # 0.003, 0.005 (edge), 0.01
    assert value(parsed, up + "_count", upstream="backend") == 3
    assert value(parsed, up + "_sum", upstream="backend") == pytest.approx(0.018)


def test_every_family_named_typed_and_documented(three_slots: list[SlotRecord]) -> None:
    text = render_records(three_slots, live={100, 101})
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.+)$", text, re.M))
    assert types == NAMES
    assert set(helps) == set(NAMES)
    assert all(len(h) > 10 for h in helps.values())
    sample_names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line and not line.startswith("#")}  # fmt: skip
    assert "ferryman_requests_total" in sample_names
    assert not [n for n in sample_names if n.endswith("_created") or "_total_total" in n]


def test_empty_board_renders() -> None:
    board = MetricsBoard(workers=2, slot_size=16 * 1024)
    try:
        parsed = samples(render(make_registry(board)).decode())
        assert value(parsed, "ferryman_active_connections") == 0
        assert value(parsed, "ferryman_workers") == 0
        assert value(parsed, "ferryman_config_reloads_total", result="success") == 0
        assert value(parsed, "ferryman_config_last_reload_success_timestamp_seconds") == 0
    finally:
        board.close()


def test_render_from_a_board() -> None:
    board = MetricsBoard(workers=2, slot_size=64 * 1024)
    try:
        for slot in (1, 2):
            w = WorkerMetrics()
            rec(w, 200, 0.01, upstream_used=True)
            w.set_active_connections(slot)
            board.write(slot, w.snapshot())
        board.write(0, MainMetrics(loaded_at=5.0).snapshot())
        registry = make_registry(board)
        parsed = samples(render(registry).decode())
        assert value(parsed, "ferryman_requests_total", listener="main", route="api",
                     upstream="backend", status_class="2xx") == 2  # fmt: skip
        assert value(parsed, "ferryman_active_connections") == 3  # this process: alive
        assert value(parsed, "ferryman_workers") == 2
        assert value(parsed, "ferryman_upstream_reuse_ratio", upstream="backend") == 0.0
        # a later scrape sees later writes
        w = WorkerMetrics()
        board.write(2, w.snapshot(gauges=False), final=True)
        parsed = samples(render(registry).decode())
        assert value(parsed, "ferryman_workers") == 1
        assert value(parsed, "ferryman_requests_total", listener="main", route="api",
                     upstream="backend", status_class="2xx") == 1  # fmt: skip
    finally:
        board.close()


def test_label_values_are_escaped() -> None:
    w = WorkerMetrics()
    rec(w, 200, 0.01, route='we"ird\\route\nx')
    records = [SlotRecord(1, os.getpid(), w.snapshot(), False, 0.0)]
    parsed = samples(render_records(records, live={os.getpid()}))
    assert value(parsed, "ferryman_requests_total", listener="main", route='we"ird\\route\nx',
                 upstream="backend", status_class="2xx") == 1  # fmt: skip


def test_other_snapshot_versions_are_skipped() -> None:
    w = WorkerMetrics()
    rec(w, 200, 0.01)
    snap = dict(w.snapshot(), version=99)
    totals = aggregate([SlotRecord(1, 1, snap, False, 0.0)], lambda pid: True)
    assert totals.requests == {} and totals.workers == 0


def test_reuse_ratio_only_with_uses() -> None:
    w = WorkerMetrics()
    rec(w, 502, 0.01, upstream="down")  # the upstream was chosen, no connection used
    records = [SlotRecord(1, 1, w.snapshot(), False, 0.0)]
    parsed = samples(render_records(records, live={1}))
    assert value(parsed, "ferryman_upstream_connects_total", upstream="down") == 0
    assert ("ferryman_upstream_reuse_ratio", frozenset({("upstream", "down")})) not in parsed


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_package_loads_prometheus_client_only_when_asked() -> None:
    code = (
        "import sys, ferryman.metrics as m\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "assert callable(m.WorkerMetrics) and callable(m.MetricsBoard)\n"
        "assert m.render is __import__('ferryman.metrics.exposition').metrics.exposition.render\n"
        "assert 'prometheus_client' in sys.modules\n"
        "assert callable(m.run_metrics_process) and callable(m.serve_metrics)\n"
        "try:\n    m.nothing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_cache_results_add_up_over_workers_and_survive_a_restart() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    for result in ("HIT", "HIT", "MISS", "STALE"):
        first.record_cache("static", result)
    second.record_cache("static", "HIT")
    second.record_cache("api", "EXPIRED")
    replacement = WorkerMetrics()  # (the first worker restarted in its slot)
    replacement.load_base(first.snapshot())
    replacement.record_cache("static", "UPDATING")
    records = [
        SlotRecord(1, 100, replacement.snapshot(), False, 1.0),
        SlotRecord(2, 101, second.snapshot(), False, 1.0),
    ]
    parsed = samples(render_records(records, live={100, 101}))
    name = "ferryman_cache_requests_total"
    assert value(parsed, name, route="static", result="hit") == 3
    assert value(parsed, name, route="static", result="miss") == 1
    assert value(parsed, name, route="static", result="stale") == 1
    assert value(parsed, name, route="static", result="updating") == 1
    assert value(parsed, name, route="api", result="expired") == 1
