"""Rate and concurrency limits, sans-IO: count-min ``Estimator``, sliding-window ``Rate``,
``TokenBucket``, and ``Inflight`` (per-key concurrency with guards released on every exit
path).

Everything here is a pure function of the ``now`` passed in (no sleeping, no event loop),
so it can be tested without clocks and used from sync hooks.
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
