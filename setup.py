"""Build script: compiles the hot sans-IO modules with mypyc when it can.

The compiled modules are the same Python source, type-checked and turned into C
extensions by mypyc (as black and mypy ship themselves). Every extension is optional: if a
compiler or mypyc is missing, or a module fails to build, ferryman installs as pure Python
and works the same, only slower. Set FERRYMAN_PURE_PYTHON=1 to skip compiling.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import setup

#: Modules on the per-request hot path that mypyc compiles. Classes users may subclass
#: (ConfigProxy, Selector and its algorithms, LoadBalancer, Backend) are marked
#: ``@mypyc_attr(allow_interpreted_subclasses=True)``.
COMPILED = [
    "src/ferryman/errors.py",
    "src/ferryman/timeouts.py",
    "src/ferryman/protocols/headers.py",
    "src/ferryman/protocols/h1.py",
    "src/ferryman/protocols/h2_guard.py",
    "src/ferryman/protocols/h2_goaway.py",
    "src/ferryman/protocols/h2_send.py",
    "src/ferryman/upstream/peer.py",
    "src/ferryman/upstream/connection.py",
    "src/ferryman/upstream/h2_connection.py",
    "src/ferryman/upstream/connector.py",
    "src/ferryman/metrics/recorder.py",
    "src/ferryman/proxy/options.py",
    "src/ferryman/proxy/plan.py",
    "src/ferryman/proxy/client.py",
    "src/ferryman/proxy/session.py",
    "src/ferryman/proxy/access_log.py",
    "src/ferryman/proxy/engine.py",
    "src/ferryman/proxy/downstream.py",
    "src/ferryman/proxy/h2_downstream.py",
    "src/ferryman/proxy/fetch.py",
    "src/ferryman/proxy/cache_hit.py",
    "src/ferryman/lb/backend.py",
    "src/ferryman/lb/algorithms.py",
    "src/ferryman/lb/balancer.py",
    "src/ferryman/app/routes.py",
    "src/ferryman/app/config_proxy.py",
    "src/ferryman/limits/arena.py",
    "src/ferryman/limits/limiter.py",
]


def _extensions() -> list[Any]:
    if os.environ.get("FERRYMAN_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    try:
        extensions = mypycify(COMPILED, opt_level="3")
    except Exception:  # noqa: BLE001 - compiling is an optimisation, never a requirement
        return []
    for ext in extensions:
        ext.optional = True  # a failed C build falls back to the pure-Python module
    return extensions


setup(ext_modules=_extensions())
