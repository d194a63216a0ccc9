"""Soak: millions of mixed requests through ``ferryman run`` at 2 workers, resources sampled.

Run it with ``benchmarks/soak`` (see ``--help``; ``benchmarks/README.md`` describes it).
Loopback only, bounded in requests and in time, stops by itself.

What runs:

* an nginx origin: ``/`` (12 bytes), ``/big`` (256 KiB), ``/upload`` (answers POSTs),
  ``/__stub`` (its request counter), plus a second server that closes every connection
  without answering (nginx's ``return 444``), and a port nobody listens on;
* ``ferryman run`` with 2 workers and routes to four upstream groups: ``app`` (the
  origin), ``flaky`` (the origin and the closing server: GETs are retried on the origin),
  ``broken`` (only the closing server: 502) and ``dead`` (only the refused port: 502). Its
  ``app`` is :class:`soak_app.SoakProxy`, the built-in proxy plus a once-a-second stats line
  per worker (asyncio tasks, connections, pooled connections, GC-tracked objects, RSS, fds);
* ``wrk`` with ``soak_mix.lua``: keep-alive GETs, 256 KiB responses, a new connection per
  request, 64 KiB uploads and the three failing groups, each response checked;
* an aborting client (this script, ``--aborter``): connections closed before a request,
  mid-head, right after a request, mid-response and mid-upload.

The report gives, per worker, each resource's slope over the run after warm-up (per million
requests, by least squares against the origin's request counter) and its value before the
load and after it settled; and every unexpected outcome. Exit 0 if the counts are flat and
nothing unexpected happened, 1 otherwise, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    BENCH_DIR,
    BenchError,
    Managed,
    ferryman_command,
    free_ports,
    guarded_main,
    log,
    tool_version,
    wait_ready,
)

BIG_SIZE = 256 * 1024
UPLOAD_REPLY = b"ok\n"
WRK_THREADS = 2
#: RSS growth per million requests that still counts as flat: 4 bytes a request on average.
#: Anything of 16 bytes or more leaked by every request shows above it, and so does, say, a
#: 256-byte buffer leaked by each request of the smallest (4%) share of the mix (10 bytes a
#: request). Smaller leaks of GC-tracked objects are caught by the next bound.
RSS_MIB_PER_1M = 4.0
#: GC-tracked objects per million requests that still count as flat (0.002 a request)
GC_OBJECTS_PER_1M = 2000.0
#: A growth is only reported when its drift over the run (slope × span) also exceeds this,
#: so that one allocator step (about 1 MiB) or the objects of the requests in flight at the
#: last sample cannot fail a short run: RSS in MiB, GC-tracked objects
GROWTH_FLOOR = {"rss_mib": 2.0, "gc_objects": 5000.0}
#: For counts that follow the load (descriptors, tasks, connections), the drift the slope
#: predicts over the measured part of the run must stay within this share of the range the
#: count moved in under load, or within the floor: a leak grows steadily, load noise does not
DRIFT_SHARE = 0.25
DRIFT_FLOOR = {"fds": 8.0, "tasks": 4.0, "client_conns": 8.0, "pooled_idle": 8.0}
SETTLE_SECONDS = 4.0


# --------------------------------------------------------------------------------------------
# The aborting client
# --------------------------------------------------------------------------------------------

ABORT_KINDS = ("connect-close", "mid-head", "after-request", "mid-response", "mid-upload")


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a client that crashed would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


async def _abort_once(port: int, kind: str) -> str | None:
    """One aborted exchange; a description if something unexpected happened."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        if kind == "connect-close":
            writer.close()
        elif kind == "mid-head":
            writer.write(b"GET / HTTP/1.1\r\nHost: soak\r\nX-Half: ")
            await writer.drain()
            _rst(writer)
        elif kind == "after-request":
            writer.write(b"GET /big HTTP/1.1\r\nHost: soak\r\n\r\n")
            await writer.drain()
            _rst(writer)
        elif kind == "mid-response":
            writer.write(b"GET /big HTTP/1.1\r\nHost: soak\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if not head.startswith(b"HTTP/1.1 200 "):
                return f"mid-response: got {head[:60]!r}"
            await asyncio.wait_for(reader.readexactly(8192), 5)
            _rst(writer)
        elif kind == "mid-upload":
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: soak\r\nContent-Length: 1048576\r\n\r\n"
                + b"u" * 16384
            )
            await writer.drain()
            _rst(writer)
        return None
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        writer.transport.abort()
        return f"{kind}: {type(exc).__name__}: {exc}"


async def _aborter(port: int, count: int, rate: float) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    done = dict.fromkeys(ABORT_KINDS, 0)
    problems: list[str] = []
    pending: set[asyncio.Task[str | None]] = set()
    start = loop.time()

    def finished(task: asyncio.Task[str | None]) -> None:
        pending.discard(task)
        if task.cancelled():
            problems.append(f"{task.get_name()}: stuck (cancelled after the final wait)")
            return
        exc = task.exception()
        problem = f"{type(exc).__name__}: {exc}" if exc is not None else task.result()
        if problem:
            problems.append(problem)

    for i in range(count):
        if stop.is_set():
            break
        delay = start + i / rate - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        kind = ABORT_KINDS[i % len(ABORT_KINDS)]
        done[kind] += 1
        task = loop.create_task(_abort_once(port, kind), name=kind)
        pending.add(task)
        task.add_done_callback(finished)
        if len(pending) > 200:  # the proxy is slow to answer: do not pile up
            await asyncio.sleep(0.01)
    if pending:
        await asyncio.wait(set(pending), timeout=10)
        for task in list(pending):  # each exchange is bounded by 5 s waits: stuck
            task.cancel()
        await asyncio.sleep(0)
    return {
        "aborts": sum(done.values()),
        "by_kind": done,
        "unexpected": problems[:20],
        "unexpected_count": len(problems),
    }


