"""Rate and concurrency limits.

* Building blocks, sans-IO (pure functions of the ``now`` passed in: no sleeping, no event
  loop, testable without clocks): the count-min ``Estimator``, the sliding-window
  ``Rate``, ``TokenBucket``, and ``Inflight`` (per-key concurrency with guards released on
  every exit path), all counting within one process.
* ``Limiter``: a rate and/or concurrency limit whose counts live in a ``SharedArena``
  (shared memory made before the workers are forked), so the workers of a server share
  it; decisions take ``now`` too, but the limiter also looks at the monotonic clock once
  a second to give back the units of processes that died.
* ``ferryman.limits.fleet.FleetLimiter``: the same limit shared by many servers through
  Redis (a background task on the event loop syncs the counts; decisions never wait).

All of them decide with a plain function call, usable from sync hooks.
"""

from __future__ import annotations

from ferryman.limits.arena import SharedArena, default_arena
from ferryman.limits.estimator import Estimator, Key
from ferryman.limits.inflight import Guard, Inflight
from ferryman.limits.limiter import Limiter, LimitGuard, Verdict, parse_rate
from ferryman.limits.rate import Rate, TokenBucket

__all__ = [
    "Estimator",
    "Guard",
    "Inflight",
    "Key",
    "LimitGuard",
    "Limiter",
    "Rate",
    "SharedArena",
    "TokenBucket",
    "Verdict",
    "default_arena",
    "parse_rate",
]
