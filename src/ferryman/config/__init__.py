r'''ferryman's configuration file: loading, validation with precise errors, typed result.

``load_config(path)`` reads a YAML file and returns a frozen ``Config``; any mistake raises
``ConfigError``, which lists *every* problem in the file, one per line, each naming the file,
the line, the key path and what was expected::

    ferryman.yaml:12: upstreams.app.timeouts.connect: expected a duration such as "2s" or
    "500ms", got 'fast'

(one line in practice). A config is either entirely valid or rejected; there is no partly
validated result.

The smallest useful file proxies one port to a group of servers::

    listeners:
      - bind: "127.0.0.1:8080"
        upstream: app
    upstreams:
      app:
        servers: ["127.0.0.1:9001", "127.0.0.1:9002"]

Every key, with its default (all optional unless marked *required*)::

    app: mypkg.proxy:MyProxy     # a ProxyHttp subclass to run, "module:Class"; default: the
                                 # built-in proxy. With an app, listeners need no upstream
                                 # or routes.
    server:
      workers: 4                 # worker processes; default: number of CPUs
      grace_period: 10s          # graceful shutdown waits this long for requests in flight
      timeouts:                  # towards clients
        header_read: 10s         # to receive a whole request head (slowloris)
        keepalive: 60s           # idle time allowed between two requests
        body_read: 60s           # longest gap between two reads of a request body
        body_write: 60s          # longest time a write to the client may stay blocked
      limits:
        max_request_line: 8KiB   # longer request line: 414
        max_header_bytes: 32KiB  # larger header section, all lines together: 431
        max_headers: 100         # more header fields: 431
        max_body: 1GiB           # larger request body: 413; 0 = unlimited
      forwarded:                 # headers added to requests sent upstream
        x_forwarded_for: true
        x_forwarded_proto: true
        x_forwarded_host: true
        via: false               # add "Via: 1.1 <via_name>"
        via_name: ferryman
        request_id: true         # X-Request-Id upstream: the client's when usable (1-200
                                 # visible ASCII chars), else a new one (32 hex digits)
      pid_file: run/ferryman.pid # the main process's pid while it runs; default none
      error_log: logs/error.log  # where log lines go; default: standard error. Required
                                 # with --daemon. SIGUSR1 reopens it (and the access logs)
                                 # after logrotate. Paths: in existing writable directories
      user: www-data             # workers switch to this user (and group) once the ports
      group: www-data            # are bound; the main process keeps its rights
      cpu_affinity: off          # off (default); auto: worker i on the i-th allowed CPU;
                                 # or a list such as [0, 2]
      upgrade_sock: run/upgrade.sock  # `ferryman run --upgrade` takes the listening
                                 # sockets over from the server listening here; default none
      metrics: 127.0.0.1:9090    # Prometheus endpoint (GET /metrics); default off
    listeners:                   # required, at least one
      - bind: ":8080"            # required; "host:port", "[::1]:8080", ":8080" = 0.0.0.0
        upstream: app            # every request goes to group "app" (a key of `upstreams`):
                                 # short for `routes: [{upstream: app}]`. A listener needs
                                 # `upstream` or `routes`, not both (neither: the `app` decides)
        h2c: false               # true: also accept cleartext HTTP/2 with prior knowledge
        access_log: off          # off (default), combined or json (to standard output), or:
                                 # {format: json, path: logs/access.log, buffer: 64k,
                                 #  flush: 1s}; path "-" = standard output; lines are
                                 # written when `buffer` bytes gathered or after `flush`
      - bind: "0.0.0.0:8443"
        tls:
          cert: certs/site.pem   # required; relative paths are taken from this file's
          key: certs/site.key    # directory. Files must exist and be readable.
          sni:                   # other certificates, chosen by the SNI name
            - server_names: ["api.example.com", "*.api.example.com"]
              cert: certs/api.pem
              key: certs/api.key
          client_ca: certs/clients-ca.pem  # verify client certificates (mutual TLS)
          client_verify: required          # off | optional | required; default: required
                                           # with client_ca, off without
          alpn: h2_preferred               # h2_preferred (default) | h1_only | h2_only, or
                                           # a list such as ["h2", "http/1.1"]
        routes:                  # tried in order: the first that matches takes the request;
                                 # none matches: 404. A route hidden by an earlier one (which
                                 # matches all it would) is an error.
          - name: api            # for logs and metrics; unique in the listener; default: the
                                 # key path, "listeners[1].routes[0]"
            match:               # all conditions given must hold; no match: every request
              host: ["api.example.com", "*.api.example.com"]  # one name or a list; no port;
                                 # "*.x" is any name ending in ".x"; default: any host
              path_prefix: /v1   # "/v1" and "/v1/..." but not "/v10" ("/v1/": "/v1/..." only).
                                 # Or `path: /exact`, or `path_regex: "^/v[0-9]+/"` (re.match,
                                 # must compile); at most one of the three. Default: any path
              methods: [GET, POST]  # one method or a list; default: any method
              headers:           # name: condition, all must hold
                X-Env: prod      #   the exact value (quote numbers: "1")
                X-Canary: false  #   false: absent; true: present with any value
                X-Trace: {regex: "^[0-9a-f]+$"}  # a value the regex finds (re.search)
            upstream: api        # the action, exactly one of: upstream (proxy to that group),
                                 # redirect, respond, static (below)
            strip_prefix: /v1    # upstream only: "/v1/users" goes upstream as "/users"
            rewrite:             # upstream only, after strip_prefix: re.sub, first match
              regex: "^/legacy/(.*)$"  # required, must compile
              to: '/api/\1'     # required; \1 or \g<name> refer to groups of the regex
            request_headers:     # upstream only: applied remove, then set, then add
              remove: [X-Debug]  # one name or a list
              set: {X-Env: prod} # replace (names are HTTP tokens; values have no CR/LF)
              add: {X-Tag: edge} # append
            response_headers:    # any action; same keys as request_headers
              set: {X-Frame-Options: DENY}
            cache:               # upstream only: cache the responses (RFC 9111)
              storage: disk      # memory (per worker; default), disk (shared by the
                                 # workers, kept across restarts), redis (shared by servers)
              path: cache        # disk only, required: a directory (created), relative to
                                 # this file's directory
              # redis: redis://127.0.0.1:6379/0  # redis only, required
              max_size: 256MiB   # memory: per worker; disk: the directory; default 64MiB
              max_entry: 8MiB    # largest body stored; default: memory max_size/64, disk
                                 # max_size/8, redis 16MiB
              default_ttl: 10m   # freshness when the response states none; default: only
                                 # RFC 9111's heuristic (10% of the age of Last-Modified)
              key: [scheme, host, uri]  # the default; also path, query, method,
                                 # "header:NAME", "cookie:NAME", "arg:NAME"
              ignore: [set-cookie]  # cache-control, expires, set-cookie (stored without
                                 # it), vary, client-cache-control; default none
              stale_while_revalidate: 30s  # when the response does not say; default 0
              stale_if_error: 1h # when neither side says; default 0
              lock_timeout: 5s   # longest wait for another request's fetch of the key
              purge: [127.0.0.1, 10.0.0.0/8]  # who may send PURGE; default: PURGE is
                                 # not handled (it goes upstream as any method)
              status_header: true  # add Cache-Status (RFC 9211); default true
            compress:            # upstream and static: compress responses (or `compress: true`)
              algorithms: [br, zstd, gzip]  # offered, preferred first among those a
                                 # client accepts equally (Accept-Encoding q-values)
              min_size: 1KiB     # smaller bodies (by Content-Length) go as they are
              types: [text/*, application/json]  # default: text, JSON, JavaScript, XML,
                                 # SVG, wasm...; never already-encoded bodies, no-transform,
                                 # HEAD, 204, 206, 304, or text/event-stream
            limit:               # any action; one limit or a list (each must admit)
              key: client_ip     # client_ip (default), "header:NAME", "cookie:NAME" (no
                                 # such header/cookie: not limited) or route (all clients)
              rate: 100/s        # N/s, N/m, N/h, N/d or N/5s (also nginx's 100r/s); a
                                 # sliding window (only admitted requests count)
              burst: 20          # at most 20 at once: the window becomes burst/rate (0.2s
                                 # here) holding 20; default: the rate's period and count
              concurrency: 10    # requests of one key in progress at once; default none
                                 # (rate, concurrency or both is required)
              status: 429        # of refusals, 400..599; default 429
              retry_after: true  # refusals carry Retry-After (seconds); default true
              headers: true      # RateLimit-Limit/-Remaining/-Reset/-Policy on admitted
                                 # responses too (rate refusals always have them); default false
              backend: local     # local: shared by this server's workers (default);
                                 # redis: shared by every server using the same Redis
              # redis: redis://127.0.0.1:6379/0  # redis only, required
              # sync: 50ms       # redis only: how stale a worker's view of the fleet may
                                 # get; default 50ms
              # fail_open: true  # redis only: Redis down: true holds the limit per
                                 # server (default), false refuses with `status`
          - match: {path_prefix: /old}
            redirect:
              to: /new           # required: a path or an http(s):// URL; $path and $query
                                 # stand for the request's path and "?query"
              status: 301        # 301, 302, 303, 307 or 308; default 302
              keep_query: true   # append the request's query (unless `to` has one or
                                 # uses $query); default true
          - match: {path: /ping, methods: GET}
            respond:
              status: 200        # 200..599 (204 and 304 take no body); default 200
              body: "pong"       # default ""
              content_type: text/plain  # default: text/plain; charset=utf-8 with a body
              headers: {Cache-Control: no-store}  # default none
          - match: {path_prefix: /}
            static:
              root: site         # required: a directory, relative to this file's directory
              index: [index.html, index.htm]  # tried for a directory; default index.html
              max_age: 1h        # Cache-Control: max-age (whole seconds); default: none sent
    upstreams:                   # groups of servers, by name (letters, digits, _ . -);
                                 # groups no listener uses are allowed
      app:
        servers:                 # the servers come from exactly one of servers, dns, file
          - "127.0.0.1:9001 weight=3"  # and discovery. "host:port", then options: only
          - "backend.internal:9002"    # weight=N (1..1000; default 1), the server's share
          - "[::1]:9003"               # of traffic
        lb: consistent           # round_robin (default), random, hash, consistent (ring:
                                 # few keys move when servers change), least_conn, p2c_ewma
        hash_key: "header:X-User"  # hash and consistent only: client_ip (default), uri,
                                 # path, "header:NAME", "cookie:NAME" or
                                 # "python:module:function" (called with the session)
        health_check:            # active checks, once per process; default: none
                                 # (`health_check: {}`: all defaults)
          type: http             # http (default) or tcp (a connection is enough)
          method: GET            # http only, like path, host, expect_status, body_contains
          path: /healthz         # default /
          host: app.internal     # the Host header; default: the server's address
          expect_status: [200-299, 304]  # a code, a range "200-399", a class "2xx", or a
                                 # list of them; default 200-399
          body_contains: ok      # default: not checked
          interval: 2s           # between checks of one server; default 5s
          timeout: 1s            # for one check, at most interval; default 2s
          rise: 2                # successes in a row that mark a server up
          fall: 3                # failures in a row that mark it down
        passive:                 # from live traffic, per worker
          max_fails: 3           # failures in a row that eject a server; 0 = off
          eject: 10s             # first ejection; doubled when it fails again on return
          max_eject: 5m          # longest ejection, at least eject; default 300s
          on_5xx: true           # a 5xx answer counts as a failure
        timeouts:
          connect: 5s            # TCP (and TLS) connection establishment
          read: 60s              # longest wait for data from the server
          write: 60s             # longest time a write to the server may stay blocked
          idle: 60s              # how long an idle pooled connection is kept
          ping: 30s              # HTTP/2: PING an idle connection this often; no answer
                                 # within `connect` closes it
        pool:
          max_idle: 128          # idle connections kept per server; 0 = no reuse
          idle_timeout: 60s      # same setting as timeouts.idle: set either one
          max_streams: 1000      # HTTP/2: concurrent requests per connection (the server's
                                 # limit wins when lower); full: another connection opens
        protocol: h1             # h1 (default); h2: HTTP/2 over TLS, chosen with ALPN
                                 # (HTTP/1.1 if the server does not pick it), needs
                                 # `tls`; h2c: cleartext HTTP/2 by prior knowledge,
                                 # without `tls`
        max_retries: 1           # retries of a failed attempt, on a server not tried yet:
                                 # after a connect failure, or (GET/HEAD/PUT/DELETE/...)
                                 # when the server closed or timed out before answering,
                                 # as nginx's default proxy_next_upstream; never onto a
                                 # server marked down while another is up
        tls:                     # the key turns TLS on; `tls: true` = all defaults
          sni: app.internal      # default: the host of each server address
          verify: true           # verify the certificate chain
          verify_hostname: true  # check the certificate matches the name
          ca: certs/internal-ca.pem     # default: the system trust store
          cert: certs/client.pem        # client certificate: cert and key together
          key: certs/client.key
      api:
        dns:                     # servers from DNS, re-resolved as records expire
          name: api.internal     # required
          type: A                # A (default), AAAA or SRV (SRV records carry the ports)
          port: 8080             # A/AAAA only; default 80
          refresh: 30s           # default: the records' TTL
          resolver: "10.0.0.53:53"  # default: the system's resolver
      legacy:
        file: servers.yaml       # a readable YAML/JSON list of servers ("host:port weight=N"
                                 # items), relative to this file; reloaded when it changes
      dynamic:
        discovery: mypkg.discovery:Consul  # "module:Class", a ferryman.lb.ServiceDiscovery

Durations are a number of seconds (``30``, ``1.5``) or a string of ``h``/``m``/``s``/``ms``
parts, largest first: ``"500ms"``, ``"10s"``, ``"2m"``, ``"1m30s"``, ``"1.5s"``. Sizes are
a number of bytes or a string with a binary unit in any case: ``"8k"``, ``"8KiB"`` and
``"8kb"`` all mean 8192; ``"1m"``/``"1MiB"``, ``"1g"``. Unknown keys are errors (with the
list of allowed keys), booleans are not numbers, and YAML anchors (set where a value first
appears, as there is no free-form section to park them in) and merge keys (``<<: *name``)
may be used to share settings between upstream groups.
'''

