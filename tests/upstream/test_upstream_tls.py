"""TLS to the upstream: verification on by default, CA, SNI, hostname checks, client certs,
and pool keys made of the TLS settings."""

from __future__ import annotations

import pytest
from upstream_util import (
    PROXY_MODES,
    ByHeaderProxy,
    Pki,
    StartHarness,
    StartTlsOrigin,
    SyncProxy,
    get,
)

from ferryman import HttpPeer


def tls_peer(port: int, pki: Pki, **kw: object) -> HttpPeer:
    opts: dict[str, object] = {"ca": pki.ca_file, "sni": "localhost"}
    opts.update(kw)
    return HttpPeer(f"127.0.0.1:{port}", tls=True, **opts)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_verified_tls_with_ca_and_sni(
    mode: str, pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    proxy = start_proxy(PROXY_MODES[mode](tls_peer(origin.port, pki)))
    resp = get(proxy.port)
    assert (resp.status, resp.body) == (200, b"hello world\n")
    assert len(origin.requests) == 1


def test_verification_is_on_by_default_unknown_ca_is_502(
    tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    proxy = start_proxy(SyncProxy(HttpPeer(f"127.0.0.1:{origin.port}", tls=True, sni="localhost")))
    assert get(proxy.port).status == 502
    assert origin.requests == []


def test_certificate_from_another_ca_is_502(
    pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    proxy = start_proxy(SyncProxy(tls_peer(origin.port, pki, ca=pki.other_ca_file)))
    assert get(proxy.port).status == 502
    assert origin.requests == []


def test_wrong_sni_with_hostname_verification_is_502(
    pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    peer = tls_peer(origin.port, pki, sni="wrong.example", verify_hostname=True)
    proxy = start_proxy(SyncProxy(peer))
    assert get(proxy.port).status == 502
    assert origin.requests == []


def test_default_sni_is_the_host_and_is_checked(
    pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    """The certificate names only "localhost": connecting as 127.0.0.1 fails the check."""
    origin = tls_origin()
    peer = HttpPeer(f"127.0.0.1:{origin.port}", tls=True, ca=pki.ca_file)
    assert peer.sni == "127.0.0.1"
    proxy = start_proxy(SyncProxy(peer))
    assert get(proxy.port).status == 502


def test_verify_hostname_false_accepts_a_cert_for_another_name(
    pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    peer = tls_peer(origin.port, pki, sni="wrong.example", verify_hostname=False)
    proxy = start_proxy(SyncProxy(peer))
    assert get(proxy.port).status == 200


def test_verify_cert_false_accepts_an_untrusted_cert(
    tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    peer = HttpPeer(f"127.0.0.1:{origin.port}", tls=True, verify_cert=False)
    proxy = start_proxy(SyncProxy(peer))
    resp = get(proxy.port)
    assert (resp.status, resp.body) == (200, b"hello world\n")


def test_client_certificate_accepted_by_origin_requiring_one(
    pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin(require_client_cert=True)
    peer = tls_peer(origin.port, pki, client_cert=pki.client_cert, client_key=pki.client_key)
    proxy = start_proxy(SyncProxy(peer))
    resp = get(proxy.port)
    assert (resp.status, resp.body) == (200, b"hello world\n")
    assert origin.client_cns == ["proxy-client"]


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_no_client_certificate_for_origin_requiring_one_is_502(
    mode: str, pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin(require_client_cert=True)
    proxy = start_proxy(PROXY_MODES[mode](tls_peer(origin.port, pki)))
    assert get(proxy.port).status == 502
    assert origin.requests == []
    # the proxy stays usable for other requests
    assert get(proxy.port).status == 502


def test_tls_connections_are_pooled(
    pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    peer = tls_peer(origin.port, pki)
    proxy = start_proxy(SyncProxy(peer))
    for _ in range(5):
        assert get(proxy.port).status == 200
    assert origin.connections == 1
    connector = proxy.service.connector
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (1, 4)


# --- pool keys ---------------------------------------------------------------------------


def test_pool_key_same_address_and_tls_settings_is_equal(pki: Pki) -> None:
    assert HttpPeer("127.0.0.1:8000").key == HttpPeer(("127.0.0.1", 8000)).key
    a = HttpPeer("127.0.0.1:8443", tls=True, sni="localhost", ca=pki.ca_file)
    b = HttpPeer(
        ("127.0.0.1", 8443),
        True,
        "localhost",
        ca=pki.ca_file,
        connect_timeout=1,
        read_timeout=2,
        write_timeout=3,
        idle_timeout=4,
        max_idle=5,
    )
    assert a.key == b.key
    # without TLS the sni does not make connections distinct
    assert HttpPeer("127.0.0.1:8000", sni="x").key == HttpPeer("127.0.0.1:8000").key
    # the default sni is the host
    assert HttpPeer("127.0.0.1:8443", tls=True).key == (
        HttpPeer("127.0.0.1:8443", tls=True, sni="127.0.0.1").key
    )


@pytest.mark.parametrize(
    "change",
    [
        {"address": "127.0.0.1:8444"},
        {"address": "localhost:8443"},
        {"tls": False},
        {"sni": "other.test"},
        {"verify_cert": False},
        {"verify_hostname": False},
        {"ca": "/elsewhere/ca.pem"},
        {"client_cert": "/c.pem", "client_key": "/c.key"},
    ],
    ids=lambda c: ",".join(c),
)
def test_pool_key_differs_for_different_address_or_tls_settings(
    pki: Pki, change: dict[str, object]
) -> None:
    base: dict[str, object] = {
        "address": "127.0.0.1:8443",
        "tls": True,
        "sni": "localhost",
        "ca": pki.ca_file,
    }
    other = dict(base, **change)
    assert HttpPeer(**base).key != HttpPeer(**other).key  # type: ignore[arg-type]


def test_peers_with_different_tls_settings_do_not_share_connections(
    pki: Pki, tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    peers = {
        "a": tls_peer(origin.port, pki),
        "a2": tls_peer(origin.port, pki),  # equal settings: shares with "a"
        "nohost": tls_peer(origin.port, pki, verify_hostname=False),
        "noverify": tls_peer(origin.port, pki, verify_cert=False),
        "sni": tls_peer(origin.port, pki, sni="LOCALHOST"),
    }
    proxy = start_proxy(ByHeaderProxy(peers))
    for name in ["a", "a2", "nohost", "noverify", "sni", "a", "nohost", "noverify", "sni"]:
        assert get(proxy.port, headers={"X-Peer": name}).status == 200, name
    assert origin.connections == 4
    connector = proxy.service.connector
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (4, 5)
    for name, peer in peers.items():
        assert proxy.call(lambda p=peer: connector.idle_count(p)) == 1, name
    assert proxy.call(lambda: connector.idle_count()) == 4


def test_plaintext_peer_to_a_tls_origin_is_502(
    tls_origin: StartTlsOrigin, start_proxy: StartHarness
) -> None:
    origin = tls_origin()
    proxy = start_proxy(SyncProxy(HttpPeer(f"127.0.0.1:{origin.port}")))
    assert get(proxy.port).status == 502
    assert origin.requests == []
