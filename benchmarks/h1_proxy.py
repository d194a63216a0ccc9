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
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CONFIG_DIR = BENCH_DIR / "configs"
OUT_DIR = BENCH_DIR / "out"

PROXIES: tuple[str, ...] = ("nginx", "haproxy", "ferryman")
CLK_TCK: int = os.sysconf("SC_CLK_TCK")
EXPECTED_BODY = b"hello world\n"
IDLE_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

# Timeouts (seconds). Every wait in this script is bounded by one of these.
READY_TIMEOUT_NATIVE = 10.0
READY_TIMEOUT_FERRYMAN = 30.0
STOP_TIMEOUT = 5.0
PROBE_TIMEOUT = 2.0
WRK_EXTRA_TIMEOUT = 30.0
IDLE_SOCKET_TIMEOUT = 10.0
IDLE_OPEN_DEADLINE = 120.0
IDLE_SETTLE = 1.0
IDLE_BATCH = 100

# Helper processes a Python supervisor may fork besides its worker(s); never the server.
_HELPER_MARKERS = ("resource_tracker", "semaphore_tracker", "forkserver")


class BenchError(Exception):
    """A failure with a message meant for the user (no traceback needed)."""


# --------------------------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------------------------


class Managed:
    """A child process started in its own session, logged to a file, killed by group id."""

    registry: list[Managed] = []

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start ``argv``; stdout+stderr go to ``<log_dir>/<name>.log``."""
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=str(cwd) if cwd else None,
                env=env,
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise
        Managed.registry.append(self)

    @property
    def pid(self) -> int:
        """PID of the started process (after ``taskset`` exec'd the real program)."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the started process has not exited."""
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the process's combined output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process group, then SIGKILL it if it outlives ``timeout``."""
        pgid = self.proc.pid  # start_new_session=True: the group id is our child's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not _group_alive(pgid):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1.0)
        self._log.close()
        if self in Managed.registry:
            Managed.registry.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        """Stop every process still registered (newest first)."""
        for managed in reversed(list(cls.registry)):
            with contextlib.suppress(Exception):
                managed.stop()


def _group_alive(pgid: int) -> bool:
    """True if any process is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg(…, 0); ignore our own reaped/unreaped direct child.
    for pid in _all_pids():
        stat = _read_stat(pid)
        if stat is not None and int(stat[2]) == pgid and stat[0] != "Z":
            return True
    return False


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    """Turn SIGTERM/SIGHUP into an exception so ``finally`` blocks run."""
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------------------------


def _all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat *after* the comm field (so index 0 is field 3, state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime (fields 14 and 15 of /proc/PID/stat) in SC_CLK_TCK ticks."""
    fields = _read_stat(pid)
    if fields is None:
        raise BenchError(f"process {pid} vanished while reading its CPU time")
    return int(fields[11]) + int(fields[12])


def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` in SC_CLK_TCK ticks."""
    fields = _read_stat(pid)
    if fields is None:
        raise BenchError(f"process {pid} vanished while reading its CPU time")
    return int(fields[11]), int(fields[12])


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError as exc:
        raise BenchError(f"process {pid} vanished while reading its RSS") from exc
    raise BenchError(f"no VmRSS for process {pid}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (via /proc/PID/task/*/children, else a ppid scan)."""
    kids: set[int] = set()
    task_dir = Path(f"/proc/{pid}/task")
    found_interface = False
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        found_interface = True
        kids.update(int(x) for x in text.split())
    if not found_interface:  # kernel without CONFIG_PROC_CHILDREN
        for other in _all_pids():
            stat = _read_stat(other)
            if stat is not None and int(stat[1]) == pid:
                kids.add(other)
    return sorted(kids)


def cmdline(pid: int) -> str:
    """The command line of ``pid`` as one space-separated string ('' if gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children(current))
    return out


def serving_pid(pid: int) -> tuple[int, str]:
    """The process that actually serves traffic for a proxy started as ``pid``.

    Rule: while the process has exactly one child (ignoring Python multiprocessing helper
    processes such as ``resource_tracker``), descend into that child. This picks the nginx
    worker under its master, HAProxy itself (``-db``: no children) and ferryman's single
    worker under its supervisor, or the main process if ferryman serves in-process or has
    several children.
    """
    current, how = pid, "main process"
    for _ in range(4):
        kids = [k for k in children(current) if not any(m in cmdline(k) for m in _HELPER_MARKERS)]
        if len(kids) != 1:
            if len(kids) > 1:
                how += f" ({len(kids)} children: measuring the parent)"
            break
        current, how = kids[0], "only child" if current == pid else how + " -> only child"
    return current, how


def tree_ticks(pid: int) -> int:
    """CPU ticks of ``pid`` plus all its live descendants."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(BenchError):
            total += cpu_ticks(member)
    return total


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def render_config(template: Path, dest: Path, proxy_port: int, origin_port: int) -> Path:
    """Copy ``template`` to ``dest`` substituting the two port placeholders."""
    text = template.read_text()
    text = text.replace("@PROXY_PORT@", str(proxy_port)).replace("@ORIGIN_PORT@", str(origin_port))
    if "@" in re.sub(r"#.*", "", text):
        raise BenchError(f"unsubstituted placeholder left in {template}")
    dest.write_text(text)
    return dest


def probe(port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """GET / on 127.0.0.1:port. None if it answered 200 'hello world', else the problem."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": "bench"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or body != EXPECTED_BODY:
            return f"HTTP {resp.status} body={body[:60]!r}"
        return None
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def wait_ready(proc: Managed, port: int, timeout: float) -> None:
    """Poll until ``proc`` answers on ``port`` correctly; raise BenchError otherwise."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = proc.log_tail()
            last = tail.splitlines()[-1] if tail else "(no output)"
            raise BenchError(
                f"{proc.name} exited with code {proc.proc.returncode} before answering: "
                f"{last}\noutput:\n{tail}"
            )
        last = probe(port) or ""
        if not last:
            return
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} did not answer correctly on 127.0.0.1:{port} within {timeout:.0f}s "
        f"(last: {last})\noutput:\n{proc.log_tail()}"
    )


def taskset(cpu: int, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` with ``taskset -c <cpu>``."""
    return ["taskset", "-c", str(cpu), *argv]


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------

_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _to_us(value: str, unit: str) -> float:
    return float(value) * _UNIT_US[unit]


@dataclass
class WrkResult:
    """What we keep from one wrk run."""

    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    non_2xx_3xx: int
    socket_errors: dict[str, int]

    @property
    def error_count(self) -> int:
        """Non-2xx/3xx responses plus all socket errors."""
        return self.non_2xx_3xx + sum(self.socket_errors.values())


def parse_wrk(output: str) -> WrkResult:
    """Parse ``wrk --latency`` text output."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    lat = {
        pct: _to_us(value, unit)
        for pct, value, unit in re.findall(
            r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M
        )
    }
    if not m or not rps or "50" not in lat or "99" not in lat:
        raise BenchError(f"could not parse wrk output:\n{output}")
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(m.group(1)),
        seconds=_to_us(m.group(2), m.group(3)) / 1e6,
        rps=float(rps.group(1)),
        p50_us=lat["50"],
        p99_us=lat["99"],
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


