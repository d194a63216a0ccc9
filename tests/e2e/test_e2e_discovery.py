"""End to end: service discovery under ``ferryman run`` — a servers file rewritten while
traffic flows, DNS A records changing (a real UDP DNS server), and a Python discovery
class named in the config. Membership changes must reach the workers within a bounded
time, let requests in flight finish, and keep the pooled connections of servers that stay.
"""

from __future__ import annotations

import http.client
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from lb_util import OriginProcess, Procs, get, wait_until

from origin import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lb"))
from dns_server import DnsServer  # noqa: E402

#: Bound on the time a membership change takes to reach the workers: the discovery's own
#: period (file: polled every second; DNS: TTL 1 s; the Python class below: 0.2 s), the
#: board poll (0.1 s), plus slack for a loaded machine.
CHANGE_TIMEOUT = 5.0


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    problems = p.close()
    assert not problems, "\n".join(problems)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def servers_list(*origins: OriginProcess) -> str:
    return "".join(f'- "{o.address}"\n' for o in origins) or "[]\n"


def config(port: int, source: str, *, workers: int = 1) -> str:
    return (
        f"server: {{workers: {workers}, grace_period: 5s}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f"upstreams:\n"
        f"  app:\n"
        f"    {source}\n"
        f"    timeouts: {{connect: 1s, read: 10s}}\n"
    )


def served(port: int, n: int, conn: http.client.HTTPConnection | None = None) -> Counter[str]:
    """Which origins served ``n`` GETs (all must be 200)."""
    c: Counter[str] = Counter()
    for _ in range(n):
        status, headers, _ = get(port, "/", conn=conn)
        assert status == 200
        c[headers["x-origin"]] += 1
    return c


def wait_for_members(port: int, names: set[str], what: str) -> None:
    """Until 10 GETs in a row are served by exactly the origins ``names``."""
    wait_until(lambda: set(served(port, 10)) == names, CHANGE_TIMEOUT, what)


def wait_for_first_discovery(port: int, names: set[str]) -> None:
    """Until the first discovery is through: before it, the group has no servers and
    requests get a 502 that says so."""

    def discovered() -> bool:
        status, _, body = get(port, "/")
        if status == 502:
            assert body.endswith(b'upstream "app" has no servers (none discovered yet)\n'), body
            return False
        return True

    wait_until(discovered, CHANGE_TIMEOUT, "the first discovery")
    wait_for_members(port, names, "the first discovery")


# --------------------------------------------------------------------------------------
# file


