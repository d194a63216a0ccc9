"""Downstream TLS: certificates, SNI selection (incl. wildcards), ALPN, mTLS, and what hooks
see of it (``session.tls``), plus X-Forwarded-Proto."""

from __future__ import annotations

import json
import ssl

import pytest
from server_util import (
    RawClient,
    Response,
    ServerPki,
    StartHarness,
    client_context,
    get,
    request_bytes,
    san_dns_names,
    tls_connect,
)

from ferryman import HttpPeer, Listener, ListenerTls, ProxyHttp, SniCertificate
from harness import ProxyHarness
from origin import OriginServer


class TlsEcho(ProxyHttp):
    """Proxies to ``peer`` and reports ``session.tls`` in response headers."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer

    def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer

    def response_filter(self, session, response, ctx):  # type: ignore[no-untyped-def]
        tls = session.tls
        h = response.headers
        h.set("X-Is-Tls", "yes" if session.is_tls else "no")
        if tls is None:
            return
        h.set("X-Tls-Sni", tls.sni or "-")
        h.set("X-Tls-Alpn", tls.alpn or "-")
        h.set("X-Tls-Version", tls.version or "-")
        cn = "-"
        for rdn in tls.peer_cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
        h.set("X-Client-CN", cn)
        h.set("X-Client-Der", "yes" if tls.peer_cert_der else "no")


class AsyncTlsEcho(TlsEcho):
    """The same, in task mode; the CN is answered from request_filter instead."""

    async def request_filter(self, session, ctx):  # type: ignore[no-untyped-def]
        if session.req_header.path != "/whoami":
            return False
        tls = session.tls
        cn = "-"
        for rdn in tls.peer_cert.get("subject", ()) if tls else ():
            for key, value in rdn:
                if key == "commonName":
                    cn = value
        await session.respond(200, f"cn={cn}", {"X-Client-CN": cn})
        return True


def tls_listener(pki: ServerPki, **kw: object) -> Listener:
    settings = ListenerTls(
        pki.default_cert,
        pki.default_key,
        sni=(SniCertificate(("api.test", "*.wild.test"), pki.sni_cert, pki.sni_key),),
        **kw,  # type: ignore[arg-type]
    )
    return Listener("127.0.0.1:0", tls=settings)


@pytest.fixture
def https(
    origin: OriginServer, server_pki: ServerPki, start_proxy: StartHarness
) -> ProxyHarness:
    return start_proxy(TlsEcho(HttpPeer(origin.address)), listeners=[tls_listener(server_pki)])


def https_get(
    port: int, ctx: ssl.SSLContext, server_hostname: str | None, path: str = "/"
) -> tuple[RawClient, Response]:
    sock = tls_connect(port, ctx, server_hostname)
    client = RawClient(sock=sock)
    client.send(request_bytes(path, {"Connection": "close"}))
    return client, client.read_response()


def test_https_request_verified_with_the_ca(https: ProxyHarness, server_pki: ServerPki) -> None:
    ctx = client_context(server_pki.ca_file)  # checks the chain and "default.test"
    client, resp = https_get(https.port, ctx, "default.test")
    with client:
        assert resp.status == 200
        assert resp.body == b"hello world\n"
        assert resp.header("x-is-tls") == "yes"
        assert resp.header("x-tls-version") in ("TLSv1.2", "TLSv1.3")


def test_https_with_httpx(https: ProxyHarness, server_pki: ServerPki) -> None:
    import httpx

    ctx = client_context(server_pki.ca_file, check_hostname=False)
    with httpx.Client(verify=ctx, timeout=10) as client:
        for _ in range(3):  # keep-alive over TLS
            r = client.get(f"https://127.0.0.1:{https.port}/")
            assert r.status_code == 200
            assert r.text == "hello world\n"


@pytest.mark.parametrize(
    ("server_name", "expected_sans"),
    [
        ("default.test", ["default.test"]),
        ("api.test", ["api.test", "*.wild.test"]),
        ("x.wild.test", ["api.test", "*.wild.test"]),
        ("other-host.wild.test", ["api.test", "*.wild.test"]),
        ("wild.test", ["default.test"]),  # "*." needs one more label
        ("a.b.wild.test", ["default.test"]),  # and matches exactly one label
        ("unknown.test", ["default.test"]),
        (None, ["default.test"]),  # no SNI at all
    ],
)
def test_certificate_depends_on_sni(
    https: ProxyHarness,
    server_pki: ServerPki,
    server_name: str | None,
    expected_sans: list[str],
) -> None:
    ctx = client_context(server_pki.ca_file, check_hostname=False)
    with tls_connect(https.port, ctx, server_name) as sock:
        cert = sock.getpeercert()
        assert san_dns_names(cert) == expected_sans
        client = RawClient(sock=sock)
        client.send(request_bytes("/", {"Connection": "close"}))
        assert client.read_response().status == 200


def test_sni_certificate_verifies_with_hostname_check(
    https: ProxyHarness, server_pki: ServerPki
) -> None:
    ctx = client_context(server_pki.ca_file)
    for name in ("api.test", "deep.wild.test", "default.test"):
        client, resp = https_get(https.port, ctx, name)
        with client:
            assert resp.status == 200, name


def test_alpn_selects_http11(https: ProxyHarness, server_pki: ServerPki) -> None:
    ctx = client_context(server_pki.ca_file, alpn=["h2", "http/1.1"])
    with tls_connect(https.port, ctx, "default.test") as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
        client = RawClient(sock=sock)
        client.send(request_bytes("/", {"Connection": "close"}))
        resp = client.read_response()
        assert resp.status == 200
        assert resp.header("x-tls-alpn") == "http/1.1"


def test_no_alpn_offered_still_works(https: ProxyHarness, server_pki: ServerPki) -> None:
    ctx = client_context(server_pki.ca_file)
    client, resp = https_get(https.port, ctx, "default.test")
    with client:
        assert resp.status == 200
        assert resp.header("x-tls-alpn") == "-"


@pytest.mark.parametrize("server_name", ["api.test", "x.wild.test", "default.test"])
def test_session_tls_sni_is_the_name_the_client_sent(
    https: ProxyHarness, server_pki: ServerPki, server_name: str
) -> None:
    ctx = client_context(server_pki.ca_file)
    client, resp = https_get(https.port, ctx, server_name)
    with client:
        assert resp.status == 200
        assert resp.header("x-tls-sni") == server_name


def test_session_tls_sni_absent_without_sni(https: ProxyHarness, server_pki: ServerPki) -> None:
    ctx = client_context(server_pki.ca_file, check_hostname=False)
    client, resp = https_get(https.port, ctx, None)
    with client:
        assert resp.status == 200
        assert resp.header("x-tls-sni") == "-"


def test_x_forwarded_proto_is_https_at_the_origin(
    https: ProxyHarness, origin: OriginServer, server_pki: ServerPki
) -> None:
    ctx = client_context(server_pki.ca_file)
    client, resp = https_get(https.port, ctx, "default.test", "/headers")
    with client:
        assert resp.status == 200
        seen = json.loads(resp.body)
    assert [v for k, v in seen if k.lower() == "x-forwarded-proto"] == ["https"]


def test_plain_listener_has_no_tls_info_and_forwards_http(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    proxy = start_proxy(TlsEcho(HttpPeer(origin.address)))
    resp = get(proxy.port, "/headers")
    assert resp.status == 200
    assert resp.header("x-is-tls") == "no"
    assert resp.header("x-tls-sni") is None
    seen = json.loads(resp.body)
    assert [v for k, v in seen if k.lower() == "x-forwarded-proto"] == ["http"]


# --- mTLS ------------------------------------------------------------------------------------


@pytest.fixture
def mtls(
    origin: OriginServer, server_pki: ServerPki, start_proxy: StartHarness
) -> ProxyHarness:
    listener = tls_listener(server_pki, client_ca=server_pki.ca_file, client_verify="required")
    return start_proxy(TlsEcho(HttpPeer(origin.address)), listeners=[listener])


def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True if the TLS connection fails (at handshake, or on first read under TLS 1.3)."""
    try:
        sock = tls_connect(port, ctx, "default.test", timeout=5)
    except (ssl.SSLError, ConnectionError):
        return True
    with sock:
        try:
            sock.sendall(request_bytes("/", {"Connection": "close"}))
            data = sock.recv(65536)
        except (ssl.SSLError, ConnectionError):
            return True
        return data == b""


