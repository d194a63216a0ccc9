"""HTTP/2 to upstreams (issue 6, items 2, 3 and 5): ``upstreams.NAME.protocol: h2 | h2c``.

``ferryman run`` sits in front of real HTTP/2 origins (``tests/h2_origin.py``: cleartext
prior knowledge, and TLS with ALPN ``h2``) and of an HTTP/1.1-only TLS origin that an
``h2`` group falls back to. Clients are curl (HTTP/1.1 and HTTP/2), nghttp, httpx with
HTTP/2, h2load and raw HTTP/2 clients (the ``h2`` library over a socket) where a test
must control windows exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import trustme
from e2e_util import ProxyProcess, start_ferryman

from h2_origin import H2Origin
from origin import OriginServer, free_port, pattern_bytes
from pki import write_leaf

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")
NGHTTP = shutil.which("nghttp")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl not installed")


@dataclass
class Rig:
    ca: str  # CA bundle for clients of the TLS listener
    proxy: ProxyProcess
    h2c: H2Origin  # cleartext HTTP/2 origin
    h2tls: H2Origin  # TLS origin, ALPN h2
    h1tls: OriginServer  # TLS origin, ALPN http/1.1 only
    small: H2Origin  # an origin allowing 50 concurrent streams
    to_h2c: int  # listener (cleartext, h2c too) -> h2c group
    to_h2tls: int  # -> protocol h2 over TLS
    to_h1tls: int  # -> protocol h2, but the server only speaks HTTP/1.1
    to_small: int  # -> the 50-stream origin
    tls_in: int  # TLS listener (h2 preferred) -> h2c group
    quick: int  # -> the h2c origin with ping 0.3s, read timeout 1s


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("ferryman-h2-upstream")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = write_leaf(leaf, workdir, "site")
    ca_path = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))

    h2_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    h2_ctx.load_cert_chain(cert, key)
    h2_ctx.set_alpn_protocols(["h2"])
    h1_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    h1_ctx.load_cert_chain(cert, key)
    h1_ctx.set_alpn_protocols(["http/1.1"])

    h2c = H2Origin().start()
    h2tls = H2Origin(tls=h2_ctx).start()
    small = H2Origin(max_streams=50).start()
    h1tls = OriginServer()
    h1tls.socket = h1_ctx.wrap_socket(h1tls.socket, server_side=True)
    h1tls.start()

    ports = [free_port() for _ in range(6)]
    tls_in = f"{{cert: {cert}, key: {key}}}"
    yaml_text = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{ports[0]}", upstream: h2c, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[1]}", upstream: h2tls, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[2]}", upstream: h1tls, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[3]}", upstream: small, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[4]}", upstream: h2c, tls: {tls_in}}}\n'
        f'  - {{bind: "127.0.0.1:{ports[5]}", upstream: quick, h2c: true}}\n'
        "upstreams:\n"
        f'  h2c: {{servers: ["{h2c.address}"], protocol: h2c}}\n'
        f'  h2tls: {{servers: ["{h2tls.address}"], protocol: h2, tls: {{ca: {ca_path}}}}}\n'
        f'  h1tls: {{servers: ["{h1tls.address}"], protocol: h2, tls: {{ca: {ca_path}}}}}\n'
        f'  small: {{servers: ["{small.address}"], protocol: h2c}}\n'
        f'  quick: {{servers: ["{h2c.address}"], protocol: h2c, max_retries: 0,\n'
        "          timeouts: {ping: 0.3s, read: 1s, idle: 60s}}\n"
    )
    proxy = start_ferryman(workdir, yaml_text, ports[0])
    yield Rig(str(ca_path), proxy, h2c, h2tls, h1tls, small, *ports)
    code = proxy.stop(signal.SIGINT)
    log = proxy.log_text()
    for origin in (h2c, h2tls, small, h1tls):
        origin.stop()
    assert code == 0, log
    assert "Traceback" not in log, log


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", *args], capture_output=True, timeout=timeout)


def h2load(requests: int, clients: int, streams: int, url: str) -> None:
    """Run ``h2load -n requests -c clients -m streams url``; every request must succeed."""
    assert H2LOAD is not None
    out = subprocess.run(
        [H2LOAD, "-n", str(requests), "-c", str(clients), "-m", str(streams), url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    done = f"{requests} succeeded, 0 failed, 0 errored, 0 timeout"
    assert done in out.stdout, out.stdout


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- bridging and header translation -----------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
def test_request_head_is_translated_for_http2(rig: Rig, flag: str) -> None:
    out = curl(
        flag,
        "-H", "Connection: keep-alive, X-Hop",
        "-H", "X-Hop: secret",
        "-H", "Keep-Alive: timeout=5",
        "-H", "TE: trailers",
        "-H", "X-Keep: yes",
        f"http://127.0.0.1:{rig.to_h2c}/headers?q=1",
    )
    assert out.returncode == 0, out.stderr
    fields = [tuple(f) for f in json.loads(out.stdout)]
    names = [n for n, _ in fields]
    # pseudo-headers first, taken from the request line and Host
    assert fields[:4] == [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", f"127.0.0.1:{rig.to_h2c}"),
        (":path", "/headers?q=1"),
    ]
    assert "host" not in names  # :authority replaces it
    for hop in ("connection", "keep-alive", "transfer-encoding", "upgrade"):
        assert hop not in names
    if flag == "--http1.1":  # (curl sends no Connection header over HTTP/2)
        assert "x-hop" not in names  # named by Connection: hop-by-hop
    assert ("te", "trailers") in fields
    assert ("x-keep", "yes") in fields
    assert all(n == n.lower() for n in names)


def test_absolute_form_target_becomes_authority_and_origin_form_path(rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", rig.to_h2c), timeout=10) as conn:
        conn.sendall(
            b"GET http://example.test/headers?x=1 HTTP/1.1\r\nHost: example.test\r\n"
            b"Connection: close\r\n\r\n"
        )
        got = b""
        while data := conn.recv(65536):
            got += data
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    fields = [tuple(f) for f in json.loads(body)]
    assert (":authority", "example.test") in fields
    assert (":path", "/headers?x=1") in fields


def test_upgrade_offer_goes_as_a_plain_request_and_is_declined(rig: Rig) -> None:
    # (HTTP/2 has no Upgrade: the offer is dropped, the answer is an ordinary one, and the
    # connection goes on with HTTP/1.1)
    with socket.create_connection(("127.0.0.1", rig.to_h2c), timeout=10) as conn:
        conn.sendall(
            b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        got = b""
        while data := conn.recv(65536):
            got += data
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    assert b'"upgrade"' not in got.lower()
    assert got.endswith(b"hello h2\n")
    assert got.count(b"HTTP/1.1 200") == 2


@needs_curl
def test_response_header_larger_than_hpacks_default_limit(rig: Rig) -> None:
    out = curl("-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{rig.to_h2c}/bigheader?size=100000")
    assert out.returncode == 0, out.stderr
    assert b"x-big: " + b"b" * 100000 in out.stdout


@pytest.mark.skipif(H2LOAD is None, reason="h2load not installed")
def test_burst_to_an_h2_group_whose_server_speaks_http1(rig: Rig) -> None:
    h2load(600, 6, 10, f"http://127.0.0.1:{rig.to_h1tls}/")


@needs_curl
def test_tls_upstream_gets_https_scheme(rig: Rig) -> None:
    out = curl("--http1.1", f"http://127.0.0.1:{rig.to_h2tls}/headers")
    assert out.returncode == 0, out.stderr
    fields = [tuple(f) for f in json.loads(out.stdout)]
    assert (":scheme", "https") in fields


@needs_curl
def test_trailers_reach_an_http2_client(rig: Rig) -> None:
    # (curl -v shows HTTP/2 trailers; the HTTP/1.1 case is read raw below)
    out = curl(
        "--http2-prior-knowledge", "-v", "-H", "TE: trailers",
        f"http://127.0.0.1:{rig.to_h2c}/trailers",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"ok"
    assert b"x-trailer: done" in out.stderr.lower()


def test_request_trailers_of_an_http1_client_reach_the_h2_upstream(rig: Rig) -> None:
    rig.h2c.reset_counts()
    with socket.create_connection(("127.0.0.1", rig.to_h2c), timeout=10) as conn:
        conn.sendall(
            b"POST /sha?t=1 HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Req-Trailer: yes\r\n\r\n"
        )
        got = b""
        while data := conn.recv(65536):
            got += data
    assert got.startswith(b"HTTP/1.1 200"), got
    assert got.endswith(f"5 {sha(b'hello')}".encode())
    assert rig.h2c.request_trailers["/sha?t=1"] == [(b"x-req-trailer", b"yes")]


def test_request_trailers_of_an_http2_client_reach_the_h2_upstream(rig: Rig) -> None:
    rig.h2c.reset_counts()
    client = RawH2Client(rig.to_h2c)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
             (b":path", b"/sha?t=2"), (b"te", b"trailers")],
        )
        client.conn.send_data(sid, b"hello")
        client.conn.send_headers(sid, [(b"x-req-trailer", b"h2")], end_stream=True)
        client.flush()
        body = b""
        for event in client.pump(2.0):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
    finally:
        client.close()
    assert body == f"5 {sha(b'hello')}".encode()
    assert rig.h2c.request_trailers["/sha?t=2"] == [(b"x-req-trailer", b"h2")]


def test_http1_client_gets_trailers_in_the_last_chunk(rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", rig.to_h2c), timeout=10) as conn:
        conn.sendall(b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        got = b""
        while not got.endswith(b"\r\n\r\n") or b"0\r\n" not in got:
            data = conn.recv(65536)
            if not data:
                break
            got += data
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"2\r\nok\r\n0\r\nx-trailer: done\r\n\r\n"


@needs_curl
def test_head_and_no_body_statuses(rig: Rig) -> None:
    out = curl("-I", "--http1.1", f"http://127.0.0.1:{rig.to_h2c}/big?size=12345")
    assert out.returncode == 0, out.stderr
    assert b"content-length: 12345" in out.stdout.lower()
    out = curl("-w", "%{http_code}", f"http://127.0.0.1:{rig.to_h2c}/status/204")
    assert out.stdout == b"204"


# -- bodies, both ways -----------------------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
@pytest.mark.parametrize("size", [1_000_000, 100_000_000])
def test_download_intact(rig: Rig, tmp_path: Path, flag: str, size: int) -> None:
    target = tmp_path / "down"
    out = curl(flag, "-o", str(target), f"http://127.0.0.1:{rig.to_h2c}/big?size={size}")
    assert out.returncode == 0, out.stderr
    assert target.stat().st_size == size
    assert sha(target.read_bytes()) == sha(pattern_bytes(size))


@needs_curl
@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
@pytest.mark.parametrize("size", [1_000_000, 100_000_000])
def test_upload_intact(rig: Rig, tmp_path: Path, flag: str, size: int) -> None:
    source = tmp_path / "up"
    data = pattern_bytes(size)
    source.write_bytes(data)
    out = curl(flag, "--data-binary", f"@{source}", f"http://127.0.0.1:{rig.to_h2c}/sha")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == f"{size} {sha(data)}"


@needs_curl
def test_chunked_upload_from_an_http1_client(rig: Rig) -> None:
    out = curl(
        "--http1.1",
        "-H", "Transfer-Encoding: chunked",
        "--data-binary", "x" * 100_000,
        f"http://127.0.0.1:{rig.to_h2c}/sha",
    )
    assert out.stdout.decode() == f"100000 {sha(b'x' * 100_000)}"


@needs_curl
@pytest.mark.parametrize("size", [1_000_000, 100_000_000])
def test_curl_http2_over_tls_both_ways(rig: Rig, tmp_path: Path, size: int) -> None:
    url = f"https://localhost:{rig.tls_in}"
    tls = ["--http2", "--cacert", rig.ca, "--resolve", f"localhost:{rig.tls_in}:127.0.0.1"]
    target = tmp_path / "down"
    out = curl(*tls, "-w", "%{http_version}", "-o", str(target), f"{url}/big?size={size}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"2"
    assert sha(target.read_bytes()) == sha(pattern_bytes(size))
    source = tmp_path / "up"
    source.write_bytes(pattern_bytes(size))
    out = curl(*tls, "--data-binary", f"@{source}", f"{url}/sha")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == f"{size} {sha(pattern_bytes(size))}"


def test_httpx_http2_over_tls_both_ways(rig: Rig) -> None:
    body = pattern_bytes(1_000_000)
    ctx = ssl.create_default_context(cafile=rig.ca)
    with httpx.Client(http2=True, verify=ctx, timeout=30) as client:
        r = client.post(f"https://localhost:{rig.tls_in}/sha", content=body)
        assert r.http_version == "HTTP/2"
        assert r.text == f"{len(body)} {sha(body)}"
        r = client.get(f"https://localhost:{rig.tls_in}/big?size=1000000")
        assert r.http_version == "HTTP/2"
        assert r.content == body


def test_httpx_http2_prior_knowledge_to_a_tls_h2_upstream(rig: Rig) -> None:
    body = pattern_bytes(1_000_000)
    with httpx.Client(http2=True, http1=False, timeout=30) as client:
        r = client.post(f"http://127.0.0.1:{rig.to_h2tls}/sha", content=body)
        assert r.http_version == "HTTP/2"
        assert r.text == f"{len(body)} {sha(body)}"
        r = client.get(f"http://127.0.0.1:{rig.to_h2tls}/big?size=1000000")
        assert r.content == body


@pytest.mark.skipif(NGHTTP is None, reason="nghttp not installed")
def test_nghttp_through_tls_listener_to_h2c(rig: Rig, tmp_path: Path) -> None:
    out = subprocess.run(
        [NGHTTP, "-v", "-n", f"https://127.0.0.1:{rig.tls_in}/trailers"],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert b":status: 200" in out.stdout
    assert b"x-trailer: done" in out.stdout


@needs_curl
def test_h2_upstream_falls_back_to_http1_when_alpn_does_not_pick_h2(rig: Rig) -> None:
    before = len(rig.h1tls.requests)
    connections = rig.h1tls.connections
    for flag in ("--http1.1", "--http2-prior-knowledge"):
        out = curl(flag, "-w", " %{http_code}", f"http://127.0.0.1:{rig.to_h1tls}/big?size=5000")
        assert out.returncode == 0, out.stderr
        assert out.stdout == pattern_bytes(5000) + b" 200"
    out = curl("--data-binary", "y" * 70000, f"http://127.0.0.1:{rig.to_h1tls}/echo")
    assert out.stdout == b"y" * 70000
    assert len(rig.h1tls.requests) == before + 3
    # the downgraded connection is pooled as an HTTP/1.1 one: reused, not reopened
    assert rig.h1tls.connections - connections <= 1


# -- multiplexing -------------------------------------------------------------------------------


@pytest.mark.skipif(H2LOAD is None, reason="h2load not installed")
def test_h2load_100k_through_an_h2_upstream(rig: Rig) -> None:
    rig.h2c.reset_counts()
    h2load(100000, 10, 10, f"http://127.0.0.1:{rig.to_h2c}/")
    assert len(rig.h2c.served_by) <= 2


@pytest.mark.skipif(H2LOAD is None, reason="h2load not installed")
def test_1000_concurrent_streams_share_at_most_two_upstream_connections(rig: Rig) -> None:
    rig.h2c.reset_counts()
    h2load(1000, 10, 100, f"http://127.0.0.1:{rig.to_h2c}/delay?ms=3000")
    assert rig.h2c.max_active == 1000  # all of them at the origin at once
    assert len(rig.h2c.served_by) <= 2  # over at most two connections (pooled or new)


@pytest.mark.skipif(H2LOAD is None, reason="h2load not installed")
def test_the_servers_stream_limit_is_respected_and_more_connections_open(rig: Rig) -> None:
    rig.small.reset_counts()
    h2load(300, 3, 100, f"http://127.0.0.1:{rig.to_small}/delay?ms=3000")
    assert rig.small.max_per_connection == 50  # never above its SETTINGS
    assert rig.small.connections >= 6  # 300 at once need six connections of 50
    assert rig.small.max_active == 300


# -- GOAWAY, PING, timeouts, cancellation ------------------------------------------------------


@needs_curl
def test_goaway_lets_the_inflight_stream_finish_and_new_ones_go_elsewhere(rig: Rig) -> None:
    rig.h2c.reset_counts()
    url = f"http://127.0.0.1:{rig.to_h2c}"
    assert curl(f"{url}/").returncode == 0  # an upstream connection exists
    result: dict[str, subprocess.CompletedProcess[bytes]] = {}
    slow = threading.Thread(
        target=lambda: result.setdefault("slow", curl(f"{url}/goaway?ms=1000"))
    )
    slow.start()
    assert rig.h2c.goaway_sent.wait(10)  # the slow stream is still in flight (1 s more)
    fresh = curl("-w", " %{http_code}", f"{url}/delay?ms=10")
    slow.join(30)
    assert fresh.stdout == b"slept 200"
    assert result["slow"].stdout == b"finished"  # its stream was below last-stream-id
    # the new request went to another connection
    assert rig.h2c.served_on["/delay?ms=10"] != rig.h2c.served_on["/goaway?ms=1000"]


def test_idle_upstream_connection_is_pinged(rig: Rig) -> None:
    rig.h2c.reset_counts()
    assert curl(f"http://127.0.0.1:{rig.quick}/").returncode == 0
    time.sleep(1.5)  # ping every 0.3 s while idle
    assert rig.h2c.pings >= 2
    assert curl(f"http://127.0.0.1:{rig.quick}/").returncode == 0
    assert rig.h2c.connections == 1  # still the same, live connection


@needs_curl
def test_read_timeout_answers_504_and_cancels_the_stream(rig: Rig) -> None:
    rig.h2c.reset_counts()
    out = curl("-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{rig.quick}/hang")
    assert out.stdout == b"504"
    deadline = time.monotonic() + 5
    while not rig.h2c.resets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.h2c.resets == [("/hang", 8)]  # RST_STREAM(CANCEL)


@needs_curl
@pytest.mark.parametrize("client", ["http2", "http1-reset"])
def test_client_that_gives_up_cancels_the_upstream_stream(rig: Rig, client: str) -> None:
    rig.h2c.reset_counts()
    if client == "http2":
        out = curl(
            "--http2-prior-knowledge", "--max-time", "2", f"http://127.0.0.1:{rig.to_h2c}/hang"
        )
        assert out.returncode == 28  # curl's timeout
    else:
        # (an HTTP/1.1 client that only half-closes still gets its answer, as designed:
        # one that resets the connection is gone)
        sock = socket.create_connection(("127.0.0.1", rig.to_h2c))
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 10
        while "/hang" not in rig.h2c.served_on and time.monotonic() < deadline:
            time.sleep(0.02)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    deadline = time.monotonic() + 5
    while not rig.h2c.resets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.h2c.resets == [("/hang", 8)]
    # the shared connection stays up for others
    assert curl(f"http://127.0.0.1:{rig.to_h2c}/").stdout == b"hello h2\n"
    assert rig.h2c.connections <= 1


# -- flow control -------------------------------------------------------------------------------


class RawH2Client:
    """An HTTP/2 client over a plain socket whose windows the test controls."""

    def __init__(self, port: int, window: int = 65535) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, seconds: float) -> list[h2.events.Event]:
        """Read and handle frames for ``seconds`` without crediting any DATA back."""
        events: list[h2.events.Event] = []
        self.sock.settimeout(0.1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                self.flush()
                continue
            if not data:
                break
            events += self.conn.receive_data(data)
            self.flush()
        return events

    def close(self) -> None:
        self.sock.close()


def test_a_client_that_does_not_read_slows_the_upstream_writer(rig: Rig) -> None:
    size = 50_000_000
    target = f"/big?size={size}"
    client = RawH2Client(rig.to_h2c, window=65535)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"),
             (b":path", target.encode())],
            end_stream=True,
        )
        client.flush()
        client.pump(2.0)  # take what comes, never credit it back
        sent = rig.h2c.sent_for(target)
        # the client's 64 KiB window, the stream's 256 KiB of buffer in the proxy, the
        # upstream stream window of 256 KiB and credit batching: well under 2 MB
        assert 0 < sent < 2_000_000, sent
        client.pump(1.0)
        assert rig.h2c.sent_for(target) == sent  # and it stays there
    finally:
        client.close()


def test_an_upstream_that_does_not_read_slows_the_client(rig: Rig) -> None:
    client = RawH2Client(rig.to_h2c)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
             (b":path", b"/noread")],
        )
        client.flush()
        offered = 0
        chunk = b"z" * 16384
        end = time.monotonic() + 3.0
        client.sock.settimeout(0.1)
        while time.monotonic() < end and offered < 20_000_000:
            window = client.conn.local_flow_control_window(sid)
            if window >= len(chunk):
                client.conn.send_data(sid, chunk)
                offered += len(chunk)
                client.flush()
                continue
            try:
                data = client.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            client.conn.receive_data(data)
            client.flush()
        received = rig.h2c.received_for("/noread")
        # the origin's 1 MiB stream window, 256 KiB queued in the proxy beyond it, the
        # proxy's 256 KiB client stream window: the client is held to about 1.5 MiB
        assert offered < 3_000_000, offered
        assert received <= offered
    finally:
        client.close()
