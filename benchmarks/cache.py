"""A cache hit's CPU per request: ferryman's HTTP cache against nginx ``proxy_cache`` (issue 8).

    python benchmarks/cache.py [--seconds 5] [--rounds 3] [--connections 50]
                               [--variants a,b,...] [--ferryman-bin PATH] [--keep-tmp]

One nginx origin (``configs/origin-nginx.conf`` plus ``/c/`` serving a 1 KiB and a 64 KiB
file with ``Cache-Control: max-age=3600``, and ``/__stub``: ``stub_status``) and one
proxy per variant, all started at once, each with one worker, pinned to core 0:

* ``nginx-cache``: the reference ``proxy-nginx.conf`` plus ``proxy_cache_path`` (a temp
  dir, ``keys_zone``, ``use_temp_path=off``), ``proxy_cache`` and
  ``add_header X-Cache-Status $upstream_cache_status``; freshness from the origin's
  ``Cache-Control``;
* ``ferryman-memory``: ``ferryman run`` with a route ``cache: {storage: memory}``;
* ``ferryman-disk``: a route ``cache: {storage: disk, path: <temp dir>}``, when
  ``ferryman.cache.disk`` imports (otherwise skipped with a note);
* ``haproxy-cache``: the reference ``proxy-haproxy.cfg`` plus a ``cache`` section,
  ``http-request cache-use`` and ``http-response cache-store``;
* ``nginx-proxy`` and ``ferryman-proxy``: plain proxying, no cache (every request goes
  to the origin), for reference.

ferryman runs like the suite's: ``forwarded`` headers off, everything else default.

Before measuring a variant and size, the script GETs the URL until the proxy reports a
hit (ferryman: ``Cache-Status`` contains ``hit``; nginx: ``X-Cache-Status: HIT``;
HAProxy: ``X-Cache-Status: HIT`` set from ``res.cache_hit``) and checks the body byte for
byte. Then ``wrk -t1 -c<N>`` keep-alive GETs of that URL, pinned to core 1 with the
origin: 1 s of warm-up, then the measured run. The origin's ``stub_status`` request
counter is read just before and just after the measured run: a cache variant must cause
no origin request then (the table shows the count, and anything else is flagged).

CPU is utime+stime of the variant's whole process tree (master/supervisor and worker)
from ``/proc``, over the measured run, divided by wrk's request count. The variants run
in turn, rotated each round; each cell is the median over the rounds, and the ratios are
to ``nginx-cache`` of the same size. Loopback only; every subprocess has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    CLK_TCK,
    CONFIG_DIR,
    OUT_DIR,
    WRK_EXTRA_TIMEOUT,
    BenchError,
    Managed,
    WrkResult,
    _read_stat,
    ferryman_command,
    free_ports,
    guarded_main,
    log,
    parse_wrk,
    process_tree,
    render_config,
    taskset,
    tool_version,
)

PROXY_CPU, LOAD_CPU = 0, 1
WARMUP_SECONDS = 1
#: name -> the URL path on the origin, and the body size
SIZES: dict[str, tuple[str, int]] = {"1k": ("/c/1k.bin", 1024), "64k": ("/c/64k.bin", 65536)}
VARIANTS = (
    "nginx-cache",
    "ferryman-memory",
    "ferryman-disk",
    "haproxy-cache",
    "nginx-proxy",
    "ferryman-proxy",
)
CACHED = frozenset(("nginx-cache", "ferryman-memory", "ferryman-disk", "haproxy-cache"))
BASE = "nginx-cache"


def replace_once(text: str, old: str, new: str, what: str) -> str:
    """Replace exactly one occurrence, or fail loudly (the reference config changed)."""
    if text.count(old) != 1:
        raise BenchError(f"{what}: expected exactly one {old!r} in the reference config")
    return text.replace(old, new)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def origin_config(dest: Path, port: int, files: Path) -> Path:
    """The reference origin plus /__stub and /c/ (files with Cache-Control: max-age)."""
    render_config(CONFIG_DIR / "origin-nginx.conf", dest, 0, port)
    extra = (
        "    location = /__stub { stub_status; }\n"
        f"    location /c/ {{ root {files}; add_header Cache-Control \"max-age=3600\"; }}\n"
        "    location / {"
    )
    dest.write_text(replace_once(dest.read_text(), "    location / {", extra, "origin"))
    return dest


def nginx_config(dest: Path, port: int, origin: int, cache_dir: Path | None) -> Path:
    render_config(CONFIG_DIR / "proxy-nginx.conf", dest, port, origin)
    t = dest.read_text()
    if cache_dir is not None:
        t = replace_once(
            t,
            "  access_log off;",
            "  access_log off;\n"
            f"  proxy_cache_path {cache_dir} levels=1:2 keys_zone=bench:10m max_size=1g "
            "inactive=1h use_temp_path=off;",
            "nginx",
        )
        t = replace_once(
            t,
            'proxy_set_header Connection "";',
            'proxy_set_header Connection "";\n'
            "      proxy_cache bench;\n"
            "      add_header X-Cache-Status $upstream_cache_status;",
            "nginx",
        )
    dest.write_text(t)
    return dest


def haproxy_config(dest: Path, port: int, origin: int) -> Path:
    render_config(CONFIG_DIR / "proxy-haproxy.cfg", dest, port, origin)
    t = dest.read_text()
    t = replace_once(
        t,
        "\nbackend origin\n",
        "\nbackend origin\n"
        "  http-request cache-use bench\n"
        "  http-response cache-store bench\n"
        "  http-response set-header X-Cache-Status HIT if { res.cache_hit }\n",
        "haproxy",
    )
    t += "cache bench\n  total-max-size 64\n  max-object-size 1048576\n  max-age 3600\n"
    dest.write_text(t)
    return dest


def ferryman_config(dest: Path, port: int, origin: int, cache: str | None) -> Path:
    route = "{upstream: origin" + (f", cache: {cache}" if cache else "") + "}"
    dest.write_text(
        "server:\n"
        "  workers: 1\n"
        "  forwarded: {x_forwarded_for: false, x_forwarded_proto: false, "
        "x_forwarded_host: false}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        f"    routes: [{route}]\n"
        "upstreams:\n"
        "  origin:\n"
        f'    servers: ["127.0.0.1:{origin}"]\n'
    )
    return dest


# --------------------------------------------------------------------------------------------
# Probes and counters
# --------------------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": "bench"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET {path} on port {port}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def hit_header(variant: str, headers: dict[str, str]) -> tuple[bool, str]:
    """(is it a hit, the header that says so) for ``variant``'s response."""
    if variant.startswith("ferryman"):
        value = headers.get("cache-status", "")
        return "hit" in value.lower(), f"Cache-Status: {value}"
    value = headers.get("x-cache-status", "")
    return value.upper() == "HIT", f"X-Cache-Status: {value}"


