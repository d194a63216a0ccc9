"""Load balancing: selection algorithms, backends, health checks and service discovery.

Everything the config-driven proxy uses is here for Python users too::

    from ferryman.lb import LoadBalancer, GroupMonitor, HttpHealthCheck, StaticDiscovery

    balancer = LoadBalancer("api", [(("10.0.0.1", 80), 3), (("10.0.0.2", 80), 1)],
                            "least_conn", peer_factory=lambda addr: HttpPeer(addr))
    # in ProxyHttp.worker_start(loop):
    GroupMonitor("api", StaticDiscovery(...), HttpHealthCheck(path="/healthz")).attach(balancer)
    # in upstream_peer:
    backend = balancer.select(exclude=tried)
"""

from ferryman.lb.algorithms import (
    ALGORITHMS,
    Consistent,
    Hash,
    LeastConn,
    P2CEwma,
    Random,
    RoundRobin,
    Selector,
    fnv1a_64,
)
from ferryman.lb.backend import Backend
from ferryman.lb.balancer import LoadBalancer, NoBackendError, PassiveHealth
from ferryman.lb.discovery import (
    DnsDiscovery,
    FileDiscovery,
    Member,
    ServiceDiscovery,
    StaticDiscovery,
    parse_member,
)
from ferryman.lb.health import HealthCheck, HealthState, HttpHealthCheck, TcpHealthCheck
from ferryman.lb.monitor import GroupMonitor, GroupSnapshot, apply_snapshot
from ferryman.lb.shared import HealthBoard, run_control_process

__all__ = [
    "ALGORITHMS",
    "Backend",
    "Consistent",
    "DnsDiscovery",
    "FileDiscovery",
    "GroupMonitor",
    "GroupSnapshot",
    "Hash",
    "HealthBoard",
    "HealthCheck",
    "HealthState",
    "HttpHealthCheck",
    "LeastConn",
    "LoadBalancer",
    "Member",
    "NoBackendError",
    "P2CEwma",
    "PassiveHealth",
    "Random",
    "RoundRobin",
    "Selector",
    "ServiceDiscovery",
    "StaticDiscovery",
    "TcpHealthCheck",
    "apply_snapshot",
    "fnv1a_64",
    "parse_member",
    "run_control_process",
]
