#!/usr/bin/env python3
"""``benchmarks/run``: nginx, HAProxy and ferryman side by side, several scenarios, one table each.

One run starts one nginx origin (pinned to the load core), then, scenario after scenario and
round after round, each proxy in turn with matched settings (the reference configs of
``benchmarks/configs``, one worker or thread, upstream keep-alive on, ferryman without
``X-Forwarded-*``), pinned to the proxy core, with the load generator (``wrk`` or ``h2load``)
on the load core. It prints one Markdown table per scenario with the per-metric **median**
over the rounds and the **ratio to nginx**, and writes every raw number to a JSON file.

Scenarios (``--scenarios``; ``--list`` describes them): keepalive, fixed-rate, new-conn,
body-1m, body-100m, upload-100m, tls, idle, reuse, scaling. See ``benchmarks/README.md``.

It installs nothing: a pre-flight check lists whatever is missing, with the install line, and
exits with code 2. Traffic goes to 127.0.0.1 only. Every subprocess has a timeout, and every
process and temp dir this script creates is removed on exit, including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import resource
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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
    ensure_nofile,
    ferryman_command,
    fmt_lat,
    free_ports,
    guarded_main,
    log,
    one_line,
    open_idle_connections,
    process_tree,
    render_config,
    replace_once,
    rss_bytes,
    serving_pid,
    still_open,
    tool_version,
    tree_ticks,
    wait_ready,
)

MIB = 1 << 20
INSTALL_LINE = "apt-get install -y nginx haproxy wrk nghttp2-client openssl util-linux"
TOOL_TIMEOUT = 60.0  # openssl, version queries, pre-flight probes
LOAD_EXTRA_TIMEOUT = 60.0  # on top of a load generator's own duration
WARMUP_S = 1
# Spare connections / file descriptors on top of --idle-conns for the idle test.
CONN_MARGIN = 1000

# Added to nginx's proxy location for the body scenarios: no request-body size limit (default
# 1m), and stream request and response bodies as HAProxy and ferryman do, instead of spooling
# them to temp files (nginx's defaults). proxy_buffers stay at the default (8 x one page)
# unless --nginx-proxy-buffers is given.
NGINX_BODY_DIRECTIVES = (
    "      client_max_body_size 0;\n"
    "      proxy_request_buffering off;\n"
    "      proxy_max_temp_file_size 0;"
)

# Seconds a proxy takes to start and to stop (for the runtime estimate only).
START_COST = {"nginx": 0.2, "haproxy": 0.2, "ferryman": 1.0}


# --------------------------------------------------------------------------------------------
# Run-wide state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyOpts:
    """How a proxy is configured for one scenario (all else: the reference configs)."""

    workers: int = 1
    tls: bool = False
    many_conns: bool = False  # raise connection / file limits for the idle test
    bodies: bool = False  # no request-body size limit, stream bodies (nginx: no temp files)
    pinned: bool = True  # False: may use every allowed core


@dataclass
class Ctx:
    """Everything the scenarios share during one run."""

    args: argparse.Namespace
    tmp: Path
    origin_dir: Path
    upload_dir: Path
    origin_port: int
    origin: Managed
    all_cpus: str
    cert: Path | None = None
    key: Path | None = None
    pem: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    lua: dict[str, Path] = field(default_factory=dict)
    scaling_origin_port: int = 0
    rate: float | None = None
    rate_source: str = ""
    results: list[Result] = field(default_factory=list)
    seq: int = 0

    def label(self, name: str) -> str:
        """A unique directory/log name for the next process."""
        self.seq += 1
        return f"{self.seq:03d}-{name}"


@dataclass
class Result:
    """One proxy, one scenario, one round."""

    scenario: str
    proxy: str
    round: int
    status: str = "ok"  # ok | failed
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    error_detail: str = ""
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Running:
    """A started, answering proxy."""

    name: str
    proc: Managed
    port: int
    pid: int  # the serving process (nginx worker, HAProxy, ferryman's only worker)
    pid_choice: str
    tls: bool
    workers: int

    def url(self, path: str = "/") -> str:
        """URL of ``path`` on this proxy."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def run_tool(argv: Sequence[str], timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a short-lived tool with a timeout; BenchError if it cannot start or times out."""
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f}s") from exc
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc}") from exc


def pin(cpus: str, argv: Sequence[str]) -> list[str]:
    """``taskset -c <cpus> argv``."""
    return ["taskset", "-c", cpus, *argv]


def nofile_preexec(needed: int) -> Callable[[], None]:
    """A ``preexec_fn`` raising RLIMIT_NOFILE (soft) in the child to ``needed`` if allowed."""

    def raise_limit() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

    return raise_limit


def fd_limits(idle_conns: int) -> tuple[int, int]:
    """(connections, file descriptors) to configure for the idle test.

    The descriptors stay within the hard RLIMIT_NOFILE, which an unprivileged process (or a
    root without CAP_SYS_RESOURCE) cannot raise.
    """
    conns = idle_conns + CONN_MARGIN
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    return conns, min(cap, 2 * conns + 256)


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io as a dict (rchar, wchar, ...); empty if unreadable."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        with contextlib.suppress(ValueError):
            out[key.strip()] = int(value)
    return out


