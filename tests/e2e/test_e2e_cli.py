"""End to end: the ``ferryman`` command line (``check``, signals, graceful shutdown)."""

from __future__ import annotations

import http.client
import signal
import subprocess
import threading
import time
from pathlib import Path

from e2e_util import StartFerryman, config_yaml, ferryman_cmd

from origin import OriginServer, free_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ferryman_cmd(*args), capture_output=True, text=True, timeout=30)


def test_check_accepts_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "ferryman.yaml"
    config.write_text(config_yaml(free_port(), "127.0.0.1:9"))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert str(config) in result.stdout
    assert "ok" in result.stdout


def test_check_rejects_an_unknown_upstream(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "server: {workers: 1, grace_period: 10s}\n"
        'listeners: [{bind: "127.0.0.1:18080", upstream: nope}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:9"], timeouts: {connect: 2s, read: 1s}}}\n'
    )
    result = run_cli("check", "-c", str(config))
    assert result.returncode != 0
    assert str(config) in result.stderr
    assert "listeners[0].upstream" in result.stderr
    assert "nope" in result.stderr
    assert result.stdout == ""


def test_run_rejects_an_unknown_upstream_without_listening(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "bad.yaml"
    config.write_text(config_yaml(port, "127.0.0.1:9").replace("upstream: app", "upstream: zz"))
    result = run_cli("run", "-c", str(config))
    assert result.returncode != 0
    assert "listeners[0].upstream" in result.stderr
    assert "zz" in result.stderr


def test_check_reports_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("check", "-c", str(missing))
    assert result.returncode != 0
    assert str(missing) in result.stderr


def test_sigterm_lets_in_flight_request_finish(
    origin: OriginServer, ferryman: StartFerryman
) -> None:
    proxy = ferryman(origin.address, read="5s")
    outcome: dict[str, object] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.request("GET", "/slow?ms=1500")
            resp = conn.getresponse()
            outcome["status"] = resp.status
            outcome["body"] = resp.read()
            outcome["connection"] = resp.getheader("Connection")
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = repr(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 5
    while not any(p.startswith("/slow") for _, p, _ in origin.requests):
        assert time.monotonic() < deadline, "the request never reached the origin"
        time.sleep(0.02)
    signalled = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    code = proxy.proc.wait(timeout=15)
    elapsed = time.monotonic() - signalled
    thread.join(10)
    assert outcome.get("error") is None, outcome
    assert outcome["status"] == 200
    assert outcome["body"] == b"slow"
    assert str(outcome["connection"]).lower() == "close"
    assert code == 0, proxy.log_text()
    assert elapsed < 10  # within grace_period
    assert "Traceback" not in proxy.log_text()


def test_sigterm_when_idle_exits_promptly(origin: OriginServer, ferryman: StartFerryman) -> None:
    proxy = ferryman(origin.address)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"hello world\n"  # an idle keep-alive connection
    proxy.send_signal(signal.SIGTERM)
    code = proxy.proc.wait(timeout=10)
    assert code == 0, proxy.log_text()
    conn.close()


def test_sigint_exits_with_zero(origin: OriginServer, ferryman: StartFerryman) -> None:
    proxy = ferryman(origin.address)
    assert proxy.stop(signal.SIGINT) == 0, proxy.log_text()
