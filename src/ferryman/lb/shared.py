"""HealthBoard: health and membership published by one process, read by every worker.

The board is an anonymous shared memory region (``mmap``) created by the main process
before it forks, so the control process that runs the checks and every worker see the same
bytes. It holds one JSON document (``{group: GroupSnapshot}``) guarded by a sequence
counter, written seqlock-style: the single writer makes the counter odd, writes, then makes
it even again; a reader copies the document and keeps it only if the counter was even and
unchanged across the copy. Readers poll :meth:`HealthBoard.read` (a few times a second):
when nothing changed that costs one 8-byte read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import Any

__all__ = ["HealthBoard", "run_control_process"]

log = logging.getLogger("ferryman.health")

_HEADER = struct.Struct("<QQ")  # sequence, document length


class HealthBoard:
    """A shared region holding the latest published state.

    Args:
        size: bytes reserved (the JSON document must fit; 4 MiB holds tens of thousands of
            servers).
    """

    def __init__(self, size: int = 4 * 1024 * 1024) -> None:
        self.size = size
        self._mm = mmap.mmap(-1, size)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
        self._seen = 0

    def publish(self, state: dict[str, Any]) -> None:
        """Replace the document (single writer only)."""
        data = json.dumps(state, separators=(",", ":")).encode()
        if len(data) + _HEADER.size > self.size:
            raise ValueError(f"health state of {len(data)} bytes exceeds the board's {self.size}")
        mm = self._mm
        seq = _HEADER.unpack_from(mm, 0)[0]
        if seq & 1:
            seq += 1  # a writer died mid-write: start from a clean even value
        _HEADER.pack_into(mm, 0, seq + 1, len(data))
        mm[_HEADER.size : _HEADER.size + len(data)] = data
        _HEADER.pack_into(mm, 0, seq + 2, len(data))

    def read(self) -> dict[str, Any] | None:
        """The document if it changed since this reader's last successful read, else None
        (also None while a write is in progress: try again later)."""
        mm = self._mm
        seq, length = _HEADER.unpack_from(mm, 0)
        if seq == self._seen or seq & 1 or seq == 0:
            return None
        data = mm[_HEADER.size : _HEADER.size + length]
        if _HEADER.unpack_from(mm, 0)[0] != seq:
            return None
        self._seen = seq
        doc: dict[str, Any] = json.loads(data)
        return doc

    def latest(self) -> dict[str, Any] | None:
        """The current document whether or not this reader saw it already (a proxy built
        by a reload starts from it), or None before the first publication."""
        for _ in range(100):
            seq = self._seen
            self._seen = 0
            doc = self.read()
            if doc is not None:
                return doc
            self._seen = seq
            if self.sequence == 0:
                return None
            time.sleep(0.001)  # a write in progress
        return None  # (a writer that never finishes: as if nothing were published)

    def wait_for(
        self,
        groups: set[str],
        timeout: float,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> set[str]:
        """Block (polling, up to ``timeout`` seconds) until the document names every group
        in ``groups``; each new document goes to ``on_state``. Returns the groups still
        missing (empty when all arrived)."""
        pending = set(groups)
        state = self.latest()
        deadline = time.monotonic() + timeout
        while True:
            if state is not None:
                if on_state is not None:
                    on_state(state)
                pending -= state.keys()
            if not pending or time.monotonic() >= deadline:
                return pending
            time.sleep(0.005)
            state = self.read()

    @property
    def sequence(self) -> int:
        """The current sequence number (0 before the first publication)."""
        return int(_HEADER.unpack_from(self._mm, 0)[0])

    def close(self) -> None:
        """Unmap the region (in this process)."""
        self._mm.close()


def run_control_process(
    board: HealthBoard, monitors: list[Any], parent_pid: int | None = None
) -> None:
    """Run ``monitors`` (:class:`~ferryman.lb.monitor.GroupMonitor`) forever, publishing
    every change of any group on ``board``; returns when the parent process goes away.

    Meant as the body of the server's control process (one per server, whatever the number
    of workers). ``parent_pid`` is the supervisor's pid, taken before the fork (default:
    this process's parent now — which is already wrong if the parent died meanwhile).
    """
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    state: dict[str, Any] = {}
    parent = parent_pid if parent_pid is not None else os.getppid()

    def publisher(name: str) -> Any:
        def publish(snapshot: list[dict[str, Any]]) -> None:
            state[name] = snapshot
            board.publish(state)

        return publish

    previous = board.read()  # a restarted control process: go on from the last state
    if previous:
        state.update(previous)

    async def main() -> None:
        for monitor in monitors:
            if monitor.name in state:
                monitor.seed(state[monitor.name])
            monitor.on_change = publisher(monitor.name)
            monitor.start()
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.info("control process: parent gone, exiting")
        for monitor in monitors:
            monitor.stop()
        await asyncio.sleep(0)  # let the cancelled tasks finish

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
