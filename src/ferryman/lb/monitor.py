"""GroupMonitor: runs one upstream group's discovery and active health checks.

The monitor keeps the group's member list current (asking its
:class:`~ferryman.lb.discovery.ServiceDiscovery` as often as it says) and probes each
member every ``check.interval`` seconds, turning results into up/down verdicts with
:class:`~ferryman.lb.health.HealthState`. Whenever membership or a verdict changes it calls
``on_change`` with a :data:`GroupSnapshot`.

Where it runs decides who sees the results:

* in-process (:meth:`GroupMonitor.attach`): the snapshot is applied to a
  :class:`~ferryman.lb.balancer.LoadBalancer` in the same event loop — for library users
  and single-process tests;
* in the server's control process (``ferryman run``): snapshots of every group are
  published on a :class:`~ferryman.lb.shared.HealthBoard` that every worker reads, so a
  server process probes each backend once whatever its number of workers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from ferryman.lb.balancer import LoadBalancer
from ferryman.lb.discovery import Member, ServiceDiscovery
from ferryman.lb.health import HealthCheck, HealthState

__all__ = ["GroupMonitor", "GroupSnapshot", "apply_snapshot", "valid_members"]

log = logging.getLogger("ferryman.health")

GroupSnapshot = list[dict[str, Any]]
"""A group's state: one ``{"host", "port", "weight", "healthy", "reason"}`` dict per member,
in member order (JSON-serialisable, as published to workers)."""


def apply_snapshot(balancer: LoadBalancer, snapshot: GroupSnapshot) -> list[Any]:
    """Make ``balancer`` reflect ``snapshot`` (membership, then health); returns the removed
    backends (see :meth:`LoadBalancer.set_members`)."""
    removed = balancer.set_members(
        [((str(m["host"]), int(m["port"])), int(m["weight"])) for m in snapshot]
    )
    for m in snapshot:
        name = _name(str(m["host"]), int(m["port"]))
        backend = balancer.get(name)
        if backend is not None:
            healthy = bool(m["healthy"])
            if healthy != backend.healthy or (not healthy and backend.reason != m["reason"]):
                balancer.set_health(name, healthy, str(m.get("reason", "")))
    return removed


#: The largest weight a discovered member may have (as in the config).
MAX_WEIGHT = 1000


def valid_members(group: str, members: Sequence[Any]) -> list[Member]:
    """The well-formed members of a discovery answer: ``((host, port), weight)`` with a
    non-empty host, a port 1..65535 and a weight 1..1000; others are logged and dropped,
    so a bad entry from a registry or a custom discovery never reaches the workers."""
    out: list[Member] = []
    for item in members:
        try:
            (host, port), weight = item
            ok = (
                isinstance(host, str) and bool(host) and isinstance(port, int)
                and not isinstance(port, bool) and 1 <= port <= 65535
                and isinstance(weight, int) and not isinstance(weight, bool)
                and 1 <= weight <= MAX_WEIGHT
            )
        except (TypeError, ValueError):
            ok = False
        if ok:
            out.append(((host, port), weight))
        else:
            log.warning(
                "upstream %s: discovery gave an invalid member %r (expected ((host, port), "
                "weight) with port 1..65535 and weight 1..%d); ignored",
                group, item, MAX_WEIGHT,
            )
    return out


def _name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GroupMonitor:
    """Discovery and active health checks of one group.

    Args:
        name: the group's name (for logs).
        discovery: where members come from.
        check: the active health check, or None for none (every member stays healthy).
        on_change: called with a snapshot whenever membership or health changes (and once
            after the first discovery).
    """

    def __init__(
        self,
        name: str,
        discovery: ServiceDiscovery,
        check: HealthCheck | None,
        on_change: Callable[[GroupSnapshot], None] | None = None,
    ) -> None:
        self.name = name
        self.discovery = discovery
        self.check = check
        self.on_change = on_change
        self.members: list[Member] = []
        self.states: dict[tuple[str, int], HealthState] = {}
        self._probes: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.discovered = asyncio.Event()

    # running ------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task[None]:
        """Start discovery (and checks) as a task on ``loop`` (default: the running one)."""
        loop = loop or asyncio.get_running_loop()
        self._task = loop.create_task(self.run(), name=f"ferryman-monitor-{self.name}")
        return self._task

    def attach(
        self, balancer: LoadBalancer, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Task[None]:
        """Run in-process, applying every snapshot to ``balancer``."""
        previous = self.on_change

        def apply(snapshot: GroupSnapshot) -> None:
            apply_snapshot(balancer, snapshot)
            if previous is not None:
                previous(snapshot)

        self.on_change = apply
        return self.start(loop)

    def stop(self) -> None:
        """Cancel discovery and every probe."""
        if self._task is not None:
            self._task.cancel()
        for task in self._probes.values():
            task.cancel()
        self._probes.clear()

    def seed(self, snapshot: GroupSnapshot) -> None:
        """Start from a previously published state (a restarted control process): the
        members and verdicts the workers already use, so that a restart does not briefly
        declare every server healthy again."""
        for m in snapshot:
            try:
                address = (str(m["host"]), int(m["port"]))
                state = HealthState(
                    rise=self.check.rise if self.check else 1,
                    fall=self.check.fall if self.check else 1,
                    healthy=bool(m["healthy"]),
                    reason=str(m.get("reason", "")),
                )
            except (KeyError, TypeError, ValueError):
                continue
            self.states[address] = state

    async def run(self) -> None:
        """Discover forever; probes start and stop with membership."""
        try:
            while True:
                try:
                    members = valid_members(
                        self.name, list(await self.discovery.discover())
                    )
                    self.set_members(members)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep the last members on any failure
                    log.warning(
                        "upstream %s: discovery (%s) failed, keeping %d server(s): %s",
                        self.name, self.discovery.describe(), len(self.members), exc,
                    )
                    if not self.discovered.is_set():
                        self.discovered.set()
                        self._publish()  # say so: workers waiting for a first answer go on
                await asyncio.sleep(max(self.discovery.next_refresh(), 0.05))
        finally:
            for task in self._probes.values():
                task.cancel()
            self._probes.clear()

    def set_members(self, members: Sequence[Member]) -> None:
        """Adopt a new member list: probes for new members start, gone ones stop."""
        first = not self.discovered.is_set()
        self.discovered.set()
        seen: set[tuple[str, int]] = set()
        unique: list[Member] = []
        for address, weight in members:
            if address not in seen:
                seen.add(address)
                unique.append((address, weight))
        if unique == self.members and not first:
            return
        current = {a for a, _ in self.members}
        added = [a for a, _ in unique if a not in current]
        removed = [a for a in self.states if a not in seen]
        if added or removed:
            log.info(
                "upstream %s: %d server(s)%s%s", self.name, len(unique),
                f", added {', '.join(_name(*a) for a in added)}" if added and not first else "",
                f", removed {', '.join(_name(*a) for a in removed)}" if removed else "",
            )
        for address in removed:
            del self.states[address]
            task = self._probes.pop(address, None)
            if task is not None:
                task.cancel()
        check = self.check
        for address in added:
            if address not in self.states:  # (seeded ones keep their verdict)
                self.states[address] = HealthState(
                    rise=check.rise if check else 1, fall=check.fall if check else 1
                )
            if check is not None and address not in self._probes:
                self._probes[address] = asyncio.get_running_loop().create_task(
                    self._probe(address, check)
                )
        self.members = unique
        self._publish()

    async def _probe(self, address: tuple[str, int], check: HealthCheck) -> None:
        # spread the first probes over one interval so that many servers are not
        # probed in a burst
        await asyncio.sleep(random.uniform(0.0, min(check.interval, 1.0)))
        while True:
            failure = await check.run(address)
            state = self.states.get(address)
            if state is None:
                return
            if state.record(failure):
                if state.healthy:
                    log.warning("upstream %s: server %s is UP", self.name, _name(*address))
                else:
                    log.warning(
                        "upstream %s: server %s is DOWN after %d failed check(s): %s",
                        self.name, _name(*address), state.failures, state.reason,
                    )
                self._publish()
            await asyncio.sleep(check.interval)

    # state --------------------------------------------------------------------------------

    def snapshot(self) -> GroupSnapshot:
        """The current members and verdicts."""
        out: GroupSnapshot = []
        for (host, port), weight in self.members:
            state = self.states.get((host, port))
            healthy = state.healthy if state is not None else True
            reason = state.reason if state is not None else ""
            out.append(
                {"host": host, "port": port, "weight": weight, "healthy": healthy, "reason": reason}
            )
        return out

    def _publish(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self.snapshot())
            except Exception:  # noqa: BLE001 - a consumer bug must not stop the checks
                log.exception("upstream %s: applying health state failed", self.name)
