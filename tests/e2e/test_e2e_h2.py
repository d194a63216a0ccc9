"""HTTP/2 from clients (issue 6, items 1 and 3): ``ferryman run`` with an h2c listener and TLS
listeners (ALPN ``h2_preferred``, ``h1_only``, ``h2_only``), in front of an HTTP/1.1 origin.

Real clients only: curl (``--http2-prior-knowledge``, ``--http2`` over TLS), nghttp,
httpx with HTTP/2, and h2load. Bodies of 1 MB and 100 MB go both ways and arrive intact.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme
from e2e_util import ProxyProcess, start_ferryman

from origin import OriginServer, free_port, pattern_bytes
from pki import write_leaf

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")
NGHTTP = shutil.which("nghttp")


@dataclass
class H2Rig:
    proxy: ProxyProcess
    origin: OriginServer
    h2c: int  # cleartext port: HTTP/1.1 and HTTP/2 prior knowledge
    tls: int  # TLS, alpn h2_preferred (the default)
    tls_h1: int  # TLS, alpn h1_only
    tls_h2: int  # TLS, alpn h2_only
    ca: str  # CA bundle for the clients


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Rig]:
    workdir = tmp_path_factory.mktemp("ferryman-h2")
    ca = trustme.CA()
    cert, key = write_leaf(ca.issue_cert("localhost", "127.0.0.1"), workdir, "site")
    ca_path = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    origin = OriginServer().start()
    ports = [free_port() for _ in range(4)]
    tls = f"{{cert: {cert}, key: {key}"
    yaml_text = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{ports[0]}", upstream: app, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[1]}", upstream: app, tls: {tls}}}}}\n'
        f'  - {{bind: "127.0.0.1:{ports[2]}", upstream: app, tls: {tls}, alpn: h1_only}}}}\n'
        f'  - {{bind: "127.0.0.1:{ports[3]}", upstream: app, tls: {tls}, alpn: h2_only}}}}\n'
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    proxy = start_ferryman(workdir, yaml_text, ports[0])
    yield H2Rig(proxy, origin, *ports, str(ca_path))
    code = proxy.stop(signal.SIGINT)
    log = proxy.log_text()
    origin.stop()
    assert code == 0, log
    assert "Traceback" not in log, log


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", *args], capture_output=True, timeout=timeout)


needs_curl = pytest.mark.skipif(CURL is None, reason="curl not installed")


@needs_curl
def test_curl_prior_knowledge_h2c(rig: H2Rig) -> None:
    out = curl(
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version} %{http_code}",
        f"http://127.0.0.1:{rig.h2c}/big?size=1000",
    )
    assert out.returncode == 0, out.stderr
    body, _, meta = out.stdout.rpartition(b"\n")
    assert meta == b"2 200"
    assert body == pattern_bytes(1000)


@needs_curl
def test_http11_still_works_on_the_h2c_port(rig: H2Rig) -> None:
    out = curl(
        "--http1.1",
        "-w",
        "\n%{http_version} %{http_code}",
        f"http://127.0.0.1:{rig.h2c}/big?size=10",
    )
    assert out.stdout.rpartition(b"\n")[2] == b"1.1 200"


@needs_curl
@pytest.mark.parametrize(
    ("which", "flag", "version"),
    [
        ("tls", "--http2", b"2"),
        ("tls", "--http1.1", b"1.1"),  # the client offers only http/1.1
        ("tls_h1", "--http2", b"1.1"),  # h1_only: the proxy picks http/1.1
        ("tls_h2", "--http2", b"2"),
    ],
)
def test_alpn_policies(rig: H2Rig, which: str, flag: str, version: bytes) -> None:
    port = getattr(rig, which)
    out = curl(
        flag,
        "--cacert",
        rig.ca,
        "-w",
        "\n%{http_version} %{http_code}",
        f"https://localhost:{port}/big?size=100",
        "--resolve",
        f"localhost:{port}:127.0.0.1",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rpartition(b"\n")[2] == version + b" 200"


def test_h2_only_speaks_http2_even_to_a_client_that_did_not_negotiate_it(rig: H2Rig) -> None:
    ctx = ssl.create_default_context(cafile=rig.ca)
    ctx.set_alpn_protocols(["http/1.1"])  # no overlap: the handshake completes without ALPN
    with socket.create_connection(("127.0.0.1", rig.tls_h2), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            assert conn.selected_alpn_protocol() is None
            conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            got = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                got += data
    # a SETTINGS frame (type 4) then GOAWAY (type 7) with PROTOCOL_ERROR (1); no HTTP/1.1
    assert not got.startswith(b"HTTP/1.1")
    assert got[3] == 0x04
    goaway = got.find(b"\x07\x00\x00\x00\x00\x00")
    assert goaway > 0 and got[goaway + 10 : goaway + 14] == b"\x00\x00\x00\x01", got


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@needs_curl
@pytest.mark.parametrize("size", [1 << 20, 100 << 20], ids=["1MB", "100MB"])
def test_bodies_both_ways_over_h2c_and_tls(rig: H2Rig, tmp_path: Path, size: int) -> None:
    data = pattern_bytes(size)
    upload = tmp_path / "up.bin"
    upload.write_bytes(data)
    for scheme, port, flags in (
        ("http", rig.h2c, ["--http2-prior-knowledge"]),
        (
            "https",
            rig.tls,
            ["--http2", "--cacert", rig.ca, "--resolve", f"localhost:{rig.tls}:127.0.0.1"],
        ),
    ):
        host = "127.0.0.1" if scheme == "http" else "localhost"
        down = curl(
            *flags,
            "-w",
            "%{http_version}",
            "-o",
            str(tmp_path / "down.bin"),
            f"{scheme}://{host}:{port}/big?size={size}",
            timeout=120,
        )
        assert down.returncode == 0 and down.stdout == b"2", down.stderr
        assert _digest((tmp_path / "down.bin").read_bytes()) == _digest(data)
        echo = curl(
            *flags,
            "--data-binary",
            f"@{upload}",
            "-o",
            str(tmp_path / "echo.bin"),
            "-w",
            "%{http_version}",
            f"{scheme}://{host}:{port}/echo",
            timeout=120,
        )
        assert echo.returncode == 0 and echo.stdout == b"2", echo.stderr
        assert _digest((tmp_path / "echo.bin").read_bytes()) == _digest(data)


def test_httpx_http2_over_tls(rig: H2Rig) -> None:
    with httpx.Client(
        http2=True, verify=ssl.create_default_context(cafile=rig.ca), timeout=30
    ) as client:
        base = f"https://localhost:{rig.tls}"
        got = client.get(f"{base}/big?size=5000")
        assert (got.http_version, got.status_code) == ("HTTP/2", 200)
        assert got.content == pattern_bytes(5000)
        body = pattern_bytes(1 << 20)
        echoed = client.post(f"{base}/echo", content=body)
        assert (echoed.http_version, echoed.status_code) == ("HTTP/2", 200)
        assert echoed.content == body
        # many requests multiplexed on the one connection
        for i in range(50):
            assert client.get(f"{base}/big?size={i}").content == pattern_bytes(i)


def test_request_headers_reach_the_origin_as_http11(rig: H2Rig) -> None:
    with httpx.Client(
        http2=True, verify=ssl.create_default_context(cafile=rig.ca), timeout=10
    ) as client:
        got = client.get(f"https://localhost:{rig.tls}/headers", headers={"X-Test": "1"})
    assert got.http_version == "HTTP/2"
    fields = {k.lower(): v for k, v in got.json()}
    assert fields["host"] == f"localhost:{rig.tls}"  # from :authority
    assert fields["x-test"] == "1"
    assert fields["x-forwarded-proto"] == "https"
    assert not any(k.startswith(":") for k in fields)


@pytest.mark.skipif(NGHTTP is None, reason="nghttp not installed")
def test_nghttp(rig: H2Rig) -> None:
    assert NGHTTP is not None
    out = subprocess.run(
        [NGHTTP, "-v", f"http://127.0.0.1:{rig.h2c}/big?size=100"],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert b":status: 200" in out.stdout
    assert out.stdout.endswith(pattern_bytes(100)) or pattern_bytes(100) in out.stdout


@pytest.mark.skipif(NGHTTP is None, reason="nghttp not installed")
@pytest.mark.parametrize("size", [1_000_000])
def test_nghttp_bodies_both_ways(rig: H2Rig, tmp_path: Path, size: int) -> None:
    assert NGHTTP is not None
    down = subprocess.run(
        [NGHTTP, f"http://127.0.0.1:{rig.h2c}/big?size={size}"], capture_output=True, timeout=60
    )
    assert down.returncode == 0, down.stderr
    assert down.stdout == pattern_bytes(size)
    source = tmp_path / "up"
    source.write_bytes(pattern_bytes(size))
    up = subprocess.run(
        [NGHTTP, "-d", str(source), f"http://127.0.0.1:{rig.h2c}/echo"],
        capture_output=True,
        timeout=60,
    )
    assert up.returncode == 0, up.stderr
    assert up.stdout == pattern_bytes(size)


@pytest.mark.skipif(H2LOAD is None, reason="h2load not installed")
def test_h2load_100k_requests_no_errors(rig: H2Rig) -> None:
    assert H2LOAD is not None
    out = subprocess.run(
        [H2LOAD, "-n", "100000", "-c", "10", "-m", "10", f"http://127.0.0.1:{rig.h2c}/big?size=10"],
        capture_output=True,
        timeout=240,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "100000 succeeded, 0 failed, 0 errored, 0 timeout" in out.stdout, out.stdout
    assert "status codes: 100000 2xx" in out.stdout, out.stdout


# --- raw HTTP/2 client: cancellation and flow control --------------------------------------


class H2Client:
    """A minimal HTTP/2 client over a blocking socket (the ``h2`` library's state machine)."""

    def __init__(self, port: int, window: int | None = None) -> None:
        import h2.config
        import h2.connection

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        if window is not None:
            self.conn.local_settings.initial_window_size = window
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def get(self, path: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "t")],
            end_stream=True,
        )
        self.flush()
        return stream_id

    def events(self, timeout: float) -> list[object]:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        events = self.conn.receive_data(data) if data else []
        self.flush()
        return list(events)

    def close(self) -> None:
        self.sock.close()


