"""Access logs and request ids (issue 7, item 6): ``listeners[].access_log`` in the
combined text format and as JSON lines, and ``X-Request-Id`` (the client's, or one made by
the proxy) forwarded upstream and logged.

Real clients (http.client, curl with HTTP/1.1 and HTTP/2) go through ``ferryman run`` to
the stdlib origin; the tests read the log files the proxy writes.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_util import ProxyProcess, start_ferryman

from origin import OriginServer, free_port

HEX32 = re.compile(r"[0-9a-f]{32}")


@dataclass
class LogRig:
    proxy: ProxyProcess
    origin: OriginServer
    json_port: int
    text_port: int
    quiet_port: int
    json_log: Path
    text_log: Path
    dead: str


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogRig]:
    workdir = tmp_path_factory.mktemp("ferryman-access-log")
    origin = OriginServer().start()
    json_port, text_port, quiet_port = free_port(), free_port(), free_port()
    dead = f"127.0.0.1:{free_port()}"
    routes = (
        "[{match: {path: /ping}, respond: {status: 200, body: pong}},"
        " {match: {path_prefix: /dead}, upstream: dead},"
        " {match: {path_prefix: /}, upstream: app}]"
    )
    yaml_text = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{json_port}", h2c: true, routes: {routes},\n'
        "      access_log: {format: json, path: json.log, flush: 0.1s}}\n"
        f'  - {{bind: "127.0.0.1:{text_port}", upstream: app,\n'
        "      access_log: {format: combined, path: text.log, flush: 0.1s}}\n"
        f'  - {{bind: "127.0.0.1:{quiet_port}", upstream: app}}\n'
        "upstreams:\n"
        f'  app: {{servers: ["{origin.address}"]}}\n'
        f'  dead: {{servers: ["{dead}"], max_retries: 0}}\n'
    )
    proxy = start_ferryman(workdir, yaml_text, json_port)
    yield LogRig(
        proxy, origin, json_port, text_port, quiet_port,
        workdir / "json.log", workdir / "text.log", dead,
    )
    code = proxy.stop(signal.SIGINT)
    origin.stop()
    assert code == 0, proxy.log_text()
    assert "Traceback" not in proxy.log_text()


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def log_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The log's lines once it has at least ``count`` (the proxy flushes every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def json_entry(rig: LogRig, marker: str) -> dict[str, object]:
    """The JSON log entry of the one request whose path contains ``marker``."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = rig.json_log.read_text().splitlines() if rig.json_log.exists() else []
        found = [json.loads(line) for line in lines if marker in line]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {marker}")


def origin_header(rig: LogRig, marker: str, name: str) -> list[str]:
    return [
        value
        for _, path, headers in rig.origin.requests
        if marker in path
        for key, value in headers
        if key.lower() == name
    ]


def test_json_line_has_every_field(rig: LogRig) -> None:
    status, body = get(
        rig.json_port, "/big?size=1234&m=fields",
        {"X-Request-Id": "client-id-1", "User-Agent": "tester/1", "Referer": "http://r/"},
    )
    assert status == 200
    entry = json_entry(rig, "m=fields")
    assert entry["method"] == "GET"
    assert entry["path"] == "/big?size=1234&m=fields"
    assert entry["protocol"] == "HTTP/1.1"
    assert entry["status"] == 200
    assert entry["client"] == "127.0.0.1"
    assert entry["bytes_sent"] == len(body) == 1234
    assert entry["bytes_received"] == 0
    assert entry["user_agent"] == "tester/1"
    assert entry["referer"] == "http://r/"
    assert entry["upstream_addr"] == rig.origin.address
    assert entry["upstream_status"] == 200
    assert entry["retries"] == 0
    assert entry["request_id"] == "client-id-1"
    assert isinstance(entry["reused"], bool)
    assert 0 <= entry["upstream_connect_time"] <= entry["request_time"]  # type: ignore[operator]
    assert 0 < entry["upstream_header_time"] <= entry["request_time"]  # type: ignore[operator]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(entry["time"]))
    assert "error" not in entry
    # the client's id went upstream as it was
    assert origin_header(rig, "m=fields", "x-request-id") == ["client-id-1"]


def test_missing_request_id_is_made_forwarded_and_logged(rig: LogRig) -> None:
    assert get(rig.json_port, "/headers?m=made")[0] == 200
    sent = origin_header(rig, "m=made", "x-request-id")
    assert len(sent) == 1 and HEX32.fullmatch(sent[0]), sent
    assert json_entry(rig, "m=made")["request_id"] == sent[0]


@pytest.mark.parametrize(
    ("given", "marker"),
    [("has space", "m=space"), ("x" * 201, "m=long"), ("tab\there", "m=tab")],
    ids=["space", "longer-than-200", "control-char"],
)
def test_unusable_client_request_id_is_replaced(rig: LogRig, given: str, marker: str) -> None:
    assert get(rig.json_port, f"/headers?{marker}", {"X-Request-Id": given})[0] == 200
    sent = origin_header(rig, marker, "x-request-id")
    assert len(sent) == 1 and HEX32.fullmatch(sent[0]), sent  # one id only: ours
    assert json_entry(rig, marker)["request_id"] == sent[0]


def test_request_ids_made_are_unique(rig: LogRig) -> None:
    for i in range(20):
        get(rig.quiet_port, f"/headers?m=uniq-{i}-end")
    ids = [v for i in range(20) for v in origin_header(rig, f"m=uniq-{i}-end", "x-request-id")]
    assert len(ids) == len(set(ids)) == 20


