"""Fixtures for the server tests: in-process proxies on custom listeners and a test PKI."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from server_util import ServerPki, StartHarness

from ferryman import Listener, ProxyHttp, ProxyOptions
from harness import ProxyHarness
from origin import OriginServer


@pytest.fixture
def start_proxy() -> Iterator[StartHarness]:
    """``start_proxy(proxy, options=None, listeners=None)`` runs a proxy until teardown."""
    started: list[ProxyHarness] = []

    def start(
        proxy: ProxyHttp,
        options: ProxyOptions | None = None,
        listeners: list[Listener] | None = None,
    ) -> ProxyHarness:
        harness = ProxyHarness(proxy, options, listeners).start()
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.stop()


@pytest.fixture(scope="session")
def server_pki(tmp_path_factory: pytest.TempPathFactory) -> ServerPki:
    """A CA; a default certificate for default.test; one for api.test and *.wild.test; a
    client certificate (CN alice) from the CA, and one (CN mallory) from another CA."""
    tmp: Path = tmp_path_factory.mktemp("server-pki")
    ca = trustme.CA()
    other = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))

    def leaf(name: str, cert: trustme.LeafCert) -> tuple[str, str]:
        cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return str(cert_path), str(key_path)

    default = leaf("default", ca.issue_cert("default.test"))
    sni = leaf("sni", ca.issue_cert("api.test", "*.wild.test"))
    client = leaf("client", ca.issue_cert("alice.test", common_name="alice"))
    stranger = leaf("stranger", other.issue_cert("mallory.test", common_name="mallory"))
    return ServerPki(str(tmp / "ca.pem"), *default, *sni, *client, *stranger)


class QuietOrigin(OriginServer):
    """origin.OriginServer without tracebacks for connections the proxy aborts on purpose,
    and quick to stop (serve_forever polls every 50 ms instead of 500 ms)."""

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        pass

    def start(self) -> QuietOrigin:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = QuietOrigin().start()
    yield server
    server.stop()
