"""Rate and concurrency limits, sans-IO: count-min ``Estimator``, sliding-window ``Rate``,
``TokenBucket``, and ``Inflight`` (per-key concurrency with guards released on every exit
path).

Everything here is a pure function of the ``now`` passed in (no sleeping, no event loop),
so it can be tested without clocks and used from sync hooks.
"""

from __future__ import annotations

from ferryman.limits.estimator import Estimator, Key
from ferryman.limits.inflight import Guard, Inflight
from ferryman.limits.rate import Rate, TokenBucket

__all__ = ["Estimator", "Guard", "Inflight", "Key", "Rate", "TokenBucket"]
