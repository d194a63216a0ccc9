"""HealthBoard across processes, and the control process publishing real check results."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tiny_http import free_port

from ferryman.lb.balancer import LoadBalancer
from ferryman.lb.discovery import StaticDiscovery
from ferryman.lb.health import TcpHealthCheck
from ferryman.lb.monitor import GroupMonitor, apply_snapshot
from ferryman.lb.shared import HealthBoard, run_control_process

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

SNAP = [{"host": "10.0.0.1", "port": 80, "weight": 1, "healthy": True, "reason": ""}]


def poll(fn: Callable[[], Any], timeout: float = 5.0, step: float = 0.01) -> Any:
    """``fn()``'s first truthy result within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fn()
        if result:
            return result
        time.sleep(step)
    return None


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


@pytest.fixture
def board() -> Iterator[HealthBoard]:
    b = HealthBoard(size=256 * 1024)
    yield b
    b.close()


def test_publish_read_roundtrip(board: HealthBoard) -> None:
    assert board.sequence == 0
    assert board.read() is None
    board.publish({"api": SNAP})
    assert board.sequence == 2
    assert board.read() == {"api": SNAP}
    assert board.read() is None  # unchanged since the last read
    assert board.read() is None
    board.publish({"api": [], "web": SNAP})
    assert board.read() == {"api": [], "web": SNAP}
    assert board.sequence == 4


def test_shorter_document_after_longer(board: HealthBoard) -> None:
    board.publish({"api": SNAP * 50})
    assert board.read() == {"api": SNAP * 50}
    board.publish({})
    assert board.read() == {}


def test_too_large_document(board: HealthBoard) -> None:
    board.publish({"api": SNAP})
    huge = {"api": [dict(SNAP[0], reason="x" * 300 * 1024)]}
    with pytest.raises(ValueError, match=r"exceeds the board's 262144"):
        board.publish(huge)
    # the previous document is still there, untouched
    assert board.sequence == 2
    assert board.read() == {"api": SNAP}


def test_exact_fit() -> None:
    board = HealthBoard(size=64)
    try:
        doc = {"k": "x" * (64 - 16 - len('{"k":""}'))}
        board.publish(doc)
        assert board.read() == doc
        with pytest.raises(ValueError):
            board.publish({"k": doc["k"] + "x"})
    finally:
        board.close()


def test_write_in_progress_and_dead_writer(board: HealthBoard) -> None:
    board.publish({"v": 1})
    # a writer stopped half-way (odd sequence): readers wait
    struct.pack_into("<Q", board._mm, 0, 3)
    assert board.read() is None
    # the next publication starts from a clean even value
    board.publish({"v": 2})
    assert board.sequence % 2 == 0 and board.sequence > 3
    assert board.read() == {"v": 2}


def test_child_publishes_parent_reads(board: HealthBoard) -> None:
    def child() -> None:
        board.publish({"from": "child", "pid": os.getpid()})

    pid = fork(child)
    try:
        doc = poll(board.read)
        assert doc == {"from": "child", "pid": pid}
        assert reap(pid) == 0
    finally:
        kill(pid)


def test_both_directions(board: HealthBoard) -> None:
    """Parent publishes after the fork, the child sees it and answers."""

    def child() -> None:
        doc = poll(board.read)
        if not doc or doc.get("step") != 1:
            raise SystemExit(1)
        board.publish({"step": 2, "echo": doc["token"]})

    pid = fork(child)
    try:
        board.publish({"step": 1, "token": "abc"})
        doc = poll(lambda: (d := board.read()) and d.get("step") == 2 and d)
        assert doc == {"step": 2, "echo": "abc"}
        assert reap(pid) == 0
    finally:
        kill(pid)


class Acceptor:
    """A listening socket accepting (and closing) connections in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_control_process_publishes_check_results(board: HealthBoard) -> None:
    live = Acceptor()  # listening before the fork; accepting (in a thread) after it
    dead_port = free_port()
    members = [(("127.0.0.1", live.port), 1), (("127.0.0.1", dead_port), 1)]
    check = TcpHealthCheck(interval=0.1, timeout=0.5, fall=2, rise=2)
    monitor = GroupMonitor("api", StaticDiscovery(members), check)

    def child() -> None:
        live.sock.close()  # the child only probes
        run_control_process(board, [monitor])

    pid = fork(child)
    try:
        live.start()

        def down_seen() -> dict[str, Any] | None:
            doc = board.read()
            if doc is None:
                return None
            snap = doc["api"]
            return doc if len(snap) == 2 and not snap[1]["healthy"] else None

        doc = poll(down_seen, timeout=10.0)
        assert doc is not None, "the control process did not publish the dead server as down"
        assert doc["api"] == [
            {"host": "127.0.0.1", "port": live.port, "weight": 1, "healthy": True, "reason": ""},
            {"host": "127.0.0.1", "port": dead_port, "weight": 1, "healthy": False,
             "reason": "connection refused"},
        ]
        assert poll(lambda: live.connections >= 2, timeout=5.0)

        # a worker applies the snapshot to its own balancer
        balancer = LoadBalancer("api", members)
        apply_snapshot(balancer, doc["api"])
        assert {balancer.select().name for _ in range(4)} == {f"127.0.0.1:{live.port}"}
        assert not balancer.last_fail_open
        assert reap(pid, timeout=0.0) is None  # still running
    finally:
        kill(pid)
        live.stop()


def test_control_process_exits_when_its_parent_goes_away(board: HealthBoard) -> None:
    """Orphaned (its parent exited), the control process returns within a few seconds."""
    read_end, write_end = os.pipe()
    dead_port = free_port()
    monitor = GroupMonitor(
        "api",
        StaticDiscovery([(("127.0.0.1", dead_port), 1)]),
        TcpHealthCheck(interval=0.1, timeout=0.5, fall=1, rise=1),
    )

    def control() -> None:
        os.close(read_end)
        os.write(write_end, b"pid %d\n" % os.getpid())
        run_control_process(board, [monitor])  # holds write_end until it exits
        os.write(write_end, b"returned\n")

    def middle() -> None:
        fork(control)
        # exit once the control process runs (its first publication comes after it noted
        # its parent): the control process is orphaned
        if not poll(lambda: board.sequence > 0):
            raise SystemExit(1)

    pid = fork(middle)
    os.close(write_end)
    grandchild = None
    try:
        assert reap(pid) == 0
        data = b""
        deadline = time.monotonic() + 10.0
        eof = False
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        while time.monotonic() < deadline:  # until EOF: every holder of write_end exited
            ready = poller.poll(100)
            if ready:
                chunk = os.read(read_end, 256)
                if not chunk:
                    eof = True
                    break
                data += chunk
                found = re.search(rb"pid (\d+)\n", data)
                if grandchild is None and found is not None:
                    grandchild = int(found.group(1))
        assert eof, "the control process kept running after its parent exited"
        assert data.endswith(b"returned\n")
        grandchild = None
        assert board.sequence > 0  # it did run the monitor
    finally:
        if grandchild is not None:
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.close(read_end)
