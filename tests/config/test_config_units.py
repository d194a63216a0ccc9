"""Durations, sizes and addresses as written in config files."""

from __future__ import annotations

import math

import pytest

from ferryman.config import parse_duration, parse_size
from ferryman.config.address import format_address, parse_address
from ferryman.config.units import UnitError


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (10, 10.0),
        (0, 0.0),
        (1.5, 1.5),
        ("10", 10.0),
        ("2.5", 2.5),
        ("10s", 10.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("1h2m3s4ms", 3723.004),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        (" 5s ", 5.0),
        ("250ms", 0.25),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-1s",
        "-5",
        "fast",
        "",
        "  ",
        "s",
        "10x",
        "10 seconds",
        "1s1m",
        "1s1s",
        "1.s",
        ".5s",
        "1,5s",
        "10S",
        "1d",
        True,
        False,
        None,
        [],
        {},
        math.inf,
        math.nan,
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_messages() -> None:
    with pytest.raises(UnitError, match=r"^'fast' is not a duration: expected a number") as info:
        parse_duration("fast")
    assert info.value.reason is None
    with pytest.raises(UnitError) as info:
        parse_duration("-1s")
    assert info.value.reason == "negative"
    assert str(info.value).endswith("(negative)")
    with pytest.raises(UnitError) as info:
        parse_duration("3x")
    assert info.value.reason == 'unknown unit "x"; use h, m, s or ms'
    with pytest.raises(UnitError) as info:
        parse_duration("1s2m")
    assert info.value.reason == "use each unit once, largest first, as in 1h30m"
    with pytest.raises(UnitError) as info:
        parse_duration(math.inf)
    assert info.value.reason == "not finite"


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (100, 100),
        (2.0, 2),
        ("512", 512),
        ("512b", 512),
        ("512B", 512),
        ("8k", 8192),
        ("8K", 8192),
        ("8KiB", 8192),
        ("8kib", 8192),
        ("8kb", 8192),
        ("8KB", 8192),
        ("8 KiB", 8192),
        ("1m", 1 << 20),
        ("1M", 1 << 20),
        ("1MiB", 1 << 20),
        ("1mb", 1 << 20),
        ("1g", 1 << 30),
        ("1GiB", 1 << 30),
        ("1t", 1 << 40),
        ("1.5k", 1536),
        (" 4k ", 4096),
    ],
)
def test_parse_size_accepts(value: object, size: int) -> None:
    result = parse_size(value)
    assert type(result) is int
    assert result == size


@pytest.mark.parametrize(
    "value",
    [-1, "-1", "-1k", "abc", "", "k", "8x", "8 k b", "0.5", "1.1k", "1e3", 1.5, -2.0, math.inf,
     True, None, [], "8kk", "8ki"],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_parse_size_messages() -> None:
    with pytest.raises(UnitError, match=r"^'lots' is not a size: expected a number of bytes"):
        parse_size("lots")
    with pytest.raises(UnitError) as info:
        parse_size(-5)
    assert info.value.reason == "negative"
    with pytest.raises(UnitError) as info:
        parse_size("1.1k")
    assert info.value.reason == "not a whole number of bytes"
    with pytest.raises(UnitError) as info:
        parse_size("3q")
    assert info.value.reason == 'unknown unit "q"; use k, m, g or t (or KiB, MiB, ...)'


@pytest.mark.parametrize(
    ("text", "require_host", "address"),
    [
        ("127.0.0.1:8080", False, ("127.0.0.1", 8080)),
        ("[::1]:8080", False, ("::1", 8080)),
        ("[::]:443", False, ("::", 443)),
        ("0.0.0.0:80", False, ("0.0.0.0", 80)),
        (":8080", False, ("0.0.0.0", 8080)),
        ("localhost:1", False, ("localhost", 1)),
        ("backend.internal:65535", True, ("backend.internal", 65535)),
        ("my_host-1.example.com:9000", True, ("my_host-1.example.com", 9000)),
    ],
)
def test_parse_address_accepts(text: str, require_host: bool, address: tuple[str, int]) -> None:
    assert parse_address(text, require_host=require_host) == address


@pytest.mark.parametrize(
    ("text", "require_host", "reason"),
    [
        (":8080", True, "missing host"),
        ("127.0.0.1", False, "missing :port"),
        ("127.0.0.1:0", False, "port 0 is out of range 1..65535"),
        ("127.0.0.1:65536", False, "port 65536 is out of range 1..65535"),
        ("127.0.0.1:http", False, 'port "http" is not a number'),
        ("127.0.0.1:", False, 'port "" is not a number'),
        ("127.0.0.1:-1", False, 'port "-1" is not a number'),
        ("::1:80", False, 'write IPv6 addresses in brackets, as in "[::1]:8080"'),
        ("[::1:80", False, 'missing "]" after the IPv6 address'),
        ("[::1]", False, "missing :port after the IPv6 address"),
        ("[nope]:80", False, '"nope" is not an IPv6 address'),
        ("bad host:80", False, '"bad host" is not a valid host name or address'),
        ("-x:80", False, '"-x" is not a valid host name or address'),
    ],
)
def test_parse_address_rejects(text: str, require_host: bool, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text, require_host=require_host)
    assert str(info.value) == reason


def test_format_address() -> None:
    assert format_address(("::1", 80)) == "[::1]:80"
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
