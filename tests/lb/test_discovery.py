"""Service discovery: member parsing, files, and DNS against a real DNS server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
import yaml
from dns_server import DnsServer

from ferryman.lb.discovery import (
    DnsDiscovery,
    FileDiscovery,
    ServiceDiscovery,
    StaticDiscovery,
    parse_member,
)
from ferryman.lb.monitor import GroupMonitor, GroupSnapshot


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro_fn()

    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


# parse_member -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("127.0.0.1:80", (("127.0.0.1", 80), 1)),
        ("example.com:8080 weight=3", (("example.com", 8080), 3)),
        ("example.com:8080   weight=1000", (("example.com", 8080), 1000)),
        ("[::1]:443", (("::1", 443), 1)),
        ("[2001:db8::1]:65535 weight=2", (("2001:db8::1", 65535), 2)),
        ({"address": "10.0.0.1:80"}, (("10.0.0.1", 80), 1)),
        ({"address": "[::1]:81", "weight": 7}, (("::1", 81), 7)),
        ({"address": "backend:1", "weight": 1, "zone": "eu"}, (("backend", 1), 1)),
    ],
)
def test_parse_member_valid(item: Any, expected: Any) -> None:
    assert parse_member(item) == expected


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("10.0.0.1", "expected \"host:port\", got '10.0.0.1'"),
        (":80", "expected \"host:port\", got ':80'"),
        ("::1:80", "expected \"host:port\", got '::1:80'"),
        ("", "expected \"host:port\", got ''"),
        ("   ", "expected \"host:port\", got '   '"),
        ("[::1]", "expected \"[v6]:port\", got '[::1]'"),
        ("[::1]80", "expected \"[v6]:port\", got '[::1]80'"),
        ("host:0", "expected a port 1..65535 in 'host:0'"),
        ("host:65536", "expected a port 1..65535 in 'host:65536'"),
        ("host:http", "expected a port 1..65535 in 'host:http'"),
        ("host:", "expected a port 1..65535 in 'host:'"),
        ("[::1]:-1", "expected a port 1..65535 in '[::1]:-1'"),
        ("host:80 weight=0", "expected weight=1..1000 after the address in 'host:80 weight=0'"),
        ("host:80 weight=1001",
         "expected weight=1..1000 after the address in 'host:80 weight=1001'"),
        ("host:80 weight=x", "expected weight=1..1000 after the address in 'host:80 weight=x'"),
        ("host:80 max_fails=3",
         "expected weight=1..1000 after the address in 'host:80 max_fails=3'"),
        ({"address": 80}, "expected \"address\": \"host:port\" in {'address': 80}"),
        ({"host": "a:1"}, "expected \"address\": \"host:port\" in {'host': 'a:1'}"),
        ({"address": "a:1", "weight": 0}, "expected a weight 1..1000 in "),
        ({"address": "a:1", "weight": True}, "expected a weight 1..1000 in "),
        ({"address": "a:1", "weight": "3"}, "expected a weight 1..1000 in "),
        ({"address": "a:1", "weight": 1001}, "expected a weight 1..1000 in "),
        ({"address": "a:1", "weight": 2.5}, "expected a weight 1..1000 in "),
        (42, "expected \"host:port\" or a mapping, got 42"),
        (None, "expected \"host:port\" or a mapping, got None"),
        (["a:1"], "expected \"host:port\" or a mapping, got ['a:1']"),
    ],
)
def test_parse_member_invalid(item: Any, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_member(item)


@pytest.mark.parametrize("item", ["[not-v6]:80", "[10.0.0.1]:80", "[::g]:80"])
def test_parse_member_bad_ipv6(item: str) -> None:
    with pytest.raises(ValueError):
        parse_member(item)


# base classes -----------------------------------------------------------------------------


def test_static_discovery() -> None:
    members = [(("10.0.0.1", 80), 1), (("10.0.0.2", 80), 2)]
    d = StaticDiscovery(members)
    assert run(d.discover) == members
    assert d.next_refresh() == 3600.0
    assert d.describe() == "static"


def test_service_discovery_base() -> None:
    class Custom(ServiceDiscovery):
        refresh = 2.5

    d = Custom()
    assert d.next_refresh() == 2.5
    assert d.describe() == "Custom"
    with pytest.raises(NotImplementedError):
        run(d.discover)


# FileDiscovery ----------------------------------------------------------------------------


def write(path: Path, text: str, *, bump: int = 0) -> None:
    """Replace ``path`` atomically (a new inode, like config management tools do)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    if bump:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump))


