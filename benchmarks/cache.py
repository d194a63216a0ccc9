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
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    CONFIG_DIR,
    BenchError,
    CpuSample,
    Proxy,
    bench_main,
    ferryman_build,
    ferryman_proxy,
    ferryman_python,
    fetch,
    has_tool,
    log,
    log_estimate,
    make_workdir,
    measure_tree_cpu,
    nginx_argv,
    nginx_proxy_config,
    origin_and_proxies,
    print_header,
    render_config,
    replace_once,
    require_load_tools,
    run_wrk,
    sbin_tool,
    tool_version,
    wait_ready,
    write_raw,
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


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def origin_locations(files: Path) -> str:
    """What the origin adds to the reference: /__stub and /c/ (files with Cache-Control)."""
    return (
        "    location = /__stub { stub_status; }\n"
        f"    location /c/ {{ root {files}; add_header Cache-Control \"max-age=3600\"; }}\n"
    )


def nginx_config(dest: Path, port: int, origin: int, cache_dir: Path | None) -> Path:
    """The reference proxy, plus a proxy_cache in ``cache_dir`` unless it is None."""
    if cache_dir is None:
        return nginx_proxy_config(dest, port, origin)
    zone = (
        f"  proxy_cache_path {cache_dir} levels=1:2 keys_zone=bench:10m max_size=1g "
        "inactive=1h use_temp_path=off;"
    )
    use = "      proxy_cache bench;\n      add_header X-Cache-Status $upstream_cache_status;"
    return nginx_proxy_config(dest, port, origin, zone, use)


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


# --------------------------------------------------------------------------------------------
# Probes and counters
# --------------------------------------------------------------------------------------------


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
        status, headers, got = fetch(port, path)
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
    _, _, text = fetch(port, "/__stub")
    try:
        return int(text.decode().splitlines()[2].split()[2])
    except (IndexError, ValueError) as exc:
        raise BenchError(f"cannot parse origin stub_status: {text!r}") from exc


@dataclass
class Sample(CpuSample):
    origin_requests: int
    bytes_per_resp: float
    p99_us: float
    errors: int


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def disk_available() -> str | None:
    """None if ``ferryman.cache.disk`` imports (in a child, as the proxy will), else why."""
    out = ferryman_python("import ferryman.cache.disk as d; d.DiskStorage")
    if out.returncode == 0:
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {out.returncode}"


def proxy_command(
    args: argparse.Namespace, name: str, d: Path, port: int, origin_port: int
) -> tuple[list[str], dict[str, str] | None]:
    """Variant ``name`` (nginx, HAProxy or ferryman, with or without its cache) configured
    in ``d``: its argv and environment (None: ours)."""
    if name.startswith("nginx"):
        cache_dir = None
        if name == "nginx-cache":
            cache_dir = d / "cache"
            cache_dir.mkdir()
            cache_dir.chmod(0o777)  # the worker runs as nobody when started by root
        return nginx_argv(d, nginx_config(d / "nginx.conf", port, origin_port, cache_dir)), None
    if name == "haproxy-cache":
        conf = haproxy_config(d / "haproxy.cfg", port, origin_port)
        return [sbin_tool("haproxy"), "-f", str(conf), "-db"], None
    cache = {
        "ferryman-memory": "{storage: memory}",
        "ferryman-disk": f'{{storage: disk, path: "{d / "cache"}"}}',
        "ferryman-proxy": None,
    }[name]
    route = f", cache: {cache}" if cache else ""
    return ferryman_proxy(args.ferryman_bin, d, port, origin_port, route)


def measure(
    proxy: Proxy, size: str, body: bytes, origin_port: int, args: argparse.Namespace
) -> Sample:
    path = SIZES[size][0]
    proxy.evidence[size] = warm_and_verify(proxy.name, proxy.port, path, body)
    run_wrk(LOAD_CPU, proxy.port, args.connections, WARMUP_SECONDS, path)
    before_o = stub_requests(origin_port)
    cpu, result, per_resp = measure_tree_cpu(
        proxy.proc.pid, LOAD_CPU, proxy.port, args.connections, args.seconds, path
    )
    after_o = stub_requests(origin_port)
    return Sample(
        **vars(cpu),
        origin_requests=after_o - before_o - 1,  # (the second query counts itself)
        bytes_per_resp=per_resp,
        p99_us=result.p99_us,
        errors=result.error_count,
    )


def run(args: argparse.Namespace) -> int:
    require_load_tools()
    names = [v for v in VARIANTS if v in args.variants]
    notes: list[str] = []
    if "ferryman-disk" in names:
        why = disk_available()
        if why is not None:
            names.remove("ferryman-disk")
            notes.append(f"ferryman-disk skipped: ferryman.cache.disk does not import ({why})")
            log(notes[-1])
    if "haproxy-cache" in names and not has_tool("haproxy"):
        names.remove("haproxy-cache")
        notes.append("haproxy-cache skipped: no haproxy")
        log(notes[-1])
    sizes = [s for s in SIZES if s in args.sizes]
    per = WARMUP_SECONDS + args.seconds + 0.4
    what = f"{len(names)} variants x {len(sizes)} sizes"
    log_estimate(what, len(names) * len(sizes), args.rounds, per)
    started = time.monotonic()
    work, files = make_workdir("ferryman-cachebench-", "c")
    bodies: dict[str, bytes] = {}
    for size, (path, length) in SIZES.items():
        bodies[size] = os.urandom(length)
        (files / path.lstrip("/")).write_bytes(bodies[size])
        (files / path.lstrip("/")).chmod(0o644)
    results: dict[tuple[str, str], list[Sample]] = {}
    with origin_and_proxies(
        work,
        origin_locations(files),
        SIZES["1k"][0],
        names,
        functools.partial(proxy_command, args),
        (PROXY_CPU, LOAD_CPU),
        args.keep_tmp,
    ) as (origin_port, proxies):
        for proxy in proxies.values():
            wait_ready(proxy.proc, proxy.port, 30, expected=None)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                for size in sizes:
                    s = measure(proxies[name], size, bodies[size], origin_port, args)
                    results.setdefault((name, size), []).append(s)
                    flag = "" if name not in CACHED or s.origin_requests == 0 else " !!"
                    log(
                        f"round {rnd + 1} {name:16} {size:>3}: {s.summary()}, origin reqs "
                        f"{s.origin_requests}{flag}, {s.bytes_per_resp:,.0f} B/resp"
                    )
        evidence = {name: dict(p.evidence) for name, p in proxies.items()}
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
    versions = [tool_version(["nginx", "-v"]), tool_version(["haproxy", "-v"]), ferryman_build()]
    print_header("cache.py", versions, args, WARMUP_SECONDS, (PROXY_CPU, LOAD_CPU), elapsed)
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
    write_raw("cache", results, evidence=evidence, notes=notes)
    return 1 if bad else 0


def main() -> int:
    subsets = {"variants": VARIANTS, "sizes": SIZES}
    return bench_main(__doc__, subsets, "keep configs, logs and caches", run)


if __name__ == "__main__":
    sys.exit(main())