def warm_and_verify(variant: str, port: int, path: str, body: bytes) -> str:
    """GET until a hit (cache variants) and check the body; the evidence, for the report."""
    evidence = ""
    for _ in range(10):
        status, headers, got = get(port, path)
        if status != 200 or got != body:
            raise BenchError(
                f"{variant} {path}: HTTP {status}, {len(got)} bytes, body matches: {got == body}"
            )
        if variant not in CACHED:
            return "(no cache)"
        hit, evidence = hit_header(variant, headers)
        if hit:
            return evidence
        time.sleep(0.05)
    raise BenchError(f"{variant} {path}: no cache hit after 10 GETs (last: {evidence!r})")


def stub_requests(port: int) -> int:
    """The origin's stub_status request counter (this query included)."""
    _, _, text = get(port, "/__stub")
    try:
        return int(text.decode().splitlines()[2].split()[2])
    except (IndexError, ValueError) as exc:
        raise BenchError(f"cannot parse origin stub_status: {text!r}") from exc


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


def run_wrk(port: int, path: str, connections: int, seconds: int) -> tuple[WrkResult, int]:
    """wrk pinned to the load core: (parsed result, bytes read)."""
    argv = taskset(
        LOAD_CPU,
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
         f"http://127.0.0.1:{port}{path}"],
    )
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + WRK_EXTRA_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + WRK_EXTRA_TIMEOUT:.0f}s") from exc
    if out.returncode != 0:
        raise BenchError(f"wrk failed (exit {out.returncode}): {out.stderr.strip() or out.stdout}")
    m = re.search(r"requests in [\d.]+\w+, ([\d.]+)([KMGT]?B) read", out.stdout)
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
    read = int(float(m.group(1)) * scale[m.group(2)]) if m else 0
    return parse_wrk(out.stdout), read