def _h2c_proxy(workdir: Path, upstream: str, server_extra: str = "") -> ProxyProcess:
    port = free_port()
    yaml_text = (
        f"server: {{workers: 1{server_extra}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app, h2c: true}}]\n'
        f'upstreams: {{app: {{servers: ["{upstream}"]}}}}\n'
    )
    return start_ferryman(workdir, yaml_text, port)


def test_a_cancelled_stream_aborts_its_upstream_request(tmp_path: Path) -> None:
    import threading

    import h2.errors
    import h2.events
    from e2e_util import ScriptedOrigin, read_request_head

    upstream_got_it = threading.Event()
    upstream_closed = threading.Event()

    def handle(conn: socket.socket) -> None:
        head = read_request_head(conn)
        if head.startswith(b"GET /ok "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            read_request_head(conn)
            return
        upstream_got_it.set()
        conn.settimeout(8)  # /wait: never answer; watch for the proxy giving up
        try:
            if conn.recv(1) == b"":
                upstream_closed.set()
        except OSError:
            upstream_closed.set()

    origin = ScriptedOrigin(handle)
    proxy = _h2c_proxy(tmp_path, f"127.0.0.1:{origin.port}")
    client = H2Client(proxy.port)
    try:
        stream_id = client.get("/wait")
        # (a stream reset before its request went upstream never reaches the upstream)
        assert upstream_got_it.wait(5)
        client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        assert upstream_closed.wait(5), "the upstream request was not cancelled"
        # the connection goes on: another stream is answered
        second = client.get("/ok")
        got: list[object] = []
        for _ in range(20):
            got += client.events(1)
            if any(isinstance(e, h2.events.StreamEnded) and e.stream_id == second for e in got):
                break
        data = b"".join(
            e.data for e in got if isinstance(e, h2.events.DataReceived) and e.stream_id == second
        )
        assert data == b"ok"
    finally:
        client.close()
        proxy.stop(signal.SIGINT)
        origin.stop()


def test_a_client_that_does_not_read_stops_the_upstream(tmp_path: Path) -> None:
    """Flow control end to end: a client that never opens its window beyond 64 KiB makes
    the proxy stop reading the upstream; the upstream's sends block after a bounded amount
    (socket buffers plus the stream's 256 KiB margin), not after the whole 200 MB."""
    import threading

    from e2e_util import ScriptedOrigin, read_request_head

    sent = [0]
    total = 200 << 20

    def handle(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        conn.settimeout(10)
        try:
            while sent[0] < total:
                conn.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass

    origin = ScriptedOrigin(handle)
    proxy = _h2c_proxy(tmp_path, f"127.0.0.1:{origin.port}")
    client = H2Client(proxy.port)
    try:
        client.get("/big")
        # read what arrives but never acknowledge it: the windows stay closed
        deadline = 3.0
        waited = 0.0
        while waited < deadline:
            client.sock.settimeout(0.5)
            try:
                client.sock.recv(1 << 20)
            except TimeoutError:
                pass
            waited += 0.5
        stalled_at = sent[0]
        threading.Event().wait(1.0)
        assert sent[0] == stalled_at, "the upstream kept sending"
        assert stalled_at < 32 << 20, f"the proxy read {stalled_at} bytes for a stalled client"
    finally:
        client.close()
        proxy.stop(signal.SIGINT)
        origin.stop()


def test_upstream_trailers_reach_an_h2_client(rig: H2Rig) -> None:
    import h2.events

    client = H2Client(rig.h2c)
    try:
        stream_id = client.get("/chunked?n=2&size=5&trailer=abc")
        got: list[object] = []
        for _ in range(20):
            got += client.events(1)
            if any(isinstance(e, h2.events.StreamEnded) for e in got):
                break
        body = b"".join(e.data for e in got if isinstance(e, h2.events.DataReceived))
        assert body == b"x" * 10
        trailers = [e for e in got if isinstance(e, h2.events.TrailersReceived)]
        assert len(trailers) == 1 and trailers[0].stream_id == stream_id
        assert (b"x-trailer", b"abc") in [(bytes(n), bytes(v)) for n, v in trailers[0].headers]
    finally:
        client.close()


def _stream_result(client: H2Client, stream_id: int) -> tuple[int | None, bytes, bool]:
    """(status, body, reset) of ``stream_id``, reading until it ends or is reset."""
    import h2.events

    status: int | None = None
    body = b""
    for _ in range(30):
        for event in client.events(1):
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                client.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                return status, body, False
            elif isinstance(event, h2.events.StreamReset):
                return status, body, True
    raise AssertionError("the stream did not end")


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[ProxyProcess, OriginServer]]:
    origin = OriginServer().start()
    proxy = _h2c_proxy(
        tmp_path, origin.address, ", limits: {max_body: 1000, max_header_bytes: 2048}"
    )
    yield proxy, origin
    proxy.stop(signal.SIGINT)
    origin.stop()


def test_a_header_section_past_max_header_bytes_is_431(limited) -> None:
    proxy, _ = limited
    client = H2Client(proxy.port)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [
                (":method", "GET"),
                (":path", "/"),
                (":scheme", "http"),
                (":authority", "a"),
                ("x-big", "v" * 3000),
            ],
            end_stream=True,
        )
        client.flush()
        assert _stream_result(client, sid)[0] == 431
        ok = client.get("/")  # the connection goes on
        assert _stream_result(client, ok)[:2] == (200, b"hello world\n")
    finally:
        client.close()


