"""Shared machinery for the proxy benchmarks (``h1_proxy.py``, ``suite.py``, ``cache.py``,
``limits_compression.py`` and the others).

Process management (own process group, logged, killed by group id), ``/proc`` readers (CPU
ticks, RSS, the serving process under a master, a core's busy time), loopback helpers (free
ports, probes, config rendering), ``wrk`` runs and output parsing, idle keep-alive client
connections, and the frame of the one-origin, one-proxy-per-variant benchmarks (``cache.py``
and ``limits_compression.py``: origin, proxies, CPU per request, report header, raw JSON).
Nothing here installs anything or talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CONFIG_DIR = BENCH_DIR / "configs"
OUT_DIR = BENCH_DIR / "out"

PROXIES: tuple[str, ...] = ("nginx", "haproxy", "ferryman")
CLK_TCK: int = os.sysconf("SC_CLK_TCK")
EXPECTED_BODY = b"hello world\n"
IDLE_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

# Timeouts (seconds). Every wait in the benchmarks is bounded by one of these.
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
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """Start ``argv``; stdout+stderr go to ``<log_dir>/<name>.log``.

        ``preexec_fn`` runs in the child before ``exec`` (e.g. to raise RLIMIT_NOFILE).
        """
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
                preexec_fn=preexec_fn,
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


def raise_on_sigterm(signum: int, _frame: object) -> None:
    """Turn SIGTERM/SIGHUP into an exception so ``finally`` blocks run."""
    raise SystemExit(128 + signum)


def guarded_main(run: Callable[[], int], cleanup_note: str) -> int:
    """Run a benchmark's ``run()`` with cleanup on every exit: SIGTERM/SIGHUP become
    exceptions, errors map to exit codes (2 setup error, 130 Ctrl-C, 128+n signal), and
    every started process is stopped. ``cleanup_note`` says what was cleaned up."""
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
        signal.signal(signal.SIGHUP, raise_on_sigterm)
    try:
        return run()
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log(f"interrupted; {cleanup_note}")
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code >= 128:
            log(f"terminated by signal {exc.code - 128}; {cleanup_note}")
        raise
    finally:
        Managed.stop_all()


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


def tree_split(pid: int) -> tuple[int, int]:
    """(utime, stime) ticks of ``pid`` and all its live descendants."""
    user = system = 0
    for member in process_tree(pid):
        fields = _read_stat(member)
        if fields is not None:
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def core_ticks(cpu: int) -> tuple[int, int]:
    """(total, idle+iowait) jiffies of one core, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts[0] == f"cpu{cpu}":
            v = [int(x) for x in parts[1:9]]
            return sum(v), v[3] + v[4]
    raise BenchError(f"no cpu{cpu} in /proc/stat")


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


def replace_once(text: str, old: str, new: str, what: str) -> str:
    """Replace exactly one occurrence, or fail loudly (the reference config changed)."""
    if text.count(old) != 1:
        raise BenchError(f"{what}: expected exactly one {old!r} in the reference config")
    return text.replace(old, new)


def render_config(template: Path, dest: Path, proxy_port: int, origin_port: int) -> Path:
    """Copy ``template`` to ``dest`` substituting the two port placeholders."""
    text = template.read_text()
    text = text.replace("@PROXY_PORT@", str(proxy_port)).replace("@ORIGIN_PORT@", str(origin_port))
    if "@" in re.sub(r"#.*", "", text):
        raise BenchError(f"unsubstituted placeholder left in {template}")
    dest.write_text(text)
    return dest