def run_wrk(cpu: int, port: int, connections: int, duration: int) -> tuple[WrkResult, str]:
    """Run wrk pinned to ``cpu`` against 127.0.0.1:port; return parsed result and raw text."""
    argv = taskset(
        cpu,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
    )
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + WRK_EXTRA_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration + WRK_EXTRA_TIMEOUT:.0f}s") from exc
    if out.returncode != 0:
        raise BenchError(f"wrk failed (exit {out.returncode}): {out.stderr.strip() or out.stdout}")
    return parse_wrk(out.stdout), out.stdout


# --------------------------------------------------------------------------------------------
# Idle keep-alive connections
# --------------------------------------------------------------------------------------------


def _read_response(sock: socket.socket) -> None:
    """Read one complete HTTP/1.1 response (Content-Length or chunked) and check it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("connection closed before response headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise BenchError(f"unexpected status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "close" in headers.get("connection", ""):
        raise BenchError("proxy answered 'Connection: close' (not keep-alive)")

    def fill(min_len: int = 0, needle: bytes = b"") -> bytes:
        """Receive into ``body`` until it has ``min_len`` bytes and contains ``needle``."""
        nonlocal body
        while len(body) < min_len or needle not in body:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("connection closed mid-body")
            body += chunk
        return body

    if "chunked" in headers.get("transfer-encoding", ""):
        payload = b""
        while True:
            size_line, _, body = fill(needle=b"\r\n").partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                fill(needle=b"\r\n")  # final CRLF (no trailers expected)
                break
            fill(min_len=size + 2)
            payload, body = payload + body[:size], body[size + 2 :]
    else:
        length = int(headers.get("content-length", "-1"))
        if length < 0:
            raise BenchError("response without Content-Length or chunked encoding")
        payload = fill(min_len=length)[:length]
    if payload != EXPECTED_BODY:
        raise BenchError(f"unexpected body {payload[:60]!r}")


def open_idle_connections(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` keep-alive connections, each after one full GET exchange."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + IDLE_OPEN_DEADLINE
    try:
        while len(socks) < count:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"opening {count} idle connections took over {IDLE_OPEN_DEADLINE:.0f}s "
                    f"({len(socks)} done)"
                )
            batch: list[socket.socket] = []
            for _ in range(min(IDLE_BATCH, count - len(socks))):
                s = socket.create_connection(("127.0.0.1", port), timeout=IDLE_SOCKET_TIMEOUT)
                socks.append(s)
                batch.append(s)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for s in batch:
                s.sendall(IDLE_REQUEST)
            for s in batch:
                _read_response(s)
    except (OSError, ValueError, BenchError) as exc:
        close_all(socks)
        raise BenchError(f"idle connection #{len(socks)}: {exc}") from exc
    return socks


def close_all(socks: list[socket.socket]) -> None:
    """Close every socket, ignoring errors."""
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()
    socks.clear()


def ensure_nofile(needed: int) -> None:
    """Raise RLIMIT_NOFILE (soft, and hard if permitted) to at least ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        except (ValueError, OSError) as exc:
            raise BenchError(
                f"need {needed} open files for the idle-connection test but the hard limit "
                f"is {hard} and cannot be raised ({exc}); use --idle-conns or ulimit -Hn"
            ) from exc
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


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
    child_env = dict(os.environ)
    if env.ferryman_bin:
        return [env.ferryman_bin, "run", "-c", str(config)], child_env
    exe = shutil.which("ferryman")
    if exe:
        return [exe, "run", "-c", str(config)], child_env
    src = REPO_ROOT / "src"
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p
    )
    if (src / "ferryman" / "__main__.py").exists():
        return [sys.executable, "-m", "ferryman", "run", "-c", str(config)], child_env
    if (src / "ferryman" / "cli.py").exists():  # the console-script target, not installed
        shim = "import sys; from ferryman.cli import main; sys.argv[0] = 'ferryman'; "
        shim += "sys.exit(main())"
        return [sys.executable, "-c", shim, "run", "-c", str(config)], child_env
    raise Unavailable("no 'ferryman' on PATH and src/ferryman has no __main__.py or cli.py")


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
        alive = sum(1 for s in socks if _still_open(s))
        if alive < count:
            return before, after, None, f"proxy closed {count - alive}/{count} idle connections"
        return before, after, (after - before) / count, ""
    except BenchError as exc:
        return before, 0, None, str(exc)
    finally:
        close_all(socks)


