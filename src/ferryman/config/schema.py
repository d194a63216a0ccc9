"""The configuration schema: which keys each section has, their types, and the rules between
them. Builds the ``model`` dataclasses from a YAML node tree, reporting problems to a
``Reader``. The top level, ``server`` and ``listeners`` are here; listener routes are in
``routes`` and upstream groups in ``upstreams``.

Every builder returns a value (falling back to defaults where the input was wrong) so that the
whole document is checked in one pass; the caller discards the result when any problem was
recorded.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import Literal, cast

from yaml.nodes import Node, ScalarNode

from .address import address_key
from .common import APP, APP_EXPECTED, TOKEN, check_upstream_ref, is_server_name, subsection
from .model import (
    DEFAULT_ALPN,
    AccessLogConfig,
    ClientVerify,
    Config,
    DownstreamLimits,
    DownstreamTimeouts,
    ForwardedConfig,
    ListenerConfig,
    ListenerTls,
    RouteConfig,
    ServerConfig,
    SniCert,
)
from .reader import Reader, Section
from .routes import build_routes
from .upstreams import build_upstreams

__all__ = ["build_config"]

TOP_KEYS = ("app", "server", "listeners", "upstreams")
SERVER_KEYS = (
    "workers", "grace_period", "timeouts", "limits", "forwarded", "pid_file", "error_log",
    "user", "group", "cpu_affinity", "upgrade_sock", "metrics",
)
CPU_AFFINITY_EXPECTED = "auto, off, or a list of CPU numbers this process may use"
DOWNSTREAM_TIMEOUT_KEYS = ("header_read", "keepalive", "body_read", "body_write")
LIMIT_KEYS = ("max_request_line", "max_header_bytes", "max_headers", "max_body")
FORWARDED_KEYS = (
    "x_forwarded_for", "x_forwarded_proto", "x_forwarded_host", "via", "via_name", "request_id"
)
LISTENER_KEYS = ("bind", "upstream", "tls", "routes", "h2c", "access_log")
ACCESS_LOG_KEYS = ("format", "path", "buffer", "flush")
ACCESS_LOG_FORMATS = ("combined", "json")
ACCESS_LOG_EXPECTED = (
    'off, combined, json, or a mapping with format, path ("-" for standard output), '
    "buffer and flush"
)
ACCESS_LOG_PATH_EXPECTED = 'a file path in a writable directory, or "-" for standard output'
LISTENER_TLS_KEYS = ("cert", "key", "sni", "client_ca", "client_verify", "alpn")
SNI_KEYS = ("server_names", "cert", "key")

CLIENT_VERIFY_VALUES = ("off", "optional", "required")
ALPN_VALUES = ("http/1.1", "h2")

TOP_EXPECTED = "a mapping with keys " + ", ".join(TOP_KEYS)
LISTENERS_EXPECTED = "a non-empty list of listeners"
UPSTREAM_REF_EXPECTED = "the name of an upstream group"
TARGET_EXPECTED = (
    'the name of an upstream group, or a list of routes; required unless "app" is set'
)
SERVER_NAME_EXPECTED = 'a server name such as "example.com" or "*.example.com"'
SERVER_NAMES_EXPECTED = "a non-empty list of server names"
CLIENT_VERIFY_EXPECTED = '"off", "optional" or "required"'
ALPN_EXPECTED = (
    'h2_preferred, h1_only or h2_only, or a non-empty list of protocols among "http/1.1" '
    'and "h2"'
)
#: the ALPN policies (Pingora's prefer_h2 / h1_only / h2_only) and the lists they offer
ALPN_POLICIES = {
    "h2_preferred": ("h2", "http/1.1"),
    "h1_only": ("http/1.1",),
    "h2_only": ("h2",),
}
SNI_EXPECTED = "a list of mappings with keys server_names, cert, key"


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
        app = reader.string(app_node, "app", APP_EXPECTED, check=lambda s: bool(APP.fullmatch(s)))

    server = _server(top, reader)
    upstreams, upstream_names = build_upstreams(top, reader)
    reserved = {} if server.metrics is None else {address_key(server.metrics): "server.metrics"}
    listeners = _listeners(
        top, reader, has_app="app" in top, upstream_names=upstream_names, reserved=reserved
    )
    return Config(
        source=reader.source,
        app=app,
        server=server,
        listeners=listeners,
        upstreams=upstreams,
    )


# -- server ------------------------------------------------------------------------------------


def _server(top: Section, reader: Reader) -> ServerConfig:
    sec = subsection(top, "server", SERVER_KEYS)
    if sec is None:
        return ServerConfig()
    defaults = ServerConfig()
    return ServerConfig(
        workers=sec.integer("workers", defaults.workers, minimum=1),
        grace_period=sec.duration("grace_period", defaults.grace_period),
        timeouts=_downstream_timeouts(sec),
        limits=_limits(sec),
        forwarded=_forwarded(sec),
        pid_file=sec.read("pid_file", lambda n, p: _writable_path(n, p, reader), None),
        error_log=sec.read("error_log", lambda n, p: _writable_path(n, p, reader), None),
        user=sec.read("user", lambda n, p: _account(n, p, reader, "user"), None),
        group=sec.read("group", lambda n, p: _account(n, p, reader, "group"), None),
        cpu_affinity=sec.read("cpu_affinity", lambda n, p: _cpus(n, p, reader), ()),
        upgrade_sock=sec.read(
            "upgrade_sock",
            lambda n, p: _writable_path(n, p, reader, "a socket path in a writable directory"),
            None,
        ),
        metrics=sec.read("metrics", lambda n, p: _metrics_address(n, p, reader), None),
    )


def _metrics_address(node: Node, path: str, reader: Reader) -> tuple[str, int] | None:
    """``host:port`` of the Prometheus endpoint, or ``off``."""
    if isinstance(node, ScalarNode) and node.value in ("off", "false"):
        return None
    return reader.address(node, path, require_host=False)


def _cpus(node: Node, path: str, reader: Reader) -> tuple[int, ...] | None:
    """``auto`` (every CPU allowed, in order), ``off``, or a list of allowed CPU numbers."""
    allowed = sorted(os.sched_getaffinity(0))
    if isinstance(node, ScalarNode):
        ok, value = reader.scalar(node, path, CPU_AFFINITY_EXPECTED)
        if not ok:
            return None
        if value == "auto":
            return tuple(allowed)
        if value == "off" or value is False:
            return ()
        reader.expected(node, path, CPU_AFFINITY_EXPECTED)
        return None
    items = reader.sequence(node, path, CPU_AFFINITY_EXPECTED, non_empty=True)
    if items is None:
        return None
    cpus: list[int] = []
    for item_path, item in items:
        cpu = reader.integer(item, item_path, minimum=0)
        if cpu is None:
            continue
        if cpu not in allowed:
            reader.expected(
                item, item_path, "a CPU this process may use",
                f"allowed: {', '.join(map(str, allowed))}",
            )
        else:
            cpus.append(cpu)
    return tuple(cpus)


def _account(node: Node, path: str, reader: Reader, kind: str) -> str | None:
    """The name of an existing user or group."""
    expected = f"the name of an existing {kind}"
    name = reader.string(node, path, expected)
    if name is None:
        return None
    try:
        if kind == "user":
            pwd.getpwnam(name)
        else:
            grp.getgrnam(name)
    except KeyError:
        reader.expected(node, path, expected, f"no {kind} {name!r} on this system")
        return None
    return name


def _writable_path(
    node: Node, path: str, reader: Reader, expected: str = "a file path in a writable directory"
) -> str | None:
    """A file (relative to the config's directory) that can be written or created."""
    text = reader.string(node, path, expected)
    if text is None:
        return None
    full = os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(text)))
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        reader.expected(node, path, expected, f"{full} is a directory")
    elif not os.path.isdir(parent):
        reader.expected(node, path, expected, f"{parent} does not exist")
    elif os.path.exists(full) and not os.access(full, os.W_OK):
        reader.expected(node, path, expected, f"{full} is not writable")
    elif not os.path.exists(full) and not os.access(parent, os.W_OK):
        reader.expected(node, path, expected, f"{parent} is not writable")
    else:
        return full
    return None


