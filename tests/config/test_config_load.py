"""Loading valid configurations: the result, its defaults, and the entry points."""

from __future__ import annotations

import dataclasses
import os
import pickle
import textwrap
from pathlib import Path

import pytest

import ferryman.config
from ferryman.config import (
    Config,
    ConfigError,
    ConfigProblem,
    DownstreamLimits,
    DownstreamTimeouts,
    ForwardedConfig,
    ListenerConfig,
    ListenerTls,
    PoolConfig,
    RouteConfig,
    ServerConfig,
    ServerEntry,
    SniCert,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamTls,
    load_config,
    parse_config,
)

MINIMAL = """\
server:
  workers: 1
  grace_period: 10s
listeners:
  - bind: "127.0.0.1:8080"
    upstream: app            # every request on this listener goes to group "app"
upstreams:
  app:
    servers: ["127.0.0.1:9001", "127.0.0.1:9002"]
    timeouts: {connect: 2s, read: 30s}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_example(tmp_path: Path) -> None:
    path = write(tmp_path / "ferryman.yaml", MINIMAL)
    config = load_config(path)
    assert config == Config(
        source=str(path),
        app=None,
        server=ServerConfig(
            workers=1,
            grace_period=10.0,
            timeouts=DownstreamTimeouts(
                header_read=10.0, keepalive=60.0, body_read=60.0, body_write=60.0
            ),
            limits=DownstreamLimits(
                max_request_line=8192,
                max_header_bytes=32768,
                max_headers=100,
                max_body=1073741824,
            ),
            forwarded=ForwardedConfig(
                x_forwarded_for=True,
                x_forwarded_proto=True,
                x_forwarded_host=True,
                via=False,
                via_name="ferryman",
            ),
        ),
        listeners=(
            ListenerConfig(
                bind=("127.0.0.1", 8080),
                upstream="app",
                tls=None,
                routes=(RouteConfig(upstream="app", name="default"),),
            ),
        ),
        upstreams={
            "app": UpstreamConfig(
                name="app",
                servers=(ServerEntry(("127.0.0.1", 9001)), ServerEntry(("127.0.0.1", 9002))),
                timeouts=UpstreamTimeouts(connect=2.0, read=30.0, write=60.0, idle=60.0),
                tls=None,
                pool=PoolConfig(max_idle=128, idle_timeout=60.0),
                max_retries=1,
            )
        },
    )


def test_parse_config_same_as_load(tmp_path: Path) -> None:
    path = write(tmp_path / "ferryman.yaml", MINIMAL)
    assert parse_config(MINIMAL, str(path)) == load_config(path)
    assert load_config(str(path)) == load_config(path)
    assert parse_config(MINIMAL).source == "<string>"


def test_defaults_when_server_omitted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    config = parse_config(
        'listeners: [{bind: ":80", upstream: a}]\nupstreams: {a: {servers: ["h:1"]}}'
    )
    assert config.server == ServerConfig(workers=7)
    assert config.server.grace_period == 10.0
    assert config.server.timeouts == DownstreamTimeouts()
    assert config.server.limits == DownstreamLimits()
    assert config.server.forwarded == ForwardedConfig()
    assert config.listeners == (
        ListenerConfig(
            bind=("0.0.0.0", 80),
            upstream="a",
            routes=(RouteConfig(upstream="a", name="default"),),
        ),
    )
    assert config.upstreams["a"] == UpstreamConfig(name="a", servers=(ServerEntry(("h", 1)),))


def test_workers_default_when_cpu_count_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert ServerConfig().workers == 1


def test_empty_sections_mean_defaults() -> None:
    text = textwrap.dedent(
        """\
        server:
          timeouts:
          limits: {}
        listeners: [{bind: ":80", upstream: a}]
        upstreams:
          a:
            servers: ["h:1"]
            timeouts:
            pool: {}
        """
    )
    config = parse_config(text)
    assert config.server.timeouts == DownstreamTimeouts()
    assert config.server.limits == DownstreamLimits()
    assert config.upstreams["a"].timeouts == UpstreamTimeouts()
    assert config.upstreams["a"].pool == PoolConfig()


def test_every_server_setting() -> None:
    text = textwrap.dedent(
        """\
        server:
          workers: 3
          grace_period: 1m30s
          timeouts: {header_read: 5s, keepalive: 75, body_read: 1.5, body_write: 500ms}
          limits: {max_request_line: 4k, max_header_bytes: 64KiB, max_headers: 50, max_body: 0}
          forwarded:
            x_forwarded_for: false
            x_forwarded_proto: false
            x_forwarded_host: false
            via: true
            via_name: edge-1
        listeners: [{bind: ":80", upstream: a}]
        upstreams: {a: {servers: ["h:1"]}}
        """
    )
    server = parse_config(text).server
    assert server == ServerConfig(
        workers=3,
        grace_period=90.0,
        timeouts=DownstreamTimeouts(header_read=5.0, keepalive=75.0, body_read=1.5, body_write=0.5),
        limits=DownstreamLimits(
            max_request_line=4096, max_header_bytes=65536, max_headers=50, max_body=0
        ),
        forwarded=ForwardedConfig(
            x_forwarded_for=False,
            x_forwarded_proto=False,
            x_forwarded_host=False,
            via=True,
            via_name="edge-1",
        ),
    )


def test_every_upstream_setting() -> None:
    text = textwrap.dedent(
        """\
        listeners: [{bind: ":80", upstream: api}]
        upstreams:
          api:
            servers: ["[::1]:9000", "backend.internal:9001", "10.0.0.2:9002"]
            timeouts: {connect: 1s, read: 2s, write: 3s, idle: 4s}
            pool: {max_idle: 0}
            max_retries: 0
            tls: {sni: api.internal, verify: false, verify_hostname: false}
        """
    )
    upstream = parse_config(text).upstreams["api"]
    assert upstream == UpstreamConfig(
        name="api",
        servers=(
            ServerEntry(("::1", 9000)),
            ServerEntry(("backend.internal", 9001)),
            ServerEntry(("10.0.0.2", 9002)),
        ),
        timeouts=UpstreamTimeouts(connect=1.0, read=2.0, write=3.0, idle=4.0),
        tls=UpstreamTls(sni="api.internal", verify=False, verify_hostname=False),
        pool=PoolConfig(max_idle=0, idle_timeout=4.0),
        max_retries=0,
    )


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("true", UpstreamTls()),
        ("false", None),
        ("{}", UpstreamTls()),
        ("", UpstreamTls()),
        ("{verify: false}", UpstreamTls(verify=False)),
    ],
)
def test_upstream_tls_switch(tls: str, expected: UpstreamTls | None) -> None:
    text = 'listeners: [{bind: ":80", upstream: a}]\nupstreams:\n  a:\n    servers: ["h:1"]\n'
    text += f"    tls: {tls}\n"
    assert parse_config(text).upstreams["a"].tls == expected


def test_idle_timeouts_follow_each_other() -> None:
    text = textwrap.dedent(
        """\
        listeners: [{bind: ":80", upstream: a}]
        upstreams:
          a: {servers: ["h:1"], timeouts: {idle: 5s}}
          b: {servers: ["h:1"], pool: {idle_timeout: 6s}}
          c: {servers: ["h:1"], timeouts: {idle: 7s}, pool: {idle_timeout: 7000ms}}
        """
    )
    upstreams = parse_config(text).upstreams
    assert (upstreams["a"].timeouts.idle, upstreams["a"].pool.idle_timeout) == (5.0, 5.0)
    assert (upstreams["b"].timeouts.idle, upstreams["b"].pool.idle_timeout) == (6.0, 6.0)
    assert (upstreams["c"].timeouts.idle, upstreams["c"].pool.idle_timeout) == (7.0, 7.0)


def test_upstreams_keep_file_order() -> None:
    text = 'listeners: [{bind: ":80", upstream: b}]\nupstreams:\n'
    for name in ("zeta", "b", "alpha", "api.v1", "x_y-z"):
        text += f'  {name}: {{servers: ["h:1"]}}\n'
    config = parse_config(text)
    assert list(config.upstreams) == ["zeta", "b", "alpha", "api.v1", "x_y-z"]
    assert all(config.upstreams[n].name == n for n in config.upstreams)


def test_app_makes_upstream_optional() -> None:
    config = parse_config('app: "mypkg.proxy:MyProxy"\nlisteners: [{bind: ":80"}, {bind: ":81"}]')
    assert config.app == "mypkg.proxy:MyProxy"
    assert config.upstreams == {}
    assert [listener.upstream for listener in config.listeners] == [None, None]


def test_app_with_upstream_groups() -> None:
    text = textwrap.dedent(
        """\
        app: mypkg.proxy:MyProxy
        listeners:
          - bind: ":80"
          - bind: ":81"
            upstream: a
        upstreams: {a: {servers: ["h:1"]}}
        """
    )
    config = parse_config(text)
    assert [listener.upstream for listener in config.listeners] == [None, "a"]


@pytest.mark.parametrize(
    ("bind", "address"),
    [
        ('"127.0.0.1:8080"', ("127.0.0.1", 8080)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ('"[::1]:8080"', ("::1", 8080)),
        ('"0.0.0.0:80"', ("0.0.0.0", 80)),
        ('":8080"', ("0.0.0.0", 8080)),
        (":8080", ("0.0.0.0", 8080)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_bind_forms(bind: str, address: tuple[str, int]) -> None:
    config = parse_config(f"app: a:B\nlisteners:\n  - bind: {bind}\n")
    assert config.listeners[0].bind == address


def test_yaml_anchors_and_merge_keys() -> None:
    text = textwrap.dedent(
        """\
        listeners: [{bind: ":80", upstream: a}]
        upstreams:
          a:
            servers: &servers ["h:1", "h:2"]
            timeouts: &timeouts {connect: 1s, read: 2s}
          b:
            servers: *servers
            timeouts:
              <<: *timeouts
              read: 9s
        """
    )
    upstreams = parse_config(text).upstreams
    assert upstreams["b"].servers == (ServerEntry(("h", 1)), ServerEntry(("h", 2)))
    assert upstreams["b"].timeouts == UpstreamTimeouts(connect=1.0, read=9.0)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ferryman.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_config(path).listeners[0].bind == ("127.0.0.1", 8080)


def test_config_objects_are_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.app = "x:Y"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.timeouts.header_read = 1.0  # type: ignore[misc]
    assert not hasattr(config, "__dict__")  # slots


def test_public_names() -> None:
    for name in ferryman.config.__all__:
        assert getattr(ferryman.config, name) is not None
    for cls in (
        Config, ServerConfig, DownstreamTimeouts, DownstreamLimits, ForwardedConfig,
        ListenerConfig, ListenerTls, SniCert, UpstreamConfig, UpstreamTimeouts, UpstreamTls,
        PoolConfig, ConfigProblem, ferryman.config.RouteConfig, ferryman.config.RouteMatch,
        ferryman.config.HeaderMatch, ferryman.config.HeaderEdits, ferryman.config.RedirectAction,
        ferryman.config.FixedResponse, ferryman.config.StaticAction, ferryman.config.PathRewrite,
        ferryman.config.ServerEntry, ferryman.config.DnsDiscovery,
        ferryman.config.HealthCheckConfig, ferryman.config.PassiveHealthConfig,
    ):
        assert dataclasses.is_dataclass(cls)
        assert cls.__doc__ and "Fields:" in cls.__doc__, cls


def _doc_block(after: str) -> str:
    """The indented literal block that follows the paragraph ending with ``after`` in the
    package docstring."""
    doc = ferryman.config.__doc__ or ""
    start = doc.index(after) + len(after)
    lines = doc[start:].splitlines()[1:]
    block: list[str] = []
    for line in lines:
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def test_docstring_minimal_example_is_valid() -> None:
    config = parse_config(_doc_block("proxies one port to a group of servers::"))
    assert config.upstreams["app"].servers == (
        ServerEntry(("127.0.0.1", 9001)),
        ServerEntry(("127.0.0.1", 9002)),
    )


def test_docstring_full_example_is_valid(tmp_path: Path) -> None:
    for name in ("site.pem", "site.key", "api.pem", "api.key", "clients-ca.pem",
                 "internal-ca.pem", "client.pem", "client.key"):
        write(tmp_path / "certs" / name, "placeholder\n")
    (tmp_path / "site").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "logs").mkdir()
    write(tmp_path / "servers.yaml", '["127.0.0.1:9001"]\n')
    example = _doc_block("(all optional unless marked *required*)::")
    path = write(tmp_path / "ferryman.yaml", example)
    config = load_config(path)
    certs = tmp_path / "certs"
    assert config.app == "mypkg.proxy:MyProxy"
    assert config.server.workers == 4
    assert config.server.limits == DownstreamLimits()
    assert config.server.timeouts == DownstreamTimeouts()
    assert config.server.forwarded == ForwardedConfig()
    assert config.server.pid_file == str(tmp_path / "run" / "ferryman.pid")
    assert config.server.error_log == str(tmp_path / "logs" / "error.log")
    assert (config.server.user, config.server.group) == ("www-data", "www-data")
    assert config.listeners[1].tls == ListenerTls(
        cert=str(certs / "site.pem"),
        key=str(certs / "site.key"),
        sni=(
            SniCert(
                server_names=("api.example.com", "*.api.example.com"),
                cert=str(certs / "api.pem"),
                key=str(certs / "api.key"),
            ),
        ),
        client_ca=str(certs / "clients-ca.pem"),
        client_verify="required",
        alpn=("h2", "http/1.1"),
    )
    assert config.listeners[0].routes == (RouteConfig(upstream="app", name="default"),)
    routes = config.listeners[1].routes
    assert [r.name for r in routes] == [
        "api", "listeners[1].routes[1]", "listeners[1].routes[2]", "listeners[1].routes[3]"
    ]
    assert routes[0].match.hosts == ("api.example.com", "*.api.example.com")
    assert routes[3].static is not None and routes[3].static.root == str(tmp_path / "site")
    assert config.upstreams["api"].dns is not None
    assert config.upstreams["legacy"].file == str(tmp_path / "servers.yaml")
    assert config.upstreams["dynamic"].discovery == "mypkg.discovery:Consul"
    app = config.upstreams["app"]
    assert (app.lb, app.hash_key) == ("consistent", "header:X-User")
    assert app.health_check is not None and app.health_check.expect_status == (
        *range(200, 300), 304
    )
    assert app.servers == (
        ServerEntry(("127.0.0.1", 9001), weight=3),
        ServerEntry(("backend.internal", 9002)),
        ServerEntry(("::1", 9003)),
    )
    assert app.timeouts == UpstreamTimeouts()
    assert app.pool == PoolConfig()
    assert app.tls == UpstreamTls(
        sni="app.internal",
        ca=str(certs / "internal-ca.pem"),
        cert=str(certs / "client.pem"),
        key=str(certs / "client.key"),
    )


def test_config_error_pickles() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("server: {workers: 0, grace_period: x}\n", "f.yaml")
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)
    assert copy.errors == info.value.errors
    assert copy.line == 1
