"""Connector.retire: a server that left its group keeps no pooled connections, while the
same server in another group (another peer object, same pool key) keeps its own."""

from __future__ import annotations

import asyncio

import uvloop

from ferryman import HttpPeer
from ferryman.upstream.connector import Connector
from origin import OriginServer


def test_retire_closes_only_that_peers_connections() -> None:
    origin = OriginServer().start()
    loop = uvloop.new_event_loop()
    try:
        async def scenario() -> None:
            connector = Connector(loop)
            a = HttpPeer(origin.address)  # the server as group A knows it
            b = HttpPeer(origin.address)  # the same server in group B
            assert a.key == b.key and not a.retired
            a1 = await connector.connect(a)
            a2 = await connector.connect(a)
            b1 = await connector.connect(b)
            connector.release(a1)
            connector.release(b1)
            assert connector.idle_count(a) == 2
            assert connector.retire(a) == 1  # a1 closed; b1 kept
            assert a1.closed and not b1.closed and a.retired and not b.retired
            assert connector.get_idle(b) is b1
            connector.release(b1)
            connector.release(a2)  # in use while A retired: closed, not pooled
            assert a2.closed and connector.idle_count(b) == 1
            connector.close_all()

        loop.run_until_complete(asyncio.wait_for(scenario(), 10))
    finally:
        loop.close()
        origin.stop()