def test_a_streamed_body_past_max_body_is_413(limited) -> None:
    proxy, _ = limited
    client = H2Client(proxy.port)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [(":method", "POST"), (":path", "/echo"), (":scheme", "http"), (":authority", "a")],
        )
        for _ in range(3):  # no content-length: counted as it arrives
            client.conn.send_data(sid, b"x" * 600)
        client.flush()
        assert _stream_result(client, sid)[0] == 413
        ok = client.get("/")
        assert _stream_result(client, ok)[0] == 200
    finally:
        client.close()


def test_a_declared_body_past_max_body_is_413_before_it_is_sent(limited) -> None:
    proxy, origin = limited
    client = H2Client(proxy.port)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":path", "/echo"),
                (":scheme", "http"),
                (":authority", "a"),
                ("content-length", "5000"),
            ],
        )
        client.flush()
        assert _stream_result(client, sid)[0] == 413
        assert origin.connections == 0
    finally:
        client.close()


@needs_curl
def test_graceful_stop_lets_an_http2_request_finish(tmp_path: Path) -> None:
    """SIGTERM: a GOAWAY (NO_ERROR, last stream 1) goes out at once, the stream in flight
    is still answered, then the connection closes and ferryman exits 0."""
    import time

    assert CURL is not None
    origin = OriginServer().start()
    proxy = _h2c_proxy(tmp_path, origin.address)
    try:
        client = subprocess.Popen(
            [
                CURL,
                "-sS",
                "-v",
                "--http2-prior-knowledge",
                f"http://127.0.0.1:{proxy.port}/slow?ms=1500",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10  # the request is at the origin, in flight
        while not any(r[1].startswith("/slow") for r in origin.requests):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proxy.proc.send_signal(signal.SIGTERM)
        out, err = client.communicate(timeout=15)
        assert client.returncode == 0, err
        assert out == b"slow"
        assert b"GOAWAY, error=0, last_stream=1" in err
        assert proxy.proc.wait(10) == 0
    finally:
        proxy.stop(signal.SIGINT)
        origin.stop()


@needs_curl
def test_expect_100_continue_over_h2(rig: H2Rig, tmp_path: Path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(pattern_bytes(200_000))
    out = curl(
        "-v",
        "--http2-prior-knowledge",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{body}",
        f"http://127.0.0.1:{rig.h2c}/echo",
    )
    assert out.returncode == 0, out.stderr
    assert b"< HTTP/2 100" in out.stderr  # the interim response, before the body was sent
    assert out.stdout == pattern_bytes(200_000)


def test_an_idle_http2_connection_gets_goaway_after_the_keepalive_timeout(
    tmp_path: Path,
) -> None:
    import time

    import h2.events

    origin = OriginServer().start()
    proxy = _h2c_proxy(tmp_path, origin.address, ", timeouts: {keepalive: 1s}")
    client = H2Client(proxy.port)
    try:
        stream_id = client.get("/")
        assert _stream_result(client, stream_id)[0] == 200
        started = time.monotonic()
        got: list[object] = []
        while time.monotonic() - started < 5:
            got += client.events(0.5)
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in got):
                break
        terminated = [e for e in got if isinstance(e, h2.events.ConnectionTerminated)]
        assert terminated and terminated[0].error_code == 0
        assert terminated[0].last_stream_id == stream_id
        assert 0.8 < time.monotonic() - started < 3
    finally:
        client.close()
        proxy.stop(signal.SIGINT)
        origin.stop()


# --- regressions from the review of the HTTP/2 code ------------------------------------------


def _dead_port() -> int:
    return free_port()  # nothing listens there: connections are refused


def test_failed_uploads_give_back_their_window(tmp_path: Path) -> None:
    """Bytes held while a session was paused are acknowledged when it ends, so that the
    connection's receive window does not shrink for good (20 x 200 KB > the 1 MiB window)."""
    import h2.events

    proxy = _h2c_proxy(tmp_path, f"127.0.0.1:{_dead_port()}")
    client = H2Client(proxy.port)
    try:
        for _ in range(20):
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                sid,
                [
                    (":method", "POST"),
                    (":path", "/"),
                    (":scheme", "http"),
                    (":authority", "a"),
                    ("content-length", "200000"),
                ],
            )
            sent = 0
            status = None
            for _ in range(400):  # bounded: a window that never reopens fails the test
                if status is not None:
                    break
                room = min(client.conn.local_flow_control_window(sid), 200_000 - sent, 16384)
                if room > 0:
                    client.conn.send_data(sid, b"x" * room, end_stream=sent + room == 200_000)
                    sent += room
                    client.flush()
                for event in client.events(0.05 if room > 0 else 1):
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                        status = int(dict(event.headers)[b":status"])
            assert status == 502
        assert client.conn.outbound_flow_control_window > 0
    finally:
        client.close()
        proxy.stop(signal.SIGINT)


def test_a_stream_that_stops_reading_is_reset_after_body_write(tmp_path: Path) -> None:
    """A client whose window stays at 0 gets its stream reset (CANCEL) after body_write,
    and the connection, with nothing left on it, idles out after the keep-alive timeout."""
    import time

    origin = OriginServer().start()
    proxy = _h2c_proxy(tmp_path, origin.address, ", timeouts: {body_write: 1s, keepalive: 1s}")
    client = H2Client(proxy.port, window=0)  # never lets a body byte through
    try:
        sid = client.get("/big?size=2000000")
        started = time.monotonic()
        # read raw: the client's state machine is not consulted again
        frames, closed = _raw_frames(client.sock, 10)
        assert closed
        resets = [(sid_, payload) for kind, _, sid_, payload in frames if kind == 0x3]
        assert resets == [(sid, b"\x00\x00\x00\x08")]  # RST_STREAM CANCEL
        assert frames[-1][0] == 0x7  # then GOAWAY, and the close: nothing leaked
        assert time.monotonic() - started < 6
    finally:
        client.close()
        proxy.stop(signal.SIGINT)
        origin.stop()


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin /x"), ("GET", "/a\tb"), ("GET", "relative"), ("GE T", "/"), ("GET", "*")],
    ids=["space-in-path", "tab-in-path", "not-origin-form", "space-in-method", "star-not-options"],
)
def test_a_request_line_that_would_not_be_one_is_400(rig: H2Rig, method: str, path: str) -> None:
    client = H2Client(rig.h2c)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [(":method", method), (":path", path), (":scheme", "http"), (":authority", "a")],
            end_stream=True,
        )
        client.flush()
        assert _stream_result(client, sid)[0] == 400
    finally:
        client.close()


