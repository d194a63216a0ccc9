"""Cost of WorkerMetrics.record, the per-request metrics update, in nanoseconds per call.

    python benchmarks/metrics_micro.py

Times (``timeit``, best of 5 repeats, under 2 s in all) one key recorded over and over,
then a mix of 24 keys (listeners, routes, statuses, a retry, a request without upstream)
whose arguments are spread over the calls, and, for reference, a call of an empty
function with the same eleven arguments. Says whether the recorder module is the
mypyc-compiled one. Also times one ``snapshot()`` + ``marshal.dumps`` of the mix (what a
publisher does at most ten times a second).
"""

from __future__ import annotations

import marshal
import timeit
from typing import Any

from ferryman.metrics import recorder
from ferryman.metrics.recorder import WorkerMetrics


def _noop(
    listener: str,
    route: str,
    upstream: str,
    status: int,
    duration: float,
    upstream_header: float,
    bytes_in: int,
    bytes_out: int,
    upstream_used: bool,
    reused: bool,
    retries: int,
) -> None:
    pass


def _best(stmt: str, env: dict[str, Any], calls_per_run: int, budget: float = 0.35) -> float:
    """Nanoseconds per call: best of 5 repeats, about ``budget`` seconds in all."""
    timer = timeit.Timer(stmt, globals=env)
    trial = 100
    spent = timer.timeit(trial)  # (also warms up: the keys' entries are made here)
    number = max(1, int(budget / 5 / max(spent / trial, 1e-9)))
    return min(timer.repeat(repeat=5, number=number)) / (number * calls_per_run) * 1e9


def main() -> None:
    """Run the timings and print them."""
    compiled = not recorder.__file__.endswith(".py")
    print(f"recorder module: {'compiled (mypyc)' if compiled else 'pure Python'}")

    metrics = WorkerMetrics()
    one = _best(
        "rec('main', 'api', 'backend', 200, 0.0123, 0.0101, 512, 2048, True, True, 0)",
        {"rec": metrics.record},
        1,
    )

    mix: list[tuple[Any, ...]] = []
    for i in range(24):
        status = (200, 200, 200, 304, 404, 502)[i % 6]
        upstream = "" if i % 8 == 7 else f"backend{i % 3}"
        mix.append(
            (
                f"listener{i % 2}", f"route{i % 4}", upstream, status,
                0.0007 * (i + 1) ** 2, (0.0005 * (i + 1) ** 2) if upstream else -1.0,
                0 if i % 3 else 1024, 100 * i, bool(upstream), i % 5 != 0, 1 if i == 5 else 0,
            )  # fmt: skip
        )
    loop = "for a in mix:\n    rec(*a)"
    mixed = _best(loop, {"rec": metrics.record, "mix": mix}, len(mix))
    base_one = _best(
        "rec('main', 'api', 'backend', 200, 0.0123, 0.0101, 512, 2048, True, True, 0)",
        {"rec": _noop},
        1,
    )
    base_mix = _best(loop, {"rec": _noop, "mix": mix}, len(mix))

    snap_env = {"m": metrics, "dumps": marshal.dumps}
    snap = _best("dumps(m.snapshot())", snap_env, 1)

    print(f"record, one key:          {one:7.1f} ns/call  (empty function call: {base_one:.1f})")
    print(f"record, 24-key mix:       {mixed:7.1f} ns/call  (empty function call: {base_mix:.1f})")
    print(f"snapshot + marshal (mix): {snap / 1000:7.1f} us")


if __name__ == "__main__":
    main()
