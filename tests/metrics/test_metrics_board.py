"""MetricsBoard across processes, and WorkerPublisher on a real event loop."""

from __future__ import annotations

import asyncio
import logging
import marshal
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from ferryman.metrics.board import (
    MetricsBoard,
    WorkerPublisher,
    pid_alive,
    worker_slot,
)
from ferryman.metrics.exposition import aggregate
from ferryman.metrics.recorder import MainMetrics, WorkerMetrics

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def fork(child: Callable[[], Any]) -> int:
    """Run ``child`` in a forked process that exits with 0 if it returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = 5.0) -> int | None:
    """The child's exit status (waitpid-style), or None if it did not exit in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    return None


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def worker_snapshot(requests: int = 1, active: int = 0, healthy: bool | None = None) -> Any:
    m = WorkerMetrics()
    for _ in range(requests):
        m.record("main", "api", "backend", 200, 0.001, 0.0005, 1, 2, True, False, 0)
    m.set_active_connections(active)
    if healthy is not None:
        m.set_health("backend", "10.0.0.1:80", healthy)
    return m.snapshot()


def request_count(snap: dict[str, Any]) -> int:
    return sum(row[4] for row in snap["requests"])


@pytest.fixture
def board() -> Iterator[MetricsBoard]:
    b = MetricsBoard(workers=4, slot_size=64 * 1024)
    yield b
    b.close()


def test_geometry() -> None:
    b = MetricsBoard()
    try:
        assert (b.workers, b.slots, b.slot_size) == (64, 65, 1024 * 1024)
        assert b.capacity == 512 * 1024 - 40
        assert worker_slot(0) == 1 and worker_slot(63) == 64
    finally:
        b.close()
    with pytest.raises(ValueError):
        MetricsBoard(workers=0)


def test_write_read_per_slot(board: MetricsBoard) -> None:
    assert board.read(1) is None
    assert board.read_all() == []
    board.write(1, worker_snapshot(1))
    board.write(3, worker_snapshot(3))
    board.write(0, MainMetrics(5.0).snapshot())
    one = board.read(1)
    assert one is not None
    assert (one.slot, one.pid, one.final) == (1, os.getpid(), False)
    assert abs(one.written_at - time.time()) < 5
    assert request_count(one.snapshot) == 1
    assert board.read(2) is None
    assert [(r.slot, r.snapshot["kind"]) for r in board.read_all()] == [
        (0, "main"), (1, "worker"), (3, "worker")
    ]  # fmt: skip
    board.write(1, worker_snapshot(7), final=True)
    latest = board.read(1)
    assert latest is not None and latest.final and request_count(latest.snapshot) == 7


def test_many_writes_alternate_copies_and_latest_wins(board: MetricsBoard) -> None:
    for n in range(1, 30):
        board.write(2, worker_snapshot(n if n % 3 else 200))
        got = board.read(2)
        assert got is not None
        assert request_count(got.snapshot) == (n if n % 3 else 200)
    board.write(2, {"kind": "tiny"})  # shorter after longer
    got = board.read(2)
    assert got is not None and got.snapshot == {"kind": "tiny"}


def test_slot_out_of_range(board: MetricsBoard) -> None:
    board.write(4, worker_snapshot())  # worker index 3: the last slot
    for slot in (5, 65, -1):
        with pytest.raises(ValueError, match="out of range"):
            board.write(slot, worker_snapshot())
        with pytest.raises(ValueError, match="out of range"):
            board.read(slot)


def test_oversize_snapshot(board: MetricsBoard) -> None:
    board.write(1, worker_snapshot(2))
    m = WorkerMetrics()
    for i in range(2000):
        m.record("main", f"route-{i}", "backend", 200, 0.001, -1.0, 0, 0, False, False, 0)
    with pytest.raises(ValueError, match=r"does not fit in a board slot \(32728 bytes\)"):
        board.write(1, m.snapshot())
    got = board.read(1)
    assert got is not None and request_count(got.snapshot) == 2  # untouched


def test_exact_fit() -> None:
    board = MetricsBoard(workers=1, slot_size=4096)
    try:
        base = len(marshal.dumps({"k": "x" * 300})) - 300  # (a long string's overhead)
        doc = {"k": "x" * (board.capacity - base)}
        board.write(1, doc)
        got = board.read(1)
        assert got is not None and got.snapshot == doc
        with pytest.raises(ValueError):
            board.write(1, {"k": doc["k"] + "x"})
    finally:
        board.close()