def probe(
    port: int,
    timeout: float = PROBE_TIMEOUT,
    tls: bool = False,
    path: str = "/",
    expected: bytes | None = EXPECTED_BODY,
) -> str | None:
    """GET ``path`` on 127.0.0.1:port (over TLS, unverified, if ``tls``).

    None if it answered 200 with ``expected`` as the body (any body if ``expected`` is
    None), else a description of the problem.
    """
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "bench"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or (expected is not None and body != expected):
            return f"HTTP {resp.status} body={body[:60]!r}"
        return None
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def fetch(
    port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` on 127.0.0.1:port with ``Host: bench`` and ``headers``.

    (status, response headers with lower-case names, body); BenchError if the exchange fails.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "bench", **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET {path} on port {port}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def wait_ready(
    proc: Managed,
    port: int,
    timeout: float,
    tls: bool = False,
    path: str = "/",
    expected: bytes | None = EXPECTED_BODY,
) -> None:
    """Poll until ``proc`` answers on ``port`` correctly (see ``probe`` for ``path`` and
    ``expected``); raise BenchError otherwise."""
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
        last = probe(port, tls=tls, path=path, expected=expected) or ""
        if not last:
            return
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} did not answer correctly on 127.0.0.1:{port} within {timeout:.0f}s "
        f"(last: {last})\noutput:\n{proc.log_tail()}"
    )


def ferryman_command(
    ferryman_bin: str | None, args: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run ``ferryman <args>``.

    ``ferryman_bin`` if given, else ``ferryman`` on PATH, else ``python -m ferryman`` (or the
    ``ferryman.cli:main`` console-script target) with ``PYTHONPATH=src``.
    """
    child_env = dict(os.environ)
    if ferryman_bin:
        return [ferryman_bin, *args], child_env
    exe = shutil.which("ferryman")
    if exe:
        return [exe, *args], child_env
    src = REPO_ROOT / "src"
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p
    )
    if (src / "ferryman" / "__main__.py").exists():
        return [sys.executable, "-m", "ferryman", *args], child_env
    if (src / "ferryman" / "cli.py").exists():  # the console-script target, not installed
        shim = "import sys; from ferryman.cli import main; sys.argv[0] = 'ferryman'; "
        shim += "sys.exit(main())"
        return [sys.executable, "-c", shim, *args], child_env
    raise BenchError("no 'ferryman' on PATH and src/ferryman has no __main__.py or cli.py")


def ferryman_python(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` (30 s at most) in the environment ``ferryman_command`` gives ferryman,
    so it imports the ferryman the proxies will run."""
    _, env = ferryman_command(None, ["--version"])
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )


def ferryman_build() -> str:
    """ferryman's version and whether its engine is pure Python or mypyc-compiled."""
    code = (
        "import ferryman, ferryman.proxy.engine as e; "
        "print(ferryman.__version__, e.__file__.endswith('.py'))"
    )
    with contextlib.suppress(OSError, subprocess.TimeoutExpired, ValueError):
        version, pure = ferryman_python(code).stdout.split()
        return f"ferryman {version}, " + ("pure Python" if pure == "True" else "mypyc-compiled")
    return "ferryman (version unknown)"


def taskset(cpu: int, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` with ``taskset -c <cpu>``."""
    return ["taskset", "-c", str(cpu), *argv]


def tool_version(argv: Sequence[str]) -> str:
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


def run_wrk(
    cpu: int,
    port: int,
    connections: int,
    duration: int,
    path: str = "/",
    headers: Sequence[str] = (),
) -> tuple[WrkResult, str]:
    """Run wrk pinned to ``cpu`` against 127.0.0.1:port ``path``, sending each of ``headers``
    (``"Name: value"``) with ``-H``; return parsed result and raw text."""
    argv = taskset(
        cpu,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            *(arg for header in headers for arg in ("-H", header)),
            f"http://127.0.0.1:{port}{path}",
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


def wrk_bytes_read(output: str) -> int:
    """The bytes wrk read (``... requests in 5.00s, 12.34MB read``), 0 if not found."""
    m = re.search(r"requests in [\d.]+\w+, ([\d.]+)([KMGT]?B) read", output)
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    return int(float(m.group(1)) * scale[m.group(2)]) if m else 0


@dataclass
class CpuSample:
    """A proxy's CPU over one measured wrk run: per request (its whole process tree's utime
    and stime), and how busy its tree (CPU seconds per second) and the load core were."""

    rps: float
    cpu_us: float
    user_us: float
    sys_us: float
    busy: float
    load_busy: float

    def summary(self) -> str:
        """req/s, CPU µs per request (user, sys) and busy proxy/load, for a progress line."""
        return (
            f"{self.rps:9,.0f} req/s {self.cpu_us:6.2f} us CPU/req (user {self.user_us:.2f}, "
            f"sys {self.sys_us:.2f}), busy {self.busy:.0%}/{self.load_busy:.0%}"
        )


def measure_tree_cpu(
    pid: int, load_cpu: int, port: int, connections: int, duration: int,
    path: str = "/", headers: Sequence[str] = (),
) -> tuple[CpuSample, WrkResult, float]:
    """``run_wrk`` on ``load_cpu`` while reading the CPU ticks of ``pid``'s process tree and
    of the load core: (the CPU sample, wrk's result, wrk's bytes read per response)."""
    u0, s0 = tree_split(pid)
    c0 = core_ticks(load_cpu)
    t0 = time.monotonic()
    result, raw = run_wrk(load_cpu, port, connections, duration, path, headers)
    wall = time.monotonic() - t0
    u1, s1 = tree_split(pid)
    c1 = core_ticks(load_cpu)
    n = max(1, result.requests)
    user = (u1 - u0) / CLK_TCK * 1e6 / n
    system = (s1 - s0) / CLK_TCK * 1e6 / n
    sample = CpuSample(
        rps=result.rps,
        cpu_us=user + system,
        user_us=user,
        sys_us=system,
        busy=((u1 - u0) + (s1 - s0)) / CLK_TCK / wall,
        load_busy=1 - (c1[1] - c0[1]) / max(1, c1[0] - c0[0]),
    )
    return sample, result, wrk_bytes_read(raw) / n


# --------------------------------------------------------------------------------------------
# One nginx origin and one proxy per variant (cache.py, limits_compression.py)
# --------------------------------------------------------------------------------------------

LOAD_TOOLS = ("nginx", "wrk", "taskset")
#: (variant name, its dir, its port, the origin's port) -> (argv, environment or None)
ProxyCommand = Callable[[str, Path, int, int], tuple[list[str], dict[str, str] | None]]


def has_tool(tool: str) -> bool:
    """True if ``tool`` is on PATH or in /usr/sbin."""
    return bool(shutil.which(tool)) or Path(f"/usr/sbin/{tool}").exists()


def sbin_tool(tool: str) -> str:
    """``tool`` on PATH, else /usr/sbin/<tool> (where Debian puts nginx and haproxy)."""
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def require_load_tools() -> None:
    """BenchError naming the packages to install if nginx, wrk or taskset is missing."""
    for tool in LOAD_TOOLS:
        if not has_tool(tool):
            raise BenchError(f"missing {tool}: apt-get install -y nginx wrk util-linux")


def bench_main(
    doc: str,
    subsets: Mapping[str, Collection[str]],
    keep_help: str,
    run: Callable[[argparse.Namespace], int],
) -> int:
    """Parse the command line of the benchmark ``doc`` describes, then ``run(args)`` under
    ``guarded_main``: its exit status.

    Options: --seconds, --rounds, --connections; one ``--<name>`` per ``subsets`` entry (a
    comma-separated subset of its choices, all by default; anything else is a usage error);
    --ferryman-bin; --keep-tmp (``keep_help`` says what it keeps).
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5, help="measured wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, rotated (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    for name, choices in subsets.items():
        p.add_argument(
            f"--{name}",
            type=lambda s: s.split(","),
            default=list(choices),
            help="subset of " + ",".join(choices),
        )
    p.add_argument("--ferryman-bin", default=None)
    p.add_argument("--keep-tmp", action="store_true", help=keep_help)
    args = p.parse_args()
    for name, choices in subsets.items():
        unknown = set(getattr(args, name)) - set(choices)
        if unknown:
            p.error(f"unknown: {', '.join(sorted(unknown))}")
    return guarded_main(lambda: run(args), "stopped the origin and every proxy")


def log_estimate(what: str, cells: int, rounds: int, per: float) -> None:
    """Log how long a run will take: ``what`` (its cells, in words), then ``cells`` cells of
    ``per`` seconds each, ``rounds`` times."""
    log(f"{what} x {rounds} rounds x ~{per:.1f} s: about {cells * rounds * per / 60:.1f} min")


def make_workdir(prefix: str, subdir: str) -> tuple[Path, Path]:
    """A new temp dir (enterable by nginx workers running as nobody) with ``files/<subdir>``
    (readable by all) for the origin's files: (the dir, its ``files``)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o711)
    files = work / "files"
    (files / subdir).mkdir(parents=True)
    files.chmod(0o755)
    (files / subdir).chmod(0o755)
    return work, files


def nginx_argv(prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground with prefix ``prefix`` and config ``conf``, logging to stderr."""
    return [sbin_tool("nginx"), "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"]


def nginx_proxy_config(
    dest: Path, port: int, origin: int, http_lines: str = "", location_lines: str = ""
) -> Path:
    """The reference proxy (``configs/proxy-nginx.conf``) with ``http_lines`` after its
    ``access_log off;`` and ``location_lines`` after its ``proxy_set_header Connection "";``
    (each: lines with their indentation, joined by newlines; "" adds nothing)."""
    render_config(CONFIG_DIR / "proxy-nginx.conf", dest, port, origin)
    t = dest.read_text()
    for anchor, lines in (
        ("  access_log off;", http_lines),
        ('proxy_set_header Connection "";', location_lines),
    ):
        if lines:
            t = replace_once(t, anchor, f"{anchor}\n{lines}", "nginx")
    dest.write_text(t)
    return dest


def ferryman_proxy(
    ferryman_bin: str | None, d: Path, port: int, origin: int, route_extra: str
) -> tuple[list[str], dict[str, str]]:
    """Write ``d/ferryman.yaml`` (like the suite's: one worker, ``forwarded`` headers off; one
    listener on ``port`` with the route ``{upstream: origin<route_extra>}`` to ``origin``):
    the argv and environment of ``ferryman run`` with it."""
    conf = d / "ferryman.yaml"
    conf.write_text(
        "server:\n"
        "  workers: 1\n"
        "  forwarded: {x_forwarded_for: false, x_forwarded_proto: false, "
        "x_forwarded_host: false}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        f"    routes: [{{upstream: origin{route_extra}}}]\n"
        "upstreams:\n"
        "  origin:\n"
        f'    servers: ["127.0.0.1:{origin}"]\n'
    )
    return ferryman_command(ferryman_bin, ["run", "-c", str(conf)])


def start_origin(work: Path, locations: str, cpu: int) -> tuple[Managed, int]:
    """The reference origin (``configs/origin-nginx.conf``) with ``locations`` (nginx
    ``location`` lines, each ending in a newline) before its ``location /``, on a free port,
    pinned to ``cpu``: (the process, its port)."""
    port = free_ports(1)[0]
    conf = work / "origin.conf"
    render_config(CONFIG_DIR / "origin-nginx.conf", conf, 0, port)
    anchor = "    location / {"
    conf.write_text(replace_once(conf.read_text(), anchor, locations + anchor, "origin"))
    (work / "o").mkdir()
    return Managed("origin", taskset(cpu, nginx_argv(work / "o", conf)), work), port


@dataclass
class Proxy:
    """A started proxy: its name, process and port, and what its checks showed (by cell)."""

    name: str
    proc: Managed
    port: int
    evidence: dict[str, str] = field(default_factory=dict)


def start_proxies(
    work: Path, names: Sequence[str], cpu: int, origin_port: int, command: ProxyCommand
) -> dict[str, Proxy]:
    """Start one proxy per name, pinned to ``cpu``, each on a free port with its own dir
    ``work/<name>``: ``command(name, dir, port, origin_port)`` writes its config there and
    returns its argv and environment (None: this one's)."""
    proxies: dict[str, Proxy] = {}
    for name, port in zip(names, free_ports(len(names)), strict=True):
        d = work / name
        d.mkdir(mode=0o755)
        argv, env = command(name, d, port, origin_port)
        proxies[name] = Proxy(name, Managed(name, taskset(cpu, argv), work, env=env), port)
    return proxies


@contextlib.contextmanager
def origin_and_proxies(
    work: Path,
    locations: str,
    ready_path: str,
    names: Sequence[str],
    command: ProxyCommand,
    cpus: tuple[int, int],
    keep: bool,
) -> Iterator[tuple[int, dict[str, Proxy]]]:
    """The processes of a run, for a ``with`` block: the origin (``start_origin``: the
    reference plus ``locations``) on the load core and the proxies (``start_proxies``) on the
    proxy core, ``cpus`` = (proxy core, load core); this process moves to the load core.
    Yields (the origin's port, the proxies) once the origin serves ``ready_path`` (10 s at
    most); then stops them all and removes ``work`` unless ``keep`` (then says where it is).
    """
    proxy_cpu, load_cpu = cpus
    origin, origin_port = start_origin(work, locations, load_cpu)
    proxies: dict[str, Proxy] = {}
    try:
        os.sched_setaffinity(0, {load_cpu})
        proxies = start_proxies(work, names, proxy_cpu, origin_port, command)
        wait_ready(origin, origin_port, 10, path=ready_path, expected=None)
        yield origin_port, proxies
    finally:
        for proxy in proxies.values():
            proxy.proc.stop()
        origin.stop()
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_header(
    script: str,
    versions: Sequence[str],
    args: argparse.Namespace,
    warmup: int,
    cpus: tuple[int, int],
    elapsed: float,
) -> None:
    """The lines above a results table: the command, the date and ``versions``, and how the
    run went (wrk's options, ``warmup`` seconds, ``cpus`` = (proxy core, load core), rounds,
    time taken)."""
    command = " ".join([f"python benchmarks/{script}", *sys.argv[1:]])
    print(f"Command: `{command}`  ")
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {'; '.join(versions)}  ")
    print(
        f"`wrk -t1 -c{args.connections} -d{args.seconds}s` keep-alive GETs after "
        f"{warmup} s of warm-up; proxy on core {cpus[0]}, "
        f"wrk and origin on core {cpus[1]}; "
        f"{args.rounds} rounds, rotated (medians, CPU range in brackets); "
        f"CPU = the proxy's whole process tree; took {elapsed:.0f} s"
    )
    print()


def write_raw(
    stem: str, results: Mapping[tuple[str, str], Sequence[object]], **extra: object
) -> None:
    """Write ``out/<stem>-<timestamp>.json`` and say where: ``argv``, ``results`` (cell
    ``"a/b"`` -> each round's sample as a dict), then ``extra``."""
    data = {
        "argv": sys.argv,
        "results": {f"{a}/{b}": [vars(x) for x in v] for (a, b), v in results.items()},
        **extra,
    }
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(data, indent=1))
    log(f"raw results: {out}")


# --------------------------------------------------------------------------------------------
# Idle keep-alive connections
# --------------------------------------------------------------------------------------------


def read_response(sock: socket.socket) -> None:
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
                read_response(s)
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


def still_open(sock: socket.socket) -> bool:
    """True if the peer has not closed ``sock`` (non-blocking peek)."""
    try:
        sock.setblocking(False)
        data = sock.recv(1, socket.MSG_PEEK)
        return bool(data)  # b"" = EOF; unexpected data still means "open"
    except BlockingIOError:
        return True
    except OSError:
        return False


def log(msg: str) -> None:
    """Progress output (stderr, so the tables on stdout stay clean)."""
    print(msg, file=sys.stderr, flush=True)


def fmt_lat(us: float) -> str:
    """Latency in µs, rendered as us or ms."""
    return f"{us:.0f} us" if us < 1000 else f"{us / 1000:.2f} ms"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def one_line(text: str, limit: int = 160) -> str:
    """First line of ``text``, shortened and made safe for a Markdown table cell."""
    lines = text.strip().splitlines()
    flat = " ".join(lines[0].split()).replace("|", "/") if lines else ""
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