@dataclass
class Sample:
    rps: float
    cpu_us: float
    user_us: float
    sys_us: float
    busy: float
    load_busy: float
    origin_requests: int
    bytes_per_resp: float
    p99_us: float
    errors: int


@dataclass
class Proxy:
    name: str
    proc: Managed
    port: int
    evidence: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def disk_available() -> str | None:
    """None if ``ferryman.cache.disk`` imports (in a child, as the proxy will), else why."""
    code = "import ferryman.cache.disk as d; d.DiskStorage"
    _, env = ferryman_command(None, ["--version"])
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    if out.returncode == 0:
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {out.returncode}"


def start_proxies(
    args: argparse.Namespace, work: Path, origin_port: int, names: list[str]
) -> dict[str, Proxy]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    ports = free_ports(len(names))
    proxies: dict[str, Proxy] = {}
    for name, port in zip(names, ports, strict=True):
        d = work / name
        d.mkdir(mode=0o755)
        env = None
        if name.startswith("nginx"):
            cache_dir = None
            if name == "nginx-cache":
                cache_dir = d / "cache"
                cache_dir.mkdir()
                cache_dir.chmod(0o777)  # the worker runs as nobody when started by root
            conf = nginx_config(d / "nginx.conf", port, origin_port, cache_dir)
            argv = [nginx, "-p", f"{d}/", "-c", str(conf), "-e", "stderr"]
        elif name == "haproxy-cache":
            conf = haproxy_config(d / "haproxy.cfg", port, origin_port)
            argv = [haproxy, "-f", str(conf), "-db"]
        else:
            cache = {
                "ferryman-memory": "{storage: memory}",
                "ferryman-disk": f'{{storage: disk, path: "{d / "cache"}"}}',
                "ferryman-proxy": None,
            }[name]
            conf = ferryman_config(d / "ferryman.yaml", port, origin_port, cache)
            argv, env = ferryman_command(args.ferryman_bin, ["run", "-c", str(conf)])
        proxies[name] = Proxy(name, Managed(name, taskset(PROXY_CPU, argv), work, env=env), port)
    return proxies


