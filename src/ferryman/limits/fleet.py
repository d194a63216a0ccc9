"""FleetLimiter: one rate limit for many ferryman servers, through Redis.

Each process (every worker of every server) keeps its own counts and, every ``sync``
seconds, adds what it admitted and saw since the last time to per-window counters in
Redis with one atomic Lua script, which answers with the fleet's counts of the current
and previous windows. A request never waits for Redis: it is judged on the fleet's
counts from the last sync plus what this process admitted since.

What other processes admitted since their last sync is not known yet; each process
assumes they admitted in proportion to their share of the key's traffic, by counting its
own unsynced admissions divided by its own share of the fleet's requests for the key
(``1 / share``): two servers splitting a key's traffic evenly each count their own
admissions twice. So the fleet tracks the limit closely however traffic is spread, and
the error is bounded by how much shares change within one sync interval.

Bounded staleness: a sync sends and reads the keys used since the previous one, so for a
key in use a decision misses at most the last ``sync`` seconds of the other processes'
traffic (default 50 ms, 5% of a 1 s window). A key new to a process, or idle there since
its last sync, is judged on what the process knew (nothing, for a new key: a share of 1)
until the next sync, at most ``sync`` seconds later; the per-server limit bounds what a
server admits meanwhile. The window's counts in Redis are exact (INCRBY in a script, no
lost update). Windows are aligned on wall-clock time (``time.time``), which the servers'
clocks must agree on to well within a window. A sync costs one script call per 500 keys
used since the last one.

Redis down: the failure is logged once per server (the first worker to see it) and again
when Redis is back. Fail-open (the default): the :class:`~ferryman.limits.Limiter` that
every fleet limiter also checks, with the same rate, shared by the server's workers,
keeps holding the limit per server, so traffic keeps flowing at up to the limit per
server. Fail-closed (``fail_open=False``): requests are refused (reason
``"unavailable"``) until Redis answers again.

Works with a single Redis (or a primary with replicas), not Redis Cluster: a sync's keys
span many hash slots.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b
from typing import Any, Final

from ferryman.limits.arena import SharedArena, default_arena
from ferryman.limits.estimator import Key
from ferryman.limits.limiter import Limiter, Verdict

__all__ = ["FleetLimiter", "SYNC_SCRIPT"]

log = logging.getLogger("ferryman.limits")

#: Adds each delta to its counter (INCRBY, with a TTL) or reads the counter; returns the
#: counters' values. KEYS: per limited key, admitted in the current and the previous
#: window, then requests seen in both; ARGV[1] the counters' TTL (ms), then one delta per
#: counter.
SYNC_SCRIPT: Final = """
local ttl = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local delta = tonumber(ARGV[i + 1])
  local value
  if delta > 0 then
    value = redis.call('INCRBY', KEYS[i], delta)
    redis.call('PEXPIRE', KEYS[i], ttl)
  else
    value = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  out[i] = value
end
return out
"""

#: Keys per script call (a sync with more keys makes several calls).
SYNC_BATCH: Final = 500
#: The smallest share of a key's traffic a process assumes it has.
MIN_SHARE: Final = 0.01
#: Seconds between attempts while Redis is down.
RETRY_INTERVAL: Final = 0.5


class _KeyState:
    """One key's counts in this process, per window index: admitted and seen, not yet
    sent; being sent; and the fleet's counts from the last sync."""

    __slots__ = ("name", "unsent", "sending", "sent", "snap_index", "snap_a", "snap_a_prev",
                 "share", "last")

    def __init__(self, name: bytes) -> None:
        self.name = name  # the key's part of the Redis key names
        self.unsent: dict[int, list[int]] = {}  # window index -> [admitted, seen]
        self.sending: dict[int, list[int]] = {}
        self.sent: dict[int, int] = {}  # window index -> requests seen, synced
        self.snap_index = -1  # the window index of the last snapshot
        self.snap_a = 0  # fleet admitted in that window
        self.snap_a_prev = 0  # ... and the one before
        self.share = 1.0
        self.last = 0.0  # when last used (clock seconds)


