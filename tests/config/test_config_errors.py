"""Every validation rule, with the exact message a user sees (file:line: key.path: message)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ferryman.config import ConfigError, ConfigProblem, load_config, parse_config

# A valid listener and upstream group, for snippets that test another section.
L = 'listeners: [{bind: ":8080", upstream: app}]\n'
U = 'upstreams: {app: {servers: ["127.0.0.1:9001"]}}\n'
TOP_KEYS = "app, server, listeners, upstreams"
DURATION = 'a duration such as "2s" or "500ms"'
SIZE = 'a size such as "8KiB", "512k" or "1m"'
BIND = 'an address such as "127.0.0.1:8080", "[::1]:8080" or ":8080"'
SERVER = 'a "host:port" address such as "127.0.0.1:9001" or "[::1]:9001"'

ErrorText = Callable[[str], str]


ALLOWED_CPUS = ", ".join(map(str, sorted(os.sched_getaffinity(0))))


def case(text: str, message: str, id: str) -> object:
    return pytest.param(text, message, id=id)


DOCUMENT_CASES = [
    case("", f"ferryman.yaml:1: expected a mapping with keys {TOP_KEYS}, got an empty file",
         "empty-file"),
    case("# nothing but a comment\n",
         f"ferryman.yaml:1: expected a mapping with keys {TOP_KEYS}, got an empty file",
         "comment-only"),
    case("~\n", f"ferryman.yaml:1: expected a mapping with keys {TOP_KEYS}, got an empty file",
         "null-document"),
    case("- bind: ':80'\n",
         f"ferryman.yaml:1: expected a mapping with keys {TOP_KEYS}, got a list", "top-list"),
    case("just text\n",
         f"ferryman.yaml:1: expected a mapping with keys {TOP_KEYS}, got 'just text'",
         "top-scalar"),
    case("server:\n  workers: [1\n",
         "ferryman.yaml:3: invalid YAML: expected ',' or ']', but got '<stream end>' "
         "(while parsing a flow sequence)", "syntax-unclosed-flow"),
    case('listeners:\n  - bind: ":80"\n   upstream: app\n',
         "ferryman.yaml:3: invalid YAML: expected <block end>, but found "
         "'<block mapping start>' (while parsing a block collection)", "syntax-indentation"),
    case('listeners:\n\t- bind: ":80"\n',
         "ferryman.yaml:2: invalid YAML: found character '\\t' that cannot start any token "
         "(while scanning for the next token)", "syntax-tab"),
    case("server: *nope\n", "ferryman.yaml:1: invalid YAML: found undefined alias 'nope'",
         "syntax-alias"),
    case(L + "---\n" + U,
         "ferryman.yaml:2: invalid YAML: expected a single document in the stream, "
         "but found another document", "two-documents"),
    case(L + U + "extra: 1\n",
         f'ferryman.yaml:3: extra: unknown key "extra"; expected one of: {TOP_KEYS}',
         "unknown-top-key"),
    case(L + U + "upstream: {}\n",
         f'ferryman.yaml:3: upstream: unknown key "upstream" (did you mean "upstreams"?); '
         f"expected one of: {TOP_KEYS}", "unknown-top-key-suggestion"),
    case(L + U + L,
         'ferryman.yaml:3: listeners: duplicate key "listeners" (first defined on line 1)',
         "duplicate-key"),
    case(L + U + "app: nope\n",
         "ferryman.yaml:3: app: expected \"module:Class\" such as \"mypkg.proxy:MyProxy\", "
         "got 'nope'", "app-no-colon"),
    case(L + U + 'app: "my pkg:Proxy"\n',
         "ferryman.yaml:3: app: expected \"module:Class\" such as \"mypkg.proxy:MyProxy\", "
         "got 'my pkg:Proxy'", "app-space"),
    case(L + U + "app: [a, b]\n",
         'ferryman.yaml:3: app: expected "module:Class" such as "mypkg.proxy:MyProxy", '
         "got a list", "app-list"),
    case(L + U + "server: {workers: !!int abc}\n",
         "ferryman.yaml:3: server.workers: expected an integer >= 1, got 'abc' with tag !!int",
         "bad-yaml-int"),
    case(L + U + "server: {grace_period: !env GRACE}\n",
         'ferryman.yaml:3: server.grace_period: expected a duration such as "2s" or "500ms", '
         "got 'GRACE' with tag !env", "unknown-tag"),
    case(L + U + "server: {<<: 5}\n",
         "ferryman.yaml:3: server: invalid merge key: expected a mapping or list of mappings "
         "for merging, but found scalar", "bad-merge"),
]

SERVER_CASES = [
    case(L + U + "server:\n  cpu_affinity: [4096]\n",
         "ferryman.yaml:4: server.cpu_affinity[0]: expected a CPU this process may use, got "
         f"4096 (allowed: {ALLOWED_CPUS})", "cpu-not-allowed"),
    case(L + U + "server:\n  cpu_affinity: all\n",
         "ferryman.yaml:4: server.cpu_affinity: expected auto, off, or a list of CPU numbers "
         "this process may use, got 'all'", "cpu-affinity-word"),
    case(L + U + "server:\n  user: no-such-user-here\n",
         "ferryman.yaml:4: server.user: expected the name of an existing user, got "
         "'no-such-user-here' (no user 'no-such-user-here' on this system)", "user-unknown"),
    case(L + U + "server:\n  group: no-such-group-here\n",
         "ferryman.yaml:4: server.group: expected the name of an existing group, got "
         "'no-such-group-here' (no group 'no-such-group-here' on this system)",
         "group-unknown"),
    case(L + U + "server:\n  pid_file: /nonexistent-dir/ferryman.pid\n",
         "ferryman.yaml:4: server.pid_file: expected a file path in a writable directory, got "
         "'/nonexistent-dir/ferryman.pid' (/nonexistent-dir does not exist)", "pid-file-dir"),
    case(L + U + "server:\n  metrics: nonsense\n",
         'ferryman.yaml:4: server.metrics: expected an address such as "127.0.0.1:8080", '
         "\"[::1]:8080\" or \":8080\", got 'nonsense' (missing :port)", "metrics-address"),
    case(L + U + "server:\n  upgrade_sock: /nonexistent-dir/u.sock\n",
         "ferryman.yaml:4: server.upgrade_sock: expected a socket path in a writable "
         "directory, got '/nonexistent-dir/u.sock' (/nonexistent-dir does not exist)",
         "upgrade-sock-dir"),
    case(L + U + "server:\n  error_log: /\n",
         "ferryman.yaml:4: server.error_log: expected a file path in a writable directory, got "
         "'/' (/ is a directory)", "error-log-directory"),
    case(L + U + "server: []\n",
         "ferryman.yaml:3: server: expected a mapping, got an empty list", "server-list"),
    case(L + U + "server: 4\n", "ferryman.yaml:3: server: expected a mapping, got 4",
         "server-int"),
    case(L + U + "server:\n  workers: 0\n",
         "ferryman.yaml:4: server.workers: expected an integer >= 1, got 0", "workers-zero"),
    case(L + U + "server:\n  workers: true\n",
         "ferryman.yaml:4: server.workers: expected an integer >= 1, got true", "workers-bool"),
    case(L + U + "server:\n  workers: yes\n",
         "ferryman.yaml:4: server.workers: expected an integer >= 1, got yes (a boolean)",
         "workers-yes"),
    case(L + U + 'server:\n  workers: "4"\n',
         "ferryman.yaml:4: server.workers: expected an integer >= 1, got '4'",
         "workers-string"),
    case(L + U + "server:\n  workers: 1.5\n",
         "ferryman.yaml:4: server.workers: expected an integer >= 1, got 1.5",
         "workers-float"),
    case(L + U + "server:\n  workers:\n",
         "ferryman.yaml:4: server.workers: expected an integer >= 1, got null", "workers-null"),
    case(L + U + "server:\n  workers: {n: 1}\n",
         "ferryman.yaml:4: server.workers: expected an integer >= 1, got a mapping",
         "workers-mapping"),
    case(L + U + "server:\n  worker: 2\n",
         'ferryman.yaml:4: server.worker: unknown key "worker" (did you mean "workers"?); '
         "expected one of: workers, grace_period, timeouts, limits, forwarded, pid_file, "
         "error_log, user, group, cpu_affinity, upgrade_sock, metrics",
         "server-unknown-key"),
    case(L + U + "server:\n  grace_period: fast\n",
         f"ferryman.yaml:4: server.grace_period: expected {DURATION}, got 'fast'",
         "grace-garbage"),
    case(L + U + "server:\n  grace_period: -1s\n",
         f"ferryman.yaml:4: server.grace_period: expected {DURATION}, got '-1s' (negative)",
         "grace-negative"),
    case(L + U + "server:\n  grace_period: 5x\n",
         f"ferryman.yaml:4: server.grace_period: expected {DURATION}, got '5x' "
         '(unknown unit "x"; use h, m, s or ms)', "grace-unit"),
    case(L + U + "server:\n  grace_period: .inf\n",
         f"ferryman.yaml:4: server.grace_period: expected {DURATION}, got inf (not finite)",
         "grace-inf"),
    case(L + U + "server:\n  timeouts: 10s\n",
         "ferryman.yaml:4: server.timeouts: expected a mapping, got '10s'", "timeouts-scalar"),
    case(L + U + "server:\n  timeouts:\n    header: 10s\n",
         'ferryman.yaml:5: server.timeouts.header: unknown key "header" (did you mean '
         '"header_read"?); expected one of: header_read, keepalive, body_read, body_write',
         "timeouts-unknown-key"),
    case(L + U + "server:\n  timeouts:\n    header_read: 0\n",
         'ferryman.yaml:5: server.timeouts.header_read: expected a positive duration such as '
         '"2s" or "500ms", got 0', "header-read-zero"),
    case(L + U + "server:\n  timeouts:\n    keepalive: forever\n",
         f"ferryman.yaml:5: server.timeouts.keepalive: expected {DURATION}, got 'forever'",
         "keepalive-garbage"),
    case(L + U + "server:\n  limits:\n    max_body: lots\n",
         f"ferryman.yaml:5: server.limits.max_body: expected {SIZE}, got 'lots'",
         "max-body-garbage"),
    case(L + U + "server:\n  limits:\n    max_body: -1\n",
         f"ferryman.yaml:5: server.limits.max_body: expected {SIZE}, got -1 (negative)",
         "max-body-negative"),
    case(L + U + "server:\n  limits:\n    max_request_line: 0\n",
         'ferryman.yaml:5: server.limits.max_request_line: expected a positive size such as '
         '"8KiB", "512k" or "1m", got 0', "max-request-line-zero"),
    case(L + U + "server:\n  limits:\n    max_header_bytes: 1.5x\n",
         f"ferryman.yaml:5: server.limits.max_header_bytes: expected {SIZE}, got '1.5x' "
         '(unknown unit "x"; use k, m, g or t (or KiB, MiB, ...))', "max-header-bytes-unit"),
    case(L + U + "server:\n  limits:\n    max_headers: 0\n",
         "ferryman.yaml:5: server.limits.max_headers: expected an integer >= 1, got 0",
         "max-headers-zero"),
    case(L + U + "server:\n  limits:\n    max_headers: 1k\n",
         "ferryman.yaml:5: server.limits.max_headers: expected an integer >= 1, got '1k'",
         "max-headers-size"),
    case(L + U + "server:\n  limits:\n    max_body_size: 1m\n",
         'ferryman.yaml:5: server.limits.max_body_size: unknown key "max_body_size" (did you '
         'mean "max_body"?); expected one of: max_request_line, max_header_bytes, max_headers, '
         "max_body", "limits-unknown-key"),
    case(L + U + "server:\n  forwarded:\n    via: 'yes'\n",
         "ferryman.yaml:5: server.forwarded.via: expected true or false, got 'yes'",
         "via-string"),
    case(L + U + "server:\n  forwarded:\n    x_forwarded_for: 1\n",
         "ferryman.yaml:5: server.forwarded.x_forwarded_for: expected true or false, got 1",
         "xff-int"),
    case(L + U + "server:\n  forwarded:\n    via_name: my proxy\n",
         'ferryman.yaml:5: server.forwarded.via_name: expected an HTTP token such as '
         "\"ferryman\", got 'my proxy'", "via-name-space"),
    case(L + U + "server:\n  forwarded:\n    via_name: ''\n",
         'ferryman.yaml:5: server.forwarded.via_name: expected an HTTP token such as '
         "\"ferryman\", got ''", "via-name-empty"),
    case(L + U + "server:\n  forwarded:\n    real_ip: true\n",
         'ferryman.yaml:5: server.forwarded.real_ip: unknown key "real_ip"; expected one '
         "of: x_forwarded_for, x_forwarded_proto, x_forwarded_host, via, via_name, request_id",
         "forwarded-unknown-key"),
]

LISTENER_CASES = [
    case(U + 'listeners:\n  - bind: ":80"\n    upstream: app\n    access_log: verbose\n',
         "ferryman.yaml:5: listeners[0].access_log: expected off, combined, json, or a mapping "
         'with format, path ("-" for standard output), buffer and flush, got \'verbose\'',
         "access-log-word"),
    case(U + 'listeners:\n  - bind: ":80"\n    upstream: app\n    access_log: {format: xml}\n',
         "ferryman.yaml:5: listeners[0].access_log.format: expected combined or json, got 'xml'",
         "access-log-format"),
    case(U + 'listeners:\n  - bind: ":80"\n    upstream: app\n'
         "    access_log: {path: /nonexistent-dir/a.log}\n",
         "ferryman.yaml:5: listeners[0].access_log.path: expected a file path in a writable "
         'directory, or "-" for standard output, got \'/nonexistent-dir/a.log\' '
         "(/nonexistent-dir does not exist)", "access-log-path"),
    case(U + 'listeners:\n  - bind: ":80"\n    upstream: app\n    access_log: {size: 1}\n',
         'ferryman.yaml:5: listeners[0].access_log.size: unknown key "size"; expected one of: '
         "format, path, buffer, flush", "access-log-unknown-key"),
    case(U + 'listeners:\n  - bind: ":80"\n    upstream: app\n    access_log: {flush: 0}\n',
         "ferryman.yaml:5: listeners[0].access_log.flush: expected a positive duration such as "
         '"2s" or "500ms", got 0', "access-log-flush-zero"),
    case(L + U + "server:\n  forwarded:\n    request_id: 'yes'\n",
         "ferryman.yaml:5: server.forwarded.request_id: expected true or false, got 'yes'",
         "request-id-not-bool"),
    case(U, 'ferryman.yaml:1: missing required key "listeners" (expected a non-empty list of '
         "listeners)", "listeners-missing"),
    case(U + "listeners: []\n",
         "ferryman.yaml:2: listeners: expected a non-empty list of listeners, got an empty list",
         "listeners-empty"),
    case(U + "listeners:\n",
         "ferryman.yaml:2: listeners: expected a non-empty list of listeners, got null",
         "listeners-null"),
    case(U + 'listeners: {bind: ":80", upstream: app}\n',
         "ferryman.yaml:2: listeners: expected a non-empty list of listeners, got a mapping",
         "listeners-mapping"),
    case(U + 'listeners:\n  - ":80"\n',
         "ferryman.yaml:3: listeners[0]: expected a mapping, got ':80'", "listener-scalar"),
    case(U + "listeners:\n  - upstream: app\n",
         'ferryman.yaml:3: listeners[0]: missing required key "bind" (expected an address '
         'such as "127.0.0.1:8080" or ":8080")', "bind-missing"),
    case(U + "listeners:\n  - bind: 8080\n    upstream: app\n",
         f"ferryman.yaml:3: listeners[0].bind: expected {BIND}, got 8080", "bind-int"),
    case(U + "listeners:\n  - bind: 127.0.0.1\n    upstream: app\n",
         f"ferryman.yaml:3: listeners[0].bind: expected {BIND}, got '127.0.0.1' "
         "(missing :port)", "bind-no-port"),
    case(U + 'listeners:\n  - bind: "127.0.0.1:0"\n    upstream: app\n',
         f"ferryman.yaml:3: listeners[0].bind: expected {BIND}, got '127.0.0.1:0' "
         "(port 0 is out of range 1..65535)", "bind-port-zero"),
    case(U + 'listeners:\n  - bind: ":70000"\n    upstream: app\n',
         f"ferryman.yaml:3: listeners[0].bind: expected {BIND}, got ':70000' "
         "(port 70000 is out of range 1..65535)", "bind-port-too-big"),
    case(U + 'listeners:\n  - bind: "::1:8080"\n    upstream: app\n',
         f"ferryman.yaml:3: listeners[0].bind: expected {BIND}, got '::1:8080' "
         '(write IPv6 addresses in brackets, as in "[::1]:8080")', "bind-ipv6-brackets"),
    case(U + 'listeners:\n  - bind: "[::1]:80"\n    upstream: app\n'
         '  - bind: "[0:0::1]:80"\n    upstream: app\n',
         "ferryman.yaml:5: listeners[1].bind: expected an address no other listener binds, "
         "got '[0:0::1]:80' (already bound by listeners[0])", "bind-duplicate-ipv6"),
    case(U + 'listeners:\n  - bind: "127.0.0.1:8080"\n    upstream: app\n'
         '  - bind: ":9000"\n    upstream: app\n'
         '  - bind: 127.0.0.1:8080\n    upstream: app\n',
         "ferryman.yaml:7: listeners[2].bind: expected an address no other listener binds, "
         "got '127.0.0.1:8080' (already bound by listeners[0])", "bind-duplicate"),
    case(U + 'listeners:\n  - bind: ":80"\n',
         'ferryman.yaml:3: listeners[0]: missing required key "upstream" or "routes" (expected '
         'the name of an upstream group, or a list of routes; required unless "app" is set)',
         "upstream-missing"),
    case('upstreams:\n  app: {servers: ["h:1"]}\n  api: {servers: ["h:2"]}\n'
         'listeners:\n  - bind: ":80"\n    upstream: nope\n',
         'ferryman.yaml:6: listeners[0].upstream: unknown upstream "nope" (defined: app, api)',
         "upstream-unknown"),
    case('app: "pkg:P"\nlisteners:\n  - bind: ":80"\n    upstream: nope\n',
         'ferryman.yaml:4: listeners[0].upstream: unknown upstream "nope" '
         "(no upstreams are defined)", "upstream-unknown-none-defined"),
    case(U + 'listeners:\n  - bind: ":80"\n    upstream: [app]\n',
         "ferryman.yaml:4: listeners[0].upstream: expected the name of an upstream group, "
         "got a list", "upstream-list"),
    case(U + 'listeners:\n  - bind: ":80"\n    upstreams: app\n',
         'ferryman.yaml:3: listeners[0]: missing required key "upstream" or "routes" (expected '
         'the name of an upstream group, or a list of routes; required unless "app" is set)\n'
         'ferryman.yaml:4: listeners[0].upstreams: unknown key "upstreams" (did you mean '
         '"upstream"?); expected one of: bind, upstream, tls, routes, h2c, access_log',
         "listener-unknown-key"),
    case(U + 'listeners:\n  - bind: ":80"\n    upstream: app\n    tls: true\n',
         "ferryman.yaml:5: listeners[0].tls: expected a mapping, got true", "listener-tls-bool"),
]

UPSTREAM_CASES = [
    case(L + "upstreams: [app]\n",
         "ferryman.yaml:2: upstreams: expected a mapping of upstream group names to upstream "
         "groups, got a list", "upstreams-list"),
    case(L + 'upstreams:\n  app: {servers: ["h:1"]}\n  "my app": {servers: ["h:1"]}\n',
         'ferryman.yaml:4: upstreams["my app"]: expected an upstream name made of letters, '
         "digits, \"_\", \".\" and \"-\", got 'my app'", "upstream-name"),
    case(L + 'upstreams:\n  app: ["h:1"]\n',
         "ferryman.yaml:3: upstreams.app: expected a mapping, got a list", "upstream-list"),
    case(L + "upstreams:\n  app:\n",
         "ferryman.yaml:3: upstreams.app: missing a source of servers (expected one of servers, "
         "dns, file or discovery)", "servers-missing-null-group"),
    case(L + "upstreams:\n  app:\n    max_retries: 2\n",
         "ferryman.yaml:4: upstreams.app: missing a source of servers (expected one of servers, "
         "dns, file or discovery)", "servers-missing"),
    case(L + "upstreams:\n  app:\n    servers: []\n",
         'ferryman.yaml:4: upstreams.app.servers: expected a non-empty list of "host:port" '
         "addresses, got an empty list", "servers-empty"),
    case(L + 'upstreams:\n  app:\n    servers: "h:1"\n',
         'ferryman.yaml:4: upstreams.app.servers: expected a non-empty list of "host:port" '
         "addresses, got 'h:1'", "servers-string"),
    case(L + 'upstreams:\n  app:\n    servers:\n      - "h:1"\n      - ":9001"\n',
         f"ferryman.yaml:6: upstreams.app.servers[1]: expected {SERVER}, got ':9001' "
         "(missing host)", "server-no-host"),
    case(L + 'upstreams:\n  app:\n    servers: ["backend"]\n',
         f"ferryman.yaml:4: upstreams.app.servers[0]: expected {SERVER}, got 'backend' "
         "(missing :port)", "server-no-port"),
    case(L + 'upstreams:\n  app:\n    servers: [9001]\n',
         f"ferryman.yaml:4: upstreams.app.servers[0]: expected {SERVER}, got 9001",
         "server-int"),
    case(L + 'upstreams:\n  app:\n    servers:\n      - "h:1"\n      - "H:1"\n',
         "ferryman.yaml:6: upstreams.app.servers[1]: expected each server once, got 'H:1' "
         "(already listed as upstreams.app.servers[0])", "server-duplicate"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    timeouts:\n      connect: fast\n',
         f"ferryman.yaml:6: upstreams.app.timeouts.connect: expected {DURATION}, got 'fast'",
         "connect-garbage"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    timeouts: {read: 0s}\n',
         'ferryman.yaml:5: upstreams.app.timeouts.read: expected a positive duration such as '
         "\"2s\" or \"500ms\", got '0s'", "read-zero"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    timeouts: {connnect: 1s}\n',
         'ferryman.yaml:5: upstreams.app.timeouts.connnect: unknown key "connnect" (did you '
         'mean "connect"?); expected one of: connect, read, write, idle, ping',
         "upstream-timeouts-unknown-key"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    pool: {max_idle: -1}\n',
         "ferryman.yaml:5: upstreams.app.pool.max_idle: expected an integer >= 0, got -1",
         "max-idle-negative"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    pool: {size: 4}\n',
         'ferryman.yaml:5: upstreams.app.pool.size: unknown key "size"; expected one of: '
         "max_idle, idle_timeout, max_streams", "pool-unknown-key"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    timeouts: {idle: 30s}\n'
         "    pool: {idle_timeout: 10s}\n",
         "ferryman.yaml:6: upstreams.app.pool.idle_timeout: expected the same duration as "
         "timeouts.idle (30s), got '10s' (both set how long an idle pooled connection is kept; "
         "set only one)", "idle-conflict"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    protocol: http2\n',
         "ferryman.yaml:5: upstreams.app.protocol: expected h1, h2 (HTTP/2 over TLS, chosen "
         "with ALPN) or h2c (cleartext HTTP/2), got 'http2'", "protocol-unknown"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    protocol: h2\n',
         "ferryman.yaml:5: upstreams.app.protocol: expected h2c for cleartext HTTP/2, got 'h2' "
         "(h2 is chosen with ALPN, which needs tls)", "protocol-h2-without-tls"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    protocol: h2c\n    tls: true\n',
         "ferryman.yaml:5: upstreams.app.protocol: expected h2 with tls, got 'h2c' "
         "(h2c is cleartext HTTP/2)", "protocol-h2c-with-tls"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    pool: {max_streams: 0}\n',
         "ferryman.yaml:5: upstreams.app.pool.max_streams: expected an integer >= 1, got 0",
         "max-streams-zero"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    timeouts: {ping: 0}\n',
         'ferryman.yaml:5: upstreams.app.timeouts.ping: expected a positive duration such as '
         "\"2s\" or \"500ms\", got 0", "ping-zero"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    max_retries: -1\n',
         "ferryman.yaml:5: upstreams.app.max_retries: expected an integer >= 0, got -1",
         "retries-negative"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    max_retries: true\n',
         "ferryman.yaml:5: upstreams.app.max_retries: expected an integer >= 0, got true",
         "retries-bool"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    retries: 3\n',
         'ferryman.yaml:5: upstreams.app.retries: unknown key "retries" (did you mean '
         '"max_retries"?); expected one of: servers, timeouts, tls, pool, max_retries, lb, '
         "hash_key, dns, file, discovery, health_check, passive, protocol",
         "upstream-unknown-key"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    tls: maybe\n',
         "ferryman.yaml:5: upstreams.app.tls: expected a mapping of TLS settings, true or "
         "false, got 'maybe'", "upstream-tls-string"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    tls: []\n',
         "ferryman.yaml:5: upstreams.app.tls: expected a mapping of TLS settings, true or "
         "false, got an empty list", "upstream-tls-list"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    tls: {verify_host: false}\n',
         'ferryman.yaml:5: upstreams.app.tls.verify_host: unknown key "verify_host" (did you '
         'mean "verify_hostname"?); expected one of: sni, verify, verify_hostname, ca, cert, '
         "key", "upstream-tls-unknown-key"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    tls: {verify: "no"}\n',
         "ferryman.yaml:5: upstreams.app.tls.verify: expected true or false, got 'no'",
         "upstream-tls-verify-string"),
    case(L + 'upstreams:\n  app:\n    servers: ["h:1"]\n    tls: {sni: "bad name"}\n',
         'ferryman.yaml:5: upstreams.app.tls.sni: expected a server name such as '
         "\"api.example.com\", got 'bad name'", "upstream-tls-sni"),
]


@pytest.mark.parametrize(
    ("text", "message"), DOCUMENT_CASES + SERVER_CASES + LISTENER_CASES + UPSTREAM_CASES
)
def test_error_message(error_text: ErrorText, text: str, message: str) -> None:
    assert error_text(text) == message


def test_every_problem_is_collected(config_error: Callable[[str], ConfigError]) -> None:
    text = """\
        server:
          workers: 0
          grace_period: fast
          bogus: 1
        listeners:
          - bind: "127.0.0.1"
            upstream: nope
          - bind: ":81"
        upstreams:
          app:
            servers: []
            timeouts: {connect: fast}
        """
    err = config_error(text)
    assert str(err).splitlines() == [
        "ferryman.yaml:2: server.workers: expected an integer >= 1, got 0",
        f"ferryman.yaml:3: server.grace_period: expected {DURATION}, got 'fast'",
        'ferryman.yaml:4: server.bogus: unknown key "bogus"; expected one of: workers, '
        "grace_period, timeouts, limits, forwarded, pid_file, error_log, user, group, "
        "cpu_affinity, upgrade_sock, metrics",
        f"ferryman.yaml:6: listeners[0].bind: expected {BIND}, got '127.0.0.1' (missing :port)",
        'ferryman.yaml:7: listeners[0].upstream: unknown upstream "nope" (defined: app)',
        'ferryman.yaml:8: listeners[1]: missing required key "upstream" or "routes" (expected '
        'the name of an upstream group, or a list of routes; required unless "app" is set)',
        'ferryman.yaml:11: upstreams.app.servers: expected a non-empty list of "host:port" '
        "addresses, got an empty list",
        f"ferryman.yaml:12: upstreams.app.timeouts.connect: expected {DURATION}, got 'fast'",
    ]
    assert len(err.errors) == 8
    assert all(isinstance(p, ConfigProblem) for p in err.errors)
    # The exception's own attributes describe the first problem.
    assert err.source == "ferryman.yaml"
    assert err.line == 2
    assert err.key_path == "server.workers"
    assert err.expected == "an integer >= 1"
    last = err.errors[-1]
    assert (last.line, last.key_path, last.expected) == (
        12, "upstreams.app.timeouts.connect", DURATION,
    )
    assert last.message == f"expected {DURATION}, got 'fast'"


def test_spec_example_error(config_error: Callable[[str], ConfigError]) -> None:
    text = """\
        server:
          workers: 1
          grace_period: 10s
        listeners:
          - bind: "127.0.0.1:8080"
            upstream: app
        upstreams:
          app:
            servers:
              - "127.0.0.1:9001"
            timeouts:
              connect: fast
        """
    err = config_error(text)
    assert str(err) == (
        'ferryman.yaml:12: upstreams.app.timeouts.connect: expected a duration such as "2s" '
        "or \"500ms\", got 'fast'"
    )
    assert (err.source, err.line, err.key_path) == (
        "ferryman.yaml", 12, "upstreams.app.timeouts.connect"
    )
    assert err.expected == 'a duration such as "2s" or "500ms"'


def test_broken_group_does_not_hide_its_name(error_text: ErrorText) -> None:
    # The group is invalid, but a listener naming it must not also report "unknown upstream".
    text = 'listeners: [{bind: ":80", upstream: app}]\nupstreams:\n  app: {servers: []}\n'
    assert error_text(text) == (
        'ferryman.yaml:3: upstreams.app.servers: expected a non-empty list of "host:port" '
        "addresses, got an empty list"
    )


def test_broken_upstreams_section_does_not_cascade(error_text: ErrorText) -> None:
    text = 'listeners: [{bind: ":80", upstream: app}]\nupstreams: 5\n'
    assert error_text(text) == (
        "ferryman.yaml:2: upstreams: expected a mapping of upstream group names to upstream "
        "groups, got 5"
    )


def test_merge_key_overrides_are_not_duplicates() -> None:
    text = """\
