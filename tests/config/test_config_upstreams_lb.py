"""Upstream groups: server weights, the sources of servers (servers, dns, file, discovery),
load balancing, active and passive health checks, and the errors for each mistake."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ferryman.config import (
    ConfigError,
    DnsDiscovery,
    HealthCheckConfig,
    PassiveHealthConfig,
    ServerEntry,
    ServerSyntaxError,
    UpstreamConfig,
    load_config,
    parse_config,
    parse_server,
    parse_status_codes,
)

ErrorText = Callable[[str], str]

L = 'listeners: [{bind: ":8080", upstream: app}]\n'
HEAD = L + "upstreams:\n  app:\n"
A = "ferryman.yaml:4: upstreams.app"  # the first key of group app is on line 4
B = "ferryman.yaml:5: upstreams.app"  # the second
SERVER = 'a "host:port" address such as "127.0.0.1:9001" or "[::1]:9001"'
WEIGHT = "expected weight=N with N an integer 1..1000"
SOURCES = "one of servers, dns, file or discovery"
LBS = "round_robin, random, hash, consistent, least_conn, p2c_ewma"
HASH_KEY = (
    'client_ip, uri, path, "header:NAME", "cookie:NAME" or "python:module:function"'
)
STATUS = (
    'a status code 100..599, a range such as "200-399", a class such as "2xx", or a list of '
    "them"
)
STATUS_ITEM = 'a status code 100..599, a range such as "200-399" or a class such as "2xx"'
POSITIVE = 'a positive duration such as "2s" or "500ms"'


def group(text: str) -> str:
    """A config whose group ``app`` has the given keys (each line indented by 4)."""
    return HEAD + "".join(f"    {line}\n" for line in text.splitlines())


def upstream(text: str) -> UpstreamConfig:
    return parse_config(group(text)).upstreams["app"]


def case(text: str, message: str, id: str) -> object:
    return pytest.param(text, message, id=id)


# -- valid groups ------------------------------------------------------------------------------


def test_documented_example_upstream() -> None:
    app = upstream(
        'lb: round_robin\nservers: ["127.0.0.1:9001 weight=3", "127.0.0.1:9002"]\n'
        "health_check: {type: http, path: /healthz, interval: 2s, timeout: 1s, rise: 2, fall: 3}"
    )
    assert app == UpstreamConfig(
        name="app",
        servers=(ServerEntry(("127.0.0.1", 9001), weight=3), ServerEntry(("127.0.0.1", 9002))),
        lb="round_robin",
        health_check=HealthCheckConfig(
            type="http", path="/healthz", interval=2.0, timeout=1.0, rise=2, fall=3
        ),
    )
    assert app.servers[1].weight == 1
    assert app.health_check is not None
    assert app.health_check.expect_status == tuple(range(200, 400))
    assert app.passive == PassiveHealthConfig()
    assert (app.dns, app.file, app.discovery, app.hash_key) == (None, None, None, "client_ip")


@pytest.mark.parametrize(
    ("item", "entry"),
    [
        ("h:1", ServerEntry(("h", 1))),
        ("h:1 weight=1000", ServerEntry(("h", 1), weight=1000)),
        ("  [::1]:9001\tweight=7  ", ServerEntry(("::1", 9001), weight=7)),
    ],
)
def test_server_items(item: str, entry: ServerEntry) -> None:
    assert upstream(f'servers: ["{item}"]').servers == (entry,)
    assert parse_server(item) == entry


def test_parse_server_errors() -> None:
    with pytest.raises(ServerSyntaxError) as info:
        parse_server("h:1 weight=0")
    assert info.value.option == "weight=0"
    with pytest.raises(ValueError, match="missing :port"):
        parse_server("h")


@pytest.mark.parametrize("lb", ["round_robin", "random", "hash", "consistent", "least_conn",
                                "p2c_ewma"])
def test_every_lb(lb: str) -> None:
    assert upstream(f'servers: ["h:1"]\nlb: {lb}').lb == lb


@pytest.mark.parametrize(
    "key", ["client_ip", "uri", "path", "header:X-User", "cookie:session",
            "python:mypkg.keys:tenant"],
)
@pytest.mark.parametrize("lb", ["hash", "consistent"])
def test_hash_keys(lb: str, key: str) -> None:
    app = upstream(f'servers: ["h:1"]\nlb: {lb}\nhash_key: "{key}"')
    assert (app.lb, app.hash_key) == (lb, key)


def test_dns_source() -> None:
    app = upstream("dns: {name: backend.internal}")
    assert app.servers == ()
    assert app.dns == DnsDiscovery(name="backend.internal", port=80, type="A")
    app = upstream(
        'dns: {name: _http._tcp.svc.internal, type: srv, refresh: 30s, resolver: "10.0.0.53:53"}'
    )
    assert app.dns == DnsDiscovery(
        name="_http._tcp.svc.internal", type="SRV", refresh=30.0, resolver=("10.0.0.53", 53)
    )
    app = upstream("dns: {name: a.internal, type: AAAA, port: 8080}")
    assert app.dns == DnsDiscovery(name="a.internal", type="AAAA", port=8080)


def test_file_source(tmp_path: Path) -> None:
    (tmp_path / "servers.yaml").write_text('["h:1 weight=2"]\n')
    path = tmp_path / "ferryman.yaml"
    path.write_text(group("file: servers.yaml"))
    app = load_config(path).upstreams["app"]
    assert (app.servers, app.file) == ((), str(tmp_path / "servers.yaml"))


def test_discovery_source() -> None:
    app = upstream("discovery: mypkg.discovery:Consul")
    assert (app.servers, app.discovery) == ((), "mypkg.discovery:Consul")


def test_every_health_check_setting() -> None:
    app = upstream(
        'servers: ["h:1"]\nhealth_check:\n  type: HTTP\n  method: head\n  path: /health?full=1\n'
        "  host: app.internal:8080\n  expect_status: [200-204, 3xx, '404']\n"
        "  body_contains: ok\n  interval: 10s\n  timeout: 10s\n  rise: 1\n  fall: 5"
    )
    assert app.health_check == HealthCheckConfig(
        type="http",
        method="HEAD",
        path="/health?full=1",
        host="app.internal:8080",
        expect_status=(200, 201, 202, 203, 204, *range(300, 400), 404),
        body_contains="ok",
        interval=10.0,
        timeout=10.0,
        rise=1,
        fall=5,
    )


@pytest.mark.parametrize("empty", ["{}", ""])
def test_empty_health_check_means_defaults(empty: str) -> None:
    assert upstream(f'servers: ["h:1"]\nhealth_check: {empty}').health_check == (
        HealthCheckConfig()
    )


def test_tcp_health_check() -> None:
    check = upstream('servers: ["h:1"]\nhealth_check: {type: tcp, interval: 1s, timeout: 500ms}')
    assert check.health_check == HealthCheckConfig(type="tcp", interval=1.0, timeout=0.5)


@pytest.mark.parametrize(
    ("value", "codes"),
    [
        (200, (200,)),
        ("204", (204,)),
        ("2xx", tuple(range(200, 300))),
        ("5XX", tuple(range(500, 600))),
        ("200-202", (200, 201, 202)),
        ("301 - 302", (301, 302)),
        ("200-200", (200,)),
    ],
)
def test_status_codes(value: object, codes: tuple[int, ...]) -> None:
    assert parse_status_codes(value) == codes


def test_passive_settings() -> None:
    app = upstream('servers: ["h:1"]\npassive: {max_fails: 0, eject: 30s, max_eject: 30s, '
                   "on_5xx: false}")
    assert app.passive == PassiveHealthConfig(
        max_fails=0, eject=30.0, max_eject=30.0, on_5xx=False
    )


def test_unused_upstreams_are_fine() -> None:
    config = parse_config(L + 'upstreams:\n  app: {servers: ["h:1"]}\n  spare: {dns: {name: x}}\n')
    assert list(config.upstreams) == ["app", "spare"]


# -- errors ------------------------------------------------------------------------------------

SERVER_CASES = [
    case(group('servers: ["h:1 weight=0"]'), f"{A}.servers[0]: {WEIGHT}, got 'weight=0'",
         "weight-zero"),
    case(group('servers: ["h:1 weight=1001"]'), f"{A}.servers[0]: {WEIGHT}, got 'weight=1001'",
         "weight-too-big"),
    case(group('servers: ["h:1 weight=x"]'), f"{A}.servers[0]: {WEIGHT}, got 'weight=x'",
         "weight-not-a-number"),
    case(group('servers: ["h:1 weight=-1"]'), f"{A}.servers[0]: {WEIGHT}, got 'weight=-1'",
         "weight-negative"),
    case(group('servers: ["h:1 weight"]'), f"{A}.servers[0]: {WEIGHT}, got 'weight'",
         "weight-no-value"),
    case(group('servers: ["h:1 weight=2 weight=3"]'),
         f"{A}.servers[0]: expected each option once, got 'weight=3' (weight is already set)",
         "weight-twice"),
    case(group('servers: ["h:1 backup"]'),
         f'{A}.servers[0]: unknown server option "backup"; expected one of: weight=N',
         "unknown-option"),
    case(group('servers: ["h:1 wieght=2"]'),
         f'{A}.servers[0]: unknown server option "wieght=2" (did you mean "weight"?); expected '
         "one of: weight=N", "unknown-option-suggestion"),
    case(group('servers: ["h weight=2"]'),
         f"{A}.servers[0]: expected {SERVER}, got 'h weight=2' (missing :port)",
         "address-with-options"),
    case(group('servers: ["h:99999"]'),
         f"{A}.servers[0]: expected {SERVER}, got 'h:99999' (port 99999 is out of range "
         "1..65535)", "bad-port"),
    case(group('servers: ["h:1 weight=2", "H:1"]'),
         f"{A}.servers[1]: expected each server once, got 'H:1' (already listed as "
         "upstreams.app.servers[0])", "duplicate-with-options"),
]

SOURCE_CASES = [
    case(group("max_retries: 1"),
         f"{A}: missing a source of servers (expected {SOURCES})", "no-source"),
    case(group('servers: ["h:1"]\ndns: {name: a.b}'),
         f"{B}.dns: expected only {SOURCES}, got servers and dns", "two-sources"),
    case(group('discovery: a:B\nservers: ["h:1"]\nfile: x.yaml'),
         f"{B}.servers: expected only {SOURCES}, got discovery, servers and file\n"
         "ferryman.yaml:6: upstreams.app.file: expected a path to a readable file, got "
         f"'x.yaml' ({Path.cwd() / 'x.yaml'} does not exist)", "three-sources"),
    case(group("dns: {name: 'bad name', port: 0}"),
         f"{A}.dns.name: expected a DNS name such as \"backend.internal\", got 'bad name'\n"
         f"{A}.dns.port: expected a port number 1..65535, got 0", "dns-bad-name-and-port"),
    case(group("dns: {port: 80}"),
         f'{A}.dns: missing required key "name" (expected a DNS name such as '
         '"backend.internal")', "dns-no-name"),
    case(group("dns: {name: a.b, type: MX}"),
         f"{A}.dns.type: expected A, AAAA or SRV, got 'MX'", "dns-bad-type"),
    case(group("dns: {name: a.b, type: SRV, port: 8080}"),
         f"{A}.dns.port: expected no port with type SRV, got 8080 (SRV records carry their "
         "own ports)", "dns-srv-port"),
    case(group("dns: {name: a.b, refresh: 0s}"),
         f"{A}.dns.refresh: expected {POSITIVE}, got '0s'", "dns-refresh-zero"),
    case(group("dns: {name: a.b, refresh: often}"),
         f"{A}.dns.refresh: expected a duration such as \"2s\" or \"500ms\", got 'often'",
         "dns-bad-duration"),
    case(group('dns: {name: a.b, resolver: "1.1.1.1"}'),
         f"{A}.dns.resolver: expected {SERVER}, got '1.1.1.1' (missing :port)",
         "dns-resolver-no-port"),
    case(group('dns: {name: a.b, resolver: "dns.local:53"}'),
         f"{A}.dns.resolver: expected the IP address and port of a DNS server, such as "
         "\"127.0.0.53:53\", got 'dns.local:53' (a DNS server is named by its address, not "
         "by a name it would have to resolve)", "dns-resolver-name"),
    case(group("dns: {name: a.b, ttl: 5}"),
         f'{A}.dns.ttl: unknown key "ttl"; expected one of: name, port, type, refresh, '
         "resolver", "dns-unknown-key"),
    case(group("discovery: consul"),
         f"{A}.discovery: expected \"module:Class\" such as \"mypkg.discovery:Consul\", got "
         "'consul'", "discovery-bad"),
]

LB_CASES = [
    case(group('servers: ["h:1"]\nlb: rr'), f"{B}.lb: expected one of {LBS}, got 'rr'",
         "lb-unknown"),
    case(group('servers: ["h:1"]\nlb: least_connections'),
         f"{B}.lb: expected one of {LBS}, got 'least_connections' (did you mean "
         '"least_conn"?)', "lb-suggestion"),
    case(group('servers: ["h:1"]\nlb: [hash]'), f"{B}.lb: expected one of {LBS}, got a list",
         "lb-list"),
    case(group('servers: ["h:1"]\nhash_key: uri'),
         f"{B}.hash_key: hash_key is only used by lb: hash or consistent (this group uses "
         "lb: round_robin, the default)", "hash-key-default-lb"),
    case(group('servers: ["h:1"]\nlb: least_conn\nhash_key: uri'),
         "ferryman.yaml:6: upstreams.app.hash_key: hash_key is only used by lb: hash or "
         "consistent (this group uses lb: least_conn)", "hash-key-wrong-lb"),
    case(group('servers: ["h:1"]\nlb: hash\nhash_key: ip'),
         f"ferryman.yaml:6: upstreams.app.hash_key: expected {HASH_KEY}, got 'ip'",
         "hash-key-unknown"),
    case(group('servers: ["h:1"]\nlb: hash\nhash_key: "header:"'),
         f"ferryman.yaml:6: upstreams.app.hash_key: expected {HASH_KEY}, got 'header:'",
         "hash-key-empty-header"),
    case(group('servers: ["h:1"]\nlb: hash\nhash_key: "cookie:a b"'),
         f"ferryman.yaml:6: upstreams.app.hash_key: expected {HASH_KEY}, got 'cookie:a b'",
         "hash-key-bad-cookie"),
    case(group('servers: ["h:1"]\nlb: consistent\nhash_key: "python:nofunction"'),
         f"ferryman.yaml:6: upstreams.app.hash_key: expected {HASH_KEY}, got "
         "'python:nofunction'", "hash-key-bad-python"),
]

HEALTH_CASES = [
    case(group('servers: ["h:1"]\nhealth_check: {rise: 0}'),
         f"{B}.health_check.rise: expected an integer >= 1, got 0", "rise-zero"),
    case(group('servers: ["h:1"]\nhealth_check: {fall: 1.5}'),
         f"{B}.health_check.fall: expected an integer >= 1, got 1.5", "fall-float"),
    case(group('servers: ["h:1"]\nhealth_check: {interval: 1s, timeout: 3s}'),
         f"{B}.health_check.timeout: expected a timeout no longer than interval (1s), got '3s'",
         "timeout-longer-than-interval"),
    case(group('servers: ["h:1"]\nhealth_check: {timeout: 10s}'),
         f"{B}.health_check.timeout: expected a timeout no longer than interval (5s, the "
         "default), got '10s'", "timeout-longer-than-default-interval"),
    case(group('servers: ["h:1"]\nhealth_check: {interval: 1s}'),
         f"{B}.health_check.interval: expected an interval no shorter than timeout (2s, the "
         "default), got '1s'", "interval-shorter-than-default-timeout"),
    case(group('servers: ["h:1"]\nhealth_check: {timeout: 0s}'),
         f"{B}.health_check.timeout: expected {POSITIVE}, got '0s'", "timeout-zero"),
    case(group('servers: ["h:1"]\nhealth_check: {interval: soon}'),
         f"{B}.health_check.interval: expected a duration such as \"2s\" or \"500ms\", got "
         "'soon'", "interval-bad"),
    case(group('servers: ["h:1"]\nhealth_check: {expect_status: 600}'),
         f"{B}.health_check.expect_status: expected {STATUS}, got 600 (600 is not a status "
         "code 100..599)", "status-600"),
    case(group('servers: ["h:1"]\nhealth_check: {expect_status: "399-200"}'),
         f"{B}.health_check.expect_status: expected {STATUS}, got '399-200' (the range is "
         "reversed; write 200-399)", "status-reversed-range"),
    case(group('servers: ["h:1"]\nhealth_check: {expect_status: "200-700"}'),
         f"{B}.health_check.expect_status: expected {STATUS}, got '200-700' (700 is not a "
         "status code 100..599)", "status-range-out"),
    case(group('servers: ["h:1"]\nhealth_check: {expect_status: [200, 6xx, ok, true]}'),
         f"{B}.health_check.expect_status[1]: expected {STATUS_ITEM}, got '6xx'\n"
         f"{B}.health_check.expect_status[2]: expected {STATUS_ITEM}, got 'ok'\n"
         f"{B}.health_check.expect_status[3]: expected {STATUS_ITEM}, got true",
         "status-list-items"),
    case(group('servers: ["h:1"]\nhealth_check: {expect_status: []}'),
         f"{B}.health_check.expect_status: expected {STATUS}, got an empty list",
         "status-empty"),
    case(group('servers: ["h:1"]\nhealth_check: {expect_status: {a: 1}}'),
         f"{B}.health_check.expect_status: expected {STATUS}, got a mapping", "status-mapping"),
    case(group('servers: ["h:1"]\nhealth_check: {type: udp}'),
         f"{B}.health_check.type: expected tcp or http, got 'udp'", "check-type"),
    case(group('servers: ["h:1"]\nhealth_check: {type: tcp, path: /x, expect_status: 200}'),
         f"{B}.health_check.path: path is only used by type: http (this check is type: tcp)\n"
         f"{B}.health_check.expect_status: expect_status is only used by type: http (this "
         "check is type: tcp)", "tcp-with-http-keys"),
    case(group('servers: ["h:1"]\nhealth_check: {path: healthz}'),
         f"{B}.health_check.path: expected a path starting with \"/\", such as \"/healthz\", "
         "got 'healthz'", "check-path"),
    case(group('servers: ["h:1"]\nhealth_check: {method: "G T"}'),
         f"{B}.health_check.method: expected an HTTP method such as \"GET\", got 'G T'",
         "check-method"),
    case(group('servers: ["h:1"]\nhealth_check: {host: "a b"}'),
         f"{B}.health_check.host: expected a host name such as \"app.internal\", optionally "
         "with \":port\", got 'a b'", "check-host"),
    case(group('servers: ["h:1"]\nhealth_check: {intervall: 1s}'),
         f'{B}.health_check.intervall: unknown key "intervall" (did you mean "interval"?); '
         "expected one of: type, method, path, host, expect_status, body_contains, interval, "
         "timeout, rise, fall", "check-unknown-key"),
    case(group('servers: ["h:1"]\nhealth_check: true'),
         f"{B}.health_check: expected a mapping, got true", "check-bool"),
]

PASSIVE_CASES = [
    case(group('servers: ["h:1"]\npassive: {eject: 1m, max_eject: 30s}'),
         f"{B}.passive.max_eject: expected a duration no shorter than eject (1m), got '30s'",
         "max-eject-below-eject"),
    case(group('servers: ["h:1"]\npassive: {max_eject: 5s}'),
         f"{B}.passive.max_eject: expected a duration no shorter than eject (10s, the "
         "default), got '5s'", "max-eject-below-default-eject"),
    case(group('servers: ["h:1"]\npassive: {eject: 10m}'),
         f"{B}.passive.eject: expected a duration no longer than max_eject (300s, the "
         "default), got '10m'", "eject-above-default-max-eject"),
    case(group('servers: ["h:1"]\npassive: {max_fails: -1, on_5xx: 1, eject: 0}'),
         f"{B}.passive.eject: expected {POSITIVE}, got 0\n"
         f"{B}.passive.max_fails: expected an integer >= 0, got -1\n"
         f"{B}.passive.on_5xx: expected true or false, got 1", "passive-values"),
    case(group('servers: ["h:1"]\npassive: {max_fail: 1}'),
         f'{B}.passive.max_fail: unknown key "max_fail" (did you mean "max_fails"?); expected '
         "one of: max_fails, eject, max_eject, on_5xx", "passive-unknown-key"),
]


@pytest.mark.parametrize(
    ("text", "message"),
    SERVER_CASES + SOURCE_CASES + LB_CASES + HEALTH_CASES + PASSIVE_CASES,
)
def test_error_message(error_text: ErrorText, text: str, message: str) -> None:
    assert error_text(text) == message


def test_file_source_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "ferryman.yaml"
    path.write_text(group("file: missing.yaml"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:4: upstreams.app.file: expected a path to a readable file, got 'missing.yaml' "
        f"({tmp_path / 'missing.yaml'} does not exist)"
    )


def test_broken_group_with_dns_is_still_a_known_name(error_text: ErrorText) -> None:
    # The group is invalid, but the listener naming it does not also say "unknown upstream".
    assert error_text(group("dns: {name: a.b, type: MX}")) == (
        f"{A}.dns.type: expected A, AAAA or SRV, got 'MX'"
    )