def test_file_discovery_follows_the_file(procs: Procs, tmp_path: Path) -> None:
    a, b = procs.origin("A"), procs.origin("B")
    port = free_port()
    workdir = tmp_path / "ferryman-0"
    workdir.mkdir()
    servers = workdir / "servers.yaml"
    write_atomically(servers, servers_list(a))
    procs.ferryman(config(port, "file: servers.yaml", workers=2), port)
    wait_for_first_discovery(port, {"A"})
    assert served(port, 10) == {"A": 10}

    write_atomically(servers, servers_list(a, b))
    wait_for_members(port, {"A", "B"}, "B added")

    # a slow request in flight to A while A is removed still completes, whole
    results: list[tuple[int, dict[str, str], bytes]] = []
    errors: list[str] = []
    size = 200_000

    def slow() -> None:
        try:
            results.append(get(port, f"/slow?ms=4000&size={size}"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def slow_requests() -> int:
        return sum(p.startswith("/slow") for o in (a, b) for p in o.requests())

    # round robin (per worker) over A and B: start slow requests until one reached A
    slow_threads: list[threading.Thread] = []
    while not any(p.startswith("/slow") for p in a.requests()):
        assert len(slow_threads) < 8, "no slow request went to A"
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        slow_threads.append(t)
        wait_until(lambda: slow_requests() >= len(slow_threads), 5,
                   "the slow request reached an origin")

    write_atomically(servers, servers_list(b))
    wait_for_members(port, {"B"}, "A removed")
    assert all(t.is_alive() for t in slow_threads), "removed too late to test in-flight"
    time.sleep(0.3)  # both workers have read the board (every 0.1 s)
    a_count = len(a.requests())
    assert served(port, 20) == {"B": 20}
    assert len(a.requests()) == a_count  # A gets no new requests
    for t in slow_threads:
        t.join(10)
    assert not errors, errors
    assert len(results) == len(slow_threads)
    for status, _, body in results:
        assert status == 200 and len(body) == size
    assert "A" in {headers["x-origin"] for _, headers, _ in results}


def test_pooled_connections_to_a_staying_server_survive_a_membership_change(
    procs: Procs, tmp_path: Path
) -> None:
    a, b, c = procs.origin("A"), procs.origin("B"), procs.origin("C")
    port = free_port()
    workdir = tmp_path / "ferryman-0"
    workdir.mkdir()
    servers = workdir / "servers.yaml"
    write_atomically(servers, servers_list(a, b))
    procs.ferryman(config(port, "file: servers.yaml"), port)
    wait_for_first_discovery(port, {"A", "B"})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    wait_until(lambda: set(served(port, 10, conn)) == {"A", "B"}, CHANGE_TIMEOUT, "A and B")
    served(port, 20, conn)
    # sequential keep-alive traffic with one worker: one pooled connection to B
    b_ports_before = set(b.request_ports())
    assert len(b_ports_before) == 1, b_ports_before
    b_conns_before = b.connections()

    # A leaves and C joins; B stays
    write_atomically(servers, servers_list(b, c))
    wait_until(lambda: set(served(port, 10, conn)) == {"B", "C"}, CHANGE_TIMEOUT, "B and C")
    served(port, 20, conn)
    conn.close()
    b_ports_after = set(b.request_ports())
    assert b_ports_after == b_ports_before, (b_ports_before, b_ports_after)
    assert b.connections() == b_conns_before


def test_a_broken_servers_file_keeps_the_members(procs: Procs, tmp_path: Path) -> None:
    a = procs.origin("A")
    port = free_port()
    workdir = tmp_path / "ferryman-0"
    workdir.mkdir()
    servers = workdir / "servers.yaml"
    write_atomically(servers, servers_list(a))
    proxy = procs.ferryman(config(port, "file: servers.yaml"), port)
    wait_for_first_discovery(port, {"A"})
    write_atomically(servers, "- not an address\n")
    wait_until(lambda: "discovery (file" in proxy.log_text(), CHANGE_TIMEOUT, "a logged error")
    assert "keeping 1 server(s)" in proxy.log_text(), proxy.log_text()
    assert served(port, 10) == {"A": 10}


def start_with_servers_file(procs: Procs, tmp_path: Path, members: str, port: int) -> None:
    workdir = tmp_path / "ferryman-0"
    workdir.mkdir()
    write_atomically(workdir / "servers.yaml", members)
    procs.ferryman(config(port, "file: servers.yaml", workers=2), port)


def test_no_502_right_after_start_with_a_servers_file(procs: Procs, tmp_path: Path) -> None:
    a = procs.origin("A")
    port = free_port()
    start_with_servers_file(procs, tmp_path, servers_list(a), port)
    statuses = Counter(get(port, "/")[0] for _ in range(20))
    assert statuses == {200: 20}


def test_empty_group_error_names_the_group_once(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    start_with_servers_file(procs, tmp_path, "[]\n", port)
    time.sleep(0.5)  # the first discovery (an empty list) is through
    status, _, body = get(port, "/")
    assert status == 502
    lines = body.decode().splitlines()
    assert lines[0] == "502 Bad Gateway"
    assert lines[1].count('upstream "app"') == 1, lines[1]


# --------------------------------------------------------------------------------------
# DNS


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()


def test_dns_discovery_follows_the_records(procs: Procs, dns: DnsServer) -> None:
    # two origins on the same port of two loopback addresses, as A records name them
    oport = free_port()
    a = procs.origin("A", host="127.0.0.2", port=oport)
    b = procs.origin("B", host="127.0.0.3", port=oport)
    dns.set("svc.test", "A", 1, "127.0.0.2")
    port = free_port()
    procs.ferryman(
        config(port, f'dns: {{name: svc.test, port: {oport}, resolver: '
                     f'"127.0.0.1:{dns.port}"}}', workers=2),
        port,
    )
    wait_for_first_discovery(port, {"A"})
    dns.set("svc.test", "A", 1, "127.0.0.2", "127.0.0.3")
    wait_for_members(port, {"A", "B"}, "a second A record")
    dns.set("svc.test", "A", 1, "127.0.0.3")
    wait_for_members(port, {"B"}, "the first A record removed")
    assert a.requests() and b.requests()
    # resolved again as the TTL runs out (1 s), not more often than that
    before, start = dns.count("svc.test"), time.monotonic()
    time.sleep(2.0)
    queries = dns.count("svc.test") - before
    assert 1 <= queries <= (time.monotonic() - start) / 1.0 + 1, queries


# --------------------------------------------------------------------------------------
# a Python discovery class

DISCOVERY_MODULE = '''\
"""A discovery class for the test: members listed in the file named by $MEMBERS_FILE."""

import os

from ferryman.lb import ServiceDiscovery, parse_member


class FromFile(ServiceDiscovery):
    refresh = 0.2

    async def discover(self):
        with open(os.environ["MEMBERS_FILE"]) as f:
            return [parse_member(line.strip()) for line in f if line.strip()]
'''


def test_python_discovery_class(
    procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = procs.origin("A"), procs.origin("B")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "my_discovery.py").write_text(DISCOVERY_MODULE)
    members = tmp_path / "members.txt"
    write_atomically(members, f"{a.address}\n")
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(pkg) + (os.pathsep + path if path else ""))
    monkeypatch.setenv("MEMBERS_FILE", str(members))
    port = free_port()
    procs.ferryman(config(port, "discovery: my_discovery:FromFile", workers=2), port)
    wait_for_first_discovery(port, {"A"})
    write_atomically(members, f"{a.address}\n{b.address} weight=3\n")
    wait_for_members(port, {"A", "B"}, "B added")
    write_atomically(members, f"{b.address}\n")
    wait_for_members(port, {"B"}, "A removed")
