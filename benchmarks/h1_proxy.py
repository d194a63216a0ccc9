#!/usr/bin/env python3
"""Side-by-side HTTP/1.1 reverse-proxy benchmark: nginx vs HAProxy vs ferryman.

One run measures every selected proxy against the same nginx origin, in the same conditions:

* the proxy under test is pinned to the "proxy core" (default 0);
* the origin (nginx, ``return 200 'hello world\\n'``) and the load generator (``wrk``) are
  pinned to the "load core" (default 1), and so is this script;
* per proxy: start, wait until it answers, warm up for 1 s, then run
  ``wrk -t1 -c<connections> -d<duration>s --latency`` while sampling the serving process's
  user+system CPU ticks (``/proc/PID/stat`` fields 14 and 15) before and after;
* then open N idle keep-alive client connections (one request/response each, left open) and
  measure the serving process's ``VmRSS`` growth per connection.

Reference configs (``benchmarks/configs``) are verbatim copies of
``/work/shared/reference``; only ``@PROXY_PORT@`` / ``@ORIGIN_PORT@`` are substituted.

Usage::

    python benchmarks/h1_proxy.py [--duration 10] [--connections 50] [--rounds 1]
                                  [--only nginx,haproxy,ferryman]

Traffic goes to 127.0.0.1 only. Every wait is bounded, and every process started here is
terminated (by its own process-group id) in a ``finally`` block, including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    CLK_TCK,
    CONFIG_DIR,
    IDLE_SETTLE,
    OUT_DIR,
    PROXIES,
    READY_TIMEOUT_FERRYMAN,
    READY_TIMEOUT_NATIVE,
    BenchError,
    Managed,
    close_all,
    cpu_split,
    cpu_ticks,
    ensure_nofile,
    ferryman_command,
    fmt_lat,
    free_ports,
    guarded_main,
    log,
    one_line,
    open_idle_connections,
    ratio,
    render_config,
    rss_bytes,
    run_wrk,
    serving_pid,
    still_open,
    taskset,
    tool_version,
    tree_ticks,
    wait_ready,
)

# --------------------------------------------------------------------------------------------
# Proxies
# --------------------------------------------------------------------------------------------


@dataclass
class Env:
    """Run-wide settings shared by every measurement."""

    tmp: Path
    origin_port: int
    proxy_ports: dict[str, int]
    proxy_cpu: int
    load_cpu: int
    duration: int
    connections: int
    idle_conns: int
    ferryman_bin: str | None
    no_forwarded: bool = False


class Unavailable(Exception):
    """The proxy cannot be run at all (e.g. ferryman not runnable yet)."""


def _ferryman_command(env: Env, config: Path) -> tuple[list[str], dict[str, str]]:
    """argv/env for ferryman: ``--ferryman-bin``, else ``ferryman`` on PATH, else ``-m``."""
    try:
        return ferryman_command(env.ferryman_bin, ["run", "-c", str(config)])
    except BenchError as exc:
        raise Unavailable(str(exc)) from exc


FERRYMAN_YAML = """\
server:
  workers: 1{forwarded}
listeners:
  - bind: "127.0.0.1:{proxy_port}"
    upstream: origin
upstreams:
  origin:
    servers: ["127.0.0.1:{origin_port}"]
"""


def start_proxy(name: str, env: Env, rnd: int) -> tuple[Managed, float]:
    """Write the proxy's config and start it pinned to the proxy core."""
    port = env.proxy_ports[name]
    workdir = env.tmp / f"{name}-r{rnd}"
    workdir.mkdir(parents=True, exist_ok=True)
    child_env: dict[str, str] | None = None
    if name == "nginx":
        conf = render_config(
            CONFIG_DIR / "proxy-nginx.conf", workdir / "nginx.conf", port, env.origin_port
        )
        argv = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", "stderr"]
        timeout = READY_TIMEOUT_NATIVE
    elif name == "haproxy":
        conf = render_config(
            CONFIG_DIR / "proxy-haproxy.cfg", workdir / "haproxy.cfg", port, env.origin_port
        )
        argv = ["haproxy", "-f", str(conf), "-db"]
        timeout = READY_TIMEOUT_NATIVE
    elif name == "ferryman":
        conf = workdir / "ferryman.yaml"
        forwarded = (
            "\n  forwarded: {x_forwarded_for: false, x_forwarded_proto: false, "
            "x_forwarded_host: false}"
            if env.no_forwarded
            else ""
        )
        conf.write_text(
            FERRYMAN_YAML.format(
                proxy_port=port, origin_port=env.origin_port, forwarded=forwarded
            )
        )
        argv, child_env = _ferryman_command(env, conf)
        timeout = READY_TIMEOUT_FERRYMAN
    else:  # pragma: no cover - argparse validates names
        raise BenchError(f"unknown proxy {name}")
    try:
        proc = Managed(f"{name}-r{rnd}", taskset(env.proxy_cpu, argv), env.tmp, workdir, child_env)
    except OSError as exc:
        raise Unavailable(f"cannot start {argv[0]}: {exc}") from exc
    return proc, timeout


@dataclass
class ProxyResult:
    """Everything measured for one proxy in one round."""

    proxy: str
    status: str = "ok"  # ok | unavailable | failed
    reason: str = ""
    pid_choice: str = ""
    requests: int = 0
    rps: float = 0.0
    cpu_us_per_req: float = 0.0
    cpu_us_per_req_tree: float = 0.0
    core_utilisation: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    rss_before: int = 0
    rss_after: int = 0
    rss_per_conn: float | None = None
    rss_error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Total non-2xx/3xx responses and socket errors seen by wrk."""
        return self.non_2xx_3xx + sum(self.socket_errors.values())


def measure_proxy(name: str, env: Env, rnd: int) -> ProxyResult:
    """Start one proxy, load it, measure CPU/latency/RSS, stop it."""
    res = ProxyResult(proxy=name)
    proc: Managed | None = None
    try:
        proc, timeout = start_proxy(name, env, rnd)
        port = env.proxy_ports[name]
        wait_ready(proc, port, timeout)
        pid, res.pid_choice = serving_pid(proc.pid)
        res.pid_choice = f"pid {pid}: {res.pid_choice} of {proc.pid}"
        log(f"  {name}: ready, measuring {res.pid_choice}")

        run_wrk(env.load_cpu, port, env.connections, 1)  # warm-up, result discarded

        split0 = cpu_split(pid)
        t0, tree0, wall0 = cpu_ticks(pid), tree_ticks(proc.pid), time.monotonic()
        wrk, raw = run_wrk(env.load_cpu, port, env.connections, env.duration)
        t1, tree1, wall1 = cpu_ticks(pid), tree_ticks(proc.pid), time.monotonic()
        split1 = cpu_split(pid)
        (env.tmp / f"wrk-{name}-r{rnd}.txt").write_text(raw)
        if wrk.requests <= 0:
            raise BenchError("wrk completed zero requests")
        res.requests, res.rps = wrk.requests, wrk.rps
        res.p50_us, res.p99_us = wrk.p50_us, wrk.p99_us
        res.non_2xx_3xx, res.socket_errors = wrk.non_2xx_3xx, wrk.socket_errors
        res.cpu_us_per_req = (t1 - t0) / CLK_TCK * 1e6 / wrk.requests
        res.cpu_us_per_req_tree = (tree1 - tree0) / CLK_TCK * 1e6 / wrk.requests
        res.core_utilisation = (t1 - t0) / CLK_TCK / (wall1 - wall0)
        if tree1 - tree0 > 1.1 * (t1 - t0) + 2:
            res.notes.append(
                f"other processes in the tree used CPU too: tree {res.cpu_us_per_req_tree:.1f} "
                "us/req"
            )
        user_us = (split1[0] - split0[0]) / CLK_TCK * 1e6 / wrk.requests
        sys_us = (split1[1] - split0[1]) / CLK_TCK * 1e6 / wrk.requests
        log(f"  {name}: user {user_us:.1f} us/req, system {sys_us:.1f} us/req")
        log(
            f"  {name}: {res.rps:,.0f} req/s, {res.cpu_us_per_req:.1f} us/req, "
            f"p50 {fmt_lat(res.p50_us)}, p99 {fmt_lat(res.p99_us)}, errors {res.errors}"
        )

        res.rss_before, res.rss_after, res.rss_per_conn, res.rss_error = measure_idle_rss(
            pid, port, env.idle_conns
        )
        if res.rss_per_conn is not None:
            log(f"  {name}: {res.rss_per_conn / 1024:.2f} KiB RSS per idle keep-alive connection")
        else:
            log(f"  {name}: idle-connection RSS test failed: {res.rss_error}")
        if not proc.alive():
            res.notes.append(f"exited during the run (code {proc.proc.returncode})")
    except Unavailable as exc:
        res.status, res.reason = "unavailable", str(exc)
    except BenchError as exc:
        res.status = "unavailable" if name == "ferryman" else "failed"
        res.reason = str(exc)
    finally:
        if proc is not None:
            proc.stop()
    if res.status != "ok":
        log(f"  {name}: {res.status}: {res.reason}")
    return res


def measure_idle_rss(pid: int, port: int, count: int) -> tuple[int, int, float | None, str]:
    """(rss_before, rss_after, bytes per idle connection or None, error message)."""
    time.sleep(IDLE_SETTLE)
    before = rss_bytes(pid)
    socks: list[socket.socket] = []
    try:
        socks = open_idle_connections(port, count)
        time.sleep(IDLE_SETTLE)
        after = rss_bytes(pid)
        # The connections must still be open (not closed by the proxy) at measurement time.
        alive = sum(1 for s in socks if still_open(s))
        if alive < count:
            return before, after, None, f"proxy closed {count - alive}/{count} idle connections"
        return before, after, (after - before) / count, ""
    except BenchError as exc:
        return before, 0, None, str(exc)
    finally:
        close_all(socks)



# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------



def table(results: list[ProxyResult], title: str) -> str:
    """A Markdown table of ``results`` with ratios relative to the nginx row."""
    base = next((r for r in results if r.proxy == "nginx" and r.status == "ok"), None)
    header = (
        "| proxy | req/s | req/s vs nginx | CPU µs/req | CPU vs nginx | proxy core busy "
        "| p50 | p99 | RSS/idle conn | RSS vs nginx | errors |"
    )
    ncols = header.count("|") - 1
    lines = [f"### {title}", "", header, "|" + "---|" * ncols]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.proxy} | {r.status}: {one_line(r.reason)} |" + " |" * (ncols - 2))
            continue
        rss = (
            f"{r.rss_per_conn / 1024:.2f} KiB ({r.rss_per_conn:,.0f} B)"
            if r.rss_per_conn is not None
            else f"n/a ({one_line(r.rss_error)})"
        )
        if r.errors:
            errs = (
                f"**!! {r.non_2xx_3xx} non-2xx/3xx, socket "
                + ", ".join(f"{k} {v}" for k, v in r.socket_errors.items())
                + "**"
            )
        else:
            errs = "0"
        lines.append(
            "| "
            + " | ".join(
                [
                    r.proxy,
                    f"{r.rps:,.0f}",
                    ratio(r.rps, base.rps if base else None),
                    f"{r.cpu_us_per_req:.1f}",
                    ratio(r.cpu_us_per_req, base.cpu_us_per_req if base else None),
                    f"{r.core_utilisation * 100:.0f}%",
                    fmt_lat(r.p50_us),
                    fmt_lat(r.p99_us),
                    rss,
                    ratio(r.rss_per_conn, base.rss_per_conn if base else None),
                    errs,
                ]
            )
            + " |"
        )
    notes = [f"- {r.proxy}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)



def median_results(rounds: list[list[ProxyResult]], names: Sequence[str]) -> list[ProxyResult]:
    """Per-proxy median of every numeric metric over the rounds in which it ran OK."""
    out = []
    for name in names:
        ok = [r for rnd in rounds for r in rnd if r.proxy == name and r.status == "ok"]
        if not ok:
            last = [r for rnd in rounds for r in rnd if r.proxy == name][-1]
            out.append(ProxyResult(proxy=name, status=last.status, reason=last.reason))
            continue
        med = ProxyResult(proxy=name, pid_choice=ok[-1].pid_choice)
        for attr in (
            "requests",
            "rps",
            "cpu_us_per_req",
            "cpu_us_per_req_tree",
            "core_utilisation",
            "p50_us",
            "p99_us",
            "rss_before",
            "rss_after",
        ):
            setattr(med, attr, statistics.median(getattr(r, attr) for r in ok))
        rss = [r.rss_per_conn for r in ok if r.rss_per_conn is not None]
        med.rss_per_conn = statistics.median(rss) if rss else None
        med.rss_error = "" if rss else ok[-1].rss_error
        med.non_2xx_3xx = sum(r.non_2xx_3xx for r in ok)
        med.socket_errors = {
            k: sum(r.socket_errors.get(k, 0) for r in ok)
            for k in ("connect", "read", "write", "timeout")
        }
        if len(ok) < len(rounds):
            med.notes.append(f"median of {len(ok)}/{len(rounds)} successful rounds")
        out.append(med)
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def preflight(names: Sequence[str], proxy_cpu: int, load_cpu: int) -> None:
    """Check tools, /proc and CPU pinning; raise BenchError with a clear message."""
    if not sys.platform.startswith("linux") or not Path("/proc/self/stat").exists():
        raise BenchError("this benchmark needs Linux with /proc")
    needed = {"taskset": "util-linux", "wrk": "wrk", "nginx": "nginx-light (origin)"}
    if "haproxy" in names:
        needed["haproxy"] = "haproxy"
    missing = [
        f"{tool} (apt-get install -y {pkg.split()[0]})"
        for tool, pkg in needed.items()
        if shutil.which(tool) is None
    ]
    if missing:
        raise BenchError("missing tools: " + "; ".join(missing))
    if proxy_cpu == load_cpu:
        raise BenchError("--proxy-cpu and --load-cpu must differ")
    allowed = os.sched_getaffinity(0)
    for cpu in (proxy_cpu, load_cpu):
        if cpu not in allowed:
            raise BenchError(
                f"CPU {cpu} is not available to this process (allowed: {sorted(allowed)}); "
                "pick others with --proxy-cpu/--load-cpu"
            )
        try:
            out = subprocess.run(taskset(cpu, ["true"]), capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"taskset -c {cpu} true failed: {exc}") from exc
        if out.returncode != 0:
            raise BenchError(f"taskset -c {cpu} does not work: {out.stderr.strip()}")
    if not CONFIG_DIR.is_dir():
        raise BenchError(f"reference configs missing: {CONFIG_DIR}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Side-by-side H1 reverse-proxy benchmark (nginx / HAProxy / ferryman)."
    )
    p.add_argument("--duration", type=int, default=10, help="wrk seconds per proxy (10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence N times")
    p.add_argument(
        "--only", default=",".join(PROXIES), help="comma-separated subset of: " + ",".join(PROXIES)
    )
    p.add_argument(
        "--idle-conns",
        type=int,
        default=2000,
        help="idle keep-alive connections for the RSS test (2000)",
    )
    p.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxy (0)")
    p.add_argument("--load-cpu", type=int, default=1, help="core for origin + wrk (1)")
    p.add_argument(
        "--ferryman-bin",
        default=None,
        help="ferryman executable (default: 'ferryman' on PATH, else python -m)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result path (default benchmarks/out/h1_proxy-<timestamp>.json)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    p.add_argument(
        "--no-forwarded",
        action="store_true",
        help="configure ferryman like the reference nginx/HAProxy configs: no X-Forwarded-* "
        "headers (its default adds three)",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PROXIES))
    if unknown or not names:
        p.error(f"--only: unknown proxies {unknown}; choose from {','.join(PROXIES)}")
    args.names = [n for n in PROXIES if n in names]
    for opt in ("duration", "connections", "rounds", "idle_conns"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be >= 1")
    return args


def metadata(args: argparse.Namespace, env: Env) -> dict[str, Any]:
    """Machine, tool versions and parameters for the JSON file."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "clk_tck": CLK_TCK,
        "python": platform.python_version(),
        "versions": {
            "nginx": tool_version(["nginx", "-v"]),
            "haproxy": tool_version(["haproxy", "-v"]) if shutil.which("haproxy") else "absent",
            "wrk": tool_version(["wrk", "-v"]),
        },
        "params": {
            "duration_s": env.duration,
            "connections": env.connections,
            "rounds": args.rounds,
            "proxies": args.names,
            "idle_conns": env.idle_conns,
            "proxy_cpu": env.proxy_cpu,
            "load_cpu": env.load_cpu,
            "origin_port": env.origin_port,
            "proxy_ports": env.proxy_ports,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the process exit code."""
    preflight(args.names, args.proxy_cpu, args.load_cpu)
    ensure_nofile(args.idle_conns + 256)
    # Keep this script (the idle-connection client) off the proxy core.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.load_cpu})

    tmp = Path(tempfile.mkdtemp(prefix="ferryman-bench-"))
    ports = free_ports(1 + len(args.names))
    env = Env(
        tmp=tmp,
        origin_port=ports[0],
        proxy_ports=dict(zip(args.names, ports[1:], strict=True)),
        proxy_cpu=args.proxy_cpu,
        load_cpu=args.load_cpu,
        duration=args.duration,
        connections=args.connections,
        idle_conns=args.idle_conns,
        ferryman_bin=args.ferryman_bin,
        no_forwarded=args.no_forwarded,
    )
    log(f"work dir {tmp}; origin :{env.origin_port}; proxies {env.proxy_ports}")
    rounds: list[list[ProxyResult]] = []
    try:
        origin_dir = tmp / "origin"
        origin_dir.mkdir()
        conf = render_config(
            CONFIG_DIR / "origin-nginx.conf", origin_dir / "origin.conf", 0, env.origin_port
        )
        origin = Managed(
            "origin",
            taskset(
                env.load_cpu, ["nginx", "-p", f"{origin_dir}/", "-c", str(conf), "-e", "stderr"]
            ),
            tmp,
            origin_dir,
        )
        wait_ready(origin, env.origin_port, READY_TIMEOUT_NATIVE)
        log("origin ready")
        meta = metadata(args, env)

        for rnd in range(1, args.rounds + 1):
            log(f"round {rnd}/{args.rounds}")
            results = []
            for name in args.names:
                if not origin.alive():
                    raise BenchError(f"origin died:\n{origin.log_tail()}")
                results.append(measure_proxy(name, env, rnd))
            rounds.append(results)
            print(table(results, f"Round {rnd}/{args.rounds}"), "\n", flush=True)

        median = median_results(rounds, args.names)
        if args.rounds > 1:
            print(table(median, f"Median of {args.rounds} rounds"), "\n", flush=True)

        out = args.out or OUT_DIR / (
            "h1_proxy-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "meta": meta,
                    "rounds": [[_jsonable(r) for r in rnd] for rnd in rounds],
                    "median": [_jsonable(r) for r in median],
                },
                indent=2,
            )
            + "\n"
        )
        log(f"results written to {out}")
    finally:
        Managed.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = [r for r in rounds[-1] if r.status == "failed" or r.errors] if rounds else []
    return 1 if bad else 0


def _jsonable(r: ProxyResult) -> dict[str, Any]:
    d = asdict(r)
    d["errors"] = r.errors
    return d


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse options, install signal handlers, run, map errors to exit codes."""
    args = parse_args(argv)
    return guarded_main(lambda: run(args), "all started processes were stopped")


if __name__ == "__main__":
    sys.exit(main())
