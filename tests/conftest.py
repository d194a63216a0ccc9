"""Shared fixtures: a real origin server and an in-process proxy harness."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ferryman import HttpPeer, ProxyHttp  # noqa: E402
from origin import OriginServer  # noqa: E402


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
