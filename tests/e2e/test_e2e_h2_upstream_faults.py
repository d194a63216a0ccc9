"""Failing HTTP/2 upstreams (issue 6, item 2): what the client gets, and that the shared
connection's trouble stays with the requests it concerns.

Behind ``ferryman run``: the HTTP/2 test origin playing faults (refused and cancelled
streams, a connection error, a reset mid-body, a GOAWAY that excludes a stream), an
HTTP/1.1 server wrongly configured as ``h2c``, and a server that never says SETTINGS.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from e2e_util import ProxyProcess, ScriptedOrigin, start_ferryman

from h2_origin import H2Origin
from origin import OriginServer, free_port

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "curl"], capture_output=True).returncode != 0,
    reason="curl not installed",
)


@dataclass
class FaultRig:
    proxy: ProxyProcess
    origin: H2Origin
    backup: H2Origin
    single: int  # -> the fault origin alone, no retries
    pair: int  # -> fault origin, then backup (max_retries 1)
    h1_as_h2c: int  # -> an HTTP/1.1 server configured as h2c
    silent: int  # -> a server that accepts and says nothing
    tight: int  # -> an origin with 64 KiB stream windows


def _silent(conn: socket.socket) -> None:
    time.sleep(3)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultRig]:
    workdir = tmp_path_factory.mktemp("ferryman-h2-faults")
    origin = H2Origin().start()
    backup = H2Origin(faults=False).start()
    h1 = OriginServer().start()
    silent = ScriptedOrigin(_silent)
    tight = H2Origin(window=65535).start()
    ports = [free_port() for _ in range(5)]
    yaml_text = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{ports[0]}", upstream: single, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[1]}", upstream: pair, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[2]}", upstream: h1, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[3]}", upstream: silent, h2c: true}}\n'
        f'  - {{bind: "127.0.0.1:{ports[4]}", upstream: tight, h2c: true}}\n'
        "upstreams:\n"
        f'  single: {{servers: ["{origin.address}"], protocol: h2c, max_retries: 0}}\n'
        f'  pair: {{servers: ["{origin.address}", "{backup.address}"], protocol: h2c,\n'
        "         max_retries: 1, lb: round_robin}\n"
        f'  h1: {{servers: ["{h1.address}"], protocol: h2c, max_retries: 0}}\n'
        f'  silent: {{servers: ["127.0.0.1:{silent.port}"], protocol: h2c, max_retries: 0,\n'
        "           timeouts: {connect: 0.5s}}\n"
        f'  tight: {{servers: ["{tight.address}"], protocol: h2c, max_retries: 0}}\n'
    )
    proxy = start_ferryman(workdir, yaml_text, ports[0])
    yield FaultRig(proxy, origin, backup, *ports)
    code = proxy.stop(signal.SIGINT)
    log = proxy.log_text()
    for server in (origin, backup, h1, tight):
        server.stop()
    silent.stop()
    assert code == 0, log
    assert "Traceback" not in log, log


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=60)


def status(port: int, path: str, *extra: str) -> str:
    out = curl("-o", "/dev/null", "-w", "%{http_code}", *extra, f"http://127.0.0.1:{port}{path}")
    return out.stdout.decode()


@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
def test_refused_stream_is_502_without_retries(rig: FaultRig, flag: str) -> None:
    assert status(rig.single, "/refuse", flag) == "502"
    assert status(rig.single, "/", flag) == "200"  # the connection carries on


def test_refused_stream_is_retried_on_the_next_server(rig: FaultRig) -> None:
    rig.backup.reset_counts()
    # round robin: one of two requests starts on the refusing origin, both succeed
    codes = [status(rig.pair, "/refuse-then-ok") for _ in range(2)]
    assert codes == ["200", "200"]


def test_refused_post_is_retried_too(rig: FaultRig) -> None:
    # (REFUSED_STREAM means the server did not act on it: safe to send again)
    codes = [status(rig.pair, "/refuse-then-ok", "--data-binary", "abc") for _ in range(2)]
    assert codes == ["200", "200"]


def test_upstream_cancel_is_502_for_http1_clients(rig: FaultRig) -> None:
    assert status(rig.single, "/cancel", "--http1.1") == "502"


def test_upstream_cancel_cancels_an_http2_clients_stream(rig: FaultRig) -> None:
    out = curl("--http2-prior-knowledge", f"http://127.0.0.1:{rig.single}/cancel")
    assert out.returncode == 92  # curl: HTTP/2 stream error
    assert b"CANCEL" in out.stderr


def test_connection_error_fails_its_requests_and_a_new_connection_serves_the_next(
    rig: FaultRig,
) -> None:
    rig.origin.reset_counts()
    assert status(rig.single, "/protocol-error") == "502"
    assert status(rig.single, "/") == "200"
    assert rig.origin.connections == 1  # a fresh connection after the broken one


@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
def test_reset_mid_body_truncates_the_response(rig: FaultRig, flag: str) -> None:
    out = curl(flag, "-w", "%{http_code}", f"http://127.0.0.1:{rig.single}/drop")
    if flag == "--http1.1":
        assert out.returncode == 18  # curl: partial file (the connection was closed)
        assert out.stdout == b"partial200"
    else:
        # the head and 7 bytes went out, then RST_STREAM (curl keeps none of it; nghttp
        # -v shows HEADERS, DATA, RST_STREAM in that order)
        assert out.returncode == 92, out.stderr
        assert b"INTERNAL_ERROR" in out.stderr
    assert status(rig.single, "/", flag) == "200"


def test_stream_above_goaway_last_stream_id_is_retried_elsewhere(rig: FaultRig) -> None:
    codes = [status(rig.pair, "/goaway-before-then-ok") for _ in range(2)]
    assert codes == ["200", "200"]


def test_http1_server_configured_as_h2c_is_502_at_once(rig: FaultRig) -> None:
    started = time.monotonic()
    assert status(rig.h1_as_h2c, "/") == "502"
    assert time.monotonic() - started < 3


def test_server_that_never_sends_settings_is_a_connect_timeout(rig: FaultRig) -> None:
    assert status(rig.silent, "/") == "504"


def test_upload_answered_early_leaves_the_keepalive_client_readable(rig: FaultRig) -> None:
    # the origin answers before reading: 400 KB stay queued in the proxy beyond its 64 KiB
    # window (the client was paused), and the next request on the connection must still
    # be read once the answer is out
    body = b"u" * 400_000
    with socket.create_connection(("127.0.0.1", rig.tight), timeout=10) as conn:
        conn.sendall(
            b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while got.count(b"HTTP/1.1 ") < 2 or not got.endswith(b"hello h2\n"):
            data = conn.recv(65536)
            if not data:
                break
            got += data
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert b"early" in got
    assert got.count(b"HTTP/1.1 200") == 2, got
