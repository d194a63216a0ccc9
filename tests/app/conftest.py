"""Fixtures for the built-in handlers (tests/app): engine modes and proxies in a harness.

Like tests/proxy, everything runs over real sockets on 127.0.0.1: the proxy under test runs
in a :class:`harness.ProxyHarness` thread (tests/conftest.py puts tests/ on ``sys.path``),
and most tests run in both engine modes through the ``mode`` fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ferryman import ProxyHttp, ProxyOptions
from harness import ProxyHarness

MODES = ("sync", "async")


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """``"sync"`` (plain-function hooks) or ``"async"`` (``async def`` hooks)."""
    return str(request.param)


StartProxy = Callable[..., ProxyHarness]


@pytest.fixture
def start_proxy() -> Iterator[StartProxy]:
    """``start_proxy(proxy, options=None)`` runs a proxy; every one is stopped at teardown."""
    started: list[ProxyHarness] = []

    def start(proxy: ProxyHttp, options: ProxyOptions | None = None) -> ProxyHarness:
        harness = ProxyHarness(proxy, options)
        started.append(harness)
        harness.start()
        assert harness._ready.is_set(), "proxy did not start"
        return harness

    yield start
    for harness in reversed(started):
        harness.stop()