def test_a_silent_connection_on_an_h2c_port_is_closed_after_header_read(tmp_path: Path) -> None:
    import time

    origin = OriginServer().start()
    proxy = _h2c_proxy(tmp_path, origin.address, ", timeouts: {header_read: 1s}")
    try:
        for first in (b"", b"PRI * HTTP/2"):  # nothing, or half a preface
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=8) as sock:
                sock.sendall(first)
                started = time.monotonic()
                assert sock.recv(1) == b""
                assert time.monotonic() - started < 4
    finally:
        proxy.stop(signal.SIGINT)
        origin.stop()


def test_a_request_body_that_stops_arriving_is_408_after_body_read(tmp_path: Path) -> None:
    import time

    import h2.events

    origin = OriginServer().start()
    proxy = _h2c_proxy(tmp_path, origin.address, ", timeouts: {body_read: 1s}")
    client = H2Client(proxy.port)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":path", "/echo"),
                (":scheme", "http"),
                (":authority", "a"),
                ("content-length", "1000"),
            ],
        )
        client.conn.send_data(sid, b"x" * 100)  # then nothing more
        client.flush()
        started = time.monotonic()
        got: list[object] = []
        while time.monotonic() - started < 6:
            got += client.events(0.5)
            if any(isinstance(e, h2.events.StreamReset) for e in got):
                break
        heads = [e for e in got if isinstance(e, h2.events.ResponseReceived)]
        assert heads and dict(heads[0].headers)[b":status"] == b"408"
        assert 0.8 < time.monotonic() - started < 4
        # the unfinished upload is told to stop
        assert any(
            isinstance(e, h2.events.StreamReset) and e.stream_id == sid and e.error_code == 0
            for e in got
        ), got
    finally:
        client.close()
        proxy.stop(signal.SIGINT)
        origin.stop()