class FleetLimiter:
    """A rate limit per key shared by all processes using one Redis.

    Args:
        rate, burst: as for :class:`~ferryman.limits.Limiter`.
        redis: the Redis URL (``redis://host:port/db``), or a ``redis.asyncio.Redis``.
        name: the limit's name in Redis (servers sharing a limit use the same name).
        prefix: prepended to every Redis key.
        sync: seconds between syncs (the staleness bound).
        fail_open: when Redis is down, hold the limit per server (True) or refuse.
        concurrency: a per-server concurrency limit too (concurrency is not fleet-wide:
            it is what each server can take).
        arena: the shared memory of the per-server limiter (default: the process's).
        timeout: seconds a Redis call may take.
        clock: wall-clock seconds (windows are aligned on it in every server).
    """

    def __init__(
        self,
        rate: str | tuple[int, float],
        *,
        redis: Any,
        name: str,
        burst: int | None = None,
        concurrency: int | None = None,
        prefix: str = "ferryman:limit:",
        sync: float = 0.05,
        fail_open: bool = True,
        arena: SharedArena | None = None,
        timeout: float = 0.5,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not sync > 0:
            raise ValueError("sync must be positive")
        if arena is None:
            arena = default_arena()
        self.arena = arena
        #: the per-server limit, always checked (and alone when Redis is down)
        self.local = Limiter(
            rate, burst=burst, concurrency=concurrency, name=f"fleet:{name}", arena=arena
        )
        self.quota = self.local.quota
        self.window = self.local.window
        self.name = name
        self.sync = sync
        self.fail_open = fail_open
        self.timeout = timeout
        self.max_keys = max_keys
        self.clock = clock
        self._redis_arg = redis
        self._client: Any = None
        self._script: Any = None
        self._prefix = f"{prefix}{name}:{self.quota}:{self.window}:".encode()
        # least recently used first
        self._keys: OrderedDict[bytes, _KeyState] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._sync_lock: asyncio.Lock | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: whether Redis answered the last sync (or none failed yet)
        self.healthy = True
        self._cell = f"fleet-down:{name}:{redis if isinstance(redis, str) else id(redis)}"
        self._ttl_ms = int(2 * self.window * 1000) + 1000
        #: syncs that succeeded / failed (for tests and metrics)
        self.syncs = 0
        self.failures = 0

    # -- deciding -------------------------------------------------------------------------

    def _state(self, key: Key, now: float) -> _KeyState:
        k = key.encode() if isinstance(key, str) else bytes(key)
        keys = self._keys
        state = keys.get(k)
        if state is None:
            if len(keys) >= self.max_keys:
                self._evict()
            name = blake2b(k, digest_size=10).hexdigest().encode()
            state = keys[k] = _KeyState(name)
        else:
            keys.move_to_end(k)
        state.last = now
        return state

    def peek(self, key: Key, now: float | None = None) -> Verdict:
        """What :meth:`check` would answer, counting nothing."""
        return self.check(key, now, commit=False)

    def check(self, key: Key, now: float | None = None, commit: bool = True) -> Verdict:
        """Admit or refuse a request of ``key`` (never waits for Redis); with ``commit``
        false, only say what the answer would be."""
        if now is None:
            now = self.clock()
        self._ensure_task()
        window = self.window
        index = math.floor(now / window)
        fraction = now / window - index
        state = self._state(key, now)
        seen = state.unsent.get(index)
        if seen is None:
            seen = state.unsent[index] = [0, 0]
        if commit:
            seen[1] += 1
        if not self.healthy and not self.fail_open:
            return Verdict(False, "unavailable", self.quota, 0, 1.0, 1.0, self.window)
        fleet: float = -1.0
        if self.healthy:
            fleet = self._estimate(state, index, fraction)
            if fleet >= self.quota:
                wait = max(self._wait(state, index, fraction), window * 1e-3)
                return Verdict(False, "rate", self.quota, 0, wait, wait, window)
        local = self.local
        verdict = (local.check if commit else local.peek)(key, time.monotonic())
        if not verdict.admitted or not commit:
            return verdict
        seen[0] += 1
        if fleet >= 0.0:
            fleet += 1.0 / state.share
            verdict.remaining = max(0, math.floor(self.quota - fleet))
            verdict.reset = (1.0 - fraction) * window
        return verdict

    def _unsynced(self, state: _KeyState, index: int) -> float:
        n = 0
        c = state.unsent.get(index)
        if c is not None:
            n += c[0]
        c = state.sending.get(index)
        if c is not None:
            n += c[0]
        return n / state.share

    def _fleet(self, state: _KeyState, index: int) -> tuple[float, float]:
        """The fleet's admitted (previous, current) windows at ``index``."""
        if state.snap_index == index:
            return state.snap_a_prev, state.snap_a
        if state.snap_index == index - 1:
            return state.snap_a, 0.0
        return 0.0, 0.0

    def _estimate(self, state: _KeyState, index: int, fraction: float) -> float:
        previous, current = self._fleet(state, index)
        previous += self._unsynced(state, index - 1)
        current += self._unsynced(state, index)
        return previous * (1.0 - fraction) + current

    def _wait(self, state: _KeyState, index: int, fraction: float) -> float:
        previous, current = self._fleet(state, index)
        previous += self._unsynced(state, index - 1)
        current += self._unsynced(state, index)
        quota = self.quota
        if current < quota:
            if previous <= 0:
                return 0.0
            return max(0.0, 1.0 - (quota - current) / previous - fraction) * self.window
        return (1.0 - fraction + max(0.0, 1.0 - quota / current)) * self.window

    # -- syncing --------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        task = self._task
        if (task is not None and not task.done()) or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # (no loop: nothing syncs; the fleet counts stay empty)
        self._loop = loop
        self._task = loop.create_task(self._run())

    def start(self) -> None:
        """Start syncing on the running loop (done by the first :meth:`check` too)."""
        self._ensure_task()

    async def close(self) -> None:
        """Stop syncing for good (requests still checked afterwards, e.g. those of a
        replaced config finishing, are judged on what is known) and close the Redis
        connections this limiter made."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
        client, self._client = self._client, None
        if client is not None and isinstance(self._redis_arg, str):
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def _redis(self) -> Any:
        if self._client is None:
            arg = self._redis_arg
            if isinstance(arg, str):
                from redis.asyncio import Redis

                arg = Redis.from_url(
                    arg, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                    decode_responses=False,
                )
            self._client = arg
            self._script = arg.register_script(SYNC_SCRIPT)
        return self._client

    async def _run(self) -> None:
        while True:
            try:
                ok = await self.sync_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must go on
                log.exception("limit %s: sync failed", self.name)
                ok = False
            await asyncio.sleep(self.sync if ok else max(self.sync, RETRY_INTERVAL))

    async def sync_now(self) -> bool:
        """Send what this process counted and fetch the fleet's counts (what the
        background task does every ``sync`` seconds). Returns whether Redis answered.
        Calls are serialised (a sync waits for the one in progress)."""
        lock = self._sync_lock
        if lock is None:
            lock = self._sync_lock = asyncio.Lock()
        async with lock:
            return await self._sync()

    async def _sync(self) -> bool:
        now = self.clock()
        index = math.floor(now / self.window)
        self._prune(now)
        batch: list[_KeyState] = []
        for state in self._keys.values():
            # the keys used since the last sync (a key idle here is read again at the
            # first sync after it is used again)
            unsent = state.unsent
            if not unsent:
                continue
            for i in [i for i in unsent if i < index - 1]:
                del unsent[i]  # (too old to matter to any window still counted)
            state.sending = unsent
            state.unsent = {}
            batch.append(state)
        if not batch:
            if self.healthy:
                return True
            try:  # (nothing to send, but whether Redis is back must be found out)
                await asyncio.wait_for(self._redis().ping(), self.timeout * 2)
            except Exception as exc:  # noqa: BLE001 - any failure: still down
                self.failures += 1
                self._down(exc)
                return False
            self._up()
            return True
        try:
            self._redis()
            for start in range(0, len(batch), SYNC_BATCH):
                await self._sync_batch(batch[start : start + SYNC_BATCH], index)
        except Exception as exc:  # noqa: BLE001 - any failure: Redis is down for us
            for state in batch:
                for i, (a, s) in state.sending.items():
                    c = state.unsent.setdefault(i, [0, 0])
                    c[0] += a
                    c[1] += s
                state.sending = {}
            self.failures += 1
            self._down(exc)
            return False
        self.syncs += 1
        self._up()
        return True

    async def _sync_batch(self, batch: list[_KeyState], index: int) -> None:
        keys: list[bytes] = []
        args: list[int] = [self._ttl_ms]
        prefix = self._prefix
        now_s = b"%d" % index
        prev_s = b"%d" % (index - 1)
        for state in batch:
            base = prefix + state.name
            keys += [base + b":a:" + now_s, base + b":a:" + prev_s,
                     base + b":s:" + now_s, base + b":s:" + prev_s]
            cur = state.sending.get(index, (0, 0))
            prev = state.sending.get(index - 1, (0, 0))
            args += [cur[0], prev[0], cur[1], prev[1]]
        values = await asyncio.wait_for(
            self._script(keys=keys, args=args), self.timeout * 2
        )
        for n, state in enumerate(batch):
            a_now, a_prev, s_now, s_prev = (int(v) for v in values[4 * n : 4 * n + 4])
            state.snap_index = index
            state.snap_a = a_now
            state.snap_a_prev = a_prev
            # this process's share of the fleet's requests for the key in these two
            # windows (what it sent for them is in the fleet's totals)
            sent = state.sent
            for i, (_a, seen) in state.sending.items():
                sent[i] = sent.get(i, 0) + seen
            for i in [i for i in sent if i < index - 1]:
                del sent[i]
            mine = sent.get(index, 0) + sent.get(index - 1, 0)
            fleet_seen = s_now + s_prev
            if fleet_seen and mine:
                state.share = min(1.0, max(MIN_SHARE, mine / fleet_seen))
            else:
                state.share = 1.0
            state.sending = {}

    def _down(self, exc: Exception) -> None:
        if self.healthy:
            self.healthy = False
            if self.arena.swap(self._cell, 1) == 0:
                how = ("holding the limit per server (fail-open)" if self.fail_open
                       else "refusing requests (fail-closed)")
                log.warning(
                    "limit %s: Redis is unreachable (%s: %s); %s until it answers",
                    self.name, type(exc).__name__, exc, how,
                )

    def _up(self) -> None:
        if not self.healthy:
            self.healthy = True
            if self.arena.swap(self._cell, 0) == 1:
                log.warning("limit %s: Redis answers again; the limit is fleet-wide", self.name)

    def _prune(self, now: float) -> None:
        """Forget keys unused for two windows (all of them counted nothing since): the
        least recently used, from the front, until one was used later."""
        horizon = now - 2 * self.window - self.sync
        keys = self._keys
        while keys:
            k, state = next(iter(keys.items()))
            if state.last >= horizon or state.sending:
                break
            del keys[k]

    def _evict(self) -> None:
        """Make room for a key: forget the least recently used (its unsynced counts are
        lost: size ``max_keys`` above the keys active within a window)."""
        keys = self._keys
        for k, state in keys.items():
            if not state.sending:
                del keys[k]
                return
