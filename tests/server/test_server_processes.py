"""``ferryman run`` as a real process tree: worker processes, restarts, signals, start-up
errors; and ``ferryman check``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from server_util import RawClient, get, request_bytes

from origin import OriginServer, free_port
from procs import alive, child_pids

APP_MODULE = '''
import os
import time

from ferryman.app.config_proxy import ConfigProxy


class PidProxy(ConfigProxy):
    """The config proxy, plus: the worker pid in X-Worker-Pid; /block blocks the worker."""

    def request_filter(self, session, ctx):
        if session.req_header.path == "/block":
            time.sleep(0.5)  # on purpose: keeps this worker's loop busy
        return False

    def response_filter(self, session, response, ctx):
        response.headers.set("X-Worker-Pid", str(os.getpid()))
'''


def config_text(port: int, upstream: str, *, workers: int = 2, grace: str = "10s") -> str:
    return (
        "app: pid_app:PidProxy\n"
        f"server: {{workers: {workers}, grace_period: {grace}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{upstream}"], timeouts: {{read: 10s}}}}}}\n'
    )


def ferryman(*args: str) -> list[str]:
    return [sys.executable, "-m", "ferryman", *args]






def wait_for(predicate, timeout: float = 10.0, step: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@pytest.fixture
def run_ferryman(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """``run_ferryman(upstream, workers=2, grace="10s")``: a ``ferryman run`` process with
    two workers (its app adds X-Worker-Pid); killed at teardown, with its children."""
    procs: list[Running] = []
    (tmp_path / "pid_app.py").write_text(APP_MODULE)

    def start(upstream: str, **kw: object) -> Running:
        port = free_port()
        cfg = tmp_path / f"ferryman-{len(procs)}.yaml"
        cfg.write_text(config_text(port, upstream, **kw))  # type: ignore[arg-type]
        log = tmp_path / f"ferryman-{len(procs)}.log"
        path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ferryman("run", "-c", str(cfg), "--log-level", "info"),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        running = Running(proc, port, log)
        procs.append(running)
        if not wait_for(lambda: accepts(port) or proc.poll() is not None, 15):
            pytest.fail(f"ferryman did not start:\n{running.log_text()}")
        assert proc.poll() is None, running.log_text()
        assert wait_for(lambda: len(child_pids(proc.pid)) == 2, 10), running.log_text()
        return running

    yield start
    for running in procs:
        children = child_pids(running.pid)
        if running.proc.poll() is None:
            running.proc.send_signal(signal.SIGKILL)
            running.proc.wait(5)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def worker_pids_seen(port: int, attempts: int = 6) -> set[int]:
    """Send pairs of requests to /block, staggered, so that while one worker sleeps the
    other must accept the second connection; return the worker pids that answered."""
    seen: set[int] = set()
    lock = threading.Lock()

    def one() -> None:
        resp = get(port, "/block")
        assert resp.status == 200
        with lock:
            seen.add(int(resp.header("x-worker-pid") or 0))

    for _ in range(attempts):
        first = threading.Thread(target=one)
        first.start()
        time.sleep(0.15)
        second = threading.Thread(target=one)
        second.start()
        first.join(10)
        second.join(10)
        if len(seen) >= 2:
            break
    return seen


def test_two_workers_both_serve(origin: OriginServer, run_ferryman) -> None:  # type: ignore[no-untyped-def]
    proxy = run_ferryman(origin.address)
    workers = child_pids(proxy.pid)
    assert len(workers) == 2
    for _ in range(30):
        resp = get(proxy.port)
        assert (resp.status, resp.body) == (200, b"hello world\n")
        assert int(resp.header("x-worker-pid") or 0) in workers
    assert worker_pids_seen(proxy.port) == workers
    assert "Traceback" not in proxy.log_text()


def test_killed_worker_is_restarted(origin: OriginServer, run_ferryman) -> None:  # type: ignore[no-untyped-def]
    proxy = run_ferryman(origin.address)
    before = child_pids(proxy.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: not alive(victim), 5)

    def replaced() -> set[int] | None:
        pids = child_pids(proxy.pid)
        return pids if len(pids) == 2 and victim not in pids else None

    after = wait_for(replaced, 10)
    assert after, proxy.log_text()
    assert after - before != set()  # a new worker pid appeared
    assert before - after == {victim}
    assert "restarting" in proxy.log_text()
    for _ in range(20):
        assert get(proxy.port).status == 200
    assert worker_pids_seen(proxy.port) == after
    assert proxy.proc.poll() is None


def test_sigint_exits_fast_even_with_a_request_in_flight(
    origin: OriginServer, run_ferryman  # type: ignore[no-untyped-def]
) -> None:
    proxy = run_ferryman(origin.address)
    workers = child_pids(proxy.pid)
    result: list[object] = []

    def slow() -> None:
        try:
            result.append(get(proxy.port, "/slow?ms=6000").status)
        except (OSError, EOFError) as exc:
            result.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGINT)
    code = proxy.wait(8)
    elapsed = time.monotonic() - started
    t.join(10)
    assert code == 0, proxy.log_text()
    assert elapsed < 4.0  # not the 10 s grace period, not the 6 s request
    assert result and result[0] != 200  # the in-flight request was cut
    assert not any(alive(pid) for pid in workers)
    assert not accepts(proxy.port)


def test_sigterm_without_traffic_exits_0_quickly(origin: OriginServer, run_ferryman) -> None:  # type: ignore[no-untyped-def]
    proxy = run_ferryman(origin.address)
    workers = child_pids(proxy.pid)
    assert get(proxy.port).status == 200
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    code = proxy.wait(8)
    assert code == 0, proxy.log_text()
    assert time.monotonic() - started < 4.0  # the grace period is 10 s: nothing to wait for
    assert not any(alive(pid) for pid in workers)
    assert "Traceback" not in proxy.log_text()


def test_sigterm_lets_an_in_flight_request_finish(origin: OriginServer, run_ferryman) -> None:  # type: ignore[no-untyped-def]
    proxy = run_ferryman(origin.address)
    result: list[object] = []

    def slow() -> None:
        try:
            resp = get(proxy.port, "/slow?ms=1000")
            result.append((resp.status, resp.body))
        except (OSError, EOFError) as exc:
            result.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    proxy.proc.send_signal(signal.SIGTERM)
    code = proxy.wait(8)
    t.join(10)
    assert result == [(200, b"slow")]
    assert code == 0, proxy.log_text()


def test_run_with_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(
        "server: {workers: 2}\n"
        'listeners: [{bind: "127.0.0.1:1", upstream: app}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:2"], timeouts: {connect: soon}}}\n'
    )
    proc = subprocess.run(
        ferryman("run", "-c", str(cfg)), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"{cfg}:3:" in err
    assert "upstreams.app.timeouts.connect" in err
    assert "soon" in err


def test_run_with_missing_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "missing.yaml"
    proc = subprocess.run(
        ferryman("run", "-c", str(cfg)), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr.decode()


def test_port_in_use_exits_nonzero_with_a_clear_message(
    origin: OriginServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "ferryman.yaml"
        cfg.write_text(
            "server: {workers: 2}\n"
            f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
            f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
        )
        proc = subprocess.run(
            ferryman("run", "-c", str(cfg)),
            capture_output=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode not in (0, None)
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert "cannot listen" in err
    assert "Address already in use" in err


def test_check_bad_yaml_exits_2_with_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server: {workers: 2\nlisteners: [\n")
    proc = subprocess.run(
        ferryman("check", "-c", str(cfg)), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"{cfg}:" in err
    assert "invalid YAML" in err
    assert proc.stdout == b""


def test_check_bad_value_names_the_key_path(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "server: {workers: 0}\n"
        'listeners: [{bind: "127.0.0.1:8080", upstream: app}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:2"]}}\n'
    )
    proc = subprocess.run(
        ferryman("check", "-c", str(cfg)), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"{cfg}:1:" in err
    assert "server.workers" in err


def test_check_good_config_exits_0(tmp_path: Path) -> None:
    cfg = tmp_path / "good.yaml"
    cfg.write_text(config_text(8080, "127.0.0.1:9000").replace("app: pid_app:PidProxy\n", ""))
    proc = subprocess.run(
        ferryman("check", "-c", str(cfg)), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"ok" in proc.stdout


def test_sigterm_closes_idle_keepalive_connections_and_exits_quickly(
    origin: OriginServer, run_ferryman  # type: ignore[no-untyped-def]
) -> None:
    proxy = run_ferryman(origin.address)
    clients = []
    for _ in range(4):
        client = RawClient(proxy.port, timeout=5)
        client.send(request_bytes("/"))
        assert client.read_response().status == 200
        clients.append(client)
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    try:
        for client in clients:
            client.wait_closed()  # closed without another byte
    finally:
        for client in clients:
            client.close()
    code = proxy.wait(8)
    assert code == 0, proxy.log_text()
    assert time.monotonic() - started < 4.0  # idle connections do not hold the 10 s grace


def test_sigint_after_sigterm_exits_fast_with_0(
    origin: OriginServer, run_ferryman  # type: ignore[no-untyped-def]
) -> None:
    proxy = run_ferryman(origin.address)
    t = threading.Thread(target=lambda: _quietly(lambda: get(proxy.port, "/slow?ms=6000")))
    t.start()
    time.sleep(0.3)
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proxy.proc.send_signal(signal.SIGINT)
    code = proxy.wait(8)
    t.join(10)
    assert code == 0, proxy.log_text()


def test_new_connections_during_graceful_shutdown_are_refused_not_hung(
    origin: OriginServer, run_ferryman  # type: ignore[no-untyped-def]
) -> None:
    proxy = run_ferryman(origin.address)
    results: list[object] = []
    t = threading.Thread(
        target=lambda: results.append(_quietly(lambda: get(proxy.port, "/slow?ms=2500").status))
    )
    t.start()
    time.sleep(0.3)
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the workers have closed their listening sockets by now
    started = time.monotonic()
    outcome: object
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=1.5) as sock:
            sock.sendall(request_bytes("/", {"Connection": "close"}))
            outcome = sock.recv(65536)  # served or closed: either way, no hang
    except ConnectionRefusedError:
        outcome = "refused"
    except (TimeoutError, ConnectionResetError) as exc:
        outcome = exc
    elapsed = time.monotonic() - started
    t.join(10)
    proxy.wait(8)
    assert results == [200]  # the in-flight request finished
    assert outcome == "refused" or (isinstance(outcome, bytes) and elapsed < 1.5), (
        outcome,
        elapsed,
    )


def _quietly(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except (OSError, EOFError) as exc:
        return exc


def _tls_config(tmp_path: Path, cert: Path, key: Path) -> Path:
    cfg = tmp_path / "tls.yaml"
    cfg.write_text(
        "server: {workers: 1}\n"
        f'listeners: [{{bind: "127.0.0.1:{free_port()}", upstream: app, '
        f'tls: {{cert: "{cert}", key: "{key}"}}}}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:2"]}}\n'
    )
    return cfg


def test_run_with_unloadable_certificate_fails_with_a_clear_message(tmp_path: Path) -> None:
    cert = tmp_path / "bad-cert.pem"
    cert.write_text("not a certificate\n")
    cfg = _tls_config(tmp_path, cert, cert)
    proc = subprocess.run(
        ferryman("run", "-c", str(cfg)), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert "bad-cert.pem" in err


def test_check_with_unloadable_certificate_exits_2(tmp_path: Path) -> None:
    cert = tmp_path / "bad-cert.pem"
    cert.write_text("not a certificate\n")
    cfg = _tls_config(tmp_path, cert, cert)
    proc = subprocess.run(
        ferryman("check", "-c", str(cfg)), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2
    assert "bad-cert.pem" in proc.stderr.decode()


def test_killing_a_worker_leaves_the_other_workers_clients_untouched(  # type: ignore[no-untyped-def]
    origin: OriginServer, run_ferryman
) -> None:
    import http.client

    proxy = run_ferryman(origin.address)
    conns: dict[int, http.client.HTTPConnection] = {}
    for _ in range(400):  # keep-alive connections until one lands on each worker
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        pid = int(resp.getheader("X-Worker-Pid") or 0)
        if pid in conns:
            conn.close()
        else:
            conns[pid] = conn
        if len(conns) == 2:
            break
    assert len(conns) == 2, "every connection went to one worker"
    victim, survivor = sorted(conns)
    served: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def keep_asking() -> None:  # the survivor's client, busy while the other worker dies
        conn = conns[survivor]
        try:
            while not stop.is_set():
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                assert (resp.status, body) == (200, b"hello world\n")
                assert int(resp.getheader("X-Worker-Pid") or 0) == survivor
                served.append(1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    client = threading.Thread(target=keep_asking)
    client.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(
        lambda: len(child_pids(proxy.pid)) == 2 and victim not in child_pids(proxy.pid), 10
    )
    time.sleep(0.3)
    stop.set()
    client.join(10)
    for conn in conns.values():
        conn.close()
    assert replaced, proxy.log_text()
    assert failures == []
    assert len(served) > 10
    assert "restarting in 0.0s" in proxy.log_text()  # the first death: at once


def test_restart_delay_backs_off_for_a_worker_that_keeps_dying() -> None:
    from ferryman.server.server import restart_delay

    assert [restart_delay(n) for n in range(1, 6)] == [0.0, 0.1, 0.2, 0.4, 0.8]
    assert restart_delay(20) == 30.0