def aborter_main(port: int, count: int, rate: float) -> int:
    """``--aborter`` mode: print one ``ABORT_JSON`` line when done or on SIGTERM."""
    result = asyncio.run(_aborter(port, count, rate))
    print("ABORT_JSON " + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def origin_conf(work: Path, port: int, closing_port: int) -> Path:
    (work / "files").mkdir()
    (work / "files" / "big").write_bytes(b"b" * BIG_SIZE)
    (work / "body-tmp").mkdir()
    text = f"""worker_processes 1;
daemon off;
error_log stderr;
pid {work}/origin.pid;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {work}/body-tmp;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    keepalive_requests 10000000;
    location = /__stub {{ stub_status; }}
    location = /big {{ root {work}/files; sendfile on; }}
    location = /upload {{
      client_max_body_size 2m;
      client_body_buffer_size 128k;
      return 200 'ok\\n';
    }}
    location / {{ return 200 'hello world\\n'; }}
  }}
  server {{
    listen 127.0.0.1:{closing_port} backlog=4096;
    location / {{ return 444; }}
  }}
}}
"""
    path = work / "origin.conf"
    path.write_text(text)
    return path


def ferryman_yaml(
    work: Path, port: int, origin: int, closing: int, dead: int, workers: int
) -> Path:
    text = f"""app: soak_app:SoakProxy
server:
  workers: {workers}
  grace_period: 5s
listeners:
  - bind: "127.0.0.1:{port}"
    routes:
      - {{match: {{path_prefix: /flaky/}}, upstream: flaky}}
      - {{match: {{path_prefix: /broken/}}, upstream: broken}}
      - {{match: {{path_prefix: /dead/}}, upstream: dead}}
      - {{upstream: app}}
upstreams:
  app:
    servers: ["127.0.0.1:{origin}"]
  flaky:
    servers: ["127.0.0.1:{origin}", "127.0.0.1:{closing}"]
  broken:
    servers: ["127.0.0.1:{closing}"]
  dead:
    servers: ["127.0.0.1:{dead}"]
"""
    path = work / "ferryman.yaml"
    path.write_text(text)
    return path


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return resp.status, resp.read()


def stub_requests(port: int) -> int:
    """The origin's total request count (nginx stub_status)."""
    _, body = http_get(port, "/__stub")
    m = re.search(rb"\n\s*\d+\s+\d+\s+(\d+)", body)
    if not m:
        raise BenchError(f"cannot read the origin's stub_status: {body[:120]!r}")
    return int(m.group(1))


def worker_pids(main_pid: int) -> list[int]:
    """The ferryman workers: children of the main process whose stats file exists."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == main_pid:
            out.append(int(entry))
    return sorted(out)


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 if xs do not vary)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass
class WorkerSeries:
    pid: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def load_series(stats_dir: Path) -> dict[int, WorkerSeries]:
    series: dict[int, WorkerSeries] = {}
    for path in sorted(stats_dir.glob("worker-*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            series.setdefault(row["pid"], WorkerSeries(row["pid"])).rows.append(row)
    return series


def progress_at(progress: list[tuple[float, int]], t: float) -> float:
    """The origin's request count at time ``t``, interpolated between samples."""
    if not progress:
        return 0.0
    if t <= progress[0][0]:
        return float(progress[0][1])
    for (t0, n0), (t1, n1) in zip(progress, progress[1:], strict=False):
        if t0 <= t <= t1:
            return n0 + (n1 - n0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return float(progress[-1][1])


METRICS = ("rss_mib", "fds", "tasks", "client_conns", "pooled_idle", "gc_objects")


def value(row: dict[str, Any], metric: str) -> float:
    return row["rss"] / 2**20 if metric == "rss_mib" else float(row[metric])


def analyse(
    series: dict[int, WorkerSeries],
    progress: list[tuple[float, int]],
    load_start: float,
    load_end: float,
    warm_fraction: float,
    settled_after: float,
) -> dict[str, Any]:
    """Per worker and metric: before, warm, end of the load, settled, slope per 1M requests.

    The load is wrk's run (``load_start`` to ``load_end``); the settled value is the last
    sample taken ``SETTLE_SECONDS`` after ``settled_after`` (when the aborter finished too).
    """
    n_start = progress_at(progress, load_start)
    n_end = progress_at(progress, load_end)
    n_warm = n_start + (n_end - n_start) * warm_fraction
    report: dict[str, Any] = {}
    for pid, ws in sorted(series.items()):
        before = [r for r in ws.rows if r["t"] < load_start]
        during = [
            r
            for r in ws.rows
            if load_start <= r["t"] <= load_end and progress_at(progress, r["t"]) >= n_warm
        ]
        after = [r for r in ws.rows if r["t"] > settled_after + SETTLE_SECONDS]
        span = (
            (progress_at(progress, during[-1]["t"]) - progress_at(progress, during[0]["t"])) / 1e6
            if during
            else 0.0
        )
        per: dict[str, Any] = {"samples": len(during), "span_1m": span}
        for m in METRICS:
            xs = [progress_at(progress, r["t"]) / 1e6 for r in during]
            ys = [value(r, m) for r in during]
            per[m] = {
                "before": value(before[-1], m) if before else None,
                "warm": ys[0] if ys else None,
                "end": ys[-1] if ys else None,
                "min": min(ys) if ys else None,
                "max": max(ys) if ys else None,
                "settled": value(after[-1], m) if after else None,
                "slope_per_1m": slope(xs, ys),
            }
        report[str(pid)] = per
    return report


def verdict(report: dict[str, Any]) -> list[str]:
    """Reasons the run is not flat (empty: flat)."""
    problems = []
    for pid, per in report.items():
        if per["samples"] < 5:
            problems.append(f"worker {pid}: only {per['samples']} samples after warm-up")
            continue
        for m, bound in (("rss_mib", RSS_MIB_PER_1M), ("gc_objects", GC_OBJECTS_PER_1M)):
            s = per[m]["slope_per_1m"]
            if s > bound and s * per["span_1m"] > GROWTH_FLOOR[m]:
                problems.append(
                    f"worker {pid}: {m} grows {s:+.2f} per 1M requests (bound {bound}), "
                    f"{s * per['span_1m']:+.1f} over the run"
                )
        for m, floor in DRIFT_FLOOR.items():
            d = per[m]
            drift = d["slope_per_1m"] * per["span_1m"]
            allowed = max(floor, DRIFT_SHARE * (d["max"] - d["min"]))
            if abs(drift) > allowed:
                problems.append(
                    f"worker {pid}: {m} drifts {drift:+.1f} over the run (allowed {allowed:.1f})"
                )
        settled, before = per["tasks"]["settled"], per["tasks"]["before"]
        if settled is not None and before is not None and settled > before:
            problems.append(
                f"worker {pid}: {settled:.0f} tasks after the load, {before:.0f} before"
            )
        if per["client_conns"]["settled"] not in (None, 0.0):
            problems.append(
                f"worker {pid}: {per['client_conns']['settled']:.0f} client connections left open"
            )
        fds_after, fds_before = per["fds"]["settled"], per["fds"]["before"]
        pooled = per["pooled_idle"]["settled"] or 0.0
        pooled_before = per["pooled_idle"]["before"] or 0.0
        if fds_after is not None and fds_before is not None:
            if fds_after - (pooled - pooled_before) > fds_before:
                problems.append(
                    f"worker {pid}: {fds_after:.0f} fds after the load ({pooled:.0f} pooled), "
                    f"{fds_before:.0f} before ({pooled_before:.0f} pooled)"
                )
    return problems


def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    w, a = result["wrk"], result["aborter"]
    total = w["requests"] + a["aborts"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; ferryman {result['ferryman_version']}; "
        f"{result['workers']} workers; {result['cpus']} CPUs; wrk {result['wrk_version']}  ",
        f"Requests: **{total:,}** in {result['load_seconds']:.0f} s "
        f"({total / result['load_seconds']:,.0f}/s): wrk {w['requests']:,} "
        f"({', '.join(f'{k} {v:,}' for k, v in sorted(w['sent'].items()))}), "
        f"aborted clients {a['aborts']:,} "
        f"({', '.join(f'{k} {v:,}' for k, v in a['by_kind'].items())})  ",
        f"Statuses: {', '.join(f'{k}: {v:,}' for k, v in sorted(w['statuses'].items()))}; "
        f"unexpected responses {w['unexpected']}, socket errors "
        f"{w['connect'] + w['read'] + w['write'] + w['timeout']} "
        f"(connect {w['connect']}, read {w['read']}, write {w['write']}, "
        f"timeout {w['timeout']}), unexpected aborter outcomes {a['unexpected_count']}, "
        f"proxy log tracebacks {result['tracebacks']}, proxy log errors {result['log_errors']}",
        "",
        f"Slopes are least squares over the samples after the first "
        f"{result['warm_fraction']:.0%} of the requests (the x axis is the origin's request "
        "count), per million requests. Settled: after the load stopped and "
        f"{SETTLE_SECONDS:.0f} s passed. Flat means: RSS grows under {RSS_MIB_PER_1M:g} MiB "
        f"and GC-tracked objects under {GC_OBJECTS_PER_1M:,.0f} per 1M requests (or by "
        f"under {GROWTH_FLOOR['rss_mib']:g} MiB and {GROWTH_FLOOR['gc_objects']:,.0f} "
        "objects over the whole run); the counts "
        f"that follow the load drift (slope × span) within {DRIFT_SHARE:.0%} of their range "
        "under load; and after the load, tasks and client connections are back where they "
        "were and descriptors exceed their start by no more than the pooled upstream "
        "connections added.",
        "",
        "| worker | metric | before load | after warm-up | end of load | min–max under load | "
        "settled | slope per 1M req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pid, per in result["report"].items():
        for m in METRICS:
            d = per[m]
            digits = 1 if m == "rss_mib" else 0
            lines.append(
                f"| {pid} | {m} | {fmt(d['before'], digits)} | {fmt(d['warm'], digits)} | "
                f"{fmt(d['end'], digits)} | {fmt(d['min'], digits)}–{fmt(d['max'], digits)} | "
                f"{fmt(d['settled'], digits)} | {d['slope_per_1m']:+.2f} |"
            )
    lines.append("")
    lines.append(
        "Verdict: "
        + (
            "**flat, no unexpected errors**"
            if result["ok"]
            else "**FAILED**: " + "; ".join(result["problems"])
        )
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=os.environ.get("FERRYMAN_BENCH_ARGV0", "benchmarks/soak"),
        description="Mixed-traffic soak of ferryman at 2 workers; resource slopes report.",
    )
    p.add_argument("--requests", type=int, default=2_000_000, help="total requests (default 2M)")
    p.add_argument(
        "--abort-share",
        type=float,
        default=0.02,
        help="share of the requests made by the aborting client (default 0.02)",
    )
    p.add_argument(
        "--abort-rate", type=float, default=600.0, help="aborted exchanges per second (default 600)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument(
        "--time-limit",
        type=int,
        default=900,
        help="seconds the load may take before the run fails (default 900)",
    )
    p.add_argument(
        "--warm-fraction",
        type=float,
        default=0.15,
        help="share of requests treated as warm-up (default 0.15)",
    )
    p.add_argument("--ferryman-bin", default=None)
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/out/soak-*.json)")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--aborter", nargs=3, metavar=("PORT", "COUNT", "RATE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def preflight() -> None:
    missing = [
        tool
        for tool in ("nginx", "wrk")
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if missing:
        raise BenchError(
            f"missing: {', '.join(missing)}; install with: apt-get install -y {' '.join(missing)}"
        )


def run(args: argparse.Namespace) -> int:
    preflight()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="ferryman-soak-"))
    os.chmod(work, 0o711)
    stats_dir = work / "stats"
    stats_dir.mkdir()
    try:
        return _run(args, nginx, work, stats_dir)
    finally:
        if args.keep_tmp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, nginx: str, work: Path, stats_dir: Path) -> int:
    proxy_port, origin_port, closing_port, dead_port = free_ports(4)
    origin = Managed(
        "origin",
        [nginx, "-p", str(work), "-c", str(origin_conf(work, origin_port, closing_port))],
        work,
    )
    wait_ready(origin, origin_port, 10)

    cfg = ferryman_yaml(work, proxy_port, origin_port, closing_port, dead_port, args.workers)
    argv, env = ferryman_command(args.ferryman_bin, ["run", "-c", str(cfg)])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH")) if p)
    env["FERRYMAN_SOAK_STATS"] = str(stats_dir)
    proxy = Managed("ferryman", argv, work, env=env)
    wait_ready(proxy, proxy_port, 30)
    version = (
        subprocess.run(
            [*argv[:-3], "--version"], capture_output=True, text=True, env=env, timeout=30
        ).stdout.strip()
        if argv[-3] == "run"
        else "?"
    )
    time.sleep(2.5)  # two stats lines per worker before the load
    pids = worker_pids(proxy.pid)
    log(f"ferryman main {proxy.pid}, workers {pids}; origin {origin_port}, proxy {proxy_port}")

    aborts = int(args.requests * args.abort_share)
    wrk_total = args.requests - aborts
    per_thread = -(-wrk_total // WRK_THREADS)
    progress: list[tuple[float, int]] = [(time.time(), stub_requests(origin_port))]
    stop_sampling = threading.Event()

    def sample_progress() -> None:
        while not stop_sampling.wait(1.0):
            try:
                progress.append((time.time(), stub_requests(origin_port)))
            except OSError:
                pass

    sampler = threading.Thread(target=sample_progress, daemon=True)
    load_start = time.time()
    sampler.start()
    marks = work / "marks"
    marks.mkdir()
    wrk_env = dict(os.environ, SOAK_PER_THREAD=str(per_thread), SOAK_MARK_DIR=str(marks))
    log(
        f"load: {wrk_total:,} wrk requests ({args.connections} connections) + {aborts:,} aborts "
        f"at {args.abort_rate:.0f}/s; time limit {args.time_limit} s"
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        aborter = subprocess.Popen(
            [sys.executable, __file__, "--aborter"]
            + [str(proxy_port), str(aborts), str(args.abort_rate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        procs.append(aborter)
        wrk = subprocess.Popen(
            [
                "wrk",
                f"-t{WRK_THREADS}",
                f"-c{args.connections}",
                f"-d{args.time_limit}s",
                "--timeout=10s",
                "-s",
                str(BENCH_DIR / "soak_mix.lua"),
                f"http://127.0.0.1:{proxy_port}/",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=wrk_env,
            start_new_session=True,
        )
        procs.append(wrk)
        # wrk sleeps out -d even when its threads stopped at their count: interrupt it then
        while wrk.poll() is None and len(list(marks.iterdir())) < WRK_THREADS:
            time.sleep(0.2)
        # the samples are analysed up to here: what follows (an aborter finishing its
        # count) is a trickle, not the load
        load_end = time.time()
        if wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)
        wrk_stdout, wrk_stderr = wrk.communicate(timeout=60)
        try:
            a_out, a_err = aborter.communicate(timeout=max(30.0, 2 * aborts / args.abort_rate))
        except subprocess.TimeoutExpired:
            aborter.send_signal(signal.SIGTERM)
            a_out, a_err = aborter.communicate(timeout=30)
    finally:
        for proc in procs:  # on an error or a signal: nothing is left running
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    all_done = time.time()
    line = next((x for x in wrk_stdout.splitlines() if x.startswith("SOAK_JSON ")), None)
    if line is None:
        raise BenchError(f"wrk failed ({wrk.returncode}): {wrk_stderr[-500:]} {wrk_stdout[-500:]}")
    wrk_result = json.loads(line[len("SOAK_JSON ") :])
    a_line = next((x for x in a_out.splitlines() if x.startswith("ABORT_JSON ")), None)
    if a_line is None:
        raise BenchError(f"the aborting client failed: {a_err[-800:]}")
    abort_result = json.loads(a_line[len("ABORT_JSON ") :])
    log(
        f"load done in {load_end - load_start:.0f} s (aborter in {all_done - load_start:.0f} s); "
        f"settling {SETTLE_SECONDS + 2:.0f} s"
    )
    time.sleep(SETTLE_SECONDS + 2.5)
    stop_sampling.set()
    sampler.join(timeout=5)
    progress.append((time.time(), stub_requests(origin_port)))
    proxy.stop()
    origin.stop()

    proxy_log = proxy.log_path.read_text(errors="replace")
    tracebacks = proxy_log.count("Traceback (most recent call last)")
    log_errors = sum(1 for x in proxy_log.splitlines() if " ERROR " in x or " CRITICAL " in x)
    series = load_series(stats_dir)
    report = analyse(series, progress, load_start, load_end, args.warm_fraction, all_done)
    problems = verdict(report)
    if set(str(p) for p in pids) - set(report) or len(report) != args.workers:
        problems.append(
            f"stats from {len(report)} workers ({sorted(report)}), expected {args.workers} "
            f"(workers found: {pids})"
        )
    if wrk_result["unexpected"]:
        problems.append(f"{wrk_result['unexpected']} unexpected responses: {wrk_result['sample']}")
    sock_errors = sum(wrk_result[k] for k in ("connect", "read", "write", "timeout"))
    if sock_errors:
        problems.append(f"{sock_errors} wrk socket errors")
    if wrk_result["requests"] < wrk_total:
        problems.append(
            f"wrk completed {wrk_result['requests']:,} of {wrk_total:,} requests "
            f"within the {args.time_limit} s limit"
        )
    if abort_result["unexpected_count"]:
        problems.append(
            f"{abort_result['unexpected_count']} unexpected aborter outcomes: "
            f"{abort_result['unexpected'][:3]}"
        )
    if tracebacks or log_errors:
        problems.append(f"proxy log: {tracebacks} tracebacks, {log_errors} error lines")
    result = {
        "command": " ".join(
            [os.environ.get("FERRYMAN_BENCH_ARGV0", "benchmarks/soak"), *sys.argv[1:]]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "ferryman_version": version,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "wrk_version": (tool_version(["wrk", "-v"]).split() + ["?", "?"])[1],
        "load_seconds": all_done - load_start,
        "wrk_seconds": load_end - load_start,
        "warm_fraction": args.warm_fraction,
        "wrk": wrk_result,
        "aborter": abort_result,
        "tracebacks": tracebacks,
        "log_errors": log_errors,
        "report": report,
        "problems": problems,
        "ok": not problems,
        "progress": progress,
        "series": {pid: ws.rows for pid, ws in series.items()},
    }
    out = (
        Path(args.out) if args.out else BENCH_DIR / "out" / time.strftime("soak-%Y%m%d-%H%M%S.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    log(f"raw samples: {out}")
    if problems:
        log("problems:\n  " + "\n  ".join(problems))
        if tracebacks:
            log(proxy_log[proxy_log.find("Traceback") :][:3000])
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.aborter:
        port, count, rate = args.aborter
        return aborter_main(int(port), int(count), float(rate))
    return guarded_main(lambda: run(args), "stopped nginx and ferryman")


if __name__ == "__main__":
    sys.exit(main())
