"""Helpers for the reload (SIGHUP) and zero-downtime upgrade (``--upgrade``) end-to-end tests.

* :func:`start` / :func:`upgrade` — ``ferryman run`` (``--upgrade``) at log level ``info``,
  so that the tests can wait for "config reloaded from" and the handover lines.
* :func:`reload` — SIGHUP, then wait for the main process's verdict in its log.
* :class:`RequestLoop` — a client thread making requests until stopped, counting failures.
* :func:`nginx_origin` — nginx as a fast origin (``return 200 "ok\\n"``) in its own process.
* :func:`server_processes` — every live process whose command line names a config file.

Everything uses real sockets on 127.0.0.1 and real processes.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from e2e_util import ProxyProcess, ferryman_cmd, wait_for_port

from origin import free_port
from procs import alive

RELOADED = "config reloaded from "
RELOAD_FAILED = "reload failed; the running config stays:"
HANDED_OVER = "upgrade: the workers accept; telling the old server"
NGINX = "/usr/sbin/nginx"


def spawn(config: Path, log: Path, port: int, *args: str) -> ProxyProcess:
    """Start ``ferryman run -c config ARGS`` (log level info, output to ``log``); no wait."""
    log_file = open(log, "ab")  # noqa: SIM115 - closed by ProxyProcess.stop
    proc = subprocess.Popen(
        ferryman_cmd("run", "-c", str(config), "--log-level", "info", *args),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ProxyProcess(proc, port, config, log, log_file)


def start(workdir: Path, yaml_text: str, port: int) -> ProxyProcess:
    """Write ``workdir``/ferryman.yaml and run it; returns once ``port`` accepts."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "ferryman.yaml"
    config.write_text(yaml_text)
    proxy = spawn(config, workdir / "ferryman.log", port)
    try:
        wait_for_port(port, 10.0, proxy.proc)
    except BaseException:
        proxy.stop(signal.SIGKILL)
        raise RuntimeError(f"ferryman did not start:\n{proxy.log_text()}") from None
    return proxy


def upgrade(old: ProxyProcess, name: str, timeout: float = 20.0) -> ProxyProcess:
    """``ferryman run -c <old's config> --upgrade`` (write the new config first); returns
    once the new server told the old one to drain."""
    new = spawn(old.config, old.config.with_name(f"{name}.log"), old.port, "--upgrade")
    deadline = time.monotonic() + timeout
    while HANDED_OVER not in new.log_text():
        if new.proc.poll() is not None or time.monotonic() > deadline:
            code = new.stop(signal.SIGKILL)
            raise AssertionError(
                f"the upgrade did not take over (exit {code}):\n{new.log_text()}\n"
                f"--- old server:\n{old.log_text()}"
            )
        time.sleep(0.02)
    return new


def reload(proxy: ProxyProcess, timeout: float = 10.0) -> str:
    """SIGHUP the main process; wait for "config reloaded from ..." or the whole "reload
    failed" message in its log, and return what the log got meanwhile."""
    offset = len(proxy.log_text())
    proxy.send_signal(signal.SIGHUP)
    done = re.compile(
        re.escape(RELOADED) + r".*\n|" + re.escape(RELOAD_FAILED) + r"\n.*\n"
        r"|reload failed while applying.*\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        text = proxy.log_text()[offset:]
        if done.search(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"no reload verdict within {timeout}s:\n{proxy.log_text()}")
        time.sleep(0.02)


def wait_exit(proxy: ProxyProcess, timeout: float) -> int:
    """Wait for the main process to exit by itself; its exit code."""
    try:
        return proxy.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"ferryman {proxy.pid} still runs after {timeout}s:\n{proxy.log_text()}"
        ) from None


def wait_workers(proxy: ProxyProcess, count: int, timeout: float = 10.0) -> list[int]:
    """Wait until the main process has exactly ``count`` live children; their pids."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in proxy.worker_pids() if alive(pid)]
        if len(pids) == count:
            return pids
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(pids)} worker(s) instead of {count}:\n{proxy.log_text()}"
            )
        time.sleep(0.05)


def request(
    port: int,
    path: str = "/",
    *,
    conn: http.client.HTTPConnection | None = None,
    close: bool = False,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One GET; on ``conn`` if given (kept open), else on a new connection (closed after).
    Header names lowercased."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Connection": "close"} if close else {})
        resp = c.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        if own:
            c.close()


def wait_for(port: int, header: str, value: str, path: str = "/", timeout: float = 5.0) -> None:
    """Wait until a GET of ``path`` on a new connection answers 200 with ``header: value``
    (after a reload, the workers take the new config a moment after the main process)."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, _ = request(port, path)
        if status == 200 and headers.get(header.lower()) == value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: {status} {headers} (expected {header}: {value})")
        time.sleep(0.02)


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def wait_refused(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not refused(port):
        assert time.monotonic() < deadline, f"127.0.0.1:{port} still accepts connections"
        time.sleep(0.02)


class RequestLoop(threading.Thread):
    """GETs one after the other until :meth:`finish`: each on a new connection with
    ``Connection: close``, or (``keep_alive``) on one connection http.client reopens
    when the server asks to close. Any exception or non-200 answer is a failure."""

    def __init__(self, port: int, *, keep_alive: bool = False, path: str = "/") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.keep_alive = keep_alive
        self.path = path
        self.ok = 0
        self.failures: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        kind = "keep-alive" if self.keep_alive else "new connection"
        last = time.monotonic()
        while not self._done.is_set():
            if self.keep_alive and conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            gap = time.monotonic() - last
            try:
                status, _, body = request(self.port, self.path, conn=conn,
                                          close=not self.keep_alive)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                self.failures.append(
                    f"{time.strftime('%X')} {kind}, {gap:.3f}s after the previous answer: "
                    f"{exc!r}"
                )
                last = time.monotonic()
                if conn is not None:
                    conn.close()
                    conn = None
                continue
            last = time.monotonic()
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{time.strftime('%X')} status {status}: {body[:200]!r}")
        if conn is not None:
            conn.close()

    def finish(self) -> None:
        self._done.set()
        self.join(15)
        assert not self.is_alive(), "the request loop did not stop"


@contextmanager
def nginx_origin(workdir: Path) -> Iterator[int]:
    """nginx answering ``200 ok\\n`` to everything on a free port (one process, in the
    foreground); yields the port, stops it after."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        "daemon off;\nmaster_process off;\nworker_processes 1;\n"
        f"pid {workdir}/nginx.pid;\nerror_log {workdir}/nginx-error.log;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  access_log off;\n  keepalive_requests 1000000;\n"
        f'  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }}\n}}\n'
    )
    with open(workdir / "nginx.out", "wb") as out:
        proc = subprocess.Popen(
            [NGINX, "-e", "stderr", "-p", f"{workdir}/", "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )
    try:
        wait_for_port(port, 10.0, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def server_processes(needle: str) -> dict[int, int]:
    """``pid -> parent pid`` of every live process whose command line contains ``needle``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if needle.encode() in cmdline and fields[0] != "Z":
            out[int(entry)] = int(fields[1])
    return out


def tls_client(ca_pem: bytes) -> ssl.SSLContext:
    """A client context trusting only the test CA, speaking HTTP/1.1."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def peer_der(conn: http.client.HTTPSConnection) -> bytes:
    """The DER of the certificate the server presented on ``conn``."""
    sock = conn.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der
