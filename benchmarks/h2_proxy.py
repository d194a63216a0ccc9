"""HTTP/2 clients through ferryman, nginx and HAProxy, side by side (issue 6).

    python benchmarks/h2_proxy.py [--requests 200000] [--rounds 3] [--clients 10]
                                  [--streams 10] [--upstream h1|h2c] [--ferryman-bin PATH]

Every proxy takes cleartext HTTP/2 with prior knowledge (nginx: ``listen ... http2``;
HAProxy: ``bind ... proto h2``; ferryman: ``h2c: true``) and proxies to one nginx origin,
as in ``configs/`` (one worker or thread, no access log, upstream keep-alive):

* ``--upstream h1`` (default): over HTTP/1.1 keep-alive (nginx ``proxy_pass``).
* ``--upstream h2c``: over cleartext HTTP/2, the origin listening with ``http2``; nginx
  uses ``grpc_pass`` (its only HTTP/2 upstream), HAProxy ``server ... proto h2``, ferryman
  ``protocol: h2c``.

``h2load -n N -c C -m M`` is the client. The proxy is pinned to core 0, the origin and
h2load to core 1; the proxy order rotates each round. Reported: requests per second, the
proxy's CPU microseconds per request (from /proc), h2load's errors, and ratios to nginx.
Loopback only; every run is bounded by a timeout.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
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
    serving_pid,
    taskset,
    tool_version,
    tree_ticks,
    wait_ready,
)

PROXY_CPU, LOAD_CPU = 0, 1
RUN_TIMEOUT = 300.0


def _edit(dest: Path, text: str, old: str, new: str, what: str) -> str:
    if text.count(old) != 1:
        raise BenchError(f"the reference config {dest.name} changed: cannot {what}")
    return text.replace(old, new)


def nginx_h2_config(dest: Path, port: int, origin: int, upstream: str) -> Path:
    """The reference proxy config with its listener speaking HTTP/2 (prior knowledge),
    and with ``grpc_pass`` (HTTP/2 to the origin) for ``upstream == "h2c"``."""
    render_config(CONFIG_DIR / "proxy-nginx.conf", dest, port, origin)
    text = dest.read_text()
    text = _edit(
        dest, text, f"listen 127.0.0.1:{port} backlog=4096;",
        f"listen 127.0.0.1:{port} http2 backlog=4096;", "add http2",
    )
    if upstream == "h2c":
        text = _edit(
            dest, text, "proxy_pass http://origin;", "grpc_pass grpc://origin;", "use grpc_pass"
        )
    dest.write_text(text)
    return dest


def haproxy_h2_config(dest: Path, port: int, origin: int, upstream: str) -> Path:
    """The reference HAProxy config taking HTTP/2 (and speaking it to the origin for h2c)."""
    render_config(CONFIG_DIR / "proxy-haproxy.cfg", dest, port, origin)
    text = dest.read_text()
    text = _edit(
        dest, text, f"bind 127.0.0.1:{port}\n", f"bind 127.0.0.1:{port} proto h2\n", "add h2"
    )
    if upstream == "h2c":
        line = f"server s1 127.0.0.1:{origin}"
        text = _edit(dest, text, line + "\n", line + " proto h2\n", "add proto h2")
    dest.write_text(text)
    return dest


def origin_config(dest: Path, origin: int, upstream: str) -> Path:
    """The reference origin, listening with ``http2`` for an h2c upstream."""
    render_config(CONFIG_DIR / "origin-nginx.conf", dest, 0, origin)
    if upstream == "h2c":
        text = dest.read_text()
        old = f"listen 127.0.0.1:{origin} reuseport"
        dest.write_text(_edit(dest, text, old, old + " http2", "add http2"))
    return dest


def ferryman_config(dest: Path, port: int, origin: int, upstream: str) -> Path:
    protocol = ", protocol: h2c" if upstream == "h2c" else ""
    dest.write_text(
        "server: {workers: 1, forwarded: {x_forwarded_for: false, x_forwarded_proto: false, "
        "x_forwarded_host: false}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app, h2c: true}}]\n'
        f'upstreams: {{app: {{servers: ["127.0.0.1:{origin}"]{protocol}}}}}\n'
    )
    return dest


def h2load(port: int, requests: int, clients: int, streams: int) -> dict[str, float]:
    argv = taskset(
        LOAD_CPU,
        [
            "h2load",
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-m",
            str(streams),
            f"http://127.0.0.1:{port}/",
        ],
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    text = out.stdout
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        text,
    )
    rate = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", text)
    if out.returncode != 0 or not done or not rate:
        raise BenchError(f"h2load failed ({out.returncode}): {text[-400:]} {out.stderr[-400:]}")
    return {
        "seconds": float(rate.group(1)) / (1000.0 if rate.group(2) == "ms" else 1.0),
        "rps": float(rate.group(3)),
        "succeeded": int(done.group(2)),
        "errors": int(done.group(3)) + int(done.group(4)) + int(done.group(5)),
    }


def wait_ready_h2(proc: Managed, port: int, timeout: float) -> None:
    """Poll with one HTTP/2 request (h2load) until ``proc`` answers it."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited early:\n{proc.log_tail()}")
        out = subprocess.run(
            ["h2load", "-n", "1", "-c", "1", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if "1 succeeded" in out.stdout:
            return
        last = out.stdout[-200:]
        time.sleep(0.2)
    raise BenchError(f"{proc.name} did not answer HTTP/2 on {port}: {last}\n{proc.log_tail()}")


def measure(name: str, proc: Managed, port: int, args: argparse.Namespace) -> dict[str, float]:
    pid, _ = serving_pid(proc.pid)
    h2load(port, min(20000, args.requests), args.clients, args.streams)  # warm-up
    before = tree_ticks(pid)
    result = h2load(port, args.requests, args.clients, args.streams)
    used = (tree_ticks(pid) - before) / CLK_TCK
    result["cpu_us"] = used * 1e6 / max(1, result["succeeded"])
    log(
        f"{name}: {result['rps']:,.0f} req/s, {result['cpu_us']:.1f} us CPU/req, "
        f"{result['errors']:.0f} errors"
    )
    return result


def run(args: argparse.Namespace) -> int:
    for tool in ("nginx", "haproxy", "h2load", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise BenchError(
                f"missing {tool}: apt-get install -y nginx haproxy nghttp2-client util-linux"
            )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    upstream = args.upstream
    work = Path(tempfile.mkdtemp(prefix="ferryman-h2bench-"))
    work.chmod(0o711)
    origin_port, nginx_port, haproxy_port, ferryman_port = free_ports(4)
    origin_config(work / "origin.conf", origin_port, upstream)
    (work / "o").mkdir()
    origin = Managed(
        "origin",
        taskset(LOAD_CPU, [nginx, "-p", str(work / "o"), "-c", str(work / "origin.conf")]),
        work,
    )
    (work / "n").mkdir()
    nginx_proc = Managed(
        "nginx",
        taskset(
            PROXY_CPU,
            [
                nginx,
                "-p",
                str(work / "n"),
                "-c",
                str(nginx_h2_config(work / "nginx.conf", nginx_port, origin_port, upstream)),
            ],
        ),
        work,
    )
    haproxy_conf = haproxy_h2_config(work / "haproxy.cfg", haproxy_port, origin_port, upstream)
    haproxy_proc = Managed(
        "haproxy", taskset(PROXY_CPU, [haproxy, "-f", str(haproxy_conf), "-db"]), work
    )
    ferryman_yaml = ferryman_config(work / "ferryman.yaml", ferryman_port, origin_port, upstream)
    argv, env = ferryman_command(args.ferryman_bin, ["run", "-c", str(ferryman_yaml)])
    ferry = Managed("ferryman", taskset(PROXY_CPU, argv), work, env=env)
    time.sleep(1.0)
    if upstream == "h2c":
        wait_ready_h2(origin, origin_port, 10)
    else:
        wait_ready(origin, origin_port, 10)
    wait_ready_h2(nginx_proc, nginx_port, 10)
    wait_ready_h2(haproxy_proc, haproxy_port, 10)
    wait_ready_h2(ferry, ferryman_port, 30)
    results: dict[str, list[dict[str, float]]] = {"nginx": [], "haproxy": [], "ferryman": []}
    order = [
        ("nginx", nginx_proc, nginx_port),
        ("haproxy", haproxy_proc, haproxy_port),
        ("ferryman", ferry, ferryman_port),
    ]
    for rnd in range(args.rounds):
        shift = rnd % len(order)
        for name, proc, port in order[shift:] + order[:shift]:
            results[name].append(measure(name, proc, port, args))
    for proc in (ferry, haproxy_proc, nginx_proc, origin):
        proc.stop()
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for name, rs in results.items()
    }
    print(f"Command: `python benchmarks/h2_proxy.py {' '.join(sys.argv[1:])}`  ")
    versions = f"{tool_version(['nginx', '-v'])}; {tool_version(['h2load', '--version'])}"
    versions += f"; {tool_version(['haproxy', '-v'])}"
    print(
        f"h2load -n {args.requests} -c {args.clients} -m {args.streams}; upstream "
        f"{'HTTP/2 (h2c)' if upstream == 'h2c' else 'HTTP/1.1'}; "
        f"{args.rounds} rounds (medians); {versions}"
    )
    print()
    print("| proxy | req/s | CPU µs/req | errors | req/s ratio | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    base = med["nginx"]
    for name in ("nginx", "haproxy", "ferryman"):
        m = med[name]
        print(
            f"| {name} | {m['rps']:,.0f} | {m['cpu_us']:.1f} | {m['errors']:.0f} | "
            f"{m['rps'] / base['rps']:.2f}× | {m['cpu_us'] / base['cpu_us']:.2f}× |"
        )
    return 0 if all(r["errors"] == 0 for rs in results.values() for r in rs) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--upstream", choices=("h1", "h2c"), default="h1")
    p.add_argument("--ferryman-bin", default=None)
    args = p.parse_args()
    return guarded_main(lambda: run(args), "stopped nginx, haproxy and ferryman")


if __name__ == "__main__":
    sys.exit(main())