listeners: [{bind: ":80", upstream: a}]
upstreams:
  a:
    servers: ["h:1"]
    timeouts: &t {<<: {connect: 1s, read: 1s}, read: 2s}
  b:
    servers: ["h:1"]
    timeouts: *t
"""
    config = parse_config(text)
    assert config.upstreams["a"].timeouts.read == 2.0
    assert config.upstreams["b"].timeouts.read == 2.0
    assert config.upstreams["b"].timeouts.connect == 1.0


def test_default_source_name(error_text: ErrorText) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("server: {workers: 0}\n")
    assert str(info.value).splitlines()[0] == (
        "<string>:1: server.workers: expected an integer >= 1, got 0"
    )


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ferryman.yaml"
    path.write_text('listeners: [{bind: ":80", upstream: app}]\nupstreams: {}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f'{path}:1: listeners[0].upstream: unknown upstream "app" (no upstreams are defined)'
    )
    assert info.value.source == str(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the config file: No such file or directory"
    assert info.value.line is None


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read the config file: Is a directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "ferryman.yaml"
    path.write_bytes(b"server:\n  via_name: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2: expected UTF-8 text, got byte 0xe9"


def test_control_character(error_text: ErrorText) -> None:
    assert error_text("server:\n  workers: 1\x01\n") == (
        "ferryman.yaml:2: invalid YAML: special characters are not allowed (character #x0001)"
    )


def test_non_string_keys(error_text: ErrorText) -> None:
    text = L + "upstreams:\n  ? [a]\n  : {servers: [\"h:1\"]}\n  ~: {servers: [\"h:1\"]}\n"
    assert error_text(text).splitlines() == [
        'ferryman.yaml:1: listeners[0].upstream: unknown upstream "app" (no upstreams are '
        "defined)",
        "ferryman.yaml:3: upstreams: expected a key name, got a list",
        "ferryman.yaml:5: upstreams: expected a key name, got null",
    ]
