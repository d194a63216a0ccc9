"""Running it as a service (issue 7, item 4): ``--daemon``, ``server.pid_file``,
``server.error_log``, ``server.user``/``group`` and the exit codes a service manager reads.
Each test starts a real ``ferryman run`` and a real origin on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e_util import ProxyProcess, ferryman_cmd, start_ferryman, wait_for_port

from origin import OriginServer, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        try:  # (a zombie until its parent reaps it: a daemon's parent is init)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.05)


def _two_workers(tmp_path: Path, origin: OriginServer, port: int, server: str) -> ProxyProcess:
    """``ferryman run`` with 2 workers and the ``server`` settings, once both are up."""
    yaml_text = (
        f"server: {{workers: 2, {server}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    proxy = start_ferryman(tmp_path, yaml_text, port)
    try:
        assert _get(port) == 200
        deadline = time.monotonic() + 10
        while len(proxy.worker_pids()) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
    except BaseException:
        proxy.stop(signal.SIGKILL)
        raise
    return proxy


def _get(port: int, path: str = "/") -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_daemon_detaches_writes_its_pid_and_logs_to_the_error_log(tmp_path: Path) -> None:
    origin = OriginServer().start()
    port = free_port()
    config = tmp_path / "ferryman.yaml"
    config.write_text(
        "server: {workers: 2, pid_file: run/ferryman.pid, error_log: logs/error.log}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "logs").mkdir()
    pid_file, error_log = tmp_path / "run" / "ferryman.pid", tmp_path / "logs" / "error.log"
    try:
        out = subprocess.run(
            ferryman_cmd("run", "-c", str(config), "--daemon"),
            capture_output=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"" and out.stderr == b""  # (the daemon logs to its file)
        pid = int(pid_file.read_text())  # written before the command returned
        assert _alive(pid)
        wait_for_port(port, 15)
        assert _get(port) == 200
        # detached: in a session of its own (whose leader exited: no terminal can be
        # acquired again), not the test's
        assert os.getsid(pid) not in (os.getsid(0), pid)
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)
    finally:
        origin.stop()
    assert not pid_file.exists()  # removed at exit
    assert "listening on http://127.0.0.1" in error_log.read_text()


def test_daemon_without_an_error_log_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ferryman.yaml"
    config.write_text(
        f'listeners: [{{bind: "127.0.0.1:{free_port()}", upstream: app}}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:9"]}}\n'
    )
    out = subprocess.run(
        ferryman_cmd("run", "-c", str(config), "--daemon"), capture_output=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.decode() == (
        f"ferryman: --daemon needs server.error_log in {config}: the file log lines go to "
        "once detached from the terminal\n"
    )


def test_pid_file_and_error_log_in_the_foreground(tmp_path: Path) -> None:
    origin = OriginServer().start()
    port = free_port()
    yaml_text = (
        "server: {workers: 1, pid_file: ferryman.pid, error_log: error.log}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{origin.address}"]}}}}\n'
    )
    proxy = start_ferryman(tmp_path, yaml_text, port)
    log_file, rotated = tmp_path / "error.log", tmp_path / "error.log.1"
    try:
        assert int((tmp_path / "ferryman.pid").read_text()) == proxy.pid
        assert _get(port) == 200
        pids = [proxy.pid, *proxy.worker_pids()]
        # standard error of every process is the error log (standard output is not)
        for pid in pids:
            assert os.readlink(f"/proc/{pid}/fd/2") == str(log_file)
        assert os.readlink(f"/proc/{proxy.pid}/fd/1") != str(log_file)
        log_file.rename(rotated)
        proxy.send_signal(signal.SIGUSR1)  # reopen, as after logrotate
        deadline = time.monotonic() + 10
        while any(os.readlink(f"/proc/{pid}/fd/2") != str(log_file) for pid in pids):
            assert time.monotonic() < deadline, "server.error_log was not reopened"
            time.sleep(0.05)
        assert log_file.exists()
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
        origin.stop()
    assert not (tmp_path / "ferryman.pid").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_workers_run_as_server_user_and_group(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    origin = OriginServer().start()
    port = free_port()
    proxy = _two_workers(tmp_path, origin, port, "user: nobody, group: nogroup")
    try:
        for pid in proxy.worker_pids():
            status = Path(f"/proc/{pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4, uid_line
        main = Path(f"/proc/{proxy.pid}/status").read_text()
        assert "Uid:\t0\t0\t0\t0" in main  # the main process keeps its rights
        for _ in range(10):
            assert _get(port) == 200
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
        origin.stop()


def test_an_occupied_port_exits_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "ferryman.yaml"
        config.write_text(
            f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
            'upstreams: {app: {servers: ["127.0.0.1:9"]}}\n'
        )
        out = subprocess.run(
            ferryman_cmd("run", "-c", str(config)), capture_output=True, timeout=30
        )
    assert out.returncode == 1
    assert out.stderr.decode().startswith("ferryman: cannot listen: ")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_cpu_affinity_pins_each_worker_to_its_cpu(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    origin = OriginServer().start()
    port = free_port()
    proxy = _two_workers(tmp_path, origin, port, f"cpu_affinity: [{cpus[0]}, {cpus[1]}]")
    try:
        pinned = sorted(tuple(sorted(os.sched_getaffinity(p))) for p in proxy.worker_pids())
        assert pinned == [(cpus[0],), (cpus[1],)]
        assert os.sched_getaffinity(proxy.pid) == set(os.sched_getaffinity(0))
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
        origin.stop()


def test_health_checks_keep_running_under_daemon(tmp_path: Path) -> None:
    """The control process (health checks) watches its supervisor: under --daemon that is
    the detached process, not the one that ran the command."""
    origin = OriginServer().start()
    port = free_port()
    config = tmp_path / "ferryman.yaml"
    config.write_text(
        "server: {workers: 1, pid_file: ferryman.pid, error_log: error.log}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{origin.address}"],\n'
        "  health_check: {type: http, interval: 0.2s, timeout: 0.2s}}}\n"
    )
    try:
        out = subprocess.run(
            ferryman_cmd("run", "-c", str(config), "--daemon"), capture_output=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        pid = int((tmp_path / "ferryman.pid").read_text())
        wait_for_port(port, 15)
        before = len(origin.requests)
        time.sleep(2.0)  # ten check intervals
        checks = len(origin.requests) - before
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)
    finally:
        origin.stop()
    log = (tmp_path / "error.log").read_text()
    assert "helper process" not in log, log  # never exited and restarted
    assert checks >= 5, log  # the checks kept coming
