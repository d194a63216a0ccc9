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
import functools
import gzip
import json
import random
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import brotli
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    BenchError,
    CpuSample,
    Proxy,
    bench_main,
    ferryman_build,
    ferryman_proxy,
    fetch,
    log,
    log_estimate,
    make_workdir,
    measure_tree_cpu,
    nginx_argv,
    nginx_proxy_config,
    origin_and_proxies,
    print_header,
    require_load_tools,
    run_wrk,
    tool_version,
    wait_ready,
    write_raw,
)

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


def origin_locations(files: Path) -> str:
    """What the origin adds to the reference: /d/ (files, with their media types; no
    compression)."""
    return (
        f"    location /d/ {{ root {files}; "
        "types { application/json json; application/octet-stream bin; } }\n"
    )


def nginx_config(dest: Path, port: int, origin: int, variant: str) -> Path:
    """The reference proxy, plus the limits (``nginx-limit``) or gzip (``nginx-gzip``)."""
    extras = {
        "nginx-proxy": ("", ""),
        "nginx-limit": (
            "  limit_req_zone $binary_remote_addr zone=r:10m rate=1000000r/s;\n"
            "  limit_conn_zone $binary_remote_addr zone=c:10m;",
            "      limit_req zone=r burst=1000000 nodelay;\n"
            f"      limit_conn c {NGINX_CONN_LIMIT};",
        ),
        "nginx-gzip": (
            "  gzip on; gzip_comp_level 5; gzip_types application/json; "
            "gzip_min_length 1024; gzip_proxied any;",
            "",
        ),
    }
    if variant not in extras:
        raise BenchError(f"no nginx config for {variant}")
    return nginx_proxy_config(dest, port, origin, *extras[variant])


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def accept_encoding(accept: str | None) -> dict[str, str]:
    """The request header that asks for ``accept`` (none for None)."""
    return {} if accept is None else {"Accept-Encoding": accept}


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
    status, headers, got = fetch(port, sc.path, accept_encoding(accept))
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


@dataclass
class Sample(CpuSample):
    bytes_per_resp: float
    body_bytes: int
    p99_us: float
    non_2xx: int
    socket_errors: int


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def proxy_command(
    args: argparse.Namespace, name: str, d: Path, port: int, origin_port: int
) -> tuple[list[str], dict[str, str] | None]:
    """Variant ``name`` (nginx or ferryman, with a limit, a compression or neither)
    configured in ``d``: its argv and environment (None: ours)."""
    if name.startswith("nginx"):
        return nginx_argv(d, nginx_config(d / "nginx.conf", port, origin_port, name)), None
    return ferryman_proxy(args.ferryman_bin, d, port, origin_port, FERRYMAN_ROUTES[name])


def measure(
    proxy: Proxy, scenario: str, body: bytes, args: argparse.Namespace
) -> Sample:
    sc = SCENARIOS[scenario]
    accept = sc.variants[proxy.name][0]
    size, proxy.evidence[scenario] = verify(proxy.name, proxy.port, sc, body)
    header = [f"Accept-Encoding: {accept}"] if accept else []
    run_wrk(LOAD_CPU, proxy.port, args.connections, WARMUP_SECONDS, sc.path, header)
    cpu, result, per_resp = measure_tree_cpu(
        proxy.proc.pid, LOAD_CPU, proxy.port, args.connections, args.seconds, sc.path, header
    )
    if not proxy.proc.alive():
        raise BenchError(f"{proxy.name} exited during the run:\n{proxy.proc.log_tail()}")
    return Sample(
        **vars(cpu),
        bytes_per_resp=per_resp,
        body_bytes=size,
        p99_us=result.p99_us,
        non_2xx=result.non_2xx_3xx,
        socket_errors=sum(result.socket_errors.values()),
    )


def run(args: argparse.Namespace) -> int:
    require_load_tools()
    scenarios = [s for s in SCENARIOS if s in args.scenarios]
    cells = [(s, v) for s in scenarios for v in SCENARIOS[s].variants]
    names = list(dict.fromkeys(v for _, v in cells))
    per = WARMUP_SECONDS + args.seconds + 0.5
    log_estimate(f"{len(names)} proxies, {len(cells)} cells", len(cells), args.rounds, per)
    started = time.monotonic()
    work, files = make_workdir("ferryman-limitbench-", "d")
    bodies = {
        "limit": random.Random(1).randbytes(SMALL_SIZE),
        "gzip": realistic_json(JSON_TARGET),
    }
    for scenario, data in bodies.items():
        f = files / SCENARIOS[scenario].path.lstrip("/")
        f.write_bytes(data)
        f.chmod(0o644)
    json.loads(bodies["gzip"])  # it is JSON
    results: dict[tuple[str, str], list[Sample]] = {}
    failed: dict[tuple[str, str], str] = {}
    with origin_and_proxies(
        work,
        origin_locations(files),
        SMALL_PATH,
        names,
        functools.partial(proxy_command, args),
        (PROXY_CPU, LOAD_CPU),
        args.keep_tmp,
    ) as (origin_port, proxies):
        status, headers, got = fetch(origin_port, JSON_PATH, accept_encoding("gzip"))
        if status != 200 or got != bodies["gzip"] or "content-encoding" in headers:
            raise BenchError(f"origin {JSON_PATH}: HTTP {status}, {headers}")
        if headers.get("content-type") != "application/json":
            raise BenchError(f"origin {JSON_PATH}: Content-Type {headers.get('content-type')}")
        for name, proxy in proxies.items():
            try:
                wait_ready(proxy.proc, proxy.port, 30, path=SMALL_PATH, expected=None)
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
                    f"round {rnd + 1} {scenario:5} {name:15}: {s.summary()}, body "
                    f"{s.body_bytes:,} B, {s.bytes_per_resp:,.0f} B/resp, non-2xx "
                    f"{s.non_2xx}, socket errors {s.socket_errors}{flag}"
                )
        evidence = {name: dict(p.evidence) for name, p in proxies.items()}
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
    versions = [tool_version(["nginx", "-v"]), ferryman_build()]
    cpus = (PROXY_CPU, LOAD_CPU)
    print_header("limits_compression.py", versions, args, WARMUP_SECONDS, cpus, elapsed)
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
    failed_by_name = {f"{s}/{n}": r for (s, n), r in failed.items()}
    write_raw("limits_compression", results, failed=failed_by_name, evidence=evidence, sizes=sizes)
    return 1 if bad else 0


def main() -> int:
    return bench_main(__doc__, {"scenarios": SCENARIOS}, "keep configs and logs", run)


if __name__ == "__main__":
    sys.exit(main())