def _still_open(sock: socket.socket) -> bool:
    """True if the peer has not closed ``sock`` (non-blocking peek)."""
    try:
        sock.setblocking(False)
        data = sock.recv(1, socket.MSG_PEEK)
        return bool(data)  # b"" = EOF; unexpected data still means "open"
    except BlockingIOError:
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress output (stderr, so the tables on stdout stay clean)."""
    print(msg, file=sys.stderr, flush=True)


def fmt_lat(us: float) -> str:
    """Latency in µs, rendered as us or ms."""
    return f"{us:.0f} us" if us < 1000 else f"{us / 1000:.2f} ms"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


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
            lines.append(f"| {r.proxy} | {r.status}: {_one_line(r.reason)} |" + " |" * (ncols - 2))
            continue
        rss = (
            f"{r.rss_per_conn / 1024:.2f} KiB ({r.rss_per_conn:,.0f} B)"
            if r.rss_per_conn is not None
            else f"n/a ({_one_line(r.rss_error)})"
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
                    _ratio(r.rps, base.rps if base else None),
                    f"{r.cpu_us_per_req:.1f}",
                    _ratio(r.cpu_us_per_req, base.cpu_us_per_req if base else None),
                    f"{r.core_utilisation * 100:.0f}%",
                    fmt_lat(r.p50_us),
                    fmt_lat(r.p99_us),
                    rss,
                    _ratio(r.rss_per_conn, base.rss_per_conn if base else None),
                    errs,
                ]
            )
            + " |"
        )
    notes = [f"- {r.proxy}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    """First line of ``text``, shortened and made safe for a Markdown table cell."""
    lines = text.strip().splitlines()
    flat = " ".join(lines[0].split()).replace("|", "/") if lines else ""
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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
            "nginx": _version(["nginx", "-v"]),
            "haproxy": _version(["haproxy", "-v"]) if shutil.which("haproxy") else "absent",
            "wrk": _version(["wrk", "-v"]),
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
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
        signal.signal(signal.SIGHUP, _raise_on_sigterm)
    try:
        return run(args)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted; all started processes were stopped")
        return 130
    finally:
        Managed.stop_all()


if __name__ == "__main__":
    sys.exit(main())
