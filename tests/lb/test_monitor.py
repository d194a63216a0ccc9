"""GroupMonitor: discovery and active checks against real servers, applied to a balancer."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from tiny_http import ScriptedServer, free_port

from ferryman.lb.balancer import LoadBalancer
from ferryman.lb.discovery import Member, ServiceDiscovery, StaticDiscovery
from ferryman.lb.health import TcpHealthCheck
from ferryman.lb.monitor import GroupMonitor, GroupSnapshot, apply_snapshot


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(7)


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro_fn()

    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def fast_check() -> TcpHealthCheck:
    return TcpHealthCheck(interval=0.1, timeout=0.5, fall=2, rise=2)


class ListDiscovery(ServiceDiscovery):
    """Members from a list the test changes; raises while ``fail`` is set."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)
        self.fail = False
        self.calls = 0
        self.refresh = 0.05

    async def discover(self) -> Sequence[Member]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("registry unavailable")
        return list(self.members)


async def stop_monitor(monitor: GroupMonitor) -> None:
    monitor.stop()
    task = monitor._task
    assert task is not None
    await asyncio.wait([task], timeout=2.0)
    assert task.done()
    await asyncio.sleep(0.05)
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    # only the servers' connection handlers may be left
    assert not [t for t in others if "monitor" in repr(t) or "_probe" in repr(t)], others


def test_dead_server_marked_down_then_up_again() -> None:
    async def main() -> None:
        live = await ScriptedServer(read_request=False).start()
        dead_port = free_port()
        live_name, dead_name = f"127.0.0.1:{live.port}", f"127.0.0.1:{dead_port}"
        members: list[Member] = [(live.address, 1), (("127.0.0.1", dead_port), 2)]
        balancer = LoadBalancer("api", members, "round_robin")
        snapshots: list[GroupSnapshot] = []
        monitor = GroupMonitor("api", StaticDiscovery(members), fast_check(), snapshots.append)
        monitor.attach(balancer)
        dead = balancer.get(dead_name)
        assert dead is not None
        await until(lambda: not dead.healthy, what="dead server marked down")
        assert dead.reason == "connection refused"
        assert balancer.get(live_name).healthy  # type: ignore[union-attr]
        assert all(balancer.select().name == live_name for _ in range(10))
        assert balancer.get(dead_name) is dead  # the snapshot kept the backend object
        assert "connection refused" in balancer.down_report()

        # the server comes up on that port: healthy again after `rise` good checks
        revived = await ScriptedServer(read_request=False).start(dead_port)
        await until(lambda: dead.healthy, what="revived server marked up")
        assert dead.reason == ""
        assert {balancer.select().name for _ in range(3)} == {live_name, dead_name}

        # snapshots: the first one after discovery, then each verdict change
        assert len(snapshots) == 3
        keys = {"host", "port", "weight", "healthy", "reason"}
        for snap in snapshots:
            assert json.loads(json.dumps(snap)) == snap
            assert [set(m) for m in snap] == [keys, keys]
        first, down, up = snapshots
        assert first == [
            {"host": "127.0.0.1", "port": live.port, "weight": 1, "healthy": True, "reason": ""},
            {"host": "127.0.0.1", "port": dead_port, "weight": 2, "healthy": True, "reason": ""},
        ]
        assert down[1] == {
            "host": "127.0.0.1", "port": dead_port, "weight": 2, "healthy": False,
            "reason": "connection refused",
        }
        assert down[0] == first[0] and up == first
        assert monitor.snapshot() == up

        await stop_monitor(monitor)
        await live.stop()
        await revived.stop()

    run(main)


def test_membership_changes_start_and_stop_probes() -> None:
    async def main() -> None:
        a = await ScriptedServer(read_request=False).start()
        b = await ScriptedServer(read_request=False).start()
        c = await ScriptedServer(read_request=False).start()
        discovery = ListDiscovery([(a.address, 1), (b.address, 1)])
        balancer = LoadBalancer("api", [])
        monitor = GroupMonitor("api", discovery, fast_check())
        monitor.attach(balancer)
        await until(lambda: a.connections >= 2 and b.connections >= 2, what="a and b probed")
        assert [x.name for x in balancer.backends] == [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
        backend_a = balancer.get(f"127.0.0.1:{a.port}")

        # b leaves: no longer probed, no longer in the balancer; a keeps its Backend
        discovery.members = [(a.address, 1)]
        await until(lambda: len(balancer.backends) == 1, what="b removed")
        assert balancer.backends[0] is backend_a
        assert set(monitor.states) == {a.address}
        await asyncio.sleep(0.15)  # a connect that was already in progress may still land
        b_count, a_count = b.connections, a.connections
        await asyncio.sleep(0.5)
        assert b.connections == b_count
        assert a.connections >= a_count + 3

        # c joins, with weight 3: probes start, the balancer gets it
        discovery.members = [(a.address, 1), (c.address, 3)]
        await until(lambda: c.connections >= 2, what="c probed")
        assert [(x.name, x.weight) for x in balancer.backends] == [
            (f"127.0.0.1:{a.port}", 1), (f"127.0.0.1:{c.port}", 3)
        ]

        # a weight change alone reaches the balancer's selector
        discovery.members = [(a.address, 2), (c.address, 3)]
        await until(lambda: balancer.backends[0].weight == 2, what="weight change")
        picks = [balancer.select().name for _ in range(50)]
        assert picks.count(f"127.0.0.1:{a.port}") == 20

        # discovery failing keeps the previous members (and their probes)
        discovery.fail = True
        discovery.members = []
        calls = discovery.calls
        await until(lambda: discovery.calls >= calls + 3, what="discovery retried")
        assert monitor.members == [(a.address, 2), (c.address, 3)]
        assert len(balancer.backends) == 2
        c_count = c.connections
        await until(lambda: c.connections > c_count, what="c still probed")

        await stop_monitor(monitor)
        counts = a.connections, b.connections, c.connections
        await asyncio.sleep(0.3)
        assert (a.connections, b.connections, c.connections) == counts
        for s in (a, b, c):
            await s.stop()

    run(main)


def test_stop_cancels_everything() -> None:
    async def main() -> None:
        dead = free_port()
        monitor = GroupMonitor(
            "api", StaticDiscovery([(("127.0.0.1", dead), 1)]), fast_check()
        )
        task = monitor.start()
        await until(lambda: bool(monitor._probes), what="probe started")
        probes = list(monitor._probes.values())
        monitor.stop()
        await asyncio.wait([task, *probes], timeout=2.0)
        assert task.cancelled()
        assert all(p.done() for p in probes)
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main)