from .errors import ConfigError, ConfigProblem
from .loader import load_config, parse_config
from .model import (
    Address,
    ClientVerify,
    Config,
    DnsDiscovery,
    DownstreamLimits,
    DownstreamTimeouts,
    FixedResponse,
    ForwardedConfig,
    HeaderEdits,
    HeaderMatch,
    HealthCheckConfig,
    LbAlgorithm,
    ListenerConfig,
    ListenerTls,
    PassiveHealthConfig,
    PathRewrite,
    PoolConfig,
    RedirectAction,
    RouteConfig,
    RouteMatch,
    ServerConfig,
    ServerEntry,
    SniCert,
    StaticAction,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamTls,
)
from .routes import host_covers, match_covers, path_has_prefix
from .units import parse_duration, parse_size
from .upstreams import ServerSyntaxError, parse_server, parse_status_codes

__all__ = [
    "Address",
    "ClientVerify",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DnsDiscovery",
    "DownstreamLimits",
    "DownstreamTimeouts",
    "FixedResponse",
    "ForwardedConfig",
    "HeaderEdits",
    "HeaderMatch",
    "HealthCheckConfig",
    "LbAlgorithm",
    "ListenerConfig",
    "ListenerTls",
    "PassiveHealthConfig",
    "PathRewrite",
    "PoolConfig",
    "RedirectAction",
    "RouteConfig",
    "RouteMatch",
    "ServerConfig",
    "ServerEntry",
    "ServerSyntaxError",
    "SniCert",
    "StaticAction",
    "UpstreamConfig",
    "UpstreamTimeouts",
    "UpstreamTls",
    "host_covers",
    "load_config",
    "match_covers",
    "parse_config",
    "parse_duration",
    "parse_server",
    "parse_size",
    "parse_status_codes",
    "path_has_prefix",
]