def test_writer_killed_mid_write_leaves_previous_copy(board: MetricsBoard) -> None:
    board.write(1, worker_snapshot(3))
    board.write(1, worker_snapshot(4))  # copies now hold 3 (older) and 4 (newer)
    # what a writer killed while overwriting the older copy leaves: an odd sequence
    base = 1 * board.slot_size
    half = board.slot_size // 2
    seqs = [struct.unpack_from("<Q", board._mm, base + k * half)[0] for k in (0, 1)]
    older = base + (0 if seqs[0] < seqs[1] else half)
    struct.pack_into("<Q", board._mm, older, max(seqs) + 1)
    board._mm[older + 40 : older + 60] = b"\xff" * 20
    got = board.read(1)
    assert got is not None and request_count(got.snapshot) == 4
    # the next writer (a restarted worker) repairs the torn copy and keeps the good one
    board.write(1, worker_snapshot(5))
    got = board.read(1)
    assert got is not None and request_count(got.snapshot) == 5
    board.write(1, worker_snapshot(6))
    got = board.read(1)
    assert got is not None and request_count(got.snapshot) == 6


def test_child_process_writes_its_slot(board: MetricsBoard) -> None:
    def child() -> None:
        board.write(worker_slot(1), worker_snapshot(5, active=2))

    pid = fork(child)
    assert reap(pid) == 0
    got = board.read(2)
    assert got is not None
    assert got.pid == pid and request_count(got.snapshot) == 5


def test_slots_of_several_processes_sum(board: MetricsBoard) -> None:
    pids = [fork(lambda i=i: board.write(worker_slot(i), worker_snapshot(i + 1))) for i in range(3)]
    for pid in pids:
        assert reap(pid) == 0
    board.write(0, MainMetrics().snapshot())
    totals = aggregate(board.read_all())
    assert totals.requests == {("main", "api", "backend", "2xx"): 1 + 2 + 3}
    assert totals.upstreams == {"backend": [6, 0, 0]}


def test_dead_writer_keeps_counters_loses_gauges(board: MetricsBoard) -> None:
    # a worker that is alive (blocked on a pipe) and one killed after publishing
    read_end, write_end = os.pipe()

    def live_worker() -> None:
        board.write(1, worker_snapshot(2, active=3, healthy=False))
        os.close(write_end)
        os.read(read_end, 1)  # until the test ends

    def killed_worker() -> None:
        board.write(2, worker_snapshot(5, active=7, healthy=True))
        time.sleep(60)

    live = fork(live_worker)
    dead = fork(killed_worker)
    try:
        deadline = time.monotonic() + 5
        while len(board.read_all()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert aggregate(board.read_all()).active_connections == 10
        assert aggregate(board.read_all()).workers == 2
        kill(dead)
        assert not pid_alive(dead)
        totals = aggregate(board.read_all())
        assert totals.requests == {("main", "api", "backend", "2xx"): 7}  # all counted
        assert totals.active_connections == 3  # only the live worker's
        assert totals.workers == 1
        assert totals.health == {("backend", "10.0.0.1:80"): 0}
    finally:
        os.close(read_end)
        os.close(write_end)
        kill(live)
        kill(dead)
    totals = aggregate(board.read_all())
    assert (totals.active_connections, totals.workers, totals.health) == (0, 0, {})
    assert totals.requests == {("main", "api", "backend", "2xx"): 7}


def test_pid_alive_sees_zombies_as_dead() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    pid = fork(lambda: None)
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(pid)  # exited, not reaped yet: a zombie
    assert reap(pid) == 0
    assert not pid_alive(pid)


def test_final_slot_has_no_gauges(board: MetricsBoard) -> None:
    board.write(1, worker_snapshot(1, active=4, healthy=True))
    assert aggregate(board.read_all()).active_connections == 4  # this process: alive
    board.write(1, worker_snapshot(1, active=4, healthy=True), final=True)
    totals = aggregate(board.read_all())
    assert (totals.active_connections, totals.workers, totals.health) == (0, 0, {})
    assert totals.requests == {("main", "api", "backend", "2xx"): 1}


# WorkerPublisher ---------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def run_for(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def test_publisher_publishes_changes(
    loop: asyncio.AbstractEventLoop, board: MetricsBoard
) -> None:
    metrics = WorkerMetrics()
    conns = [1, 2]
    metrics.set_connections_source(lambda: len(conns))
    pub = WorkerPublisher(loop, metrics, board, worker_slot(0), interval=0.02, refresh=0.2)
    pub.start()
    got = board.read(1)
    assert got is not None and got.snapshot["requests"] == []  # published at once
    assert got.snapshot["active_connections"] == 2
    metrics.record("main", "api", "backend", 200, 0.001, -1.0, 0, 0, False, False, 0)
    run_for(loop, 0.1)
    got = board.read(1)
    assert got is not None and request_count(got.snapshot) == 1
    conns.append(3)  # a gauge change without requests: published within `refresh`
    run_for(loop, 0.3)
    got = board.read(1)
    assert got is not None and got.snapshot["active_connections"] == 3
    pub.stop()
    got = board.read(1)
    assert got is not None and got.final
    assert got.snapshot["active_connections"] == 0
    assert request_count(got.snapshot) == 1
    run_for(loop, 0.1)  # no more publications after stop
    again = board.read(1)
    assert again is not None and again.written_at == got.written_at


