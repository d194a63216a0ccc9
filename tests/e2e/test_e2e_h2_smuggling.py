"""HTTP/2 → HTTP/1.1 downgrade smuggling (H2.CL, H2.TE, CRLF injection...), end to end and
differentially: issue 5's smuggling corpus extended to HTTP/2 clients.

Each payload is one HTTP/2 request from a client whose own header checks are turned off,
sent to a ``ferryman run`` h2c listener whose origin parses with h11 (an independent
HTTP/1.1 parser). For each: the client's exact outcome (a status on the stream, or GOAWAY
with PROTOCOL_ERROR), and what the origin saw: nothing, or exactly the one request; never a
``/smuggled`` target, never anything h11 finds malformed.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from e2e_util import ProxyProcess, start_ferryman
from h11_origin import H11Origin

from origin import free_port

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
GOAWAY_PROTOCOL_ERROR = "GOAWAY 1"

#: (id, extra header fields, body or None, :path, :method, client outcome, origin sees /p)
CASES: list[tuple[str, list[tuple[bytes, bytes]], bytes | None, bytes, bytes, str, bool]] = [
    (
        "h2.cl-zero-with-body",
        [(b"content-length", b"0")],
        SMUGGLED,
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "h2.cl-shorter-than-body",
        [(b"content-length", b"5")],
        b"0123456789",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "h2.cl-longer-than-body",
        [(b"content-length", b"50")],
        b"0123456789",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "h2.te-chunked",
        [(b"transfer-encoding", b"chunked")],
        b"0\r\n\r\n" + SMUGGLED,
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "crlf-in-value",
        [(b"x", b"a\r\ntransfer-encoding: chunked")],
        b"0\r\n\r\n" + SMUGGLED,
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "lf-in-value",
        [(b"x", b"a\ntransfer-encoding: chunked")],
        b"0\r\n\r\n" + SMUGGLED,
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    ("nul-in-value", [(b"x", b"a\x00b")], b"x", b"/p", b"POST", GOAWAY_PROTOCOL_ERROR, False),
    (
        "crlf-in-name",
        [(b"x\r\ntransfer-encoding", b"chunked")],
        b"x",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "uppercase-name",
        [(b"Transfer-Encoding", b"chunked")],
        b"x",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    ("colon-in-name", [(b"x:y", b"1")], b"x", b"/p", b"POST", GOAWAY_PROTOCOL_ERROR, False),
    ("space-in-name", [(b"x y", b"1")], b"x", b"/p", b"POST", GOAWAY_PROTOCOL_ERROR, False),
    (
        "connection-field",
        [(b"connection", b"keep-alive")],
        b"x",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "upgrade-field",
        [(b"upgrade", b"websocket")],
        b"x",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    ("te-not-trailers", [(b"te", b"gzip")], b"x", b"/p", b"POST", GOAWAY_PROTOCOL_ERROR, False),
    (
        "host-differs-from-authority",
        [(b"host", b"b")],
        b"x",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "cl-with-sign",
        [(b"content-length", b"+1")],
        b"x",
        b"/p",
        b"POST",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "duplicate-cl",
        [(b"content-length", b"1"), (b"content-length", b"1")],
        b"x",
        b"/p",
        b"POST",
        "status 400",
        False,
    ),
    (
        "crlf-in-path",
        [],
        None,
        b"/p HTTP/1.1\r\nHost: a\r\n\r\nGET /smuggled",
        b"GET",
        GOAWAY_PROTOCOL_ERROR,
        False,
    ),
    (
        "space-in-path",  # h2 lets it through: the request line would have 4 parts
        [],
        None,
        b"/p HTTP/1.1 /smuggled",
        b"GET",
        "status 400",
        False,
    ),
    ("space-in-method", [], None, b"/p", b"GET /smuggled", "status 400", False),
    # well-formed: forwarded
    ("te-trailers", [(b"te", b"trailers")], b"x", b"/p", b"POST", "status 200", True),
    ("plain", [(b"content-length", b"1")], b"x", b"/p", b"POST", "status 200", True),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, H11Origin]]:
    origin = H11Origin()
    port = free_port()
    yaml_text = (
        "server: {workers: 1}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app, h2c: true}}]\n'
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    proxy = start_ferryman(tmp_path_factory.mktemp("ferryman-h2-smuggling"), yaml_text, port)
    yield proxy, origin
    code = proxy.stop(signal.SIGINT)
    origin.stop()
    assert code == 0, proxy.log_text()
    assert "Traceback" not in proxy.log_text(), proxy.log_text()


def send(
    port: int, fields: list[tuple[bytes, bytes]], body: bytes | None, path: bytes, method: bytes
) -> str:
    """One request from a client that checks nothing; the first outcome it sees."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        conn.initiate_connection()
        pseudo = [
            (b":method", method),
            (b":path", path),
            (b":scheme", b"http"),
            (b":authority", b"a"),
        ]
        conn.send_headers(1, pseudo + fields, end_stream=body is None)
        if body is not None:
            conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return "reset"
            if not data:
                return "EOF"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return "status " + dict(event.headers)[b":status"].decode()
                if isinstance(event, h2.events.StreamReset):
                    return f"RST {event.error_code}"
                if isinstance(event, h2.events.ConnectionTerminated):
                    return f"GOAWAY {event.error_code}"
            sock.sendall(conn.data_to_send())
    return "nothing"


@pytest.mark.parametrize(
    ("fields", "body", "path", "method", "outcome", "forwarded"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_h2_downgrade_smuggling(
    rig: tuple[ProxyProcess, H11Origin],
    fields: list[tuple[bytes, bytes]],
    body: bytes | None,
    path: bytes,
    method: bytes,
    outcome: str,
    forwarded: bool,
) -> None:
    proxy, origin = rig
    origin.take()
    assert send(proxy.port, fields, body, path, method) == outcome
    time.sleep(0.2)  # let the origin read whatever the proxy sent
    seen = origin.take()
    targets = [r[1] for r in seen.requests]
    assert not any(b"smuggled" in t for t in targets), f"DESYNC: the origin saw {targets}"
    assert seen.errors == [], seen.errors
    assert seen.partial == []
    assert targets == ([b"/p"] if forwarded else [])