def test_no_check_keeps_everyone_healthy() -> None:
    async def main() -> None:
        dead = free_port()
        snapshots: list[GroupSnapshot] = []
        members: list[Member] = [(("127.0.0.1", dead), 1), (("::1", dead), 4)]
        monitor = GroupMonitor("api", StaticDiscovery(members), None, snapshots.append)
        monitor.start()
        await asyncio.wait_for(monitor.discovered.wait(), 2.0)
        await asyncio.sleep(0.2)
        assert snapshots == [[
            {"host": "127.0.0.1", "port": dead, "weight": 1, "healthy": True, "reason": ""},
            {"host": "::1", "port": dead, "weight": 4, "healthy": True, "reason": ""},
        ]]
        assert not monitor._probes
        await stop_monitor(monitor)

    run(main)


def test_attach_keeps_previous_on_change_and_survives_a_bad_consumer() -> None:
    async def main() -> None:
        seen: list[GroupSnapshot] = []

        def consumer(snapshot: GroupSnapshot) -> None:
            seen.append(snapshot)
            raise RuntimeError("consumer bug")

        live = await ScriptedServer(read_request=False).start()
        dead = free_port()
        members: list[Member] = [(live.address, 1), (("127.0.0.1", dead), 1)]
        balancer = LoadBalancer("api", [])
        monitor = GroupMonitor("api", StaticDiscovery(members), fast_check(), consumer)
        monitor.attach(balancer)
        await until(lambda: len(seen) >= 2, what="down snapshot")
        assert len(balancer.backends) == 2
        assert not balancer.backends[1].healthy
        await stop_monitor(monitor)
        await live.stop()

    run(main)


def test_duplicate_members_are_probed_once() -> None:
    async def main() -> None:
        a = await ScriptedServer(read_request=False).start()
        discovery = ListDiscovery([(a.address, 1), (a.address, 5)])
        monitor = GroupMonitor("api", discovery, fast_check())
        monitor.start()
        await until(lambda: monitor.discovered.is_set(), what="discovery")
        assert monitor.members == [(a.address, 1)]
        assert len(monitor._probes) == 1
        await stop_monitor(monitor)
        await a.stop()

    run(main)


def test_apply_snapshot() -> None:
    balancer = LoadBalancer("api", [(("10.0.0.1", 80), 1), (("10.0.0.2", 80), 1)])
    kept = balancer.get("10.0.0.1:80")
    removed = apply_snapshot(
        balancer,
        [
            {"host": "10.0.0.1", "port": 80, "weight": 2, "healthy": False, "reason": "refused"},
            {"host": "::1", "port": 81, "weight": 1, "healthy": True, "reason": ""},
        ],
    )
    assert [b.name for b in removed] == ["10.0.0.2:80"]
    assert balancer.get("10.0.0.1:80") is kept
    assert kept is not None and kept.weight == 2 and not kept.healthy and kept.reason == "refused"
    assert all(balancer.select().name == "[::1]:81" for _ in range(5))
    assert not balancer.last_fail_open


def test_invalid_discovered_members_are_dropped() -> None:
    from ferryman.lb.monitor import valid_members

    good = (("127.0.0.1", 80), 2)
    bad: list[Any] = [
        (("127.0.0.1", 80), 0),
        (("127.0.0.1", 0), 1),
        (("", 80), 1),
        (("h", 80), 1001),
        (("h", True), 1),
        "127.0.0.1:80",
        None,
    ]
    assert valid_members("g", [good, *bad]) == [good]

    class Bad(ServiceDiscovery):
        async def discover(self) -> list[Any]:
            return [good, (("127.0.0.1", 81), 0), "nonsense"]

    async def scenario() -> None:
        seen: list[Any] = []
        monitor = GroupMonitor("g", Bad(), None, seen.append)
        monitor.start()
        await until(lambda: bool(seen), what="first snapshot")
        assert [(m["host"], m["port"], m["weight"]) for m in seen[-1]] == [("127.0.0.1", 80, 2)]
        await stop_monitor(monitor)

    run(scenario)


def test_seeded_monitor_keeps_published_verdicts() -> None:
    snapshot = [
        {"host": "127.0.0.1", "port": 9, "weight": 1, "healthy": False, "reason": "refused"},
    ]

    async def scenario() -> None:
        seen: list[Any] = []
        monitor = GroupMonitor(
            "g", StaticDiscovery([(("127.0.0.1", 9), 1)]), fast_check(), seen.append
        )
        monitor.seed(snapshot)
        monitor.start()
        await until(lambda: bool(seen), what="first snapshot")
        assert seen[0][0]["healthy"] is False and seen[0][0]["reason"] == "refused"
        await stop_monitor(monitor)

    run(scenario)