def _raw_frames(
    sock: socket.socket, seconds: float
) -> tuple[list[tuple[int, int, int, bytes]], bool]:
    """Read until EOF (or ``seconds``): the frames as (type, flags, stream, payload), and
    whether the connection was closed."""
    import time

    raw = b""
    closed = False
    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            continue
        if not piece:
            closed = True
            break
        raw += piece
    frames = []
    pos = 0
    while pos + 9 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 3], "big")
        frames.append(
            (
                raw[pos + 3],
                raw[pos + 4],
                int.from_bytes(raw[pos + 5 : pos + 9], "big"),
                raw[pos + 9 : pos + 9 + length],
            )
        )
        pos += 9 + length
    return frames, closed


@pytest.mark.parametrize("code", [0, 2], ids=["no-error", "internal-error"])
def test_client_goaway_answers_the_streams_in_flight_unless_it_is_an_error(
    rig: H2Rig, code: int
) -> None:
    import hyperframe.frame

    client = H2Client(rig.h2c)
    try:
        sid = client.get("/slow?ms=300")
        goaway = hyperframe.frame.GoAwayFrame(0)
        goaway.last_stream_id = 0
        goaway.error_code = code
        client.sock.sendall(goaway.serialize())
        frames, closed = _raw_frames(client.sock, 5)
    finally:
        client.close()
    assert closed  # the connection ends either way
    on_stream = [(kind, flags, payload) for kind, flags, s, payload in frames if s == sid]
    if code == 0:
        # the stream in flight is answered in full, then the connection closes
        assert [kind for kind, _, _ in on_stream][:1] == [0x1]  # HEADERS
        body = b"".join(payload for kind, _, payload in on_stream if kind == 0x0)
        assert body == b"slow"
        assert on_stream[-1][1] & 0x1  # END_STREAM
    else:
        assert not [f for f in on_stream if f[0] in (0x0, 0x1)]  # abandoned: no answer


@needs_curl
@pytest.mark.parametrize("size", [300_000, 330_000, 400_000])
def test_an_upstream_connection_paused_by_a_slow_stream_is_pooled_reading(
    tmp_path: Path, size: int
) -> None:
    """A response that ends in the very read that made its HTTP/2 client's stream
    write-paused: the upstream connection goes back to the pool, and must read again
    there, or the next request on it would never be answered."""
    origin = OriginServer().start()
    proxy = _h2c_proxy(tmp_path, origin.address)
    try:
        for _ in range(3):
            client = H2Client(proxy.port)  # its 64 KiB window is never credited back
            client.get(f"/big?size={size}")
            for _ in range(4):
                client.events(0.05)
            client.close()
            out = curl(
                "--http2-prior-knowledge", "--max-time", "5",
                f"http://127.0.0.1:{proxy.port}/big?size=10",
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout == pattern_bytes(10)
    finally:
        proxy.stop(signal.SIGINT)
        origin.stop()
