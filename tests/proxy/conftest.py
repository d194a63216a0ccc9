"""Fixtures for the proxy-engine tests (tests/proxy); the helpers are in proxy_util.py.

Everything runs over real sockets on 127.0.0.1: the proxy under test runs in a
:class:`harness.ProxyHarness` thread, the origins are real servers started here (the threaded
:class:`origin.OriginServer`, raw TCP servers, a ``websockets`` server), the clients are
``http.client``, ``httpx``, raw sockets and the ``websockets`` client. Most tests run in both
engine modes through the ``mode`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from proxy_util import HangupServer, TcpServer, echo_handler, start_origin

from origin import OriginServer, free_port


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    """Overrides tests/conftest.py's ``origin``: the same server, quicker to stop and quiet."""
    server = start_origin()
    yield server
    server.stop()


@pytest.fixture
def dead_port() -> int:
    """A port on 127.0.0.1 nobody listens on (connections are refused)."""
    return free_port()


@pytest.fixture
def echo_server() -> Iterator[TcpServer]:
    """A raw TCP echo server (the far end of CONNECT tunnels)."""
    server = TcpServer(echo_handler).start()
    yield server
    server.stop()


@pytest.fixture
def hangup_server() -> Iterator[HangupServer]:
    """Reads one whole request per connection, then closes without answering."""
    server = HangupServer().start()
    yield server
    server.stop()
