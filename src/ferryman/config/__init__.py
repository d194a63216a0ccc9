'''ferryman's configuration file: loading, validation with precise errors, typed result.

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

    demo_origin: "127.0.0.1:9001"  # also run ferryman's tiny greeting origin there (for the
                                   # quickstart); default: none
    app: mypkg.proxy:MyProxy     # a ProxyHttp subclass to run, "module:Class"; default: the
                                 # built-in proxy. With an app, listeners need no upstream.
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
    listeners:                   # required, at least one
      - bind: ":8080"            # required; "host:port", "[::1]:8080", ":8080" = 0.0.0.0
        upstream: app            # required unless `app` is set: a key of `upstreams`
      - bind: "0.0.0.0:8443"
        upstream: app
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
          alpn: ["h2", "http/1.1"]         # default ["http/1.1"]
    upstreams:                   # groups of servers, by name (letters, digits, _ . -)
      app:
        servers: ["127.0.0.1:9001", "backend.internal:9002", "[::1]:9003"]  # required
        timeouts:
          connect: 5s            # TCP (and TLS) connection establishment
          read: 60s              # longest wait for data from the server
          write: 60s             # longest time a write to the server may stay blocked
          idle: 60s              # how long an idle pooled connection is kept
        pool:
          max_idle: 128          # idle connections kept per server; 0 = no reuse
          idle_timeout: 60s      # same setting as timeouts.idle: set either one
        max_retries: 1           # retries of a retryable failure (another server if any)
        tls:                     # the key turns TLS on; `tls: true` = all defaults
          sni: app.internal      # default: the host of each server address
          verify: true           # verify the certificate chain
          verify_hostname: true  # check the certificate matches the name
          ca: certs/internal-ca.pem     # default: the system trust store
          cert: certs/client.pem        # client certificate: cert and key together
          key: certs/client.key

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
from .units import parse_duration, parse_size

__all__ = [
    "Address",
    "ClientVerify",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DownstreamLimits",
    "DownstreamTimeouts",
    "ForwardedConfig",
    "ListenerConfig",
    "ListenerTls",
    "PoolConfig",
    "ServerConfig",
    "SniCert",
    "UpstreamConfig",
    "UpstreamTimeouts",
    "UpstreamTls",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]