def test_http2_client_and_upload_are_logged(rig: LogRig) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--data-binary", "z" * 1000,
         f"http://127.0.0.1:{rig.json_port}/echo?m=h2post"],
        capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    entry = json_entry(rig, "m=h2post")
    assert entry["protocol"] == "HTTP/2"
    assert entry["method"] == "POST"
    assert entry["bytes_received"] == 1000
    assert entry["bytes_sent"] == 1000


def test_answered_by_a_route_has_no_upstream_fields(rig: LogRig) -> None:
    assert get(rig.json_port, "/ping", {"X-Request-Id": "ping-id"}) == (200, b"pong")
    entry = json_entry(rig, "ping-id")
    assert entry["path"] == "/ping" and entry["status"] == 200
    for key in ("upstream_addr", "upstream_status", "upstream_connect_time", "reused"):
        assert key not in entry


def test_failed_upstream_is_logged_with_its_error(rig: LogRig) -> None:
    assert get(rig.json_port, "/dead?m=refused")[0] == 502
    entry = json_entry(rig, "m=refused")
    assert entry["status"] == 502
    assert entry["error"] == "connect_refused"
    assert entry["upstream_addr"] == rig.dead
    assert entry["upstream_status"] is None


def test_combined_text_format(rig: LogRig) -> None:
    before = len(log_lines(rig.text_log, 0, 0))
    status, body = get(
        rig.text_port, "/big?size=77&m=text",
        {"User-Agent": 'evil" agent', "X-Request-Id": "text-id"},
    )
    assert status == 200
    lines = log_lines(rig.text_log, before + 1)
    line = lines[-1]
    pattern = (
        r'127\.0\.0\.1 - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
        r'"GET /big\?size=77&m=text HTTP/1\.1" 200 77 "-" "evil\\" agent" '
        r"request_time=[0-9.e-]+ upstream_connect_time=[0-9.e-]+ "
        r"upstream_header_time=[0-9.e-]+ upstream_addr=127\.0\.0\.1:\d+ "
        r"upstream_status=200 reused=[01] retries=0 request_id=text-id"
    )
    assert re.fullmatch(pattern, line), line


def _raw(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_a_request_refused_by_the_parser_is_logged(rig: LogRig) -> None:
    before_json = len(log_lines(rig.json_log, 0, 0))
    before_text = len(log_lines(rig.text_log, 0, 0))
    assert _raw(rig.json_port, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n").startswith(
        b"HTTP/1.1 400 "
    )
    assert _raw(rig.text_port, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n").startswith(
        b"HTTP/1.1 400 "
    )
    entry = json.loads(log_lines(rig.json_log, before_json + 1)[-1])
    assert entry["status"] == 400
    assert entry["method"] is None and entry["path"] is None and entry["request_id"] is None
    assert entry["client"] == "127.0.0.1"
    assert entry["error"] == "bad_request"
    line = log_lines(rig.text_log, before_text + 1)[-1]
    pattern = (
        r'127\.0\.0\.1 - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
        r'"-" 400 0 "-" "-" request_time=0\.000000 retries=0 request_id=- error=bad_request'
    )
    assert re.fullmatch(pattern, line), line


def test_a_listener_without_access_log_writes_none(rig: LogRig, tmp_path: Path) -> None:
    json_before = len(log_lines(rig.json_log, 0, 0))
    text_before = len(log_lines(rig.text_log, 0, 0))
    assert get(rig.quiet_port, "/?m=quiet")[0] == 200
    time.sleep(0.3)  # (three flush intervals: a line would have been written)
    assert len(log_lines(rig.json_log, 0, 0)) == json_before
    assert len(log_lines(rig.text_log, 0, 0)) == text_before


def test_buffered_lines_are_written_at_shutdown_and_workers_share_the_file(
    tmp_path: Path,
) -> None:
    origin = OriginServer().start()
    port = free_port()
    yaml_text = (
        "server: {workers: 2}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app,\n'
        "  access_log: {format: json, path: access.log, buffer: 1m, flush: 1h}}]\n"
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    proxy = start_ferryman(tmp_path, yaml_text, port)
    try:
        for i in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"/?n={i}")
            assert conn.getresponse().status == 200
            conn.close()
        assert not (tmp_path / "access.log").read_text()  # all still buffered
        assert proxy.stop(signal.SIGTERM) == 0
    finally:
        proxy.stop(signal.SIGINT)
        origin.stop()
    lines = (tmp_path / "access.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line whole
    assert sorted(e["path"] for e in entries) == sorted(f"/?n={i}" for i in range(200))


def test_sigusr1_reopens_the_log_after_a_rotation(tmp_path: Path) -> None:
    origin = OriginServer().start()
    port = free_port()
    yaml_text = (
        "server: {workers: 2}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app,\n'
        "  access_log: {format: json, path: access.log, flush: 0.1s}}]\n"
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    proxy = start_ferryman(tmp_path, yaml_text, port)
    current, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    try:
        assert get(port, "/?before")[0] == 200
        assert log_lines(current, 1)
        current.rename(rotated)  # what logrotate does, then it signals the server
        proxy.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not current.exists():  # each worker opens the path afresh
            assert time.monotonic() < deadline, "the log was not reopened"
            time.sleep(0.05)
        for i in range(20):  # (both workers)
            assert get(port, f"/?after={i}")[0] == 200
        after = log_lines(current, 20)
    finally:
        code = proxy.stop(signal.SIGTERM)
        origin.stop()
    assert code == 0
    assert [json.loads(line)["path"] for line in rotated.read_text().splitlines()] == ["/?before"]
    assert sorted(json.loads(line)["path"] for line in after) == sorted(
        f"/?after={i}" for i in range(20)
    )