def test_mtls_required_without_client_cert_fails(
    mtls: ProxyHarness, origin: OriginServer, server_pki: ServerPki
) -> None:
    assert _refused(mtls.port, client_context(server_pki.ca_file))
    assert origin.requests == []


def test_mtls_required_with_cert_from_another_ca_fails(
    mtls: ProxyHarness, origin: OriginServer, server_pki: ServerPki
) -> None:
    cert = (server_pki.stranger_cert, server_pki.stranger_key)
    assert _refused(mtls.port, client_context(server_pki.ca_file, cert=cert))
    assert origin.requests == []


def test_mtls_required_with_client_cert_is_200_and_visible_to_hooks(
    mtls: ProxyHarness, server_pki: ServerPki
) -> None:
    ctx = client_context(server_pki.ca_file, cert=(server_pki.client_cert, server_pki.client_key))
    client, resp = https_get(mtls.port, ctx, "default.test")
    with client:
        assert resp.status == 200
        assert resp.body == b"hello world\n"
        assert resp.header("x-client-cn") == "alice"
        assert resp.header("x-client-der") == "yes"


def test_mtls_client_cert_seen_by_async_request_filter(
    origin: OriginServer, server_pki: ServerPki, start_proxy: StartHarness
) -> None:
    listener = tls_listener(server_pki, client_ca=server_pki.ca_file, client_verify="required")
    proxy = start_proxy(AsyncTlsEcho(HttpPeer(origin.address)), listeners=[listener])
    ctx = client_context(server_pki.ca_file, cert=(server_pki.client_cert, server_pki.client_key))
    client, resp = https_get(proxy.port, ctx, "api.test", "/whoami")
    with client:
        assert resp.status == 200
        assert resp.body == b"cn=alice"
    assert origin.requests == []  # answered by the hook


@pytest.mark.parametrize("with_cert", [False, True])
def test_mtls_optional(
    with_cert: bool, origin: OriginServer, server_pki: ServerPki, start_proxy: StartHarness
) -> None:
    listener = tls_listener(server_pki, client_ca=server_pki.ca_file, client_verify="optional")
    proxy = start_proxy(TlsEcho(HttpPeer(origin.address)), listeners=[listener])
    cert = (server_pki.client_cert, server_pki.client_key) if with_cert else None
    ctx = client_context(server_pki.ca_file, cert=cert)
    client, resp = https_get(proxy.port, ctx, "default.test")
    with client:
        assert resp.status == 200
        assert resp.header("x-client-cn") == ("alice" if with_cert else "-")
        assert resp.header("x-client-der") == ("yes" if with_cert else "no")