def test_publisher_skips_unchanged(loop: asyncio.AbstractEventLoop, board: MetricsBoard) -> None:
    metrics = WorkerMetrics()
    pub = WorkerPublisher(loop, metrics, board, worker_slot(0), interval=0.02, refresh=10.0)
    pub.start()
    first = board.read(1)
    run_for(loop, 0.1)
    second = board.read(1)
    assert first is not None and second is not None
    assert second.written_at == first.written_at
    pub.stop()


def test_restarted_worker_continues_its_slot(
    loop: asyncio.AbstractEventLoop, board: MetricsBoard
) -> None:
    def first_worker() -> None:
        lp = uvloop.new_event_loop()
        m = WorkerMetrics()
        pub = WorkerPublisher(lp, m, board, worker_slot(2), interval=0.01)
        pub.start()
        for _ in range(4):
            m.record("main", "api", "backend", 200, 0.001, -1.0, 0, 10, True, False, 0)
        lp.run_until_complete(asyncio.sleep(0.05))
        time.sleep(60)  # killed here, without a final publication

    pid = fork(first_worker)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = board.read(3)
            if got is not None and request_count(got.snapshot) == 4:
                break
            time.sleep(0.01)
    finally:
        kill(pid)
    metrics = WorkerMetrics()
    pub = WorkerPublisher(loop, metrics, board, worker_slot(2), interval=0.01)
    pub.start()
    metrics.record("main", "api", "backend", 500, 0.001, -1.0, 0, 5, True, True, 0)
    run_for(loop, 0.05)
    got = board.read(3)
    assert got is not None and got.pid == os.getpid()
    assert {row[3]: row[4] for row in got.snapshot["requests"]} == {"2xx": 4, "5xx": 1}
    assert got.snapshot["traffic"] == [("main", 0, 45)]
    assert got.snapshot["upstreams"] == [("backend", 4, 1, 0)]
    pub.stop()


def test_publisher_logs_oversize_once(
    loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    board = MetricsBoard(workers=1, slot_size=1024)
    try:
        metrics = WorkerMetrics()
        pub = WorkerPublisher(loop, metrics, board, 1, interval=0.01)
        with caplog.at_level(logging.ERROR, logger="ferryman.metrics"):
            for i in range(50):
                metrics.record("l", f"route-{i}", "u", 200, 0.1, -1.0, 0, 0, False, False, 0)
            pub.start()  # does not raise
            run_for(loop, 0.05)
            metrics.record("l", "r", "u", 200, 0.1, -1.0, 0, 0, False, False, 0)
            run_for(loop, 0.05)
            pub.stop()
        errors = [r for r in caplog.records if "does not fit" in r.getMessage()]
        assert len(errors) == 1
    finally:
        board.close()


def test_publisher_refuses_a_slot_the_board_lacks(
    loop: asyncio.AbstractEventLoop, board: MetricsBoard
) -> None:
    with pytest.raises(ValueError, match="out of range"):
        WorkerPublisher(loop, WorkerMetrics(), board, worker_slot(4))