def cpu_core_times(cpus: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """Per core from /proc/stat: (total, idle incl. iowait, steal) jiffies."""
    out: dict[int, tuple[int, int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            parts = line.split()
            if not parts or not parts[0].startswith("cpu") or parts[0] == "cpu":
                continue
            n = int(parts[0][3:])
            if n in cpus:
                v = [int(x) for x in parts[1:9]]
                out[n] = (sum(v), v[3] + v[4], v[7])
    return out


def origin_worker_pid(ctx: Ctx) -> int:
    """The origin's (single) nginx worker."""
    return serving_pid(ctx.origin.pid)[0]


def stub_status(port: int) -> tuple[int, int]:
    """(accepts, requests) from the origin's stub_status page (this query included)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/__stub", headers={"Host": "stub"})
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"origin stub_status: {exc}") from exc
    finally:
        conn.close()
    lines = text.splitlines()
    try:
        accepts, _handled, requests = (int(x) for x in lines[2].split())
    except (IndexError, ValueError) as exc:
        raise BenchError(f"cannot parse origin stub_status: {text!r}") from exc
    return accepts, requests


def median(values: Sequence[float]) -> float:
    """statistics.median, for readability below."""
    return statistics.median(values)


# --------------------------------------------------------------------------------------------
# CPU sampling around one load run
# --------------------------------------------------------------------------------------------


class CpuWindow:
    """CPU of the proxy (serving process and whole tree) and of both cores over a window."""

    def __init__(self, rp: Running, ctx: Ctx) -> None:
        """Take the "before" sample."""
        self.rp = rp
        self.cores = [ctx.args.proxy_cpu, ctx.args.load_cpu]
        self.split0 = cpu_split(rp.pid)
        self.tree0 = tree_ticks(rp.proc.pid)
        self.core0 = cpu_core_times(self.cores)
        self.wall0 = time.monotonic()
        self.ticks = self.tree = 0
        self.user = self.system = 0
        self.wall = 0.0
        self.core_busy: dict[int, float] = {}
        self.core_steal: dict[int, float] = {}

    def stop(self) -> CpuWindow:
        """Take the "after" sample and compute the deltas."""
        split1 = cpu_split(self.rp.pid)
        tree1 = tree_ticks(self.rp.proc.pid)
        core1 = cpu_core_times(self.cores)
        self.wall = time.monotonic() - self.wall0
        self.user = split1[0] - self.split0[0]
        self.system = split1[1] - self.split0[1]
        self.ticks = self.user + self.system
        self.tree = tree1 - self.tree0
        for n in self.cores:
            if n in self.core0 and n in core1:
                total = core1[n][0] - self.core0[n][0]
                if total > 0:
                    self.core_busy[n] = 1 - (core1[n][1] - self.core0[n][1]) / total
                    self.core_steal[n] = (core1[n][2] - self.core0[n][2]) / total
        return self

    def us(self, tree: bool = False) -> float:
        """CPU microseconds used in the window (serving process, or the whole tree)."""
        return (self.tree if tree else self.ticks) / CLK_TCK * 1e6

    def busy(self, tree: bool = False) -> float:
        """Share of one core the proxy used over the window."""
        return self.us(tree) / 1e6 / self.wall if self.wall > 0 else 0.0

    def raw(self, units: float, unit: str) -> dict[str, Any]:
        """The window's numbers for the JSON file."""
        return {
            "wall_s": round(self.wall, 3),
            "ticks": self.ticks,
            "user_ticks": self.user,
            "system_ticks": self.system,
            "tree_ticks": self.tree,
            f"user_us_per_{unit}": self.user / CLK_TCK * 1e6 / units if units else None,
            f"system_us_per_{unit}": self.system / CLK_TCK * 1e6 / units if units else None,
            f"tree_us_per_{unit}": self.us(True) / units if units else None,
            "core_busy": {str(k): round(v, 3) for k, v in self.core_busy.items()},
            "core_steal": {str(k): round(v, 3) for k, v in self.core_steal.items()},
        }


# --------------------------------------------------------------------------------------------
# Load generators
# --------------------------------------------------------------------------------------------

# A wrk ``done`` hook that prints the summary as one JSON line (exact byte and error counts,
# latency percentiles in microseconds) instead of wrk's rounded text.
REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write("WRK_JSON {")
  io.write(string.format('"requests": %.0f, "bytes": %.0f, "duration_us": %.0f, ',
    summary.requests, summary.bytes, summary.duration))
  io.write(string.format('"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, ',
    e.connect, e.read, e.write, e.status))
  io.write(string.format('"timeout": %.0f, "p50": %.0f, "p99": %.0f, "p999": %.0f, ',
    e.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
  io.write(string.format('"mean": %.1f, "max": %.0f}\n', latency.mean, latency.max))
end
"""

UPLOAD_LUA = """
wrk.method = "PUT"
wrk.body = string.rep("x", {size})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


@dataclass
class WrkStats:
    """One wrk run, from the ``done`` hook."""

    requests: int
    bytes: int
    seconds: float
    p50: float
    p99: float
    p999: float
    mean: float
    max: float
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        """Socket errors plus non-2xx/3xx responses."""
        return sum(self.errors.values())

    def error_text(self) -> str:
        """Non-zero error counters, e.g. 'read 3, status 1'."""
        return ", ".join(f"{k} {v}" for k, v in self.errors.items() if v)


def wrk(
    ctx: Ctx,
    url: str,
    duration: int,
    connections: int | None = None,
    cpus: str | None = None,
    threads: int = 1,
    headers: Sequence[str] = (),
    script: str = "report",
    timeout: str = "10s",
) -> WrkStats:
    """Run wrk (pinned to ``cpus``, default the load core) and return its summary."""
    conns = connections or ctx.args.connections
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", f"--timeout={timeout}"]
    for h in headers:
        argv += ["-H", h]
    argv += ["-s", str(ctx.lua[script]), url]
    out = run_tool(pin(cpus or str(ctx.args.load_cpu), argv), duration + LOAD_EXTRA_TIMEOUT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(
            f"wrk failed (exit {out.returncode}): {one_line(out.stderr or out.stdout, 300)}"
        )
    d = json.loads(line[len("WRK_JSON ") :])
    return WrkStats(
        requests=int(d["requests"]),
        bytes=int(d["bytes"]),
        seconds=d["duration_us"] / 1e6,
        p50=d["p50"],
        p99=d["p99"],
        p999=d["p999"],
        mean=d["mean"],
        max=d["max"],
        errors={k: int(d[k]) for k in ("connect", "read", "write", "timeout", "status")},
    )


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def h2load_fixed_rate(
    ctx: Ctx, url: str, rate: float, duration: int, log_path: Path
) -> dict[str, Any]:
    """Open-loop load at ``rate`` req/s total over HTTP/1.1 with h2load; latency from its log.

    ``--rps`` is per client. The clients are started one per millisecond (``-r 1
    --rate-period 1ms``) so that their send timers are spread out instead of firing together
    (all 50 at once otherwise: bursts of 50 requests). Rate mode excludes ``-D``, so the
    request count is ``rate * duration`` (a multiple of the client count).
    """
    conns = ctx.args.connections
    per_client = rate / conns
    per_client_reqs = max(1, round(per_client * duration))
    total = per_client_reqs * conns
    log_path.unlink(missing_ok=True)  # h2load appends
    argv = [
        "h2load",
        "--h1",
        "-t1",
        f"-c{conns}",
        "-r1",
        "--rate-period=1ms",
        f"-n{total}",
        f"--rps={per_client:.3f}",
        f"--log-file={log_path}",
        url,
    ]
    out = run_tool(pin(str(ctx.args.load_cpu), argv), duration * 2 + LOAD_EXTRA_TIMEOUT)
    if out.returncode != 0:
        raise BenchError(
            f"h2load failed (exit {out.returncode}): {one_line(out.stderr or out.stdout, 300)}"
        )
    summary = next((x for x in out.stdout.splitlines() if x.startswith("requests:")), "")
    counts = {
        k: int(v) for v, k in (pair.split() for pair in summary[len("requests:") :].split(","))
    }
    starts: list[int] = []
    lat: list[float] = []
    bad_status = 0
    with open(log_path) as fh:
        for row in fh:
            parts = row.split("\t")
            if len(parts) < 3:
                continue
            starts.append(int(parts[0]))
            lat.append(float(parts[2]))
            if not parts[1].startswith("2"):
                bad_status += 1
    if not lat:
        raise BenchError(f"h2load logged no requests: {one_line(out.stdout, 300)}")
    lat.sort()
    span = (max(starts) - min(starts)) / 1e6
    return {
        "target_rps": rate,
        "achieved_rps": len(lat) / span if span > 0 else math.nan,
        "requests": len(lat),
        "p50": quantile(lat, 0.50),
        "p99": quantile(lat, 0.99),
        "p999": quantile(lat, 0.999),
        "max": lat[-1],
        "mean": statistics.fmean(lat),
        "h2load_counts": counts,
        "non_2xx": bad_status,
        "errors": counts.get("failed", 0)
        + counts.get("errored", 0)
        + counts.get("timeout", 0)
        + bad_status
        + max(0, total - counts.get("done", 0)),
    }


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def origin_config(
    files_dir: Path, upload_dir: Path, dest: Path, port: int, workers: int = 1
) -> Path:
    """The reference origin plus /__stub (stub_status), /files/ (sendfile) and /upload/ (PUT).

    ``files_dir`` holds ``files/`` (served); ``upload_dir`` holds ``dav/`` and ``body-tmp/``
    (where uploads are stored: nginx's DAV module answers a PUT once it has the whole body).
    """
    render_config(CONFIG_DIR / "origin-nginx.conf", dest, 0, port)
    d, u = files_dir, upload_dir
    extra = (
        "    location = /__stub { stub_status; }\n"
        f"    location /files/ {{ root {d}; sendfile on; }}\n"
        "    location /upload/ {\n"
        f"      root {u / 'dav'};\n"
        "      dav_methods PUT;\n"
        "      create_full_put_path on;\n"
        "      client_max_body_size 0;\n"
        f"      client_body_temp_path {u / 'body-tmp'};\n"
        "    }\n"
        "    location / {"
    )
    text = replace_once(dest.read_text(), "    location / {", extra, "origin")
    if workers != 1:
        text = replace_once(
            text, "worker_processes 1;", f"worker_processes {workers};", "origin workers"
        )
    dest.write_text(text)
    return dest


def nginx_config(ctx: Ctx, dest: Path, port: int, origin: int, o: ProxyOpts) -> Path:
    """The reference proxy-nginx.conf, adjusted for ``o``."""
    render_config(CONFIG_DIR / "proxy-nginx.conf", dest, port, origin)
    t = dest.read_text()
    if o.workers != 1:
        t = replace_once(t, "worker_processes 1;", f"worker_processes {o.workers};", "nginx")
    if o.many_conns:
        conns, fds = fd_limits(ctx.args.idle_conns)
        t = replace_once(
            t,
            "events { worker_connections 8192; }",
            f"worker_rlimit_nofile {fds};\nevents {{ worker_connections {conns}; }}",
            "nginx",
        )
    if o.tls:
        t = replace_once(
            t,
            f"listen 127.0.0.1:{port} backlog=4096;",
            f"listen 127.0.0.1:{port} ssl backlog=4096;\n"
            "    ssl_protocols TLSv1.2 TLSv1.3;\n"  # 1.22's default lacks TLSv1.3
            f"    ssl_certificate {ctx.cert};\n"
            f"    ssl_certificate_key {ctx.key};",
            "nginx",
        )
    if o.bodies:
        t = replace_once(
            t,
            'proxy_set_header Connection "";',
            'proxy_set_header Connection "";\n'
            + NGINX_BODY_DIRECTIVES
            + (
                f"\n      proxy_buffers {ctx.args.nginx_proxy_buffers};"
                if ctx.args.nginx_proxy_buffers
                else ""
            ),
            "nginx",
        )
    dest.write_text(t)
    return dest


def haproxy_config(ctx: Ctx, dest: Path, port: int, origin: int, o: ProxyOpts) -> Path:
    """The reference proxy-haproxy.cfg, adjusted for ``o``."""
    render_config(CONFIG_DIR / "proxy-haproxy.cfg", dest, port, origin)
    t = dest.read_text()
    if o.workers != 1:
        t = replace_once(t, "nbthread 1", f"nbthread {o.workers}", "haproxy")
    if o.many_conns:
        # HAProxy reserves 2 descriptors per connection (client + server side) and by default
        # refuses to start if it cannot get them; the idle connections need only one each, so
        # stay within the hard limit and let it start anyway (`no strict-limits`).
        conns, fds = fd_limits(ctx.args.idle_conns)
        t = replace_once(
            t,
            "maxconn 8000",
            f"maxconn {conns}\n  ulimit-n {fds}\n  no strict-limits",
            "haproxy",
        )
    if o.tls:
        t = replace_once(
            t, f"bind 127.0.0.1:{port}", f"bind 127.0.0.1:{port} ssl crt {ctx.pem}", "haproxy"
        )
    dest.write_text(t)
    return dest


def ferryman_config(ctx: Ctx, dest: Path, port: int, origin: int, o: ProxyOpts) -> Path:
    """A ferryman.yaml equivalent to the reference nginx/HAProxy configs."""
    lines = ["server:", f"  workers: {o.workers}"]
    if not ctx.args.forwarded:
        lines.append(
            "  forwarded: {x_forwarded_for: false, x_forwarded_proto: false, "
            "x_forwarded_host: false}"
        )
    lines += ["listeners:", f'  - bind: "127.0.0.1:{port}"', "    upstream: origin"]
    if o.tls:
        lines += ["    tls:", f'      cert: "{ctx.cert}"', f'      key: "{ctx.key}"']
    lines += ["upstreams:", "  origin:", f'    servers: ["127.0.0.1:{origin}"]']
    dest.write_text("\n".join(lines) + "\n")
    return dest


@contextlib.contextmanager
def launch(
    ctx: Ctx, name: str, opts: ProxyOpts, origin_port: int | None = None
) -> Iterator[Running]:
    """Start ``name`` configured by ``opts``, wait until it answers, stop it afterwards."""
    label = ctx.label(name)
    workdir = ctx.tmp / label
    workdir.mkdir()
    port = free_ports(1)[0]
    origin = origin_port or ctx.origin_port
    env: dict[str, str] | None = None
    if name == "nginx":
        conf = nginx_config(ctx, workdir / "nginx.conf", port, origin, opts)
        argv = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", "stderr"]
        timeout = READY_TIMEOUT_NATIVE
    elif name == "haproxy":
        conf = haproxy_config(ctx, workdir / "haproxy.cfg", port, origin, opts)
        argv = ["haproxy", "-f", str(conf), "-db"]
        timeout = READY_TIMEOUT_NATIVE
    else:
        conf = ferryman_config(ctx, workdir / "ferryman.yaml", port, origin, opts)
        argv, env = ferryman_command(ctx.args.ferryman_bin, ["run", "-c", str(conf)])
        timeout = READY_TIMEOUT_FERRYMAN
    cpus = str(ctx.args.proxy_cpu) if opts.pinned else ctx.all_cpus
    need = fd_limits(ctx.args.idle_conns)[1] if opts.many_conns else 0
    try:
        proc = Managed(
            label,
            pin(cpus, argv),
            ctx.tmp / "logs",
            workdir,
            env,
            preexec_fn=nofile_preexec(need) if need else None,
        )
    except OSError as exc:
        raise BenchError(f"cannot start {argv[0]}: {exc}") from exc
    try:
        wait_ready(proc, port, timeout, tls=opts.tls)
        pid, how = serving_pid(proc.pid)
        yield Running(
            name, proc, port, pid, f"pid {pid}: {how} of {proc.pid}", opts.tls, opts.workers
        )
        if not proc.alive():
            raise BenchError(f"{name} exited during the measurement:\n{proc.log_tail()}")
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


@dataclass
class Column:
    """One table column: a metric, its format, and whether to add a 'vs nginx' ratio."""

    key: str
    header: str
    fmt: Callable[[float], str]
    vs_nginx: bool = False
    spread: bool = False  # show min–max over the rounds too


def f_int(v: float) -> str:
    return f"{v:,.0f}"


def f_1(v: float) -> str:
    return f"{v:.1f}"


def f_2(v: float) -> str:
    return f"{v:.2f}"


def f_pct(v: float) -> str:
    return f"{v * 100:.0f}%"


def f_pct3(v: float) -> str:
    return f"{v:.3f}%"


def f_lat(v: float) -> str:
    return fmt_lat(v)


def f_kib(v: float) -> str:
    return f"{v / 1024:.2f} KiB"


def f_mib(v: float) -> str:
    return f"{v / MIB:.1f} MiB"


def f_x(v: float) -> str:
    return f"{v:.2f}x"


@dataclass
class Scenario:
    """A named measurement, run once per proxy per round."""

    name: str
    title: str
    how: str
    opts: ProxyOpts
    measure: Callable[[Ctx, Running, Result], None] | None
    columns: list[Column]
    cost: Callable[[argparse.Namespace, str], float]
    run: Callable[[Ctx, Scenario, str, int], Result] | None = None
    proxies: tuple[str, ...] = PROXIES


def load_cpu_share(ctx: Ctx, w: CpuWindow) -> float:
    return w.core_busy.get(ctx.args.load_cpu, math.nan)


def measure_keepalive(ctx: Ctx, rp: Running, res: Result) -> None:
    """Closed loop: wrk -c50 keep-alive GET /; CPU per request of the serving process."""
    d = ctx.args.duration
    wrk(ctx, rp.url(), WARMUP_S)
    w = CpuWindow(rp, ctx)
    st = wrk(ctx, rp.url(), d)
    w.stop()
    need_requests(st)
    res.metrics.update(
        rps=st.requests / st.seconds,
        cpu_us=w.us() / st.requests,
        busy=w.busy(),
        load_busy=load_cpu_share(ctx, w),
        p50=st.p50,
        p99=st.p99,
    )
    res.raw.update(wrk=asdict(st), cpu=w.raw(st.requests, "req"))
    set_errors(res, st)


def need_requests(st: WrkStats) -> None:
    if st.requests <= 0:
        raise BenchError(f"wrk completed no requests ({st.error_text() or 'no errors'})")


def set_errors(res: Result, st: WrkStats) -> None:
    res.errors += st.error_count
    if st.error_count:
        res.error_detail = ", ".join(x for x in (res.error_detail, st.error_text()) if x)


def fixed_rate(ctx: Ctx) -> float:
    """The open-loop rate: --rate, else 50% of nginx's keep-alive saturation in this run."""
    if ctx.rate is not None:
        return ctx.rate
    if ctx.args.rate:
        ctx.rate, ctx.rate_source = ctx.args.rate, "--rate"
        return ctx.rate
    sat = [
        r.metrics["rps"]
        for r in ctx.results
        if r.scenario == "keepalive" and r.proxy == "nginx" and r.status == "ok"
    ]
    if sat:
        ctx.rate = 0.5 * sat[0]
        ctx.rate_source = f"50% of nginx's keep-alive req/s in round 1 ({sat[0]:,.0f})"
    else:
        log("  fixed-rate: measuring nginx's keep-alive saturation first (for the rate)")
        with launch(ctx, "nginx", ProxyOpts()) as rp:
            wrk(ctx, rp.url(), WARMUP_S)
            st = wrk(ctx, rp.url(), ctx.args.duration)
            need_requests(st)
        sat_rps = st.requests / st.seconds
        ctx.rate = 0.5 * sat_rps
        ctx.rate_source = f"50% of nginx's keep-alive req/s in a calibration run ({sat_rps:,.0f})"
    log(f"  fixed-rate: {ctx.rate:,.0f} req/s ({ctx.rate_source})")
    return ctx.rate


def measure_fixed_rate(ctx: Ctx, rp: Running, res: Result) -> None:
    """Open loop at a fixed rate (h2load --rps): latency percentiles and CPU per request."""
    rate = fixed_rate(ctx)
    wrk(ctx, rp.url(), WARMUP_S)
    log_path = ctx.tmp / f"h2load-{rp.name}-r{res.round}.log"
    w = CpuWindow(rp, ctx)
    h = h2load_fixed_rate(ctx, rp.url(), rate, ctx.args.duration, log_path)
    w.stop()
    with contextlib.suppress(OSError):
        log_path.unlink()
    res.metrics.update(
        target=h["target_rps"],
        achieved=h["achieved_rps"],
        p50=h["p50"],
        p99=h["p99"],
        p999=h["p999"],
        max=h["max"],
        cpu_us=w.us() / h["requests"],
        busy=w.busy(),
    )
    res.raw.update(h2load=h, cpu=w.raw(h["requests"], "req"))
    res.errors += h["errors"]
    if h["errors"]:
        res.error_detail = f"h2load {h['h2load_counts']}, non-2xx {h['non_2xx']}"


def measure_new_conn(ctx: Ctx, rp: Running, res: Result) -> None:
    """wrk with 'Connection: close': one TCP connection (accept+close) per request."""
    hdr = ["Connection: close"]
    wrk(ctx, rp.url(), WARMUP_S, headers=hdr)
    w = CpuWindow(rp, ctx)
    st = wrk(ctx, rp.url(), ctx.args.duration, headers=hdr)
    w.stop()
    need_requests(st)
    res.metrics.update(
        rps=st.requests / st.seconds,
        cpu_us=w.us() / st.requests,
        busy=w.busy(),
        p50=st.p50,
        p99=st.p99,
    )
    res.raw.update(wrk=asdict(st), cpu=w.raw(st.requests, "conn"))
    set_errors(res, st)


def body_measure(kind: str, size_name: str) -> Callable[[Ctx, Running, Result], None]:
    """A measure function for a download of /files/<size_name>.bin or an upload of it."""

    def measure(ctx: Ctx, rp: Running, res: Result) -> None:
        size = ctx.files[size_name].stat().st_size
        conns = BODY_CONNECTIONS[size_name]
        if kind == "download":
            url, script = rp.url(f"/files/{size_name}.bin"), "report"
            check_download(rp, f"/files/{size_name}.bin", ctx.files[size_name])
        else:
            url, script = rp.url(f"/upload/{rp.name}-{size_name}"), f"upload-{size_name}"
            check_upload(rp, f"/upload/{rp.name}-check")
        wrk(ctx, url, WARMUP_S, conns, script=script, timeout="60s")
        origin_pid = origin_worker_pid(ctx)
        io0 = proc_io(origin_pid)
        w = CpuWindow(rp, ctx)
        st = wrk(ctx, url, ctx.args.duration, conns, script=script, timeout="60s")
        w.stop()
        io1 = proc_io(origin_pid)
        if kind == "download":
            moved = st.bytes  # what the client received (bodies and heads)
            how = "bytes wrk read"
        elif "wchar" in io0 and "wchar" in io1:
            moved = io1["wchar"] - io0["wchar"]  # what the origin wrote to its PUT temp files
            how = "bytes the origin stored (its wchar)"
        else:
            moved = st.requests * size
            how = "completed uploads x size (origin /proc/PID/io unreadable)"
            res.notes.append("upload bytes estimated from completed requests")
        if moved <= 0:
            raise BenchError(f"no body bytes moved ({st.error_text() or 'no errors'})")
        mib = moved / MIB
        res.metrics.update(
            mib_s=mib / w.wall,
            cpu_us_mib=w.us() / mib,
            busy=w.busy(),
            load_busy=load_cpu_share(ctx, w),
            requests=st.requests,
        )
        res.raw.update(
            wrk=asdict(st), bytes=moved, bytes_how=how, cpu=w.raw(mib, "mib"), connections=conns
        )
        set_errors(res, st)

    return measure


BODY_CONNECTIONS = {"1m": 10, "100m": 2}


def check_download(rp: Running, path: str, file: Path) -> None:
    """One GET through the proxy must return the file intact."""
    conn = http.client.HTTPConnection("127.0.0.1", rp.port, timeout=60)
    try:
        conn.request("GET", path, headers={"Host": "bench"})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET {path}: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200 or len(body) != file.stat().st_size:
        raise BenchError(f"GET {path}: HTTP {resp.status}, {len(body)} bytes")
    if file.stat().st_size <= 4 * MIB and body != file.read_bytes():
        raise BenchError(f"GET {path}: body differs from the origin's file")


def check_upload(rp: Running, path: str) -> None:
    """One 1 MiB PUT through the proxy must be stored by the origin (201/204)."""
    conn = http.client.HTTPConnection("127.0.0.1", rp.port, timeout=60)
    try:
        conn.request("PUT", path, body=b"u" * MIB, headers={"Host": "bench"})
        resp = conn.getresponse()
        resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"PUT {path}: {exc}") from exc
    finally:
        conn.close()
    if resp.status not in (201, 204):
        raise BenchError(f"PUT {path} through the proxy: HTTP {resp.status}")


def measure_tls(ctx: Ctx, rp: Running, res: Result) -> None:
    """TLS at the proxy: full handshakes per second (Connection: close), then keep-alive."""
    res.raw["negotiated"] = tls_probe(rp.port)
    d = ctx.args.duration
    hdr = ["Connection: close"]
    wrk(ctx, rp.url(), WARMUP_S, headers=hdr)
    w = CpuWindow(rp, ctx)
    hs = wrk(ctx, rp.url(), d, headers=hdr)
    w.stop()
    need_requests(hs)
    res.metrics.update(
        hs_s=hs.requests / hs.seconds, cpu_us_hs=w.us() / hs.requests, hs_busy=w.busy()
    )
    res.raw.update(handshakes_wrk=asdict(hs), handshakes_cpu=w.raw(hs.requests, "handshake"))
    set_errors(res, hs)
    wrk(ctx, rp.url(), WARMUP_S)
    w = CpuWindow(rp, ctx)
    ka = wrk(ctx, rp.url(), d)
    w.stop()
    need_requests(ka)
    res.metrics.update(
        rps=ka.requests / ka.seconds, cpu_us=w.us() / ka.requests, busy=w.busy(), p99=ka.p99
    )
    res.raw.update(keepalive_wrk=asdict(ka), keepalive_cpu=w.raw(ka.requests, "req"))
    set_errors(res, ka)


def tls_probe(port: int) -> str:
    """Protocol and cipher a default Python client negotiates with the proxy."""
    sctx = ssl.create_default_context()
    sctx.check_hostname = False
    sctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with sctx.wrap_socket(raw, server_hostname="localhost") as s:
                cipher = s.cipher()
                return f"{s.version()} {cipher[0] if cipher else '?'}"
    except (OSError, ssl.SSLError) as exc:
        return f"probe failed: {exc}"


def measure_idle(ctx: Ctx, rp: Running, res: Result) -> None:
    """RSS of the serving process before and after N idle keep-alive client connections."""
    n = ctx.args.idle_conns
    wrk(ctx, rp.url(), WARMUP_S)  # the allocator's steady state after some traffic
    time.sleep(IDLE_SETTLE)
    before, tree_before = rss_bytes(rp.pid), tree_rss(rp.proc.pid)
    socks: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        socks = open_idle_connections(rp.port, n)
        opened_s = time.monotonic() - t0
        time.sleep(IDLE_SETTLE)
        after, tree_after = rss_bytes(rp.pid), tree_rss(rp.proc.pid)
        alive = sum(1 for s in socks if still_open(s))
    finally:
        close_all(socks)
    if alive < n:
        raise BenchError(f"the proxy closed {n - alive} of {n} idle connections")
    res.metrics.update(base_rss=before, rss_conn=(after - before) / n, rss_after=after)
    res.raw.update(
        rss_before=before,
        rss_after=after,
        tree_rss_before=tree_before,
        tree_rss_after=tree_after,
        connections=n,
        open_seconds=round(opened_s, 2),
    )


def tree_rss(pid: int) -> int:
    """VmRSS summed over ``pid`` and its descendants (shared pages counted twice)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(BenchError):
            total += rss_bytes(member)
    return total


def measure_reuse(ctx: Ctx, rp: Running, res: Result) -> None:
    """Upstream connections the origin accepted per 1,000 proxied requests, 2 workers.

    Three phases, counted with the origin's stub_status: a cold start (1 s of keep-alive
    load right after the proxy started: its pools fill), then keep-alive clients, then a new
    client connection per request (the upstream pool must outlive client connections).
    """
    d = ctx.args.duration
    marks = [stub_status(ctx.origin_port)]
    cold = wrk(ctx, rp.url(), WARMUP_S)
    marks.append(stub_status(ctx.origin_port))
    w = CpuWindow(rp, ctx)
    ka = wrk(ctx, rp.url(), d)
    w.stop()
    marks.append(stub_status(ctx.origin_port))
    nc = wrk(ctx, rp.url(), d, headers=["Connection: close"])
    marks.append(stub_status(ctx.origin_port))
    for st in (cold, ka, nc):
        need_requests(st)
        set_errors(res, st)
    # Each stub_status query is one origin connection and one request: subtract it.
    phases = []
    for (a0, r0), (a1, r1) in zip(marks, marks[1:], strict=False):
        phases.append((a1 - a0 - 1, r1 - r0 - 1))
    (cold_opened, cold_req), (ka_opened, ka_req), (nc_opened, nc_req) = phases
    if min(cold_req, ka_req, nc_req) <= 0:
        raise BenchError(f"the origin saw no requests in a phase: {phases}")
    res.metrics.update(
        cold_opened=cold_opened,
        ka_per_1000=ka_opened / ka_req * 1000,
        ka_reuse=100 * (1 - ka_opened / ka_req),
        nc_per_1000=nc_opened / nc_req * 1000,
        nc_reuse=100 * (1 - nc_opened / nc_req),
        all_reuse=100 * (1 - sum(p[0] for p in phases) / sum(p[1] for p in phases)),
        cpu_us=w.us(tree=True) / ka.requests,
    )
    res.raw.update(
        phases={
            "cold_start": {"opened": cold_opened, "requests": cold_req, "wrk": asdict(cold)},
            "keepalive": {"opened": ka_opened, "requests": ka_req, "wrk": asdict(ka)},
            "new_conn": {"opened": nc_opened, "requests": nc_req, "wrk": asdict(nc)},
        },
        origin_stub_status=marks,
        cpu=w.raw(ka.requests, "req"),
        workers=rp.workers,
    )


def run_scaling(ctx: Ctx, scn: Scenario, name: str, rnd: int) -> Result:
    """1 then 2 workers, nothing pinned (proxy, wrk -t2 and a 2-worker origin share cores)."""
    res = Result(scenario=scn.name, proxy=name, round=rnd)
    origin = ensure_scaling_origin(ctx)
    d = ctx.args.duration
    try:
        for workers in (1, 2):
            opts = ProxyOpts(workers=workers, pinned=False)
            with launch(ctx, name, opts, origin_port=origin) as rp:
                wrk(ctx, rp.url(), WARMUP_S, cpus=ctx.all_cpus, threads=2)
                w = CpuWindow(rp, ctx)
                st = wrk(ctx, rp.url(), d, cpus=ctx.all_cpus, threads=2)
                w.stop()
                need_requests(st)
                res.metrics[f"rps_{workers}"] = st.requests / st.seconds
                res.metrics[f"cpu_us_{workers}"] = w.us(tree=True) / st.requests
                res.raw[f"workers_{workers}"] = {
                    "wrk": asdict(st),
                    "cpu": w.raw(st.requests, "req"),
                    "pid_choice": rp.pid_choice,
                }
                set_errors(res, st)
        res.metrics["scale"] = res.metrics["rps_2"] / res.metrics["rps_1"]
    except BenchError as exc:
        res.status, res.reason = "failed", str(exc)
    return res


def ensure_scaling_origin(ctx: Ctx) -> int:
    """A second origin (2 workers, not pinned) for the scaling scenario; started once."""
    if ctx.scaling_origin_port:
        return ctx.scaling_origin_port
    port = free_ports(1)[0]
    odir = ctx.tmp / "origin-scaling"
    odir.mkdir()
    conf = origin_config(ctx.origin_dir, ctx.upload_dir, odir / "origin.conf", port, workers=2)
    proc = Managed(
        "origin-scaling",
        pin(ctx.all_cpus, ["nginx", "-p", f"{odir}/", "-c", str(conf), "-e", "stderr"]),
        ctx.tmp / "logs",
        odir,
    )
    wait_ready(proc, port, READY_TIMEOUT_NATIVE)
    ctx.scaling_origin_port = port
    return port


def _cost_simple(extra: float = 0.0, loads: int = 1, warm: bool = True):
    def cost(args: argparse.Namespace, proxy: str) -> float:
        per_load = args.duration + (WARMUP_S if warm else 0) + 0.3
        return START_COST[proxy] + loads * per_load + extra

    return cost


def _cost_idle(args: argparse.Namespace, proxy: str) -> float:
    return START_COST[proxy] + WARMUP_S + 2 * IDLE_SETTLE + args.idle_conns / 2500 + 1


def _cost_scaling(args: argparse.Namespace, proxy: str) -> float:
    return 2 * (START_COST[proxy] + WARMUP_S + args.duration + 0.3)


SCENARIOS: dict[str, Scenario] = {}


def _add(s: Scenario) -> None:
    SCENARIOS[s.name] = s


_add(
    Scenario(
        "keepalive",
        "small GET, keep-alive, 50 connections (wrk, closed loop)",
        "`wrk -t1 -c50` keep-alive `GET /` (12-byte body). CPU µs/req = the serving "
        "process's utime+stime / requests. busy = proxy CPU / wall time, and the load core's "
        "busy share: if the load core is at ~100%, req/s is capped by wrk + origin.",
        ProxyOpts(),
        measure_keepalive,
        [
            Column("rps", "req/s", f_int, vs_nginx=True),
            Column("cpu_us", "CPU µs/req", f_1, vs_nginx=True, spread=True),
            Column("busy", "proxy core busy", f_pct),
            Column("load_busy", "load core busy", f_pct),
            Column("p50", "p50", f_lat),
            Column("p99", "p99", f_lat, vs_nginx=True),
        ],
        _cost_simple(),
    )
)
_add(
    Scenario(
        "fixed-rate",
        "small GET at a fixed rate below saturation (h2load, open loop)",
        "`h2load --h1 -c50 --rps` at 50% of nginx's keep-alive req/s from this run (or "
        "`--rate`); latency percentiles from h2load's per-request log, CPU µs/req as above.",
        ProxyOpts(),
        measure_fixed_rate,
        [
            Column("achieved", "req/s (achieved)", f_int),
            Column("p50", "p50", f_lat),
            Column("p99", "p99", f_lat, vs_nginx=True, spread=True),
            Column("p999", "p99.9", f_lat, vs_nginx=True),
            Column("max", "max", f_lat),
            Column("cpu_us", "CPU µs/req", f_1, vs_nginx=True),
            Column("busy", "proxy core busy", f_pct),
        ],
        _cost_simple(extra=0.5),
    )
)
_add(
    Scenario(
        "new-conn",
        "new connection per request (wrk, `Connection: close`)",
        "`wrk -c50 -H 'Connection: close'`: every request is a new client TCP connection "
        "(upstream keep-alive stays on). CPU µs per connection+request.",
        ProxyOpts(),
        measure_new_conn,
        [
            Column("rps", "conn/s", f_int, vs_nginx=True),
            Column("cpu_us", "CPU µs/conn", f_1, vs_nginx=True, spread=True),
            Column("busy", "proxy core busy", f_pct),
            Column("p50", "p50", f_lat),
            Column("p99", "p99", f_lat),
        ],
        _cost_simple(),
    )
)
_BODY_COLUMNS = [
    Column("mib_s", "MiB/s", f_int, vs_nginx=True),
    Column("cpu_us_mib", "CPU µs/MiB", f_int, vs_nginx=True, spread=True),
    Column("busy", "proxy core busy", f_pct),
    Column("load_busy", "load core busy", f_pct),
    Column("requests", "requests", f_int),
]
_add(
    Scenario(
        "body-1m",
        "1 MiB responses (wrk, 10 connections)",
        "`GET /files/1m.bin` (the origin serves a file with sendfile). MiB/s = bytes wrk "
        "read / wall time; CPU µs per MiB moved. nginx streams (`proxy_max_temp_file_size 0`).",
        ProxyOpts(bodies=True),
        body_measure("download", "1m"),
        _BODY_COLUMNS,
        _cost_simple(),
    )
)
_add(
    Scenario(
        "body-100m",
        "100 MiB responses (wrk, 2 connections)",
        "`GET /files/100m.bin`, as body-1m.",
        ProxyOpts(bodies=True),
        body_measure("download", "100m"),
        _BODY_COLUMNS,
        _cost_simple(),
    )
)
_add(
    Scenario(
        "upload-100m",
        "100 MiB request bodies (wrk PUT, 2 connections)",
        "`PUT /upload/…` with a 100 MiB body; the origin (nginx DAV) stores it and answers "
        "only once it has read all of it. MiB = bytes the origin stored. nginx streams "
        "(`proxy_request_buffering off`, `client_max_body_size 0`).",
        ProxyOpts(bodies=True),
        body_measure("upload", "100m"),
        _BODY_COLUMNS,
        _cost_simple(),
    )
)
_add(
    Scenario(
        "tls",
        "TLS termination at the proxy (wrk over https, 50 connections)",
        "Self-signed certificate made at run time (`--tls-key`, default EC P-256). "
        "Handshakes: `Connection: close`, so every request is a full handshake (wrk does not "
        "resume sessions). Then keep-alive requests over TLS.",
        ProxyOpts(tls=True),
        measure_tls,
        [
            Column("hs_s", "handshakes/s", f_int, vs_nginx=True),
            Column("cpu_us_hs", "CPU µs/handshake", f_1, vs_nginx=True, spread=True),
            Column("rps", "TLS keep-alive req/s", f_int, vs_nginx=True),
            Column("cpu_us", "CPU µs/req", f_1, vs_nginx=True),
            Column("p99", "p99 (keep-alive)", f_lat),
        ],
        _cost_simple(loads=2),
    )
)
_add(
    Scenario(
        "idle",
        "idle keep-alive client connections: memory",
        "After a 1 s warm-up: VmRSS of the serving process (base), then N connections that "
        "each did one GET and stay open; RSS/conn = RSS growth / N (user-space memory only: "
        "kernel socket buffers are not in RSS).",
        ProxyOpts(many_conns=True),
        measure_idle,
        [
            Column("base_rss", "base RSS", f_mib, vs_nginx=True),
            Column("rss_conn", "RSS/idle conn", f_kib, vs_nginx=True, spread=True),
            Column("rss_after", "RSS with N conns", f_mib),
        ],
        _cost_idle,
    )
)
_add(
    Scenario(
        "reuse",
        "upstream connection reuse, 2 workers (wrk, 50 connections)",
        "Proxy with 2 workers (nginx `worker_processes 2`, HAProxy `nbthread 2`, ferryman "
        "`workers: 2`), pinned to the proxy core. Upstream connections opened = the origin's "
        "stub_status `accepts` delta; requests = its `requests` delta. Phases: cold start "
        "(the first 1 s after the proxy started), keep-alive clients, then a new client "
        "connection per request. reuse = 1 - opened / requests.",
        ProxyOpts(workers=2),
        measure_reuse,
        [
            Column("cold_opened", "opened at cold start", f_int),
            Column("ka_per_1000", "opened/1k req, keep-alive clients", f_2),
            Column("ka_reuse", "reuse", f_pct3),
            Column("nc_per_1000", "opened/1k req, new client conns", f_2),
            Column("nc_reuse", "reuse", f_pct3, spread=True),
            Column("all_reuse", "reuse, all phases", f_pct3),
            Column("cpu_us", "CPU µs/req (all workers)", f_1, vs_nginx=True),
        ],
        _cost_simple(loads=2),
    )
)
_add(
    Scenario(
        "scaling",
        "1 → 2 workers on both cores (wrk -t2, nothing pinned)",
        "Proxy, `wrk -t2 -c50` and a 2-worker origin all share both cores. scale = req/s with "
        "2 workers / req/s with 1 worker (at most 2; the load generator and origin use the "
        "same cores, so less in practice). CPU µs/req over the proxy's whole process tree.",
        ProxyOpts(workers=1, pinned=False),
        None,
        [
            Column("rps_1", "req/s, 1 worker", f_int, vs_nginx=True),
            Column("rps_2", "req/s, 2 workers", f_int, vs_nginx=True),
            Column("scale", "scale", f_x, vs_nginx=True, spread=True),
            Column("cpu_us_1", "CPU µs/req 1w", f_1),
            Column("cpu_us_2", "CPU µs/req 2w", f_1),
        ],
        _cost_scaling,
        run=run_scaling,
    )
)


# --------------------------------------------------------------------------------------------
# Running scenarios
# --------------------------------------------------------------------------------------------


def run_one(ctx: Ctx, scn: Scenario, name: str, rnd: int) -> Result:
    """Measure ``name`` in ``scn`` for round ``rnd``; failures become a failed Result."""
    if scn.run is not None:
        return scn.run(ctx, scn, name, rnd)
    res = Result(scenario=scn.name, proxy=name, round=rnd)
    assert scn.measure is not None
    try:
        with launch(ctx, name, scn.opts) as rp:
            res.raw["pid_choice"] = rp.pid_choice
            scn.measure(ctx, rp, res)
    except BenchError as exc:
        res.status, res.reason = "failed", str(exc)
    return res


def progress_line(scn: Scenario, res: Result) -> str:
    """One stderr line summarising a result."""
    if res.status != "ok":
        return f"  {scn.name} {res.proxy}: FAILED: {one_line(res.reason, 300)}"
    parts = []
    for col in scn.columns:
        if col.key in res.metrics and not math.isnan(res.metrics[col.key]):
            parts.append(f"{col.header} {col.fmt(res.metrics[col.key])}")
    errs = f", ERRORS {res.errors} ({res.error_detail})" if res.errors else ""
    return f"  {scn.name} {res.proxy}: " + ", ".join(parts) + errs


def proxy_order(names: Sequence[str], rnd: int) -> list[str]:
    """Round 1: as given; each later round starts one proxy further (rotation)."""
    k = (rnd - 1) % len(names)
    return list(names[k:]) + list(names[:k])


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def medians(results: Sequence[Result], scn: Scenario, name: str) -> dict[str, float] | None:
    """Per-metric median of the OK rounds of ``name`` in ``scn`` (None if none was OK)."""
    ok = [r for r in results if r.scenario == scn.name and r.proxy == name and r.status == "ok"]
    if not ok:
        return None
    keys = {k for r in ok for k in r.metrics}
    return {
        k: median([r.metrics[k] for r in ok if k in r.metrics and not math.isnan(r.metrics[k])])
        for k in keys
        if any(k in r.metrics and not math.isnan(r.metrics[k]) for r in ok)
    }


def scenario_table(ctx: Ctx, scn: Scenario, names: Sequence[str]) -> str:
    """The Markdown table (medians, ratios to nginx) of one scenario."""
    rounds = ctx.args.rounds
    res = [r for r in ctx.results if r.scenario == scn.name]
    med = {n: medians(res, scn, n) for n in names}
    base = med.get("nginx")
    header = ["proxy"]
    for c in scn.columns:
        header.append(c.header)
        if c.vs_nginx:
            header.append("vs nginx")
    header.append("errors")
    lines = [
        f"### {scn.name}: {scn.title}",
        "",
        scn.how,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    notes: list[str] = []
    for n in names:
        mine = [r for r in res if r.proxy == n]
        m = med[n]
        if m is None:
            reason = one_line(mine[-1].reason) if mine else "not run"
            lines.append(f"| {n} | failed: {reason} |" + " |" * (len(header) - 2))
            continue
        cells = [n]
        for c in scn.columns:
            v = m.get(c.key)
            cell = c.fmt(v) if v is not None else "n/a"
            ok_vals = [
                r.metrics[c.key]
                for r in mine
                if r.status == "ok" and c.key in r.metrics and not math.isnan(r.metrics[c.key])
            ]
            if c.spread and rounds > 1 and len(ok_vals) > 1:
                cell += f" ({c.fmt(min(ok_vals))}–{c.fmt(max(ok_vals))})"
            cells.append(cell)
            if c.vs_nginx:
                b = base.get(c.key) if base else None
                cells.append(f"{v / b:.2f}x" if v is not None and b else "n/a")
        errors = sum(r.errors for r in mine if r.status == "ok")
        detail = "; ".join(r.error_detail for r in mine if r.error_detail)
        cells.append(f"**!! {errors}** ({one_line(detail, 80)})" if errors else "0")
        lines.append("| " + " | ".join(cells) + " |")
        failed = [r for r in mine if r.status != "ok"]
        if failed:
            notes.append(
                f"- {n}: median of {len(mine) - len(failed)}/{len(mine)} rounds; failed: "
                + one_line(failed[-1].reason, 200)
            )
        for r in mine:
            notes += [f"- {n} (round {r.round}): {x}" for x in r.notes]
    if scn.name == "fixed-rate" and ctx.rate:
        notes.insert(0, f"- target rate {ctx.rate:,.0f} req/s: {ctx.rate_source}")
    if scn.name == "tls":
        seen = {r.proxy: r.raw.get("negotiated") for r in res if r.raw.get("negotiated")}
        if seen:
            notes.insert(0, "- negotiated: " + "; ".join(f"{k} {v}" for k, v in seen.items()))
    if scn.name == "idle":
        notes.insert(0, f"- N = {ctx.args.idle_conns:,} idle connections")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Pre-flight, machine description, estimate
# --------------------------------------------------------------------------------------------


def preflight(args: argparse.Namespace) -> list[str]:
    """Everything missing, one line each (empty: all good). Starts nothing long-lived."""
    problems: list[str] = []
    if not sys.platform.startswith("linux") or not Path("/proc/self/stat").exists():
        return ["Linux with /proc is required"]
    scenarios = set(args.scenario_list)
    packages: list[str] = []

    def need(tool: str, package: str, why: str = "") -> None:
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found{why} (Debian package: {package})")
            if package not in packages:
                packages.append(package)

    need("nginx", "nginx", " (the origin and a proxy)")
    need("wrk", "wrk")
    need("taskset", "util-linux")
    if "haproxy" in args.names:
        need("haproxy", "haproxy")
    if "fixed-rate" in scenarios:
        need("h2load", "nghttp2-client", " (open-loop load for fixed-rate)")
    if "tls" in scenarios:
        if shutil.which("openssl") is None:
            try:
                import trustme  # noqa: F401
            except ImportError:
                problems.append(
                    "`openssl` not found and Python `trustme` not importable (to make the TLS "
                    "certificate) (Debian package: openssl)"
                )
                packages.append("openssl")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        problems.append(f"at least 2 cores are needed; this process may use {allowed}")
    for cpu in (args.proxy_cpu, args.load_cpu):
        if cpu not in allowed:
            problems.append(f"core {cpu} is not available (allowed: {allowed})")
    if args.proxy_cpu == args.load_cpu:
        problems.append("--proxy-cpu and --load-cpu must differ")
    if shutil.which("nginx"):
        v = run_tool(["nginx", "-V"])
        text = v.stdout + v.stderr
        for scen, module in (("reuse", "stub_status"), ("upload-100m", "dav")):
            if scen in scenarios and f"http_{module}_module" not in text:
                problems.append(
                    f"nginx lacks ngx_http_{module}_module (needed by {scen}): install Debian's "
                    "`nginx` package"
                )
    if "idle" in scenarios:
        need_fd = args.idle_conns + CONN_MARGIN
        try:
            ensure_nofile(need_fd)  # this process opens the idle client connections
        except BenchError:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            problems.append(
                f"idle: {args.idle_conns} connections need {need_fd} open files but the hard "
                f"limit is {hard} and cannot be raised here (`ulimit -Hn {need_fd}` as root "
                "before starting, or a smaller --idle-conns)"
            )
    if "ferryman" in args.names:
        try:
            argv, env = ferryman_command(args.ferryman_bin, ["--version"])
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=env
            )
            if out.returncode != 0:
                problems.append(
                    f"ferryman does not run (`{shlex.join(argv)}`: exit {out.returncode}: "
                    f"{one_line(out.stderr or out.stdout, 200)}); install it with "
                    "`pip install -e .` from the repository root"
                )
        except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
            problems.append(
                f"ferryman is not runnable ({exc}); `pip install -e .` from the repo root"
            )
    if packages:
        problems.append("install with: apt-get install -y " + " ".join(packages))
    return problems


def ferryman_build(args: argparse.Namespace) -> str:
    """'ferryman 0.1.0, hot path compiled (mypyc)' or '... pure Python'."""
    code = (
        "import ferryman, ferryman.proxy.engine as e; "
        "print(ferryman.__version__, e.__file__.endswith('.py'))"
    )
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent / "src")
    if not args.ferryman_bin and shutil.which("ferryman") is None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
        )
        version, pure = out.stdout.split()
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return "ferryman (version unknown)"
    kind = "pure Python" if pure == "True" else "hot path compiled (mypyc)"
    if os.environ.get("FERRYMAN_PURE_PYTHON"):
        kind += f", FERRYMAN_PURE_PYTHON={os.environ['FERRYMAN_PURE_PYTHON']}"
    return f"ferryman {version}, {kind}"


def machine() -> dict[str, Any]:
    """CPU, cores, kernel, OS and tool versions."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    os_name = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "clk_tck": CLK_TCK,
        "loadavg": os.getloadavg(),
        "versions": {
            "nginx": tool_version(["nginx", "-v"]),
            "haproxy": tool_version(["haproxy", "-v"]) if shutil.which("haproxy") else "absent",
            "wrk": tool_version(["wrk", "-v"]),
            "h2load": tool_version(["h2load", "--version"]) if shutil.which("h2load") else "",
            "openssl": tool_version(["openssl", "version"]) if shutil.which("openssl") else "",
        },
    }


def estimate_seconds(args: argparse.Namespace) -> float:
    """Rough total runtime (for the message printed up front)."""
    total = 3.0  # origin, certificates, files
    for name in args.scenario_list:
        scn = SCENARIOS[name]
        for proxy in args.names:
            if proxy in scn.proxies:
                total += scn.cost(args, proxy) * args.rounds
    if (
        "fixed-rate" in args.scenario_list
        and not args.rate
        and ("keepalive" not in args.scenario_list or "nginx" not in args.names)
    ):
        total += START_COST["nginx"] + WARMUP_S + args.duration
    return total


def header_text(args: argparse.Namespace, mach: dict[str, Any], ferryman: str) -> str:
    """The Markdown preamble: command, machine, software, settings."""
    v = mach["versions"]
    cmd = os.environ.get("FERRYMAN_BENCH_ARGV0", "python benchmarks/suite.py")
    command = shlex.join([cmd, *args.argv])
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    la = ", ".join(f"{x:.2f}" for x in mach["loadavg"])
    sw = [f"Python {mach['python']}", v["nginx"].replace("nginx version: ", "")]
    if "haproxy" in args.names:
        sw.append(" ".join(v["haproxy"].replace("version ", "").split()[:2]))
    sw += [v["wrk"].split(" [")[0], v["h2load"], " ".join(v["openssl"].split()[:2])]
    if "ferryman" in args.names:
        sw.append(ferryman)
    est = estimate_seconds(args)
    return "\n".join(
        [
            f"## Benchmark run {now}",
            "",
            f"- **Command:** `{command}`",
            f"- **Machine:** {mach['cpu_model']}, {mach['cpu_count']} cores "
            f"(usable: {mach['affinity']}), kernel {mach['kernel']}, {mach['os']}; load "
            f"average at start {la}",
            "- **Software:** " + "; ".join(x for x in sw if x),
            f"- **Settings:** proxy on core {args.proxy_cpu}; origin (nginx, 1 worker) and load "
            f"generators on core {args.load_cpu}; {args.rounds} round(s), proxy order rotated "
            f"each round; {args.duration} s per measurement after a {WARMUP_S} s warm-up; "
            f"{args.connections} client connections; ferryman "
            + (
                "with its default X-Forwarded-* headers"
                if args.forwarded
                else "without X-Forwarded-* (like the reference nginx/HAProxy configs)"
            )
            + (
                f"; nginx `proxy_buffers {args.nginx_proxy_buffers}` in the body scenarios"
                if args.nginx_proxy_buffers
                else ""
            )
            + f"; estimated runtime {est / 60:.0f} min",
            "- **Reading:** every figure is the median over the rounds; `vs nginx` = this "
            "proxy's median / nginx's median (for CPU and latency lower is better, for "
            "throughput higher is better); `(a–b)` = the range over the rounds.",
        ]
    )


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def make_files(ctx: Ctx) -> None:
    """1 MiB and 100 MiB files for the origin (random, so nothing compresses them)."""
    files = ctx.origin_dir / "files"
    files.mkdir(exist_ok=True)
    block = os.urandom(MIB)
    for name, mib in (("1m", 1), ("100m", 100)):
        path = files / f"{name}.bin"
        with open(path, "wb") as fh:
            for _ in range(mib):
                fh.write(block)
        path.chmod(0o644)
        ctx.files[name] = path
    files.chmod(0o755)


def make_cert(ctx: Ctx) -> None:
    """A self-signed certificate for 127.0.0.1/localhost: cert, key and cert+key (HAProxy)."""
    d = ctx.tmp / "tls"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    if shutil.which("openssl"):
        newkey = (
            ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
            if ctx.args.tls_key == "ec"
            else ["-newkey", "rsa:2048"]
        )
        out = run_tool(
            [
                "openssl", "req", "-x509", *newkey, "-nodes", "-days", "2",
                "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ]
        )  # fmt: skip
        if out.returncode != 0:
            raise BenchError(f"openssl req failed: {one_line(out.stderr, 300)}")
    else:
        import trustme

        kt = trustme.KeyType.ECDSA if ctx.args.tls_key == "ec" else trustme.KeyType.RSA
        ca = trustme.CA(key_type=kt)
        leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=kt)
        leaf.private_key_pem.write_to_path(str(key))
        leaf.cert_chain_pems[0].write_to_path(str(cert))
    pem = d / "cert+key.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    ctx.cert, ctx.key, ctx.pem = cert, key, pem


def write_lua(ctx: Ctx) -> None:
    """The wrk scripts: the JSON reporter, and PUT uploads of each body size."""
    d = ctx.tmp / "lua"
    d.mkdir()
    report = d / "report.lua"
    report.write_text(REPORT_LUA)
    ctx.lua["report"] = report
    for name, size in (("1m", MIB), ("100m", 100 * MIB)):
        up = d / f"upload-{name}.lua"
        up.write_text(UPLOAD_LUA.format(size=size) + REPORT_LUA)
        ctx.lua[f"upload-{name}"] = up


def upload_area(args: argparse.Namespace) -> Path | None:
    """A private dir on /dev/shm (tmpfs) for the origin's stored uploads, if there is room.

    Keeps the upload scenario off the disk: the origin stores each 100 MiB body (DAV PUT)
    and the disk's write-back would add noise. None: use the temp dir instead.
    """
    if "upload-100m" not in args.scenario_list:
        return None
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if not os.access(shm, os.W_OK) or st.f_bavail * st.f_frsize < 2 << 30:
            return None
        return Path(tempfile.mkdtemp(prefix="ferryman-run-", dir=shm))
    except OSError:
        return None


def start_origin(
    args: argparse.Namespace, tmp: Path, upload_dir: Path
) -> tuple[Managed, Path, int]:
    """The nginx origin, pinned to the load core."""
    odir = tmp / "origin"
    odir.mkdir()
    odir.chmod(0o711)
    for sub in ("dav", "body-tmp"):
        (upload_dir / sub).mkdir()
        (upload_dir / sub).chmod(0o777)  # nginx workers may run as 'nobody'
    port = free_ports(1)[0]
    conf = origin_config(odir, upload_dir, odir / "origin.conf", port)
    proc = Managed(
        "origin",
        pin(str(args.load_cpu), ["nginx", "-p", f"{odir}/", "-c", str(conf), "-e", "stderr"]),
        tmp / "logs",
        odir,
    )
    wait_ready(proc, port, READY_TIMEOUT_NATIVE)
    return proc, odir, port


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog=os.environ.get("FERRYMAN_BENCH_ARGV0", "suite.py"),
        description="nginx / HAProxy / ferryman side by side, several scenarios; prints one "
        "Markdown table of medians and ratios to nginx per scenario.",
    )
    p.add_argument(
        "--scenarios",
        default="all",
        help="comma-separated subset of: " + ",".join(SCENARIOS) + " (default all)",
    )
    p.add_argument(
        "--proxies",
        "--only",
        dest="proxies",
        default=",".join(PROXIES),
        help="comma-separated subset of: " + ",".join(PROXIES),
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    p.add_argument(
        "--duration", type=int, default=None, help="seconds per measurement (5; --quick: 2)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (~2-3 min): 1 round, 2 s per measurement, 2,000 idle connections",
    )
    p.add_argument("--connections", type=int, default=50, help="client connections (50)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="fixed-rate: total req/s (default: 50%% of nginx's keep-alive req/s in this run)",
    )
    p.add_argument(
        "--idle-conns",
        type=int,
        default=None,
        help="idle: connections (10,000; --quick: 2,000)",
    )
    p.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxy (0)")
    p.add_argument("--load-cpu", type=int, default=1, help="core for origin + load (1)")
    p.add_argument(
        "--tls-key", choices=("ec", "rsa"), default="ec", help="ec (P-256, default) or rsa (2048)"
    )
    p.add_argument(
        "--forwarded",
        action="store_true",
        help="keep ferryman's default X-Forwarded-For/-Proto/-Host (nginx/HAProxy add none)",
    )
    p.add_argument(
        "--nginx-proxy-buffers",
        default=None,
        metavar="'N SIZE'",
        help="body scenarios: nginx proxy_buffers (e.g. '8 64k'; default: nginx's, 8 x 4k)",
    )
    p.add_argument("--ferryman-bin", default=None, help="ferryman executable")
    p.add_argument("--out", type=Path, default=None, help="JSON path (benchmarks/out/run-*.json)")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    p.add_argument(
        "--check", action="store_true", help="pre-flight and runtime estimate only, then exit"
    )
    p.add_argument("--list", action="store_true", help="describe the scenarios and exit")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.duration = args.duration if args.duration is not None else (2 if args.quick else 5)
    if args.idle_conns is None:
        args.idle_conns = 2000 if args.quick else 10000
    names = [n.strip() for n in args.proxies.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PROXIES))
    if unknown or not names:
        p.error(f"--proxies: unknown {unknown}; choose from {','.join(PROXIES)}")
    args.names = [n for n in PROXIES if n in names]
    if args.scenarios == "all":
        args.scenario_list = list(SCENARIOS)
    else:
        chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        bad = sorted(set(chosen) - set(SCENARIOS))
        if bad or not chosen:
            p.error(f"--scenarios: unknown {bad}; choose from {','.join(SCENARIOS)}")
        args.scenario_list = [s for s in SCENARIOS if s in chosen]
    for opt in ("duration", "connections", "rounds", "idle_conns"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be >= 1")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be > 0")
    return args


def run(args: argparse.Namespace) -> int:
    """The whole suite; returns the exit code."""
    problems = preflight(args)
    if problems:
        log("pre-flight failed; nothing was started:")
        for line in problems:
            log(f"  - {line}")
        return 2
    est = estimate_seconds(args)
    log(
        f"estimated runtime: ~{est / 60:.1f} min ({len(args.scenario_list)} scenario(s) x "
        f"{len(args.names)} prox(ies) x {args.rounds} round(s), {args.duration} s each)"
    )
    if args.check:
        log("pre-flight OK")
        return 0
    allowed = sorted(os.sched_getaffinity(0))
    all_cpus = ",".join(str(c) for c in allowed)
    mach = machine()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.load_cpu})  # this script is a client too (idle test)
    fm = ferryman_build(args) if "ferryman" in args.names else ""
    print(header_text(args, mach, fm), "\n", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="ferryman-run-"))
    tmp.chmod(0o711)  # the origin's workers may run as 'nobody' and must reach its files
    (tmp / "logs").mkdir()
    shm = upload_area(args)
    started = time.monotonic()
    ctx: Ctx | None = None
    try:
        upload_dir = shm or tmp / "uploads"
        upload_dir.mkdir(exist_ok=True)
        upload_dir.chmod(0o711)
        origin, odir, oport = start_origin(args, tmp, upload_dir)
        ctx = Ctx(
            args=args, tmp=tmp, origin_dir=odir, upload_dir=upload_dir, origin_port=oport,
            origin=origin, all_cpus=all_cpus,
        )  # fmt: skip
        if any(s.startswith(("body", "upload")) for s in args.scenario_list):
            make_files(ctx)
        if "tls" in args.scenario_list:
            make_cert(ctx)
        write_lua(ctx)
        log(f"work dir {tmp}; origin 127.0.0.1:{oport} on core {args.load_cpu}")
        for rnd in range(1, args.rounds + 1):
            order = proxy_order(args.names, rnd)
            log(f"round {rnd}/{args.rounds} (order: {', '.join(order)})")
            for sname in args.scenario_list:
                scn = SCENARIOS[sname]
                for name in order:
                    if name not in scn.proxies:
                        continue
                    if not origin.alive():
                        raise BenchError(f"the origin died:\n{origin.log_tail()}")
                    t0 = time.monotonic()
                    res = run_one(ctx, scn, name, rnd)
                    res.raw["elapsed_s"] = round(time.monotonic() - t0, 2)
                    ctx.results.append(res)
                    log(progress_line(scn, res))
        tables = [scenario_table(ctx, SCENARIOS[s], args.names) for s in args.scenario_list]
        elapsed = time.monotonic() - started
        print("\n\n".join(tables), flush=True)
        print(f"\n_Total runtime {elapsed / 60:.1f} min._", flush=True)
        out = args.out or OUT_DIR / ("run-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "command": shlex.join(
                        [os.environ.get("FERRYMAN_BENCH_ARGV0", "suite.py"), *args.argv]
                    ),
                    "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "machine": mach,
                    "ferryman": fm,
                    "params": {
                        k: v
                        for k, v in vars(args).items()
                        if isinstance(v, str | int | float | bool | list | type(None))
                    }
                    | {"out": str(out), "warmup_s": WARMUP_S},
                    "fixed_rate": {"rate": ctx.rate, "source": ctx.rate_source},
                    "elapsed_s": round(elapsed, 1),
                    "results": [asdict(r) for r in ctx.results],
                    "medians": {
                        s: {n: medians(ctx.results, SCENARIOS[s], n) for n in args.names}
                        for s in args.scenario_list
                    },
                    "tables_markdown": "\n\n".join(tables),
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
        log(f"results written to {out}")
    finally:
        Managed.stop_all()
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = [r for r in ctx.results if r.status != "ok" or r.errors] if ctx else []
    return 1 if bad else 0


def list_scenarios() -> str:
    """--list output."""
    return "\n".join(f"{s.name:12} {s.title}\n{'':12} {s.how}\n" for s in SCENARIOS.values())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse options, install signal handlers, run, map errors to exit codes."""
    args = parse_args(argv)
    if args.list:
        print(list_scenarios())
        return 0
    note = "all started processes were stopped and the temp dir removed"
    return guarded_main(lambda: run(args), note)


if __name__ == "__main__":
    sys.exit(main())