@pytest.mark.parametrize(
    "text",
    [
        '["127.0.0.1:8001", {"address": "[::1]:8002", "weight": 3}, "h:8003 weight=2"]',
        '{"servers": ["127.0.0.1:8001", {"address": "[::1]:8002", "weight": 3},'
        ' "h:8003 weight=2"]}',
        "- 127.0.0.1:8001\n- address: '[::1]:8002'\n  weight: 3\n- h:8003 weight=2\n",
        "# upstream list\nservers:\n  - 127.0.0.1:8001\n  - {address: '[::1]:8002', weight: 3}\n"
        "  - 'h:8003 weight=2'\n",
    ],
    ids=["json-list", "json-servers", "yaml-list", "yaml-servers"],
)
def test_file_discovery_formats(tmp_path: Path, text: str) -> None:
    path = tmp_path / "servers.conf"
    path.write_text(text)
    d = FileDiscovery(str(path), poll=0.5)
    assert run(d.discover) == [
        (("127.0.0.1", 8001), 1), (("::1", 8002), 3), (("h", 8003), 2)
    ]
    assert d.next_refresh() == 0.5
    assert d.describe() == f"file {path}"


def test_file_discovery_change_detection(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    write(path, '["10.0.0.1:80"]')
    d = FileDiscovery(str(path))

    async def main() -> None:
        first = await d.discover()
        assert first == [(("10.0.0.1", 80), 1)]
        assert await d.discover() is first  # unchanged: the cached list, not re-parsed

        write(path, '["10.0.0.1:80", "10.0.0.2:80"]')
        second = await d.discover()
        assert second == [(("10.0.0.1", 80), 1), (("10.0.0.2", 80), 1)]
        assert await d.discover() is second

        # rewritten in place, same size, only the modification time tells
        with open(path, "r+") as f:
            f.write('["10.0.0.3:80", "10.0.0.4:80"]')
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert await d.discover() == [(("10.0.0.3", 80), 1), (("10.0.0.4", 80), 1)]

    run(main)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"x": 1}', "expected a list of servers"),
        ("", "expected a list of servers"),
        ("servers:\n", "expected a list of servers"),
        ('["10.0.0.1:80", "nope"]', 'expected "host:port"'),
        ("- [unclosed", None),  # YAML syntax error
        ("just a string", "expected a list of servers"),
    ],
)
def test_file_discovery_invalid(tmp_path: Path, text: str, error: str | None) -> None:
    path = tmp_path / "servers.yaml"
    path.write_text(text)
    d = FileDiscovery(str(path))
    exc: type[Exception] = ValueError if error is not None else yaml.YAMLError
    with pytest.raises(exc, match=re.escape(error) if error else None):
        run(d.discover)


def test_file_discovery_missing(tmp_path: Path) -> None:
    d = FileDiscovery(str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError):
        run(d.discover)


def test_monitor_keeps_members_of_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    write(path, '["10.0.0.1:80", "10.0.0.2:80 weight=2"]')

    async def main() -> None:
        snapshots: list[GroupSnapshot] = []
        monitor = GroupMonitor("api", FileDiscovery(str(path), poll=0.05), None, snapshots.append)
        monitor.start()
        await until(lambda: len(monitor.members) == 2, what="first read")
        good = list(monitor.members)

        write(path, '["10.0.0.1:80", "broken')  # a half-written file
        await asyncio.sleep(0.3)
        assert monitor.members == good
        path.unlink()
        await asyncio.sleep(0.3)
        assert monitor.members == good
        assert len(snapshots) == 1

        write(path, "- 10.0.0.3:80\n")
        await until(lambda: monitor.members == [(("10.0.0.3", 80), 1)], what="new file")
        assert snapshots[-1] == [
            {"host": "10.0.0.3", "port": 80, "weight": 1, "healthy": True, "reason": ""}
        ]
        monitor.stop()
        await asyncio.sleep(0.01)

    run(main)


# DnsDiscovery -----------------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()


def resolve_with(server: DnsServer, name: str, *args: Any, **kw: Any) -> DnsDiscovery:
    kw.setdefault("timeout", 2.0)
    return DnsDiscovery(name, *args, resolver=server.address, **kw)


def test_dns_a_records(dns_server: DnsServer) -> None:
    dns_server.set("svc.test", "A", 30, "127.0.0.3", "127.0.0.1", "127.0.0.2")
    d = resolve_with(dns_server, "svc.test", 8080)
    assert run(d.discover) == [
        (("127.0.0.1", 8080), 1), (("127.0.0.2", 8080), 1), (("127.0.0.3", 8080), 1)
    ]
    assert d.next_refresh() == 30.0
    assert dns_server.queries == [("svc.test.", "A")]
    assert d.describe() == "dns svc.test A"


def test_dns_aaaa_records(dns_server: DnsServer) -> None:
    dns_server.set("v6.test", "AAAA", 60, "2001:db8::5", "::1")
    d = resolve_with(dns_server, "v6.test", 443, "AAAA")
    assert run(d.discover) == [(("2001:db8::5", 443), 1), (("::1", 443), 1)]
    assert dns_server.queries == [("v6.test.", "AAAA")]