def _downstream_timeouts(server: Section) -> DownstreamTimeouts:
    d = DownstreamTimeouts()
    sec = subsection(server, "timeouts", DOWNSTREAM_TIMEOUT_KEYS)
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
    sec = subsection(server, "limits", LIMIT_KEYS)
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
    sec = subsection(server, "forwarded", FORWARDED_KEYS)
    if sec is None:
        return d
    reader = sec.reader
    via_name = sec.read(
        "via_name",
        lambda n, p: reader.string(
            n, p, 'an HTTP token such as "ferryman"', check=lambda s: bool(TOKEN.fullmatch(s))
        ),
        d.via_name,
    )
    return ForwardedConfig(
        x_forwarded_for=sec.boolean("x_forwarded_for", d.x_forwarded_for),
        x_forwarded_proto=sec.boolean("x_forwarded_proto", d.x_forwarded_proto),
        x_forwarded_host=sec.boolean("x_forwarded_host", d.x_forwarded_host),
        via=sec.boolean("via", d.via),
        via_name=via_name,
        request_id=sec.boolean("request_id", d.request_id),
    )


# -- listeners ---------------------------------------------------------------------------------


def _listeners(
    top: Section,
    reader: Reader,
    *,
    has_app: bool,
    upstream_names: list[str] | None,
    reserved: dict[tuple[str, int], str],
) -> tuple[ListenerConfig, ...]:
    node = top.require("listeners", LISTENERS_EXPECTED)
    if node is None:
        return ()
    items = reader.sequence(node, "listeners", LISTENERS_EXPECTED, non_empty=True)
    if items is None:
        return ()
    listeners: list[ListenerConfig] = []
    bound: dict[tuple[str, int], str] = dict(reserved)  # (the metrics endpoint's address)
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
        upstream, routes = _targets(sec, reader, has_app=has_app, upstream_names=upstream_names)
        tls = None
        tls_node = sec.get("tls")
        if tls_node is not None:
            tls = _listener_tls(tls_node, sec.path_of("tls"), reader)
        h2c = sec.boolean("h2c", False)
        access_log = _access_log(sec, reader)
        if bind is not None:
            listeners.append(
                ListenerConfig(
                    bind=bind,
                    upstream=upstream,
                    tls=tls,
                    routes=routes,
                    h2c=h2c,
                    access_log=access_log,
                )
            )
    return tuple(listeners)


