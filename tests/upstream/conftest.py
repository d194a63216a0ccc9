"""Fixtures for the upstream tests: proxy harnesses, raw origins, a test CA and TLS origins."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from upstream_util import (
    Pki,
    RawOrigin,
    StartRawOrigin,
    StartTlsOrigin,
    TlsOriginServer,
)

from origin import OriginServer
from pki import write_leaf
from rawhttp import QuietOrigin


@pytest.fixture
def raw_origin() -> Iterator[StartRawOrigin]:
    """``raw_origin(handler)`` starts a scripted origin, stopped at teardown."""
    started: list[RawOrigin] = []

    def start(handler: Callable[[socket.socket, RawOrigin], None]) -> RawOrigin:
        origin = RawOrigin(handler)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp: Path = tmp_path_factory.mktemp("upstream-pki")
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("localhost")  # DNS name only: "127.0.0.1" does not match it
    client = ca.issue_cert("client.test", common_name="proxy-client")
    client_cert, client_key = write_leaf(client, tmp, "client")
    other_ca_file = tmp / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    return Pki(ca, str(ca_file), server, client_cert, client_key, str(other_ca_file))


@pytest.fixture
def tls_origin(pki: Pki) -> Iterator[StartTlsOrigin]:
    """``tls_origin(require_client_cert=False)`` starts origin.py behind TLS."""
    started: list[TlsOriginServer] = []

    def start(require_client_cert: bool = False) -> TlsOriginServer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        pki.server.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(pki.ca_file)
        server = TlsOriginServer(ctx).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = QuietOrigin().start()
    yield server
    server.stop()
