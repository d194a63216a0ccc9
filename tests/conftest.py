"""Shared fixtures: a real origin server and an in-process proxy harness."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ferryman import HttpPeer, Listener, ProxyHttp, ProxyOptions  # noqa: E402
from harness import ProxyHarness  # noqa: E402
from origin import OriginServer  # noqa: E402

#: The engine modes proxy tests run in: plain-function hooks, or ``async def`` hooks.
MODES = ("sync", "async")


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """``"sync"`` (plain-function hooks) or ``"async"`` (``async def`` hooks)."""
    return str(request.param)


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., ProxyHarness]]:
    """``start_proxy(proxy, options=None, listeners=None)`` runs a proxy in a thread (on
    127.0.0.1, a free port unless ``listeners`` say otherwise); all are stopped at teardown."""
    started: list[ProxyHarness] = []

    def start(
        proxy: ProxyHttp,
        options: ProxyOptions | None = None,
        listeners: list[Listener] | None = None,
    ) -> ProxyHarness:
        harness = ProxyHarness(proxy, options, listeners)
        started.append(harness)
        harness.start()
        assert harness._ready.is_set(), "proxy did not start"
        return harness

    yield start
    for harness in reversed(started):
        harness.stop()


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


class SimpleProxy(ProxyHttp):
    """Sends everything to one peer."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer

    async def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer
