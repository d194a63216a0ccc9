"""Helpers for the end-to-end tests: the ferryman CLI as a subprocess, and a raw HTTP client.

Everything here uses real sockets on 127.0.0.1 and the real ``ferryman`` command line
(``python -m ferryman``), never mocks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from origin import OriginServer, free_port
from rawhttp import RawSocket, TcpServer

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def config_yaml(
    port: int,
    upstream: str,
    *,
    read: str = "1s",
    connect: str = "2s",
    grace: str = "10s",
    server_extra: str = "",
) -> str:
    """The YAML of a one-listener, one-upstream config."""
    return (
        f"server: {{workers: 1, grace_period: {grace}{server_extra}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{upstream}"], '
        f"timeouts: {{connect: {connect}, read: {read}}}}}}}\n"
    )


def ferryman_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ferryman", *args]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ferryman exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


@dataclass
class ProxyProcess:
    """A running ``ferryman run`` process."""

    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    log: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (children of the main process)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                pids.append(int(entry.name))
        return pids

    def open_fds(self, pid: int) -> int:
        """How many file descriptors process ``pid`` has open."""
        return len(os.listdir(f"/proc/{pid}/fd"))

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGINT, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig``, wait up to ``timeout`` s, kill after that; return the exit code."""
        if self.proc.poll() is None:
            self.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        return self.proc.returncode


def start_ferryman(workdir: Path, yaml_text: str, port: int) -> ProxyProcess:
    """Write the config to ``workdir`` and start ``ferryman run -c`` on it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "ferryman.yaml"
    config.write_text(yaml_text)
    log = workdir / "ferryman.log"
    log_file = open(log, "wb")  # noqa: SIM115 - closed by ProxyProcess.stop
    proc = subprocess.Popen(
        ferryman_cmd("run", "-c", str(config), "--log-level", "warning"),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C on the test run does not hit it twice
    )
    pp = ProxyProcess(proc, port, config, log, log_file)
    try:
        wait_for_port(port, START_TIMEOUT, proc)
    except BaseException:
        pp.stop(signal.SIGKILL)
        raise RuntimeError(f"ferryman did not start:\n{pp.log_text()}") from None
    return pp


StartFerryman = Callable[..., ProxyProcess]
"""The ``ferryman`` fixture: ``start(upstream_address, **config_yaml_kwargs)``."""


@contextmanager
def ferryman_in_front_of(upstream: str, workdir: Path, **config: str) -> Iterator[ProxyProcess]:
    """A ``ferryman run`` process on a free port proxying to ``upstream``; stopped after."""
    port = free_port()
    proxy = start_ferryman(workdir, config_yaml(port, upstream, **config), port)
    try:
        yield proxy
    finally:
        proxy.stop()


@dataclass
class Pair:
    """A private origin and the ferryman process in front of it."""

    origin: OriginServer
    proxy: ProxyProcess


# --- a raw HTTP/1.1 client ------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    head: bytes

    def header(self, name: str) -> bytes | None:
        lname = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def header_all(self, name: str) -> list[bytes]:
        lname = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == lname]


class RawConn(RawSocket):
    """A blocking socket with a read buffer; reads and frames responses itself."""

    def read_head(self) -> tuple[bytes, int, bytes, bytes, list[tuple[bytes, bytes]]]:
        head = self.read_until(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, status, *reason = lines[0].split(b" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        return head, int(status), version, reason[0] if reason else b"", headers

    def read_response(self, method: bytes = b"GET", skip_interim: bool = True) -> RawResponse:
        while True:
            head, status, version, reason, headers = self.read_head()
            if not (skip_interim and 100 <= status < 200 and status != 101):
                break
        resp = RawResponse(status, reason, version, headers, b"", [], head)
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None and te.lower().endswith(b"chunked"):
            body = []
            while True:
                size_line = self.read_until(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    break
                body.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n"
            while True:
                line = self.read_until(b"\r\n")
                if line == b"\r\n":
                    break
                name, _, value = line[:-2].partition(b":")
                resp.trailers.append((name, value.strip()))
            resp.body = b"".join(body)
        elif cl is not None:
            resp.body = self.read_exact(int(cl))
        else:
            resp.body = self.read_to_eof()
        return resp


def raw_exchange(
    port: int,
    data: bytes,
    method: bytes = b"GET",
    *,
    wait_close: bool = True,
    timeout: float = 5.0,
) -> tuple[RawResponse, bool]:
    """Send ``data`` on a new connection and read one response; with ``wait_close``, also
    report whether the proxy then closed the connection (waiting at most ``timeout``)."""
    with RawConn(port, timeout=timeout) as conn:
        conn.send(data)
        resp = conn.read_response(method)
        if not wait_close:
            return resp, False
        try:
            closed = conn.at_eof()
        except TimeoutError:
            closed = False
        return resp, closed


class ScriptedOrigin(TcpServer):
    """A raw TCP origin on 127.0.0.1 whose behaviour is a function of the accepted socket.

    For misbehaving upstreams the stdlib origin cannot play: closing without a response,
    truncating a body, switching protocols.
    """

    swallow = (OSError,)

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        super().__init__(handler, conn_timeout=10)
        self.start()

    @property
    def connections(self) -> int:
        return self.accepted


def read_request_head(conn: socket.socket) -> bytes:
    """Read from ``conn`` up to the end of one request head."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            break
        data += piece
    return data
