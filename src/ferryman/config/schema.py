"""The configuration schema: which keys each section has, their types, and the rules between
them. Builds the ``model`` dataclasses from a YAML node tree, reporting problems to a
``Reader``.

Every builder returns a value (falling back to defaults where the input was wrong) so that the
whole document is checked in one pass; the caller discards the result when any problem was
recorded.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import cast

from yaml.nodes import Node, ScalarNode

from .address import address_key, is_hostname
from .model import (
    DEFAULT_ALPN,
    ClientVerify,
    Config,
    DownstreamLimits,
    DownstreamTimeouts,
    ForwardedConfig,
    ListenerConfig,
    ListenerTls,
    PoolConfig,
    ServerConfig,
    SniCert,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamTls,
)
from .reader import Reader, Section, child_path

__all__ = ["build_config"]

TOP_KEYS = ("app", "server", "listeners", "upstreams", "demo_origin")
SERVER_KEYS = ("workers", "grace_period", "timeouts", "limits", "forwarded")
DOWNSTREAM_TIMEOUT_KEYS = ("header_read", "keepalive", "body_read", "body_write")
LIMIT_KEYS = ("max_request_line", "max_header_bytes", "max_headers", "max_body")
FORWARDED_KEYS = ("x_forwarded_for", "x_forwarded_proto", "x_forwarded_host", "via", "via_name")
LISTENER_KEYS = ("bind", "upstream", "tls")
LISTENER_TLS_KEYS = ("cert", "key", "sni", "client_ca", "client_verify", "alpn")
SNI_KEYS = ("server_names", "cert", "key")
UPSTREAM_KEYS = ("servers", "timeouts", "tls", "pool", "max_retries")
UPSTREAM_TIMEOUT_KEYS = ("connect", "read", "write", "idle")
UPSTREAM_TLS_KEYS = ("sni", "verify", "verify_hostname", "ca", "cert", "key")
POOL_KEYS = ("max_idle", "idle_timeout")

CLIENT_VERIFY_VALUES = ("off", "optional", "required")
ALPN_VALUES = ("http/1.1", "h2")

_APP = re.compile(r"[\w.]+:[\w.]+")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

TOP_EXPECTED = "a mapping with keys " + ", ".join(TOP_KEYS)
APP_EXPECTED = '"module:Class" such as "mypkg.proxy:MyProxy"'
LISTENERS_EXPECTED = "a non-empty list of listeners"
UPSTREAMS_EXPECTED = "a mapping of upstream group names to upstream groups"
UPSTREAM_NAME_EXPECTED = 'an upstream name made of letters, digits, "_", "." and "-"'
UPSTREAM_REF_EXPECTED = "the name of an upstream group"
SERVERS_EXPECTED = 'a non-empty list of "host:port" addresses'
SERVER_NAME_EXPECTED = 'a server name such as "example.com" or "*.example.com"'
SERVER_NAMES_EXPECTED = "a non-empty list of server names"
CLIENT_VERIFY_EXPECTED = '"off", "optional" or "required"'
ALPN_EXPECTED = 'a non-empty list of protocols among "http/1.1" and "h2"'
UPSTREAM_TLS_EXPECTED = "a mapping of TLS settings, true or false"
SNI_EXPECTED = "a list of mappings with keys server_names, cert, key"


def _is_server_name(name: str) -> bool:
    return is_hostname(name[2:] if name.startswith("*.") else name)


def build_config(root: Node | None, reader: Reader) -> Config | None:
    """Build a ``Config`` from the document's root node. Returns None when the document is too
    broken to build anything; in every case ``reader.problems`` lists what is wrong."""
    if root is None or reader.is_null(root):
        line = 1 if root is None else None
        reader.problem(
            root, "", f"expected {TOP_EXPECTED}, got an empty file", TOP_EXPECTED, line=line
        )
        return None
    top = reader.section(root, "", TOP_KEYS, TOP_EXPECTED)
    if top is None:
        return None

    app: str | None = None
    app_node = top.get("app")
    if app_node is not None:
        app = reader.string(app_node, "app", APP_EXPECTED, check=lambda s: bool(_APP.fullmatch(s)))

    demo_origin = None
    demo_node = top.get("demo_origin")
    if demo_node is not None:
        demo_origin = reader.address(demo_node, "demo_origin", require_host=True)

    server = _server(top, reader)
    upstreams, upstream_names = _upstreams(top, reader)
    listeners = _listeners(top, reader, has_app="app" in top, upstream_names=upstream_names)
    return Config(
        source=reader.source,
        app=app,
        server=server,
        listeners=listeners,
        upstreams=upstreams,
        demo_origin=demo_origin,
    )


# -- server ------------------------------------------------------------------------------------


def _subsection(parent: Section, key: str, keys: tuple[str, ...]) -> Section | None:
    node = parent.get(key)
    if node is None:
        return None
    return parent.reader.section(node, parent.path_of(key), keys)


def _server(top: Section, reader: Reader) -> ServerConfig:
    sec = _subsection(top, "server", SERVER_KEYS)
    if sec is None:
        return ServerConfig()
    defaults = ServerConfig()
    return ServerConfig(
        workers=sec.integer("workers", defaults.workers, minimum=1),
        grace_period=sec.duration("grace_period", defaults.grace_period),
        timeouts=_downstream_timeouts(sec),
        limits=_limits(sec),
        forwarded=_forwarded(sec),
    )


def _downstream_timeouts(server: Section) -> DownstreamTimeouts:
    d = DownstreamTimeouts()
    sec = _subsection(server, "timeouts", DOWNSTREAM_TIMEOUT_KEYS)
    if sec is None:
        return d
    return DownstreamTimeouts(
        header_read=sec.duration("header_read", d.header_read, positive=True),
        keepalive=sec.duration("keepalive", d.keepalive, positive=True),
        body_read=sec.duration("body_read", d.body_read, positive=True),
        body_write=sec.duration("body_write", d.body_write, positive=True),
    )


def _limits(server: Section) -> DownstreamLimits:
    d = DownstreamLimits()
    sec = _subsection(server, "limits", LIMIT_KEYS)
    if sec is None:
        return d
    return DownstreamLimits(
        max_request_line=sec.size("max_request_line", d.max_request_line, positive=True),
        max_header_bytes=sec.size("max_header_bytes", d.max_header_bytes, positive=True),
        max_headers=sec.integer("max_headers", d.max_headers, minimum=1),
        max_body=sec.size("max_body", d.max_body),
    )


def _forwarded(server: Section) -> ForwardedConfig:
    d = ForwardedConfig()
    sec = _subsection(server, "forwarded", FORWARDED_KEYS)
    if sec is None:
        return d
    reader = sec.reader
    via_name = sec.read(
        "via_name",
        lambda n, p: reader.string(
            n, p, 'an HTTP token such as "ferryman"', check=lambda s: bool(_TOKEN.fullmatch(s))
        ),
        d.via_name,
    )
    return ForwardedConfig(
        x_forwarded_for=sec.boolean("x_forwarded_for", d.x_forwarded_for),
        x_forwarded_proto=sec.boolean("x_forwarded_proto", d.x_forwarded_proto),
        x_forwarded_host=sec.boolean("x_forwarded_host", d.x_forwarded_host),
        via=sec.boolean("via", d.via),
        via_name=via_name,
    )


# -- listeners ---------------------------------------------------------------------------------


def _listeners(
    top: Section, reader: Reader, *, has_app: bool, upstream_names: list[str] | None
) -> tuple[ListenerConfig, ...]:
    node = top.require("listeners", LISTENERS_EXPECTED)
    if node is None:
        return ()
    items = reader.sequence(node, "listeners", LISTENERS_EXPECTED, non_empty=True)
    if items is None:
        return ()
    listeners: list[ListenerConfig] = []
    bound: dict[tuple[str, int], str] = {}
    for path, item in items:
        sec = reader.section(item, path, LISTENER_KEYS)
        if sec is None:
            continue
        bind_node = sec.require("bind", 'an address such as "127.0.0.1:8080" or ":8080"')
        bind = None
        if bind_node is not None:
            bind = reader.address(bind_node, sec.path_of("bind"), require_host=False)
        if bind is not None and bind_node is not None:
            key = address_key(bind)
            if key in bound:
                reader.expected(
                    bind_node, sec.path_of("bind"), "an address no other listener binds",
                    f"already bound by {bound[key]}",
                )
            else:
                bound[key] = path
        upstream = _upstream_ref(sec, reader, has_app=has_app, upstream_names=upstream_names)
        tls = None
        tls_node = sec.get("tls")
        if tls_node is not None:
            tls = _listener_tls(tls_node, sec.path_of("tls"), reader)
        if bind is not None:
            listeners.append(ListenerConfig(bind=bind, upstream=upstream, tls=tls))
    return tuple(listeners)


def _upstream_ref(
    sec: Section, reader: Reader, *, has_app: bool, upstream_names: list[str] | None
) -> str | None:
    node = sec.get("upstream")
    if node is None:
        if not has_app:
            sec.require("upstream", f'{UPSTREAM_REF_EXPECTED}; required unless "app" is set')
        return None
    path = sec.path_of("upstream")
    name = reader.string(node, path, UPSTREAM_REF_EXPECTED)
    if name is None:
        return None
    if upstream_names is not None and name not in upstream_names:
        if upstream_names:
            defined = "defined: " + ", ".join(upstream_names)
            expected = "one of: " + ", ".join(upstream_names)
        else:
            defined = expected = "no upstreams are defined"
        reader.problem(node, path, f'unknown upstream "{name}" ({defined})', expected)
        return None
    return name


def _listener_tls(node: Node, path: str, reader: Reader) -> ListenerTls | None:
    sec = reader.section(node, path, LISTENER_TLS_KEYS)
    if sec is None:
        return None
    cert_node = sec.require("cert", "a path to the PEM certificate chain")
    key_node = sec.require("key", "a path to the PEM private key")
    cert = None if cert_node is None else reader.file(cert_node, sec.path_of("cert"))
    key = None if key_node is None else reader.file(key_node, sec.path_of("key"))
    sni = _sni_certs(sec, reader)
    client_ca = sec.file("client_ca")
    client_verify = _client_verify(sec, reader)
    alpn = _alpn(sec, reader)
    if cert is None or key is None:
        return None
    return ListenerTls(
        cert=cert, key=key, sni=sni, client_ca=client_ca, client_verify=client_verify, alpn=alpn
    )


def _client_verify(sec: Section, reader: Reader) -> ClientVerify:
    has_ca = "client_ca" in sec
    default: ClientVerify = "required" if has_ca else "off"
    node = sec.get("client_verify")
    if node is None:
        return default
    path = sec.path_of("client_verify")
    ok, value = reader.scalar(node, path, CLIENT_VERIFY_EXPECTED)
    if not ok:
        return default
    if value is False:  # an unquoted `off` is a boolean in YAML 1.1
        value = "off"
    if value not in CLIENT_VERIFY_VALUES:
        reader.expected(node, path, CLIENT_VERIFY_EXPECTED)
        return default
    if value != "off" and not has_ca:
        reader.expected(
            node, path, '"off" unless client_ca is set',
            "client certificates cannot be verified without client_ca, a CA bundle",
        )
        return default
    return cast(ClientVerify, value)


def _alpn(sec: Section, reader: Reader) -> tuple[str, ...]:
    node = sec.get("alpn")
    if node is None:
        return DEFAULT_ALPN
    items = reader.sequence(node, sec.path_of("alpn"), ALPN_EXPECTED, non_empty=True)
    if items is None:
        return ()
    protocols: list[str] = []
    for path, item in items:
        proto = reader.string(item, path, 'a protocol: "http/1.1" or "h2"')
        if proto is None:
            continue
        if proto not in ALPN_VALUES:
            reader.expected(item, path, 'a protocol: "http/1.1" or "h2"')
        elif proto in protocols:
            reader.expected(item, path, "each protocol once", "listed twice")
        else:
            protocols.append(proto)
    return tuple(protocols)


def _sni_certs(tls: Section, reader: Reader) -> tuple[SniCert, ...]:
    node = tls.get("sni")
    if node is None:
        return ()
    items = reader.sequence(node, tls.path_of("sni"), SNI_EXPECTED)
    if items is None:
        return ()
    certs: list[SniCert] = []
    seen: dict[str, str] = {}
    for path, item in items:
        sec = reader.section(item, path, SNI_KEYS)
        if sec is None:
            continue
        names = _server_names(sec, reader, seen, path)
        cert_node = sec.require("cert", "a path to the PEM certificate chain")
        key_node = sec.require("key", "a path to the PEM private key")
        cert = None if cert_node is None else reader.file(cert_node, sec.path_of("cert"))
        key = None if key_node is None else reader.file(key_node, sec.path_of("key"))
        if names and cert is not None and key is not None:
            certs.append(SniCert(server_names=names, cert=cert, key=key))
    return tuple(certs)


def _server_names(
    sec: Section, reader: Reader, seen: dict[str, str], owner: str
) -> tuple[str, ...]:
    node = sec.require("server_names", SERVER_NAMES_EXPECTED)
    if node is None:
        return ()
    names_path = sec.path_of("server_names")
    items = reader.sequence(node, names_path, SERVER_NAMES_EXPECTED, non_empty=True)
    if items is None:
        return ()
    names: list[str] = []
    for path, item in items:
        name = reader.string(item, path, SERVER_NAME_EXPECTED, check=_is_server_name)
        if name is None:
            continue
        name = name.lower().rstrip(".")
        if name in seen:
            reader.expected(
                item, path, "a server name not listed before", f"already listed in {seen[name]}"
            )
            continue
        seen[name] = owner
        names.append(name)
    return tuple(names)


# -- upstreams ---------------------------------------------------------------------------------


def _upstreams(
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


def _upstream(name: str, node: Node, path: str, reader: Reader) -> UpstreamConfig | None:
    sec = reader.section(node, path, UPSTREAM_KEYS)
    if sec is None:
        return None
    servers = _servers(sec, reader)
    timeouts_sec = _subsection(sec, "timeouts", UPSTREAM_TIMEOUT_KEYS)
    pool_sec = _subsection(sec, "pool", POOL_KEYS)
    timeouts = _upstream_timeouts(timeouts_sec)
    pool = _pool(pool_sec)
    timeouts, pool = _reconcile_idle(reader, timeouts_sec, pool_sec, timeouts, pool)
    tls = _upstream_tls(sec, reader)
    max_retries = sec.integer("max_retries", 1, minimum=0)
    if not servers:
        return None
    return UpstreamConfig(
        name=name, servers=servers, timeouts=timeouts, tls=tls, pool=pool, max_retries=max_retries
    )


def _servers(sec: Section, reader: Reader) -> tuple[tuple[str, int], ...]:
    node = sec.require("servers", SERVERS_EXPECTED)
    if node is None:
        return ()
    items = reader.sequence(node, sec.path_of("servers"), SERVERS_EXPECTED, non_empty=True)
    if items is None:
        return ()
    servers: list[tuple[str, int]] = []
    seen: dict[tuple[str, int], str] = {}
    for path, item in items:
        address = reader.address(item, path, require_host=True)
        if address is None:
            continue
        key = address_key(address)
        if key in seen:
            reader.expected(item, path, "each server once", f"already listed as {seen[key]}")
            continue
        seen[key] = path
        servers.append(address)
    return tuple(servers)


def _upstream_timeouts(sec: Section | None) -> UpstreamTimeouts:
    d = UpstreamTimeouts()
    if sec is None:
        return d
    return UpstreamTimeouts(
        connect=sec.duration("connect", d.connect, positive=True),
        read=sec.duration("read", d.read, positive=True),
        write=sec.duration("write", d.write, positive=True),
        idle=sec.duration("idle", d.idle, positive=True),
    )


def _pool(sec: Section | None) -> PoolConfig:
    d = PoolConfig()
    if sec is None:
        return d
    return PoolConfig(
        max_idle=sec.integer("max_idle", d.max_idle, minimum=0),
        idle_timeout=sec.duration("idle_timeout", d.idle_timeout, positive=True),
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
