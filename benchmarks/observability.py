"""What observability costs per request: ferryman with the access log on and off (issue 7).

    python benchmarks/observability.py [--seconds 10] [--rounds 3] [--connections 50]
                                       [--ferryman-bin PATH]

One nginx origin (``configs/origin-nginx.conf``) and one ferryman per variant, each with one
worker and the reference settings:

* ``off``: no access log, ``X-Request-Id`` off (the engine as it was before issue 7);
* ``request-id``: ``X-Request-Id`` made and sent upstream, no access log;
* ``json-log``: request id and a JSON-lines access log to a file (64 KiB buffer);
* ``text-log``: request id and the combined-format access log to a file;
* ``metrics``: request id and ``server.metrics`` (every request counted, the endpoint
  served by its own process, not scraped during the run);
* ``metrics+json``: request id, metrics and the JSON access log.

``wrk -t1 -c50`` keep-alive GETs, pinned to core 1 with the origin; the proxy is pinned to
core 0. The variants run in turn, rotated each round. Reported: requests per second and the
proxy's CPU microseconds per request (from /proc), medians over the rounds, and the ratio
to ``off``. Loopback only; every run is bounded by a timeout. The log files are written to a
temporary directory and deleted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    CLK_TCK,
    CONFIG_DIR,
    BenchError,
    Managed,
    ferryman_command,
    free_ports,
    guarded_main,
    log,
    render_config,
    run_wrk,
    taskset,
    tree_ticks,
    wait_ready,
)

PROXY_CPU, LOAD_CPU = 0, 1

#: name -> (request id, access log format, metrics)
VARIANTS: dict[str, tuple[bool, str | None, bool]] = {
    "off": (False, None, False),
    "request-id": (True, None, False),
    "json-log": (True, "json", False),
    "text-log": (True, "combined", False),
    "metrics": (True, None, True),
    "metrics+json": (True, "json", True),
}


def ferryman_config(
    dest: Path, port: int, origin: int, request_id: bool, fmt: str | None, metrics: int
) -> Path:
    access = f", access_log: {{format: {fmt}, path: {dest.stem}.log}}" if fmt else ""
    endpoint = f", metrics: 127.0.0.1:{metrics}" if metrics else ""
    dest.write_text(
        "server: {workers: 1, forwarded: {x_forwarded_for: false, x_forwarded_proto: false, "
        f"x_forwarded_host: false, request_id: {'true' if request_id else 'false'}}}{endpoint}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app{access}}}]\n'
        f'upstreams: {{app: {{servers: ["127.0.0.1:{origin}"]}}}}\n'
    )
    return dest


def run(args: argparse.Namespace) -> int:
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise BenchError(f"missing {tool}: apt-get install -y nginx wrk util-linux")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="ferryman-obsbench-"))
    work.chmod(0o711)
    ports = free_ports(1 + 2 * len(VARIANTS))
    origin_port = ports[0]
    render_config(CONFIG_DIR / "origin-nginx.conf", work / "origin.conf", 0, origin_port)
    (work / "o").mkdir()
    origin = Managed(
        "origin",
        taskset(LOAD_CPU, [nginx, "-p", str(work / "o"), "-c", str(work / "origin.conf")]),
        work,
    )
    procs: dict[str, tuple[Managed, int]] = {}
    metric_ports = ports[1 + len(VARIANTS):]
    for i, (name, (request_id, fmt, metrics)) in enumerate(VARIANTS.items()):
        port = ports[1 + i]
        conf = ferryman_config(
            work / f"{name}.yaml", port, origin_port, request_id, fmt,
            metric_ports[i] if metrics else 0,
        )
        argv, env = ferryman_command(args.ferryman_bin, ["run", "-c", str(conf)])
        procs[name] = (Managed(name, taskset(PROXY_CPU, argv), work, env=env), port)
    try:
        time.sleep(1.0)
        wait_ready(origin, origin_port, 10)
        for proc, port in procs.values():
            wait_ready(proc, port, 30)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                proc, port = procs[name]
                # the whole process tree: with metrics the main process has two children
                # (the worker and the metrics process), whose CPU counts too
                pid = proc.pid
                run_wrk(LOAD_CPU, port, args.connections, 2)  # warm-up
                before = tree_ticks(pid)
                result, _ = run_wrk(LOAD_CPU, port, args.connections, args.seconds)
                used = (tree_ticks(pid) - before) / CLK_TCK
                if result.error_count:
                    raise BenchError(f"{name}: wrk saw {result.error_count} errors")
                cpu_us = used * 1e6 / max(1, result.requests)
                results[name].append((result.rps, cpu_us))
                log(f"{name}: {result.rps:,.0f} req/s, {cpu_us:.2f} us CPU/req")
        logged = {
            name: (work / f"{name}.log").stat().st_size
            for name, (_, fmt, _) in VARIANTS.items()
            if fmt
        }
    finally:
        for proc, _ in procs.values():
            proc.stop()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {
        name: (statistics.median(r for r, _ in rs), statistics.median(c for _, c in rs))
        for name, rs in results.items()
    }
    print(f"Command: `python benchmarks/observability.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"wrk -t1 -c{args.connections} -d{args.seconds}s keep-alive GET /; "
        f"{args.rounds} rounds (medians); log bytes written: "
        + ", ".join(f"{k} {v:,}" for k, v in logged.items())
    )
    print()
    print("| variant | req/s | CPU µs/req | CPU vs off |")
    print("|---|---:|---:|---:|")
    base = med["off"][1]
    for name in VARIANTS:
        rps, cpu = med[name]
        print(f"| {name} | {rps:,.0f} | {cpu:.2f} | {cpu / base:.3f}× |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--ferryman-bin", default=None)
    args = p.parse_args()
    return guarded_main(lambda: run(args), "stopped nginx and the ferryman variants")


if __name__ == "__main__":
    sys.exit(main())
