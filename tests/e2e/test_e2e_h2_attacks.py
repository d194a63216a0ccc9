"""HTTP/2 attacks from a raw-frame client (issue 6, item 6).

One ``ferryman run`` with an h2c listener. Each attack is sent as hand-built frames on a
connection of its own; the test asserts the GOAWAY (its error code) and the close, and
that a second, well-behaved connection opened afterwards is served.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from e2e_util import ProxyProcess, start_ferryman

from origin import OriginServer, free_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR, PROTOCOL_ERROR, ENHANCE_YOUR_CALM = 0x0, 0x1, 0xB
GOAWAY = 0x7


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return head + struct.pack(">I", stream) + payload


# a valid HPACK block for GET / (static table: :method GET, :scheme http, :path /) plus
# :authority "a" (literal without indexing, name index 1)
GET_BLOCK = b"\x82\x86\x84\x01\x01a"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    origin = OriginServer().start()
    port = free_port()
    yaml_text = (
        "server: {workers: 1}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app, h2c: true}}]\n'
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    proc = start_ferryman(tmp_path_factory.mktemp("ferryman-h2-attacks"), yaml_text, port)
    yield proc
    code = proc.stop(signal.SIGINT)
    origin.stop()
    assert code == 0, proc.log_text()
    assert "Traceback" not in proc.log_text(), proc.log_text()


def attack(port: int, payload: bytes, *, chunk: int = 1 << 16) -> tuple[int | None, bool]:
    """Send the preface, a SETTINGS frame and ``payload``; read until the server closes.

    Returns the GOAWAY error code (None if no GOAWAY came) and whether the server closed
    the connection (within 10 s).
    """
    got = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = PREFACE + frame(4) + payload
        try:
            for i in range(0, len(data), chunk):
                sock.sendall(data[i : i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us mid-attack: what it sent before is read below
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not piece:
                closed = True
                break
            got += piece
    return goaway_code(got), closed


def goaway_code(data: bytes) -> int | None:
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == GOAWAY:
            return int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return None


class Bystander:
    """A well-behaved HTTP/2 connection opened before an attack and used after it: the
    attack must not disturb other connections."""

    def __init__(self, port: int) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def get(self) -> int:
        """One GET on this connection; returns the status."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")],
            end_stream=True,
        )
        self.sock.sendall(self.conn.data_to_send())
        status = None
        while True:
            data = self.sock.recv(65536)
            assert data, "the server closed a well-behaved connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    status = int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    assert status is not None
                    return status
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def bystander(proxy: ProxyProcess) -> Iterator[Bystander]:
    client = Bystander(proxy.port)
    assert client.get() == 200
    yield client
    client.close()


def well_behaved_get(port: int) -> int:
    """A normal HTTP/2 GET on a new connection; returns the status."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn.initiate_connection()
        conn.send_headers(
            1,
            [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "a")],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        status = None
        while True:
            data = sock.recv(65536)
            assert data, "the server closed a well-behaved connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.StreamEnded):
                    assert status is not None
                    return status
            sock.sendall(conn.data_to_send())


def test_rapid_reset(proxy: ProxyProcess, bystander: Bystander) -> None:
    """CVE-2023-44487: open a stream and reset it at once, over and over."""
    payload = b"".join(
        frame(1, 0x5, sid, GET_BLOCK) + frame(3, 0, sid, b"\0\0\0\x08")
        for sid in range(1, 2 * 300, 2)
    )
    code, closed = attack(proxy.port, payload)
    assert code == ENHANCE_YOUR_CALM
    assert closed
    assert bystander.get() == 200  # a connection open during the attack is untouched
    assert well_behaved_get(proxy.port) == 200


def test_continuation_flood(proxy: ProxyProcess, bystander: Bystander) -> None:
    """CVE-2024-27316: a header block that never ends."""
    payload = frame(1, 0x1, 1, GET_BLOCK) + frame(9, 0, 1, b"\x00" * 16000) * 200
    code, closed = attack(proxy.port, payload)
    assert code == ENHANCE_YOUR_CALM
    assert closed
    assert bystander.get() == 200  # a connection open during the attack is untouched
    assert well_behaved_get(proxy.port) == 200


@pytest.mark.parametrize(
    "flood",
    [frame(4), frame(6, 0, 0, b"12345678"), frame(0, 0, 1, b"")],
    ids=["settings", "ping", "empty-data"],
)
def test_control_and_empty_data_floods(
    proxy: ProxyProcess, bystander: Bystander, flood: bytes
) -> None:
    opener = frame(1, 0x4, 1, GET_BLOCK) if flood[3] == 0 else b""  # DATA needs a stream
    code, closed = attack(proxy.port, opener + flood * 1000)
    assert code == ENHANCE_YOUR_CALM
    assert closed
    assert bystander.get() == 200  # a connection open during the attack is untouched
    assert well_behaved_get(proxy.port) == 200


@pytest.mark.parametrize(
    "payload",
    [
        frame(1, 0x5, 2, GET_BLOCK),  # an even stream id: server-initiated only
        frame(1, 0x5, 5, GET_BLOCK) + frame(1, 0x5, 3, GET_BLOCK),  # ids must increase
        frame(0, 0x1, 7, b"data"),  # DATA on a stream never opened
    ],
    ids=["even-id", "decreasing-id", "data-on-idle-stream"],
)
def test_stream_id_misuse_is_a_protocol_error(
    proxy: ProxyProcess, bystander: Bystander, payload: bytes
) -> None:
    code, closed = attack(proxy.port, payload)
    assert code == PROTOCOL_ERROR
    assert closed
    assert bystander.get() == 200  # a connection open during the attack is untouched
    assert well_behaved_get(proxy.port) == 200


def test_too_many_concurrent_streams(proxy: ProxyProcess, bystander: Bystander) -> None:
    """More open streams than SETTINGS_MAX_CONCURRENT_STREAMS (128) allows."""
    payload = b"".join(frame(1, 0x4, sid, GET_BLOCK) for sid in range(1, 2 * 200, 2))
    code, closed = attack(proxy.port, payload)
    # (h2 treats the stream past the limit as a connection error; nginx would refuse just
    # that stream: stricter, and the client learns the limit from SETTINGS anyway)
    assert code == PROTOCOL_ERROR
    assert closed
    assert bystander.get() == 200  # a connection open during the attack is untouched
    assert well_behaved_get(proxy.port) == 200