def test_dns_srv_records(dns_server: DnsServer) -> None:
    dns_server.set(
        "_http._tcp.svc.test", "SRV", 30,
        "10 5 8001 a.svc.test.", "10 1 8002 b.svc.test.", "20 9 8003 c.svc.test.",
        "10 0 8004 127.0.0.9.",
    )
    dns_server.set("a.svc.test", "A", 5, "127.0.0.1", "127.0.0.2")
    dns_server.set("b.svc.test", "A", 60, "127.0.0.3")
    dns_server.set("c.svc.test", "A", 60, "127.0.0.4")
    d = resolve_with(dns_server, "_http._tcp.svc.test", type="SRV")
    assert run(d.discover) == [
        (("127.0.0.1", 8001), 5),
        (("127.0.0.2", 8001), 5),
        (("127.0.0.3", 8002), 1),
        (("127.0.0.9", 8004), 1),  # an address as target; weight 0 counts as 1
    ]
    # only the lowest priority is used: the backup c is never even resolved
    assert dns_server.count("c.svc.test") == 0
    # the smallest TTL of the SRV set and of the targets' addresses
    assert d.next_refresh() == 5.0


def test_dns_srv_weight_capped(dns_server: DnsServer) -> None:
    dns_server.set("_x._tcp.test", "SRV", 30, "0 5000 80 a.test.")
    dns_server.set("a.test", "A", 30, "127.0.0.1")
    assert run(resolve_with(dns_server, "_x._tcp.test", type="SRV").discover) == [
        (("127.0.0.1", 80), 1000)
    ]


@pytest.mark.parametrize(
    ("ttl", "kw", "expected"),
    [
        (0, {}, 1.0),  # min_refresh
        (100_000, {}, 300.0),  # max_refresh
        (42, {}, 42.0),
        (2, {"min_refresh": 5.0}, 5.0),
        (100, {"max_refresh": 60.0}, 60.0),
        (100, {"refresh": 7.0}, 7.0),  # a fixed interval ignores TTLs
    ],
)
def test_dns_ttl_drives_refresh(
    dns_server: DnsServer, ttl: int, kw: dict[str, float], expected: float
) -> None:
    dns_server.set("svc.test", "A", ttl, "127.0.0.1")
    d = resolve_with(dns_server, "svc.test", 80, **kw)
    run(d.discover)
    assert d.next_refresh() == expected


def test_dns_changes_are_seen(dns_server: DnsServer) -> None:
    dns_server.set("svc.test", "A", 300, "127.0.0.1")
    d = resolve_with(dns_server, "svc.test", 80)

    async def main() -> None:
        assert await d.discover() == [(("127.0.0.1", 80), 1)]
        dns_server.set("svc.test", "A", 300, "127.0.0.2", "127.0.0.3")
        # no resolver cache hides the change, even within the TTL
        assert await d.discover() == [(("127.0.0.2", 80), 1), (("127.0.0.3", 80), 1)]

    run(main)


def test_dns_nxdomain_and_no_answer_raise(dns_server: DnsServer) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        run(resolve_with(dns_server, "missing.test", 80).discover)
    dns_server.set("v4only.test", "A", 30, "127.0.0.1")
    with pytest.raises(dns.resolver.NoAnswer):
        run(resolve_with(dns_server, "v4only.test", 80, "AAAA").discover)


def test_dns_type_validated() -> None:
    with pytest.raises(ValueError, match="type must be A, AAAA or SRV, got 'MX'"):
        DnsDiscovery("svc.test", 80, "MX")


def test_monitor_keeps_dns_members_on_nxdomain(dns_server: DnsServer) -> None:
    dns_server.set("svc.test", "A", 30, "127.0.0.1", "127.0.0.2")

    async def main() -> None:
        d = resolve_with(dns_server, "svc.test", 8080, refresh=0.05)
        monitor = GroupMonitor("api", d, None)
        monitor.start()
        await until(lambda: len(monitor.members) == 2, what="first resolution")
        old = list(monitor.members)

        dns_server.remove("svc.test")
        seen = dns_server.count("svc.test")
        await until(lambda: dns_server.count("svc.test") >= seen + 3, what="re-resolution")
        assert monitor.members == old

        dns_server.set("svc.test", "A", 30, "127.0.0.5")
        await until(lambda: monitor.members == [(("127.0.0.5", 8080), 1)], what="new answer")
        monitor.stop()
        await asyncio.sleep(0.01)

    run(main)


def test_monitor_follows_ttl(dns_server: DnsServer) -> None:
    """With TTL 1 (and min_refresh 0.1) the monitor re-resolves about once a second."""
    dns_server.set("svc.test", "A", 0, "127.0.0.1")

    async def main() -> None:
        d = resolve_with(dns_server, "svc.test", 80, min_refresh=0.1)
        monitor = GroupMonitor("api", d, None)
        monitor.start()
        await until(lambda: bool(monitor.members), what="first resolution")
        await until(lambda: dns_server.count("svc.test") >= 3, timeout=3.0, what="re-resolution")
        dns_server.set("svc.test", "A", 1, "127.0.0.2")
        await until(lambda: monitor.members == [(("127.0.0.2", 80), 1)], what="new answer")
        n = dns_server.count("svc.test")
        await asyncio.sleep(0.5)
        assert dns_server.count("svc.test") <= n + 1  # TTL 1 s now: no burst of queries
        monitor.stop()
        await asyncio.sleep(0.01)

    run(main)