def _access_log(sec: Section, reader: Reader) -> AccessLogConfig | None:
    """``off`` (or absent, or false), a format name (to standard output), or a mapping."""
    node = sec.get("access_log")
    if node is None:
        return None
    path = sec.path_of("access_log")
    if isinstance(node, ScalarNode):
        ok, value = reader.scalar(node, path, ACCESS_LOG_EXPECTED)
        if not ok:
            return None
        if value is False or value == "off":
            return None
        if value in ACCESS_LOG_FORMATS:
            return AccessLogConfig(format=cast(Literal["combined", "json"], value))
        reader.expected(node, path, ACCESS_LOG_EXPECTED)
        return None
    log_sec = reader.section(node, path, ACCESS_LOG_KEYS)
    if log_sec is None:
        return None
    d = AccessLogConfig()
    fmt: str = log_sec.read(
        "format",
        lambda n, p: reader.string(
            n, p, "combined or json", check=lambda s: s in ACCESS_LOG_FORMATS
        ),
        "combined",
    )
    log_path = log_sec.read("path", lambda n, p: _log_path(n, p, reader), "-")
    return AccessLogConfig(
        format=cast(Literal["combined", "json"], fmt),
        path=None if log_path == "-" else log_path,
        buffer=log_sec.size("buffer", d.buffer, positive=True),
        flush=log_sec.duration("flush", d.flush, positive=True),
    )


def _log_path(node: Node, path: str, reader: Reader) -> str | None:
    """``"-"``, or a file (relative to the config's directory) that can be appended to."""
    text = reader.string(node, path, ACCESS_LOG_PATH_EXPECTED)
    if text is None or text == "-":
        return text
    return _writable_path(node, path, reader, ACCESS_LOG_PATH_EXPECTED)


def _targets(
    sec: Section, reader: Reader, *, has_app: bool, upstream_names: list[str] | None
) -> tuple[str | None, tuple[RouteConfig, ...]]:
    """A listener's ``upstream`` and routes: ``upstream: NAME`` alone is one catch-all route
    named ``default``; ``routes`` lists them; without either the ``app`` decides."""
    upstream_node = sec.get("upstream")
    routes_node = sec.get("routes")
    if upstream_node is None and routes_node is None:
        if not has_app:
            reader.problem(
                sec.node, sec.path,
                f'missing required key "upstream" or "routes" (expected {TARGET_EXPECTED})',
                TARGET_EXPECTED,
            )
        return None, ()
    upstream = None
    if upstream_node is not None:
        path = sec.path_of("upstream")
        upstream = reader.string(upstream_node, path, UPSTREAM_REF_EXPECTED)
        if upstream is not None and not check_upstream_ref(
            reader, upstream_node, path, upstream, upstream_names
        ):
            upstream = None
    if routes_node is None:
        if upstream is None:
            return None, ()
        return upstream, (RouteConfig(upstream=upstream, name="default"),)
    if upstream_node is not None:
        shown = upstream_node.value if isinstance(upstream_node.value, str) else "NAME"
        reader.problem(
            sec.key_node("upstream"),
            sec.path_of("upstream"),
            'expected either "upstream" or "routes", not both (to send the requests no route '
            f'matches to {shown}, end the routes with a catch-all route "- upstream: {shown}")',
            'either "upstream" or "routes"',
        )
    return None, build_routes(sec, reader, upstream_names)


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
    if isinstance(node, ScalarNode):
        policy = reader.string(node, sec.path_of("alpn"), ALPN_EXPECTED)
        if policy is None:
            return ()
        if policy not in ALPN_POLICIES:
            reader.expected(node, sec.path_of("alpn"), ALPN_EXPECTED)
            return ()
        return ALPN_POLICIES[policy]
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
        name = reader.string(item, path, SERVER_NAME_EXPECTED, check=is_server_name)
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
