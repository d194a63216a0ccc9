"""Upstream groups (key ``upstreams``): where the servers come from, how one is chosen, how
their health is checked, and how connections to them are made.

``parse_server`` reads one ``servers`` item (``"host:port weight=3"``); it is public so that
server lists read at run time (``upstreams.NAME.file``) use the same syntax.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import replace
from typing import Literal, cast, get_args

from yaml.nodes import Node, ScalarNode, SequenceNode

from .address import address_key, is_hostname, parse_address
from .common import APP, TOKEN, subsection
from .model import (
    DnsDiscovery,
    HealthCheckConfig,
    LbAlgorithm,
    PassiveHealthConfig,
    PoolConfig,
    ServerEntry,
    UpstreamConfig,
    UpstreamProtocol,
    UpstreamTimeouts,
    UpstreamTls,
)
from .reader import SERVER_ADDRESS, Reader, Section, child_path

__all__ = ["ServerSyntaxError", "build_upstreams", "parse_server", "parse_status_codes"]

UPSTREAM_KEYS = (
    "servers",
    "timeouts",
    "tls",
    "pool",
    "max_retries",
    "lb",
    "hash_key",
    "dns",
    "file",
    "discovery",
    "health_check",
    "passive",
    "protocol",
)
SOURCES = ("servers", "dns", "file", "discovery")
UPSTREAM_TIMEOUT_KEYS = ("connect", "read", "write", "idle", "ping")
UPSTREAM_TLS_KEYS = ("sni", "verify", "verify_hostname", "ca", "cert", "key")
POOL_KEYS = ("max_idle", "idle_timeout", "max_streams")
DNS_KEYS = ("name", "port", "type", "refresh", "resolver")
HEALTH_CHECK_KEYS = (
    "type",
    "method",
    "path",
    "host",
    "expect_status",
    "body_contains",
    "interval",
    "timeout",
    "rise",
    "fall",
)
HTTP_CHECK_KEYS = ("method", "path", "host", "expect_status", "body_contains")
PASSIVE_KEYS = ("max_fails", "eject", "max_eject", "on_5xx")
SERVER_OPTIONS = ("weight",)
LB_VALUES: tuple[str, ...] = get_args(LbAlgorithm)
PROTOCOL_VALUES: tuple[str, ...] = get_args(UpstreamProtocol)
PROTOCOL_EXPECTED = "h1, h2 (HTTP/2 over TLS, chosen with ALPN) or h2c (cleartext HTTP/2)"
HASH_LBS = ("hash", "consistent")
DNS_TYPES = ("A", "AAAA", "SRV")
CHECK_TYPES = ("tcp", "http")
MAX_WEIGHT = 1000

UPSTREAMS_EXPECTED = "a mapping of upstream group names to upstream groups"
UPSTREAM_NAME_EXPECTED = 'an upstream name made of letters, digits, "_", "." and "-"'
SOURCE_EXPECTED = "one of servers, dns, file or discovery"
SERVERS_EXPECTED = 'a non-empty list of "host:port" addresses'
WEIGHT_EXPECTED = f"weight=N with N an integer 1..{MAX_WEIGHT}"
UPSTREAM_TLS_EXPECTED = "a mapping of TLS settings, true or false"
LB_EXPECTED = "one of " + ", ".join(LB_VALUES)
HASH_KEY_EXPECTED = (
    'client_ip, uri, path, "header:NAME", "cookie:NAME" or "python:module:function"'
)
DISCOVERY_EXPECTED = '"module:Class" such as "mypkg.discovery:Consul"'
DNS_NAME_EXPECTED = 'a DNS name such as "backend.internal"'
DNS_TYPE_EXPECTED = "A, AAAA or SRV"
PORT_EXPECTED = "a port number 1..65535"
CHECK_TYPE_EXPECTED = "tcp or http"
METHOD_EXPECTED = 'an HTTP method such as "GET"'
CHECK_PATH_EXPECTED = 'a path starting with "/", such as "/healthz"'
CHECK_HOST_EXPECTED = 'a host name such as "app.internal", optionally with ":port"'
STATUS_EXPECTED = (
    'a status code 100..599, a range such as "200-399", a class such as "2xx", or a list '
    "of them"
)
STATUS_ITEM_EXPECTED = 'a status code 100..599, a range such as "200-399" or a class such as "2xx"'

_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_STATUS_RANGE = re.compile(r"([0-9]{3})\s*-\s*([0-9]{3})")
_STATUS_CLASS = re.compile(r"([1-5])xx", re.IGNORECASE)
_CHECK_PATH = re.compile(r"/[^\s#\x00-\x1f\x7f]*")


# -- servers -----------------------------------------------------------------------------------


class ServerSyntaxError(ValueError):
    """A ``servers`` item could not be parsed.

    ``option`` is None when the address is wrong (``reason`` says why), else the offending
    option as written; ``expected`` is what would have been accepted.
    """

    def __init__(self, message: str, expected: str, option: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expected = expected
        self.option = option


def parse_server(text: str) -> ServerEntry:
    """Parse a server item: ``"host:port"`` optionally followed by whitespace-separated
    options, of which only ``weight=N`` (1..1000, default 1) exists. Raises
    ``ServerSyntaxError`` (a ``ValueError``)."""
    parts = text.split()
    if not parts:
        raise ServerSyntaxError("missing :port", SERVER_ADDRESS)
    try:
        address = parse_address(parts[0], require_host=True)
    except ValueError as exc:
        raise ServerSyntaxError(str(exc), SERVER_ADDRESS) from None
    weight: int | None = None
    for option in parts[1:]:
        name, sep, value = option.partition("=")
        if name not in SERVER_OPTIONS:
            known = ", ".join(f"{o}=N" for o in SERVER_OPTIONS)
            hint = ""
            close = difflib.get_close_matches(name, SERVER_OPTIONS, n=1)
            if close:
                hint = f' (did you mean "{close[0]}"?)'
            raise ServerSyntaxError(
                f'unknown server option "{option}"{hint}; expected one of: {known}',
                f"one of: {known}",
                option,
            )
        if weight is not None:
            raise ServerSyntaxError(
                f"expected each option once, got {option!r} (weight is already set)",
                "each option once",
                option,
            )
        if not (sep and value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_WEIGHT):
            raise ServerSyntaxError(
                f"expected {WEIGHT_EXPECTED}, got {option!r}", WEIGHT_EXPECTED, option
            )
        weight = int(value)
    return ServerEntry(address=address, weight=1 if weight is None else weight)


def _servers(sec: Section, reader: Reader) -> tuple[ServerEntry, ...]:
    node = sec.get("servers")
    if node is None:
        return ()
    items = reader.sequence(node, sec.path_of("servers"), SERVERS_EXPECTED, non_empty=True)
    if items is None:
        return ()
    servers: list[ServerEntry] = []
    seen: dict[tuple[str, int], str] = {}
    for path, item in items:
        ok, value = reader.scalar(item, path, SERVER_ADDRESS)
        if not ok:
            continue
        if not isinstance(value, str):
            reader.expected(item, path, SERVER_ADDRESS)
            continue
        try:
            entry = parse_server(value)
        except ServerSyntaxError as exc:
            if exc.option is None:
                reader.expected(item, path, SERVER_ADDRESS, exc.message)
            else:
                reader.problem(item, path, exc.message, exc.expected)
            continue
        key = address_key(entry.address)
        if key in seen:
            reader.expected(item, path, "each server once", f"already listed as {seen[key]}")
            continue
        seen[key] = path
        servers.append(entry)
    return tuple(servers)


# -- groups ------------------------------------------------------------------------------------


def build_upstreams(
    top: Section, reader: Reader
) -> tuple[dict[str, UpstreamConfig], list[str] | None]:
    """The valid upstream groups, and the names of all groups defined (valid or not, so that a
    broken group does not also make every listener naming it fail); None instead of the names
    when ``upstreams`` itself is broken."""
    node = top.get("upstreams")
    if node is None:
        return {}, []
    entries = reader.items(node, "upstreams", UPSTREAMS_EXPECTED)
    if entries is None:
        return {}, None
    upstreams: dict[str, UpstreamConfig] = {}
    names: list[str] = []
    for name, key_node, value_node in entries:
        names.append(name)
        path = child_path("upstreams", name)
        if not _UPSTREAM_NAME.fullmatch(name):
            reader.expected(key_node, path, UPSTREAM_NAME_EXPECTED)
        upstream = _upstream(name, value_node, path, reader)
        if upstream is not None:
            upstreams[name] = upstream
    return upstreams, names


def _sources(sec: Section, reader: Reader) -> bool:
    """Whether exactly one source of servers is given; reports none or several."""
    present = [key for key in sec.entries if key in SOURCES]
    if not present:
        reader.problem(
            sec.node, sec.path, f"missing a source of servers (expected {SOURCE_EXPECTED})",
            SOURCE_EXPECTED,
        )
        return False
    if len(present) > 1:
        got = ", ".join(present[:-1]) + " and " + present[-1]
        second = present[1]
        reader.problem(
            sec.key_node(second),
            sec.path_of(second),
            f"expected only {SOURCE_EXPECTED}, got {got}",
            f"only {SOURCE_EXPECTED}",
        )
        return False
    return True


def _upstream(name: str, node: Node, path: str, reader: Reader) -> UpstreamConfig | None:
    sec = reader.section(node, path, UPSTREAM_KEYS)
    if sec is None:
        return None
    one_source = _sources(sec, reader)
    servers = _servers(sec, reader)
    dns = _dns(sec, reader)
    file = sec.file("file")
    discovery = None
    discovery_node = sec.get("discovery")
    if discovery_node is not None:
        discovery = reader.string(
            discovery_node, sec.path_of("discovery"), DISCOVERY_EXPECTED,
            lambda s: bool(APP.fullmatch(s)),
        )
    timeouts_sec = subsection(sec, "timeouts", UPSTREAM_TIMEOUT_KEYS)
    pool_sec = subsection(sec, "pool", POOL_KEYS)
    timeouts = _upstream_timeouts(timeouts_sec)
    pool = _pool(pool_sec)
    timeouts, pool = _reconcile_idle(reader, timeouts_sec, pool_sec, timeouts, pool)
    tls = _upstream_tls(sec, reader)
    max_retries = sec.integer("max_retries", 1, minimum=0)
    lb = _lb(sec, reader)
    hash_key = _hash_key(sec, reader, lb)
    health_check = _health_check(sec, reader)
    passive = _passive(sec, reader)
    protocol = _protocol(sec, reader, tls is not None)
    if not one_source or not (servers or dns or file or discovery):
        return None
    return UpstreamConfig(
        name=name,
        servers=servers,
        timeouts=timeouts,
        tls=tls,
        pool=pool,
        max_retries=max_retries,
        lb=cast(LbAlgorithm, lb or "round_robin"),
        hash_key=hash_key,
        dns=dns,
        file=file,
        discovery=discovery,
        health_check=health_check,
        passive=passive,
        protocol=cast(UpstreamProtocol, protocol or "h1"),
    )


def _protocol(sec: Section, reader: Reader, tls: bool) -> str | None:
    """``h1``, ``h2`` or ``h2c``; ``h2`` needs ``tls`` (ALPN), ``h2c`` refuses it."""
    node = sec.get("protocol")
    if node is None:
        return "h1"
    path = sec.path_of("protocol")
    text = reader.string(node, path, PROTOCOL_EXPECTED)
    if text is None:
        return None
    if text not in PROTOCOL_VALUES:
        reader.expected(node, path, PROTOCOL_EXPECTED)
        return None
    if text == "h2" and not tls:
        reader.expected(
            node, path, "h2c for cleartext HTTP/2", "h2 is chosen with ALPN, which needs tls"
        )
        return None
    if text == "h2c" and tls:
        reader.expected(node, path, "h2 with tls", "h2c is cleartext HTTP/2")
        return None
    return text


# -- load balancing ----------------------------------------------------------------------------


def _lb(sec: Section, reader: Reader) -> str | None:
    """The algorithm name, or None when the value is wrong."""
    node = sec.get("lb")
    if node is None:
        return "round_robin"
    path = sec.path_of("lb")
    text = reader.string(node, path, LB_EXPECTED)
    if text is None:
        return None
    if text not in LB_VALUES:
        close = difflib.get_close_matches(text, LB_VALUES, n=1)
        reader.expected(node, path, LB_EXPECTED, f'did you mean "{close[0]}"?' if close else None)
        return None
    return text


def _is_hash_key(text: str) -> bool:
    if text in ("client_ip", "uri", "path"):
        return True
    kind, _, rest = text.partition(":")
    if kind in ("header", "cookie"):
        return bool(TOKEN.fullmatch(rest))
    return kind == "python" and bool(APP.fullmatch(rest))


def _hash_key(sec: Section, reader: Reader, lb: str | None) -> str:
    default = UpstreamConfig.__dataclass_fields__["hash_key"].default
    assert isinstance(default, str)
    node = sec.get("hash_key")
    if node is None:
        return default
    path = sec.path_of("hash_key")
    key = reader.string(node, path, HASH_KEY_EXPECTED, _is_hash_key)
    if lb is not None and lb not in HASH_LBS:
        how = "lb: round_robin, the default" if "lb" not in sec else f"lb: {lb}"
        reader.problem(
            sec.key_node("hash_key"),
            path,
            f"hash_key is only used by lb: hash or consistent (this group uses {how})",
            "lb: hash or consistent, or no hash_key",
        )
    return default if key is None else key


# -- discovery ---------------------------------------------------------------------------------


def _int_between(
    reader: Reader, node: Node, path: str, low: int, high: int, expected: str
) -> int | None:
    ok, value = reader.scalar(node, path, expected)
    if not ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        reader.expected(node, path, expected)
        return None
    return value


def _choice(
    reader: Reader, node: Node, path: str, choices: tuple[str, ...], expected: str, *, upper: bool
) -> str | None:
    """One of ``choices``, compared in any letter case; returned as listed in ``choices``."""
    text = reader.string(node, path, expected)
    if text is None:
        return None
    wanted = text.upper() if upper else text.lower()
    if wanted not in choices:
        reader.expected(node, path, expected)
        return None
    return wanted


def _dns(upstream: Section, reader: Reader) -> DnsDiscovery | None:
    sec = subsection(upstream, "dns", DNS_KEYS)
    if sec is None:
        return None
    d = DnsDiscovery(name="")
    name_node = sec.require("name", DNS_NAME_EXPECTED)
    name = None
    if name_node is not None:
        name = reader.string(name_node, sec.path_of("name"), DNS_NAME_EXPECTED, is_hostname)
    record_type: str = sec.read(
        "type", lambda n, p: _choice(reader, n, p, DNS_TYPES, DNS_TYPE_EXPECTED, upper=True),
        str(d.type),
    )
    port = sec.read(
        "port", lambda n, p: _int_between(reader, n, p, 1, 65535, PORT_EXPECTED), d.port
    )
    port_node = sec.get("port")
    if record_type == "SRV" and port_node is not None:
        reader.expected(
            port_node, sec.path_of("port"), "no port with type SRV",
            "SRV records carry their own ports",
        )
    refresh_node = sec.get("refresh")
    refresh = None
    if refresh_node is not None:
        refresh = reader.duration(refresh_node, sec.path_of("refresh"), positive=True)
    resolver_node = sec.get("resolver")
    resolver = None
    if resolver_node is not None:
        resolver = reader.address(resolver_node, sec.path_of("resolver"), require_host=True)
        if resolver is not None and not _is_ip(resolver[0]):
            reader.expected(
                resolver_node, sec.path_of("resolver"),
                'the IP address and port of a DNS server, such as "127.0.0.53:53"',
                "a DNS server is named by its address, not by a name it would have to resolve",
            )
            resolver = None
    if name is None:
        return None
    return DnsDiscovery(
        name=name,
        port=port,
        type=cast(Literal["A", "AAAA", "SRV"], record_type),
        refresh=refresh,
        resolver=resolver,
    )


# -- health ------------------------------------------------------------------------------------


def parse_status_codes(value: object) -> tuple[int, ...]:
    """Status codes from one ``expect_status`` item: an int or digit string (``200``), a range
    (``"200-399"``, both ends included) or a class (``"2xx"``), within 100..599. Raises
    ``ValueError`` with a short reason (empty when the value is simply not of that shape)."""
    if isinstance(value, bool):
        raise ValueError("")
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if not 100 <= value <= 599:
            raise ValueError(f"{value} is not a status code 100..599")
        return (value,)
    if not isinstance(value, str):
        raise ValueError("")
    text = value.strip()
    match = _STATUS_CLASS.fullmatch(text)
    if match is not None:
        first = int(match.group(1)) * 100
        return tuple(range(first, first + 100))
    match = _STATUS_RANGE.fullmatch(text)
    if match is None:
        raise ValueError("")
    low, high = int(match.group(1)), int(match.group(2))
    for code in (low, high):
        if not 100 <= code <= 599:
            raise ValueError(f"{code} is not a status code 100..599")
    if low > high:
        raise ValueError(f"the range is reversed; write {high}-{low}")
    return tuple(range(low, high + 1))


def _status_item(reader: Reader, node: Node, path: str, expected: str) -> tuple[int, ...] | None:
    ok, value = reader.scalar(node, path, expected)
    if not ok:
        return None
    try:
        return parse_status_codes(value)
    except ValueError as exc:
        reader.expected(node, path, expected, str(exc) or None)
        return None


def _expect_status(reader: Reader, node: Node, path: str) -> tuple[int, ...] | None:
    if isinstance(node, SequenceNode):
        items = reader.sequence(node, path, STATUS_EXPECTED, non_empty=True)
        if items is None:
            return None
        codes: set[int] = set()
        good = True
        for item_path, item in items:
            item_codes = _status_item(reader, item, item_path, STATUS_ITEM_EXPECTED)
            if item_codes is None:
                good = False
            else:
                codes.update(item_codes)
        return tuple(sorted(codes)) if good else None
    if not isinstance(node, ScalarNode):
        reader.expected(node, path, STATUS_EXPECTED)
        return None
    single = _status_item(reader, node, path, STATUS_EXPECTED)
    return None if single is None else single


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _setting(sec: Section, key: str, value: float) -> str:
    """How a duration setting reads in a message: as written, or ``10s, the default``."""
    node = sec.get(key)
    if isinstance(node, ScalarNode):
        return str(node.value)
    return f"{_seconds(value)}, the default"


def _health_check(upstream: Section, reader: Reader) -> HealthCheckConfig | None:
    sec = subsection(upstream, "health_check", HEALTH_CHECK_KEYS)
    if sec is None:
        return None
    d = HealthCheckConfig()
    check_type: str = sec.read(
        "type", lambda n, p: _choice(reader, n, p, CHECK_TYPES, CHECK_TYPE_EXPECTED, upper=False),
        str(d.type),
    )
    if check_type == "tcp":
        for key in HTTP_CHECK_KEYS:
            if key in sec:
                reader.problem(
                    sec.key_node(key), sec.path_of(key),
                    f"{key} is only used by type: http (this check is type: tcp)",
                    f"type: http, or no {key}",
                )
    method = sec.read(
        "method",
        lambda n, p: reader.string(n, p, METHOD_EXPECTED, lambda s: bool(TOKEN.fullmatch(s))),
        d.method,
    ).upper()
    path = sec.read(
        "path",
        lambda n, p: reader.string(n, p, CHECK_PATH_EXPECTED, _is_check_path),
        d.path,
    )
    host = None
    host_node = sec.get("host")
    if host_node is not None:
        host = reader.string(host_node, sec.path_of("host"), CHECK_HOST_EXPECTED, _is_host_header)
    expect_status = sec.read(
        "expect_status", lambda n, p: _expect_status(reader, n, p), d.expect_status
    )
    body_contains = None
    body_node = sec.get("body_contains")
    if body_node is not None:
        body_contains = reader.string(body_node, sec.path_of("body_contains"))
    interval = sec.duration("interval", d.interval, positive=True)
    timeout = sec.duration("timeout", d.timeout, positive=True)
    if timeout > interval:
        timeout_node = sec.get("timeout")
        interval_node = sec.get("interval")
        if timeout_node is not None:
            reader.expected(
                timeout_node, sec.path_of("timeout"),
                f"a timeout no longer than interval ({_setting(sec, 'interval', interval)})",
            )
        elif interval_node is not None:
            reader.expected(
                interval_node, sec.path_of("interval"),
                f"an interval no shorter than timeout ({_setting(sec, 'timeout', timeout)})",
            )
    return HealthCheckConfig(
        type=cast(Literal["tcp", "http"], check_type),
        method=method,
        path=path,
        host=host,
        expect_status=expect_status,
        body_contains=body_contains,
        interval=interval,
        timeout=timeout,
        rise=sec.integer("rise", d.rise, minimum=1),
        fall=sec.integer("fall", d.fall, minimum=1),
    )


def _is_check_path(text: str) -> bool:
    return bool(_CHECK_PATH.fullmatch(text))


def _is_host_header(text: str) -> bool:
    if is_hostname(text):
        return True
    try:
        parse_address(text, require_host=True)
    except ValueError:
        return False
    return True


def _passive(upstream: Section, reader: Reader) -> PassiveHealthConfig:
    d = PassiveHealthConfig()
    sec = subsection(upstream, "passive", PASSIVE_KEYS)
    if sec is None:
        return d
    eject = sec.duration("eject", d.eject, positive=True)
    max_eject = sec.duration("max_eject", d.max_eject, positive=True)
    if max_eject < eject:
        max_node = sec.get("max_eject")
        if max_node is not None:
            reader.expected(
                max_node, sec.path_of("max_eject"),
                f"a duration no shorter than eject ({_setting(sec, 'eject', eject)})",
            )
        else:
            eject_node = sec.get("eject")
            assert eject_node is not None
            reader.expected(
                eject_node, sec.path_of("eject"),
                f"a duration no longer than max_eject ({_setting(sec, 'max_eject', max_eject)})",
            )
    return PassiveHealthConfig(
        max_fails=sec.integer("max_fails", d.max_fails, minimum=0),
        eject=eject,
        max_eject=max_eject,
        on_5xx=sec.boolean("on_5xx", d.on_5xx),
    )


# -- connections -------------------------------------------------------------------------------


def _upstream_timeouts(sec: Section | None) -> UpstreamTimeouts:
    d = UpstreamTimeouts()
    if sec is None:
        return d
    return UpstreamTimeouts(
        connect=sec.duration("connect", d.connect, positive=True),
        read=sec.duration("read", d.read, positive=True),
        write=sec.duration("write", d.write, positive=True),
        idle=sec.duration("idle", d.idle, positive=True),
        ping=sec.duration("ping", d.ping, positive=True),
    )


def _pool(sec: Section | None) -> PoolConfig:
    d = PoolConfig()
    if sec is None:
        return d
    return PoolConfig(
        max_idle=sec.integer("max_idle", d.max_idle, minimum=0),
        idle_timeout=sec.duration("idle_timeout", d.idle_timeout, positive=True),
        max_streams=sec.integer("max_streams", d.max_streams, minimum=1),
    )


def _reconcile_idle(
    reader: Reader,
    timeouts_sec: Section | None,
    pool_sec: Section | None,
    timeouts: UpstreamTimeouts,
    pool: PoolConfig,
) -> tuple[UpstreamTimeouts, PoolConfig]:
    """``timeouts.idle`` and ``pool.idle_timeout`` are one setting spelled two ways: setting
    either sets both; setting both to different values is an error."""
    idle_node = None if timeouts_sec is None else timeouts_sec.get("idle")
    pool_node = None if pool_sec is None else pool_sec.get("idle_timeout")
    if idle_node is not None and pool_node is not None and pool_sec is not None:
        if timeouts.idle != pool.idle_timeout:
            reader.expected(
                pool_node,
                pool_sec.path_of("idle_timeout"),
                f"the same duration as timeouts.idle ({idle_node.value})",
                "both set how long an idle pooled connection is kept; set only one",
            )
        return timeouts, pool
    if idle_node is not None:
        return timeouts, replace(pool, idle_timeout=timeouts.idle)
    if pool_node is not None:
        return replace(timeouts, idle=pool.idle_timeout), pool
    return timeouts, pool


def _upstream_tls(upstream: Section, reader: Reader) -> UpstreamTls | None:
    node = upstream.get("tls")
    if node is None:
        return None
    path = upstream.path_of("tls")
    if isinstance(node, ScalarNode) and not reader.is_null(node):
        ok, value = reader.scalar(node, path, UPSTREAM_TLS_EXPECTED)
        if not ok:
            return None
        if not isinstance(value, bool):
            reader.expected(node, path, UPSTREAM_TLS_EXPECTED)
            return None
        return UpstreamTls() if value else None
    sec = reader.section(node, path, UPSTREAM_TLS_KEYS, UPSTREAM_TLS_EXPECTED)
    if sec is None:
        return None
    d = UpstreamTls()
    sni_node = sec.get("sni")
    sni = None
    if sni_node is not None:
        sni = reader.string(
            sni_node, sec.path_of("sni"), 'a server name such as "api.example.com"', is_hostname
        )
    cert = sec.file("cert")
    key = sec.file("key")
    if ("cert" in sec) != ("key" in sec):
        present, missing = ("cert", "key") if "cert" in sec else ("key", "cert")
        reader.problem(
            sec.key_node(present),
            sec.path,
            f'missing required key "{missing}" (expected both "cert" and "key" for a client '
            f'certificate, or neither; only "{present}" is set)',
            'both "cert" and "key", or neither',
        )
    return UpstreamTls(
        sni=sni,
        verify=sec.boolean("verify", d.verify),
        verify_hostname=sec.boolean("verify_hostname", d.verify_hostname),
        ca=sec.file("ca"),
        cert=cert,
        key=key,
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
