"""Fixtures for the server tests: in-process proxies on custom listeners and a test PKI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from server_util import ServerPki

from origin import OriginServer
from pki import write_leaf
from rawhttp import QuietOrigin


@pytest.fixture(scope="session")
def server_pki(tmp_path_factory: pytest.TempPathFactory) -> ServerPki:
    """A CA; a default certificate for default.test; one for api.test and *.wild.test; a
    client certificate (CN alice) from the CA, and one (CN mallory) from another CA."""
    tmp: Path = tmp_path_factory.mktemp("server-pki")
    ca = trustme.CA()
    other = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))

    default = write_leaf(ca.issue_cert("default.test"), tmp, "default")
    sni = write_leaf(ca.issue_cert("api.test", "*.wild.test"), tmp, "sni")
    client = write_leaf(ca.issue_cert("alice.test", common_name="alice"), tmp, "client")
    stranger = write_leaf(
        other.issue_cert("mallory.test", common_name="mallory"), tmp, "stranger"
    )
    return ServerPki(str(tmp / "ca.pem"), *default, *sni, *client, *stranger)


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    server = QuietOrigin().start()
    yield server
    server.stop()
