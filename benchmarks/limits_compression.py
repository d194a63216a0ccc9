"""What a rate/concurrency limit and response compression cost per request: ferryman
against nginx (issue 9).

    python benchmarks/limits_compression.py [--seconds 5] [--rounds 3] [--connections 50]
                                            [--scenarios limit,gzip] [--ferryman-bin PATH]
                                            [--keep-tmp]

One nginx origin (``configs/origin-nginx.conf`` plus ``/d/``: a 1 KiB binary file and a
64 KiB JSON file served as ``application/json``, never compressed by the origin) and one
proxy per variant, all started at once, each with one worker and no access log, pinned to
core 0. ferryman runs like the suite's: ``forwarded`` headers off, ``workers: 1``,
everything else default.

``limit``: a keep-alive GET of the 1 KiB file, through a per-client-IP rate and
concurrency limit that every request passes:

* ``nginx-proxy``: the reference ``proxy-nginx.conf``;
* ``nginx-limit``: the same plus ``limit_req_zone``/``limit_conn_zone`` on
  ``$binary_remote_addr`` (rate 1000000r/s), ``limit_req zone=r burst=1000000 nodelay``
  and ``limit_conn c 65535`` (nginx's largest: it refuses 100000 with "connection limit
  must be less 65536"; either never binds at 50 connections);
* ``ferryman-proxy``: a route ``{upstream: origin}``;
* ``ferryman-limit``: the same route with
  ``limit: {rate: 100000000/s, concurrency: 100000}`` (key ``client_ip``; ``RateLimit-*``
  fields on admitted responses are off by default, as nginx sends none).

Ratios are to ``nginx-proxy``; the table is followed by each limit's added cost (limit
minus proxy, µs/req; per-round differences in brackets).

``gzip``: a keep-alive GET of the 64 KiB JSON with ``Accept-Encoding: gzip``:

* ``nginx-gzip``: the reference config plus ``gzip on; gzip_comp_level 5;
  gzip_types application/json; gzip_min_length 1024; gzip_proxied any;``
* ``ferryman-gzip``: a route with ``compress: {algorithms: [gzip]}`` (level 5, ferryman's
  default);
* ``ferryman-br`` / ``ferryman-zstd``: ``compress: {algorithms: [br]}`` / ``[zstd]``,
  requested with ``Accept-Encoding: br`` / ``zstd`` (brotli quality 4, zstd level 3, the
  defaults): a different codec, so their ratio to ``nginx-gzip`` is marked as such;
* ``nginx-proxy`` / ``ferryman-proxy`` (the processes of ``limit``): the same request, sent
  uncompressed, for what the proxying alone costs.

Ratios are to ``nginx-gzip``. Before each measurement the script GETs the URL once through
the variant, checks ``Content-Encoding`` (the expected coding, or none), decodes the body
(``gzip``, ``brotli``, ``zstandard``) and compares it byte for byte with the origin's file;
the compressed body size is in the table. Then ``wrk -t1 -c<N>`` (with the
``Accept-Encoding`` header where the scenario sends one), pinned to core 1 with the origin:
1 s of warm-up, then the measured run.

CPU is utime+stime of the variant's whole process tree (nginx master and worker, ferryman
supervisor and worker) from ``/proc``, over the measured run, divided by wrk's request
count. The (scenario, variant) cells run in turn, the order rotated each round; each cell
is the median over the rounds. A variant that does not start, or a cell that fails its
check or its wrk run, is reported as failed with the reason and the rest still run.
Loopback only; every subprocess has a timeout.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    CLK_TCK,
    CONFIG_DIR,
    OUT_DIR,
    WRK_EXTRA_TIMEOUT,
    BenchError,
    Managed,
    WrkResult,
    ferryman_command,
    free_ports,
    guarded_main,
    log,
    parse_wrk,
    render_config,
    taskset,
    tool_version,
)

from cache import core_ticks, ferryman_build, replace_once, tree_split  # noqa: E402

PROXY_CPU, LOAD_CPU = 0, 1
WARMUP_SECONDS = 1
SMALL_PATH, SMALL_SIZE = "/d/1k.bin", 1024
JSON_PATH, JSON_TARGET = "/d/data.json", 65536
#: nginx 1.22 refuses ``limit_conn`` 100000 ("connection limit must be less 65536")
NGINX_CONN_LIMIT = 65535


@dataclass(frozen=True)
class Scenario:
    base: str
    path: str
    #: variant -> (Accept-Encoding sent, Content-Encoding expected); (None, None): plain
    variants: dict[str, tuple[str | None, str | None]]
    #: variants whose ratio to the base compares different codecs
    other_codec: frozenset[str] = frozenset()


SCENARIOS: dict[str, Scenario] = {
    "limit": Scenario(
        base="nginx-proxy",
        path=SMALL_PATH,
        variants={
            "nginx-proxy": (None, None),
            "nginx-limit": (None, None),
            "ferryman-proxy": (None, None),
            "ferryman-limit": (None, None),
        },
    ),
    "gzip": Scenario(
        base="nginx-gzip",
        path=JSON_PATH,
        variants={
            "nginx-gzip": ("gzip", "gzip"),
            "ferryman-gzip": ("gzip", "gzip"),
            "ferryman-br": ("br", "br"),
            "ferryman-zstd": ("zstd", "zstd"),
            "nginx-proxy": ("gzip", None),
            "ferryman-proxy": ("gzip", None),
        },
        other_codec=frozenset(("ferryman-br", "ferryman-zstd")),
    ),
}
#: the pairs whose difference is the limit's added cost
LIMIT_PAIRS = (("nginx-limit", "nginx-proxy"), ("ferryman-limit", "ferryman-proxy"))
#: ferryman variant -> the route's extra keys (YAML flow mapping entries)
FERRYMAN_ROUTES: dict[str, str] = {
    "ferryman-proxy": "",
    "ferryman-limit": ', limit: {rate: "100000000/s", concurrency: 100000}',
    "ferryman-gzip": ", compress: {algorithms: [gzip]}",
    "ferryman-br": ", compress: {algorithms: [br]}",
    "ferryman-zstd": ", compress: {algorithms: [zstd]}",
}


# --------------------------------------------------------------------------------------------
# Files and configs
# --------------------------------------------------------------------------------------------


def realistic_json(target: int, seed: int = 9) -> bytes:
    """A JSON document of just under ``target`` bytes, shaped like an API's list response
    (records with ids, names, e-mails, timestamps, prices, tags, nested addresses).
    Deterministic, so the compressed sizes are comparable between runs."""
    rng = random.Random(seed)
    first = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances",
             "Edsger", "Radia", "Donald", "Sophie", "Tim", "Hedy", "John", "Katherine", "Guido"]
    last = ["Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Ritchie", "Liskov",
            "Thompson", "Allen", "Dijkstra", "Perlman", "Knuth", "Wilson", "Berners-Lee",
            "Lamarr", "McCarthy", "Johnson", "van Rossum"]
    cities = [("Berlin", "DE"), ("Lyon", "FR"), ("Porto", "PT"), ("Austin", "US"),
              ("Osaka", "JP"), ("Leeds", "GB"), ("Turin", "IT"), ("Ghent", "BE")]
    tags = ["priority", "gift", "wholesale", "returning", "newsletter", "b2b", "eu", "promo",
            "backorder", "fragile"]
    statuses = ["pending", "paid", "shipped", "delivered", "refunded"]
    items: list[dict[str, object]] = []
    doc: dict[str, object] = {"object": "list", "page": 1, "per_page": 0, "has_more": True,
                              "data": items}

    def encoded() -> bytes:
        doc["per_page"] = len(items)
        return json.dumps(doc, indent=1).encode()

    out = encoded()
    while True:
        f, la = rng.choice(first), rng.choice(last)
        city, country = rng.choice(cities)
        oid = 100000 + len(items) * 7 + rng.randrange(7)
        items.append({
            "id": f"ord_{oid:08d}",
            "created_at": f"2026-{rng.randint(1, 11):02d}-{rng.randint(1, 28):02d}T"
                          f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                          f"{rng.randint(0, 59):02d}Z",
            "status": rng.choice(statuses),
            "customer": {
                "id": rng.randint(1, 99999),
                "name": f"{f} {la}",
                "email": f"{f.lower()}.{la.lower().replace(' ', '')}@example.com",
                "address": {"city": city, "country": country,
                            "postcode": f"{rng.randint(1000, 99999)}"},
            },
            "lines": [
                {"sku": f"SKU-{rng.randint(1, 4000):05d}", "qty": rng.randint(1, 5),
                 "unit_price": round(rng.uniform(1, 250), 2)}
                for _ in range(rng.randint(1, 3))
            ],
            "total": round(rng.uniform(5, 900), 2),
            "currency": "EUR" if country != "US" else "USD",
            "tags": rng.sample(tags, rng.randint(0, 3)),
            "paid": rng.random() < 0.8,
        })
        candidate = encoded()
        if len(candidate) > target:
            items.pop()
            return out
        out = candidate


def origin_config(dest: Path, port: int, files: Path) -> Path:
    """The reference origin plus /d/ (files, with their media types; no compression)."""
    render_config(CONFIG_DIR / "origin-nginx.conf", dest, 0, port)
    extra = (
        f"    location /d/ {{ root {files}; "
        "types { application/json json; application/octet-stream bin; } }\n"
        "    location / {"
    )
    dest.write_text(replace_once(dest.read_text(), "    location / {", extra, "origin"))
    return dest


def nginx_config(dest: Path, port: int, origin: int, variant: str) -> Path:
    render_config(CONFIG_DIR / "proxy-nginx.conf", dest, port, origin)
    t = dest.read_text()
    if variant == "nginx-limit":
        t = replace_once(
            t,
            "  access_log off;",
            "  access_log off;\n"
            "  limit_req_zone $binary_remote_addr zone=r:10m rate=1000000r/s;\n"
            "  limit_conn_zone $binary_remote_addr zone=c:10m;",
            "nginx",
        )
        t = replace_once(
            t,
            'proxy_set_header Connection "";',
            'proxy_set_header Connection "";\n'
            "      limit_req zone=r burst=1000000 nodelay;\n"
            f"      limit_conn c {NGINX_CONN_LIMIT};",
            "nginx",
        )
    elif variant == "nginx-gzip":
        t = replace_once(
            t,
            "  access_log off;",
            "  access_log off;\n"
            "  gzip on; gzip_comp_level 5; gzip_types application/json; "
            "gzip_min_length 1024; gzip_proxied any;",
            "nginx",
        )
    elif variant != "nginx-proxy":
        raise BenchError(f"no nginx config for {variant}")
    dest.write_text(t)
    return dest


def ferryman_config(dest: Path, port: int, origin: int, extra: str) -> Path:
    dest.write_text(
        "server:\n"
        "  workers: 1\n"
        "  forwarded: {x_forwarded_for: false, x_forwarded_proto: false, "
        "x_forwarded_host: false}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        f"    routes: [{{upstream: origin{extra}}}]\n"
        "upstreams:\n"
        "  origin:\n"
        f'    servers: ["127.0.0.1:{origin}"]\n'
    )
    return dest


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def get(port: int, path: str, accept: str | None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Host": "bench"}
    if accept is not None:
        headers["Accept-Encoding"] = accept
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"GET {path} on port {port}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def decode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return bytes(brotli.decompress(data))
    if coding == "zstd":
        d = zstandard.ZstdDecompressor().decompressobj()
        return d.decompress(data) + d.flush()
    raise BenchError(f"cannot decode {coding!r}")


def verify(name: str, port: int, sc: Scenario, body: bytes) -> tuple[int, str]:
    """One GET through ``name``: (the body's size on the wire, evidence for the report)."""
    accept, expected = sc.variants[name]
    status, headers, got = get(port, sc.path, accept)
    coding = headers.get("content-encoding")
    where = f"{name} {sc.path} (Accept-Encoding: {accept or '-'})"
    if status != 200:
        raise BenchError(f"{where}: HTTP {status}, {got[:120]!r}")
    if coding != expected:
        raise BenchError(f"{where}: Content-Encoding {coding!r}, expected {expected!r}")
    try:
        plain = decode(coding, got) if coding else got
    except (OSError, EOFError, zlib.error, brotli.error, zstandard.ZstdError) as exc:
        raise BenchError(f"{where}: {coding} body does not decode: {exc}") from exc
    if plain != body:
        raise BenchError(
            f"{where}: decoded body differs from the origin's ({len(plain)} vs {len(body)} B)"
        )
    evidence = f"Content-Encoding: {coding}" if coding else "no Content-Encoding"
    if "ratelimit-policy" in headers:
        evidence += f", RateLimit-Policy: {headers['ratelimit-policy']}"
    return len(got), evidence


def run_wrk(
    port: int, path: str, accept: str | None, connections: int, seconds: int
) -> tuple[WrkResult, int]:
    """wrk pinned to the load core: (parsed result, bytes read)."""
    header = ["-H", f"Accept-Encoding: {accept}"] if accept else []
    argv = taskset(
        LOAD_CPU,
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *header,
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
    bytes_per_resp: float
    body_bytes: int
    p99_us: float
    non_2xx: int
    socket_errors: int


@dataclass
class Proxy:
    name: str
    proc: Managed
    port: int
    evidence: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def start_proxies(
    args: argparse.Namespace, work: Path, origin_port: int, names: list[str]
) -> dict[str, Proxy]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ports = free_ports(len(names))
    proxies: dict[str, Proxy] = {}
    for name, port in zip(names, ports, strict=True):
        d = work / name
        d.mkdir(mode=0o755)
        env = None
        if name.startswith("nginx"):
            conf = nginx_config(d / "nginx.conf", port, origin_port, name)
            argv = [nginx, "-p", f"{d}/", "-c", str(conf), "-e", "stderr"]
        else:
            conf = ferryman_config(d / "ferryman.yaml", port, origin_port, FERRYMAN_ROUTES[name])
            argv, env = ferryman_command(args.ferryman_bin, ["run", "-c", str(conf)])
        proxies[name] = Proxy(name, Managed(name, taskset(PROXY_CPU, argv), work, env=env), port)
    return proxies


def wait_up(proxy: Proxy, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proxy.proc.alive():
            raise BenchError(
                f"{proxy.name} exited with code {proxy.proc.proc.returncode}:\n"
                f"{proxy.proc.log_tail()}"
            )
        try:
            status, _, _ = get(proxy.port, path, None)
            if status == 200:
                return
            last = f"HTTP {status}"
        except BenchError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{proxy.name} not answering ({last}):\n{proxy.proc.log_tail()}")


def measure(
    proxy: Proxy, scenario: str, body: bytes, args: argparse.Namespace
) -> Sample:
    sc = SCENARIOS[scenario]
    accept = sc.variants[proxy.name][0]
    size, proxy.evidence[scenario] = verify(proxy.name, proxy.port, sc, body)
    run_wrk(proxy.port, sc.path, accept, args.connections, WARMUP_SECONDS)
    u0, s0 = tree_split(proxy.proc.pid)
    c0 = core_ticks(LOAD_CPU)
    t0 = time.monotonic()
    result, read = run_wrk(proxy.port, sc.path, accept, args.connections, args.seconds)
    wall = time.monotonic() - t0
    u1, s1 = tree_split(proxy.proc.pid)
    c1 = core_ticks(LOAD_CPU)
    if not proxy.proc.alive():
        raise BenchError(f"{proxy.name} exited during the run:\n{proxy.proc.log_tail()}")
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
        bytes_per_resp=read / n,
        body_bytes=size,
        p99_us=result.p99_us,
        non_2xx=result.non_2xx_3xx,
        socket_errors=sum(result.socket_errors.values()),
    )


def run(args: argparse.Namespace) -> int:
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise BenchError(f"missing {tool}: apt-get install -y nginx wrk util-linux")
    scenarios = [s for s in SCENARIOS if s in args.scenarios]
    cells = [(s, v) for s in scenarios for v in SCENARIOS[s].variants]
    names = list(dict.fromkeys(v for _, v in cells))
    per = WARMUP_SECONDS + args.seconds + 0.5
    log(
        f"{len(names)} proxies, {len(cells)} cells x {args.rounds} rounds x ~{per:.1f} s: "
        f"about {len(cells) * args.rounds * per / 60:.1f} min"
    )
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ferryman-limitbench-"))
    work.chmod(0o711)
    files = work / "files"
    (files / "d").mkdir(parents=True)
    files.chmod(0o755)
    (files / "d").chmod(0o755)
    bodies = {
        "limit": random.Random(1).randbytes(SMALL_SIZE),
        "gzip": realistic_json(JSON_TARGET),
    }
    for scenario, data in bodies.items():
        f = files / SCENARIOS[scenario].path.lstrip("/")
        f.write_bytes(data)
        f.chmod(0o644)
    json.loads(bodies["gzip"])  # it is JSON
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
    failed: dict[tuple[str, str], str] = {}
    proxies: dict[str, Proxy] = {}
    try:
        os.sched_setaffinity(0, {LOAD_CPU})
        proxies = start_proxies(args, work, origin_port, names)
        wait_up(Proxy("origin", origin, origin_port), SMALL_PATH, 10)
        status, headers, got = get(origin_port, JSON_PATH, "gzip")
        if status != 200 or got != bodies["gzip"] or "content-encoding" in headers:
            raise BenchError(f"origin {JSON_PATH}: HTTP {status}, {headers}")
        if headers.get("content-type") != "application/json":
            raise BenchError(f"origin {JSON_PATH}: Content-Type {headers.get('content-type')}")
        for name, proxy in proxies.items():
            try:
                wait_up(proxy, SMALL_PATH, 30)
            except BenchError as exc:
                log(f"{name} did not start: {exc}")
                for cell in cells:
                    if cell[1] == name:
                        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
                        failed[cell] = "did not start: " + " / ".join(lines[:1] + lines[-1:])
        for rnd in range(args.rounds):
            k = rnd * len(cells) // max(1, args.rounds)
            for scenario, name in cells[k:] + cells[:k]:
                if (scenario, name) in failed:
                    continue
                try:
                    s = measure(proxies[name], scenario, bodies[scenario], args)
                except BenchError as exc:
                    failed[(scenario, name)] = f"round {rnd + 1}: {exc}"
                    log(f"round {rnd + 1} {scenario} {name} FAILED: {exc}")
                    continue
                results.setdefault((scenario, name), []).append(s)
                flag = " !!" if s.non_2xx or s.socket_errors else ""
                log(
                    f"round {rnd + 1} {scenario:5} {name:15}: {s.rps:9,.0f} req/s "
                    f"{s.cpu_us:6.2f} us CPU/req (user {s.user_us:.2f}, sys "
                    f"{s.sys_us:.2f}), busy {s.busy:.0%}/{s.load_busy:.0%}, body "
                    f"{s.body_bytes:,} B, {s.bytes_per_resp:,.0f} B/resp, non-2xx "
                    f"{s.non_2xx}, socket errors {s.socket_errors}{flag}"
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
    sizes = {s: len(b) for s, b in bodies.items()}
    return report(args, cells, results, failed, evidence, sizes, elapsed)


def report(
    args: argparse.Namespace,
    cells: list[tuple[str, str]],
    results: dict[tuple[str, str], list[Sample]],
    failed: dict[tuple[str, str], str],
    evidence: dict[str, dict[str, str]],
    sizes: dict[str, int],
    elapsed: float,
) -> int:
    def med(cell: tuple[str, str], attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in results[cell])

    bad = len(failed)
    command = " ".join(["python benchmarks/limits_compression.py", *sys.argv[1:]])
    print(f"Command: `{command}`  ")
    print(
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{tool_version(['nginx', '-v'])}; {ferryman_build()}  "
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
        "| scenario | variant | Accept-Encoding → Content-Encoding | body B | req/s | "
        "CPU µs/req | user / sys µs | CPU vs base | req/s vs base | busy proxy / load | "
        "B/resp | non-2xx / socket errors |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cell in cells:
        scenario, name = cell
        sc = SCENARIOS[scenario]
        accept, expected = sc.variants[name]
        codings = f"{accept or '–'} → {expected or 'none'}"
        base = (scenario, sc.base)
        if cell not in results:
            reason = failed.get(cell, "no result").replace("\n", " ").replace("|", "/")
            print(f"| {scenario} | {name} | {codings} | | **failed: {reason[:300]}** "
                  "| | | | | | | |")
            continue
        rs = results[cell]
        cpu, rps = med(cell, "cpu_us"), med(cell, "rps")
        lo, hi = min(s.cpu_us for s in rs), max(s.cpu_us for s in rs)
        if base in results:
            r_cpu = f"{cpu / med(base, 'cpu_us'):.2f}×"
            r_rps = f"{rps / med(base, 'rps'):.2f}×"
            if name in sc.other_codec:
                r_cpu += " (different codec)"
        else:
            r_cpu = r_rps = "n/a"
        non2xx = sum(s.non_2xx for s in rs)
        sock = sum(s.socket_errors for s in rs)
        errs = f"{non2xx} / {sock}"
        if non2xx or sock:
            bad += 1
            errs = f"**!! {errs}**"
        note = "" if cell not in failed else f" (then failed: {failed[cell][:120]})"
        body = statistics.median(s.body_bytes for s in rs)
        print(
            f"| {scenario} | {name} | {codings} | {body:,.0f} | {rps:,.0f} | "
            f"{cpu:.2f} ({lo:.2f}–{hi:.2f}){note} | "
            f"{med(cell, 'user_us'):.2f} / {med(cell, 'sys_us'):.2f} | {r_cpu} | {r_rps} | "
            f"{med(cell, 'busy'):.0%} / {med(cell, 'load_busy'):.0%} | "
            f"{med(cell, 'bytes_per_resp'):,.0f} | {errs} |"
        )
    print()
    if "limit" in {s for s, _ in cells}:
        parts = []
        for limited, plain in LIMIT_PAIRS:
            a, b = ("limit", limited), ("limit", plain)
            if a in results and b in results:
                diffs = [x.cpu_us - y.cpu_us for x, y in zip(results[a], results[b], strict=False)]
                added = med(a, "cpu_us") - med(b, "cpu_us")
                parts.append(
                    f"{limited} {added:+.2f} µs/req ({added / med(b, 'cpu_us'):+.0%}; per round "
                    + ", ".join(f"{d:+.2f}" for d in diffs)
                    + ")"
                )
            else:
                parts.append(f"{limited}: n/a (a cell failed)")
        print("Added cost of the limit (limit minus proxy, CPU): " + "; ".join(parts) + ".")
        print()
    checks = []
    for scenario in dict.fromkeys(s for s, _ in cells):
        got = [
            f"{name} `{evidence[name][scenario]}`"
            for s, name in cells
            if s == scenario and scenario in evidence.get(name, {})
        ]
        checks.append(f"{scenario} ({sizes[scenario]:,} B origin body): " + "; ".join(got))
    print(
        "Checked before each measurement (status 200, Content-Encoding, decoded body equal to "
        "the origin's): " + ". ".join(checks) + ". body B: the response body as sent "
        "(compressed size); B/resp: wrk's bytes read per response (head and chunk framing "
        "included)."
    )
    for cell, reason in failed.items():
        print(f"\n**{cell[0]} / {cell[1]} failed:** {reason}")
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"limits_compression-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "argv": sys.argv,
                "results": {f"{s}/{n}": [vars(x) for x in v] for (s, n), v in results.items()},
                "failed": {f"{s}/{n}": r for (s, n), r in failed.items()},
                "evidence": evidence,
                "sizes": sizes,
            },
            indent=1,
        )
    )
    log(f"raw results: {out}")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5, help="measured wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, rotated (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument(
        "--scenarios",
        type=lambda s: s.split(","),
        default=list(SCENARIOS),
        help="subset of " + ",".join(SCENARIOS),
    )
    p.add_argument("--ferryman-bin", default=None)
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    return guarded_main(lambda: run(args), "stopped the origin and every proxy")


if __name__ == "__main__":
    sys.exit(main())