def wait_up(proxy: Proxy, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proxy.proc.alive():
            raise BenchError(f"{proxy.name} exited:\n{proxy.proc.log_tail()}")
        try:
            status, _, _ = get(proxy.port, path)
            if status == 200:
                return
            last = f"HTTP {status}"
        except BenchError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{proxy.name} not answering ({last}):\n{proxy.proc.log_tail()}")


def measure(
    proxy: Proxy, size: str, body: bytes, origin_port: int, args: argparse.Namespace
) -> Sample:
    path = SIZES[size][0]
    proxy.evidence[size] = warm_and_verify(proxy.name, proxy.port, path, body)
    run_wrk(proxy.port, path, args.connections, WARMUP_SECONDS)
    before_o = stub_requests(origin_port)
    u0, s0 = tree_split(proxy.proc.pid)
    c0 = core_ticks(LOAD_CPU)
    t0 = time.monotonic()
    result, read = run_wrk(proxy.port, path, args.connections, args.seconds)
    wall = time.monotonic() - t0
    u1, s1 = tree_split(proxy.proc.pid)
    c1 = core_ticks(LOAD_CPU)
    after_o = stub_requests(origin_port)
    n = max(1, result.requests)
    user = (u1 - u0) / CLK_TCK * 1e6 / n
    system = (s1 - s0) / CLK_TCK * 1e6 / n
    return Sample(
        rps=result.rps,
        cpu_us=user + system,
        user_us=user,
        sys_us=system,
        busy=((u1 - u0) + (s1 - s0)) / CLK_TCK / wall,
        load_busy=1 - (c1[1] - c0[1]) / max(1, c1[0] - c0[0]),
        origin_requests=after_o - before_o - 1,  # (the second query counts itself)
        bytes_per_resp=read / n,
        p99_us=result.p99_us,
        errors=result.error_count,
    )


def run(args: argparse.Namespace) -> int:
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise BenchError(f"missing {tool}: apt-get install -y nginx wrk util-linux")
    names = [v for v in VARIANTS if v in args.variants]
    notes: list[str] = []
    if "ferryman-disk" in names:
        why = disk_available()
        if why is not None:
            names.remove("ferryman-disk")
            notes.append(f"ferryman-disk skipped: ferryman.cache.disk does not import ({why})")
            log(notes[-1])
    if "haproxy-cache" in names and not (
        shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()
    ):
        names.remove("haproxy-cache")
        notes.append("haproxy-cache skipped: no haproxy")
        log(notes[-1])
    sizes = [s for s in SIZES if s in args.sizes]
    per = WARMUP_SECONDS + args.seconds + 0.4
    log(
        f"{len(names)} variants x {len(sizes)} sizes x {args.rounds} rounds x ~{per:.1f} s: "
        f"about {len(names) * len(sizes) * args.rounds * per / 60:.1f} min"
    )
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ferryman-cachebench-"))
    work.chmod(0o711)
    files = work / "files"
    (files / "c").mkdir(parents=True)
    files.chmod(0o755)
    (files / "c").chmod(0o755)
    bodies: dict[str, bytes] = {}
    for size, (path, length) in SIZES.items():
        bodies[size] = os.urandom(length)
        (files / path.lstrip("/")).write_bytes(bodies[size])
        (files / path.lstrip("/")).chmod(0o644)
    origin_port = free_ports(1)[0]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    origin_config(work / "origin.conf", origin_port, files)
    (work / "o").mkdir()
    origin = Managed(
        "origin",
        taskset(LOAD_CPU, [nginx, "-p", f"{work / 'o'}/", "-c", str(work / "origin.conf"),
                           "-e", "stderr"]),
        work,
    )
    results: dict[tuple[str, str], list[Sample]] = {}
    proxies: dict[str, Proxy] = {}
    try:
        os.sched_setaffinity(0, {LOAD_CPU})
        proxies = start_proxies(args, work, origin_port, names)
        wait_up(Proxy("origin", origin, origin_port), SIZES["1k"][0], 10)
        for proxy in proxies.values():
            wait_up(proxy, "/", 30)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                for size in sizes:
                    s = measure(proxies[name], size, bodies[size], origin_port, args)
                    results.setdefault((name, size), []).append(s)
                    flag = "" if name not in CACHED or s.origin_requests == 0 else " !!"
                    log(
                        f"round {rnd + 1} {name:16} {size:>3}: {s.rps:9,.0f} req/s "
                        f"{s.cpu_us:6.2f} us CPU/req (user {s.user_us:.2f}, sys "
                        f"{s.sys_us:.2f}), busy {s.busy:.0%}/{s.load_busy:.0%}, origin reqs "
                        f"{s.origin_requests}{flag}, {s.bytes_per_resp:,.0f} B/resp"
                    )
        evidence = {name: dict(p.evidence) for name, p in proxies.items()}
    finally:
        for proxy in proxies.values():
            proxy.proc.stop()
        origin.stop()
        if args.keep_tmp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    return report(args, names, sizes, results, evidence, notes, elapsed)


def report(
    args: argparse.Namespace,
    names: list[str],
    sizes: list[str],
    results: dict[tuple[str, str], list[Sample]],
    evidence: dict[str, dict[str, str]],
    notes: list[str],
    elapsed: float,
) -> int:
    def med(name: str, size: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in results[(name, size)])

    bad = 0
    print(f"Command: `python benchmarks/cache.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{tool_version(['nginx', '-v'])}; {tool_version(['haproxy', '-v'])}; "
        f"{ferryman_build()}  "
    )
    print(
        f"`wrk -t1 -c{args.connections} -d{args.seconds}s` keep-alive GETs after "
        f"{WARMUP_SECONDS} s of warm-up; proxy on core {PROXY_CPU}, "
        f"wrk and origin on core {LOAD_CPU}; "
        f"{args.rounds} rounds, rotated (medians, CPU range in brackets); "
        f"CPU = the proxy's whole process tree; took {elapsed:.0f} s"
    )
    print()
    print(
        "| variant | body | req/s | CPU µs/req | user / sys µs | CPU vs nginx-cache | "
        "req/s vs nginx-cache | busy proxy / load | origin reqs in window | B/resp |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for name in names:
            rs = results[(name, size)]
            cpu = med(name, size, "cpu_us")
            rps = med(name, size, "rps")
            lo, hi = min(s.cpu_us for s in rs), max(s.cpu_us for s in rs)
            origin_reqs = [s.origin_requests for s in rs]
            errors = sum(s.errors for s in rs)
            o_cell = "/".join(str(n) for n in origin_reqs)
            if name in CACHED and any(origin_reqs):
                o_cell = f"**!! {o_cell}**"
                bad += 1
            if name not in CACHED:
                o_cell = f"{statistics.median(origin_reqs):,.0f} (no cache)"
            if errors:
                bad += 1
                o_cell += f" **!! {errors} wrk errors**"
            if (BASE, size) in results:
                base_cpu, base_rps = med(BASE, size, "cpu_us"), med(BASE, size, "rps")
                r_cpu, r_rps = f"{cpu / base_cpu:.2f}×", f"{rps / base_rps:.2f}×"
            else:
                r_cpu = r_rps = "n/a"
            print(
                f"| {name} | {size} | {rps:,.0f} | {cpu:.2f} ({lo:.2f}–{hi:.2f}) | "
                f"{med(name, size, 'user_us'):.2f} / {med(name, size, 'sys_us'):.2f} | "
                f"{r_cpu} | {r_rps} | {med(name, size, 'busy'):.0%} / "
                f"{med(name, size, 'load_busy'):.0%} | {o_cell} | "
                f"{med(name, size, 'bytes_per_resp'):,.0f} |"
            )
    print()
    print(
        "Hit checked before each measurement: "
        + "; ".join(
            f"{name} `{evidence[name][sizes[0]]}`"
            for name in names
            if name in CACHED and sizes[0] in evidence.get(name, {})
        )
        + ". Origin reqs: the origin's stub_status request count over each measured run "
        "(per round for cache variants, must be 0)."
    )
    for note in notes:
        print(f"\n{note}")
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "argv": sys.argv,
                "results": {
                    f"{n}/{s}": [vars(x) for x in v] for (n, s), v in results.items()
                },
                "evidence": evidence,
                "notes": notes,
            },
            indent=1,
        )
    )
    log(f"raw results: {out}")
    return 1 if bad else 0


def ferryman_build() -> str:
    code = (
        "import ferryman, ferryman.proxy.engine as e; "
        "print(ferryman.__version__, e.__file__.endswith('.py'))"
    )
    _, env = ferryman_command(None, ["--version"])
    with contextlib.suppress(OSError, subprocess.TimeoutExpired, ValueError):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
        )
        version, pure = out.stdout.split()
        return f"ferryman {version}, " + ("pure Python" if pure == "True" else "mypyc-compiled")
    return "ferryman (version unknown)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5, help="measured wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, rotated (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=list(VARIANTS),
        help="subset of " + ",".join(VARIANTS),
    )
    p.add_argument(
        "--sizes", type=lambda s: s.split(","), default=list(SIZES), help="subset of 1k,64k"
    )
    p.add_argument("--ferryman-bin", default=None)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs, logs and caches")
    args = p.parse_args()
    unknown = set(args.variants) - set(VARIANTS) or set(args.sizes) - set(SIZES)
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    return guarded_main(lambda: run(args), "stopped the origin and every proxy")


if __name__ == "__main__":
    sys.exit(main())
