"""The example configs in examples/*.yaml: each passes ``ferryman check``, the quickstart
runs exactly as the README says, and each of the others does what its header comment says
when run (on free ports: the example is copied with its addresses replaced)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import brotli
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from lb_util import Procs, child_pids, get, wait_until  # noqa: E402

from origin import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def example_configs() -> list[Path]:
    """Every examples/*.yaml that is a config (servers lists for `file:` discovery are
    YAML lists, not configs)."""
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if isinstance(yaml.safe_load(path.read_text()), dict):
            out.append(path)
    return out


def ferryman_cli() -> list[str]:
    """The ``ferryman`` command as the README runs it (the installed console script)."""
    script = shutil.which("ferryman")
    return [script] if script else [sys.executable, "-m", "ferryman"]


def test_the_examples_are_there() -> None:
    names = {p.name for p in example_configs()}
    assert names >= {
        "quickstart.yaml", "gateway.yaml", "discovery.yaml", "lb_round_robin.yaml",
        "lb_random.yaml", "lb_hash.yaml", "lb_consistent.yaml", "lb_least_conn.yaml",
        "lb_p2c_ewma.yaml",
    }, names
    assert (EXAMPLES / "servers.yaml").is_file()  # discovery.yaml's servers file


@pytest.mark.parametrize("config", example_configs(), ids=lambda p: p.name)
def test_example_passes_check(config: Path) -> None:
    result = subprocess.run(
        [*ferryman_cli(), "check", "-c", f"examples/{config.name}"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"examples/{config.name}: ok ("), result.stdout


# --------------------------------------------------------------------------------------
# the quickstart, exactly as the README runs it


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (connections in TIME_WAIT left by an
    earlier run do not count: ferryman binds with SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.fixture
def quickstart() -> Iterator[subprocess.Popen[bytes]]:
    busy = [p for p in (8080, 9001, 9002) if port_in_use(p)]
    if busy:
        pytest.skip(f"the quickstart's fixed ports are in use: {busy}")
    proc = subprocess.Popen(
        [*ferryman_cli(), "run", "-c", "examples/quickstart.yaml"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not all(port_in_use(p) for p in (8080, 9001, 9002)):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            assert time.monotonic() < deadline, "the quickstart did not start"
            time.sleep(0.05)
        yield proc
    finally:
        children = child_pids(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


def test_quickstart_as_in_the_readme(quickstart: subprocess.Popen[bytes]) -> None:
    index = (EXAMPLES / "site" / "index.html").read_bytes()
    served = []
    conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=10)
    for _ in range(10):
        status, headers, body = get(8080, "/", conn=conn)
        assert status == 200
        assert body == index
        served.append(headers["x-served-by"])
    conn.close()
    # round robin with one worker: strictly alternating
    assert set(served) == {"origin-9001", "origin-9002"}, served
    assert all(a != b for a, b in zip(served, served[1:], strict=False)), served
    status, _, body = get(8080, "/healthz")
    assert status == 200 and body == b"ok\n"
    status, headers, body = get(8080, "/about/")
    assert status == 200
    assert body == (EXAMPLES / "site" / "about" / "index.html").read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8"
    status, headers, _ = get(8080, "/about")
    assert status == 301 and headers["location"] == "/about/"
    status, headers, _ = get(8080, "/style.css")
    assert status == 200 and headers["content-type"].startswith("text/css")


# --------------------------------------------------------------------------------------
# the other examples, run on free ports


class Example:
    """An example copied to a temporary directory with its 127.0.0.1 ports replaced by free
    ones (``port(9001)`` is the port that replaced 9001), run with ``ferryman run``."""

    def __init__(self, procs: Procs, name: str) -> None:
        self.procs = procs
        text = (EXAMPLES / name).read_text()
        self.ports = {int(p): free_port() for p in re.findall(r"127\.0\.0\.1:(\d+)", text)}
        self.workdir = procs.tmp_path / "ferryman-0"
        self.workdir.mkdir()
        (self.workdir / "site").symlink_to(EXAMPLES / "site")
        servers = EXAMPLES / "servers.yaml"
        self.servers = self.workdir / "servers.yaml"
        self.servers.write_text(self.rewrite(servers.read_text()))
        self.proxy = procs.ferryman(self.rewrite(text), self.port(8080))
        for p in re.findall(r'bind: "127\.0\.0\.1:(\d+)"', text):  # origin listeners too
            port = self.port(int(p))
            wait_until(lambda port=port: port_in_use(port), 5, f"port {port}")

    def rewrite(self, text: str) -> str:
        return re.sub(r"127\.0\.0\.1:(\d+)",
                      lambda m: f"127.0.0.1:{self.ports.get(int(m[1]), int(m[1]))}", text)

    def port(self, original: int) -> int:
        return self.ports[original]

    def get(self, path: str = "/", headers: dict[str, str] | None = None,
            **kw: object) -> tuple[int, dict[str, str], bytes]:
        return get(self.port(8080), path, headers, **kw)  # type: ignore[arg-type]

    def served_by(self, path: str = "/", headers: dict[str, str] | None = None) -> str:
        status, h, _ = self.get(path, headers)
        assert status == 200
        return h["x-served-by"]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    problems = p.close()
    assert not problems, "\n".join(problems)


def test_lb_round_robin_example(procs: Procs) -> None:
    ex = Example(procs, "lb_round_robin.yaml")
    served = [ex.served_by() for _ in range(8)]
    a, b = "origin-9001", "origin-9002"
    assert served == [a, a, b, a] * 2  # smooth weighted round robin, 3:1


def test_lb_random_example(procs: Procs) -> None:
    ex = Example(procs, "lb_random.yaml")
    served = Counter(ex.served_by() for _ in range(120))
    # weights 2:1: 80 expected for 9001; fewer than 9002's count is 4 standard deviations off
    assert served["origin-9001"] > served["origin-9002"] > 0, served


def test_lb_hash_example(procs: Procs) -> None:
    ex = Example(procs, "lb_hash.yaml")
    users = [f"user{i}" for i in range(12)]
    first = {u: ex.served_by(headers={"X-User": u}) for u in users}
    assert {u: ex.served_by(headers={"X-User": u}) for u in users} == first
    assert set(first.values()) == {"origin-9001", "origin-9002"}


def test_lb_consistent_example(procs: Procs) -> None:
    ex = Example(procs, "lb_consistent.yaml")
    sessions = [f"s{i}" for i in range(30)]
    first = {s: ex.served_by(headers={"Cookie": f"session={s}"}) for s in sessions}
    assert {s: ex.served_by(headers={"Cookie": f"session={s}"}) for s in sessions} == first
    assert set(first.values()) == {"origin-9001", "origin-9002", "origin-9003"}


def test_lb_least_conn_example(procs: Procs) -> None:
    ex = Example(procs, "lb_least_conn.yaml")
    # sequential requests: nothing in flight, ties broken by weighted round robin (2:1)
    served = Counter(ex.served_by() for _ in range(30))
    assert served == {"origin-9001": 20, "origin-9002": 10}


def test_lb_p2c_ewma_example(procs: Procs) -> None:
    ex = Example(procs, "lb_p2c_ewma.yaml")
    served = Counter(ex.served_by() for _ in range(60))
    # two random candidates per request: the slowest of three loses every comparison it
    # takes part in, but the other two both get traffic
    assert len(served) >= 2, served


def test_gateway_example(procs: Procs) -> None:
    ex = Example(procs, "gateway.yaml")
    site = EXAMPLES / "site"
    status, headers, body = ex.get("/healthz")
    assert (status, body, headers["cache-control"]) == (200, b"ok\n", "no-store")
    # the API: strip_prefix, header edits
    status, headers, body = ex.get("/v1/about/", {"Host": "api.example.com"})
    assert status == 200 and body == (site / "about" / "index.html").read_bytes()
    assert headers["x-served-by"] in ("backend-9001", "backend-9002")
    assert headers["access-control-allow-origin"] == "*"
    assert "server" not in headers
    status, headers, _ = ex.get("/v1/", {"Host": "eu.api.example.com", "X-Canary": "1"})
    assert status == 200 and headers["x-served-by"] == "backend-9002"
    status, headers, body = ex.get("/v2/", {"Host": "api.example.com"})
    assert status == 404 and headers["content-type"] == "application/json"
    # the app
    status, headers, body = ex.get("/app/")
    assert status == 200 and body == (site / "index.html").read_bytes()
    assert headers["x-frame-options"] == "SAMEORIGIN"
    status, headers, _ = ex.get("/app/x", method="POST", body=b"{}")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    status, _, _ = ex.get("/app/healthz", {"Authorization": "Bearer abc.def"}, method="POST",
                          body=b"{}")
    assert status == 405  # reached the backend (a static site: GET and HEAD only)
    # redirects, the blocked area, static files
    status, headers, _ = ex.get("/blog/2024/hello?ref=x")
    assert status == 301
    assert headers["location"] == "https://blog.example.com/blog/2024/hello?ref=x"
    status, headers, _ = ex.get("/about.html?x=1")
    assert status == 308 and headers["location"] == "/about/?x=1"
    assert ex.get("/%61dmin/")[0] == 403
    status, headers, body = ex.get("/")
    assert status == 200 and body == (site / "index.html").read_bytes()
    assert headers["cache-control"] == "max-age=3600"
    assert headers["x-content-type-options"] == "nosniff"


def test_discovery_example(procs: Procs) -> None:
    ex = Example(procs, "discovery.yaml")
    wait_until(lambda: ex.get()[0] == 200, 5, "the first discovery")
    served = Counter(ex.served_by() for _ in range(30))
    assert set(served) == {"origin-9001", "origin-9002"}, served
    # as the header comment says: add the third server to servers.yaml
    with open(ex.servers, "a") as f:
        f.write(f'- "127.0.0.1:{ex.port(9003)}"\n')
    wait_until(lambda: "origin-9003" in {ex.served_by() for _ in range(6)}, 5,
               "the added server takes traffic")


def test_cache_example(procs: Procs) -> None:
    ex = Example(procs, "cache.yaml")
    page = (EXAMPLES / "site" / "index.html").read_bytes()

    def statuses(n: int) -> list[str]:
        out = []
        for _ in range(n):
            status, headers, body = ex.get("/", {"Connection": "close"})
            assert (status, body) == (200, page)
            out.append(headers["cache-status"])
        return out

    # two workers each keep their own memory cache: each misses once
    before = statuses(40)
    misses = [s for s in before if "fwd=uri-miss" in s]
    assert 1 <= len(misses) <= 2, before
    assert all(s == "ferryman; fwd=uri-miss; fwd-status=200; stored" for s in misses)
    assert all(s.startswith("ferryman; hit; ttl=") for s in before if s not in misses)
    # PURGE reaches both workers' caches (through the purge log): each misses again
    status, headers, body = ex.get("/", method="PURGE")
    assert (status, headers["content-type"]) == (200, "application/json")
    after = statuses(40)
    assert len([s for s in after if "fwd=uri-miss" in s]) == len(misses), (before, after)


def test_limits_example(procs: Procs) -> None:
    ex = Example(procs, "limits.yaml")
    # 10 at once per client address, then 429 (one more may pass if the burst
    # straddles the 10 s window's edge: the sliding window's known slack)
    got = [ex.get("/api/", {"Connection": "close"}) for _ in range(12)]
    statuses = [s for s, _, _ in got]
    assert statuses[:10] == [200] * 10 and statuses[11] == 429, statuses
    assert got[0][2] == b'{"items": ["a", "b", "c"], "note": "from the origin on port 9001"}'
    assert got[0][1]["ratelimit-limit"] == "10"
    refused = got[11][1]
    assert refused["ratelimit-remaining"] == "0" and int(refused["retry-after"]) >= 1
    # the site: compressed for clients that accept it, no RateLimit fields
    status, headers, body = ex.get("/", {"Accept-Encoding": "br"})
    assert (status, headers["content-encoding"]) == (200, "br")
    assert brotli.decompress(body) == (EXAMPLES / "site" / "index.html").read_bytes()
    assert not any(k.startswith("ratelimit") for k in headers)
