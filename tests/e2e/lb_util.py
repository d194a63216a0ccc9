"""Helpers for the load-balancing, routing and discovery end-to-end tests.

* :class:`OriginProcess` — an origin in its own process (``origin_proc.py``), which a test
  may SIGKILL and start again on the same port; what it served is read from its log file.
* :class:`Procs` — starts origins and ``ferryman run`` processes for one test and kills
  them all (ferryman with its worker and control children) at teardown.
* :func:`wait_log` — wait for a line in ferryman's log, returning when it appeared.
* :func:`get` — one GET with http.client, returning status, headers and body.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from e2e_util import ProxyProcess, start_ferryman

from origin import free_port
from procs import alive, child_pids

ORIGIN_SCRIPT = Path(__file__).with_name("origin_proc.py")






def wait_for_address(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts connections (fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited early with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.02)


@dataclass
class OriginProcess:
    """An ``origin_proc.py`` process on 127.0.0.1:``port``."""

    port: int
    log: Path
    name: str
    args: list[str]
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> OriginProcess:
        """Start (or restart, on the same port) and wait until it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        err = self.log.with_suffix(".stderr")
        with open(err, "ab") as errf:
            self.proc = subprocess.Popen(
                [sys.executable, str(ORIGIN_SCRIPT), "--port", str(self.port),
                 "--host", self.host, "--log", str(self.log), "--name", self.name, *self.args],
                stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, start_new_session=True,
            )
        try:
            wait_for_address(self.host, self.port, 10.0, self.proc)
        except BaseException:
            self.kill()
            raise RuntimeError(f"origin {self.name} did not start: {err.read_text()}") from None
        return self

    def kill(self) -> None:
        """SIGKILL it (no goodbye: its connections are reset by the kernel)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # what it saw (read from its log, so also after it died) -------------------------------

    def lines(self) -> list[list[str]]:
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        # the last line may be partial while the origin writes it
        return [line.split(" ", 3) for line in text.split("\n")[:-1]]

    def requests(self) -> list[str]:
        """Paths of the requests received, health checks excluded."""
        return [p[3] for p in self.lines() if p[0] == "req" and p[3] != "/healthz"]

    def healthz(self) -> int:
        """How many /healthz requests it received."""
        return sum(1 for p in self.lines() if p[0] == "req" and p[3] == "/healthz")

    def connections(self) -> int:
        """How many TCP connections it accepted (its start-up probe included)."""
        return sum(1 for p in self.lines() if p[0] == "conn")

    def request_ports(self) -> list[int]:
        """The client port of each non-health-check request, in order."""
        return [int(p[1]) for p in self.lines() if p[0] == "req" and p[3] != "/healthz"]


class Procs:
    """The processes of one test; :meth:`close` kills every one of them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.origins: list[OriginProcess] = []
        self.proxies: list[ProxyProcess] = []

    def origin(
        self, name: str = "", *, port: int = 0, host: str = "127.0.0.1", delay_ms: int = 0,
        status: int = 0, start: bool = True,
    ) -> OriginProcess:
        port = port or free_port()
        name = name or str(port)
        args = []
        if delay_ms:
            args += ["--delay-ms", str(delay_ms)]
        if status:
            args += ["--status", str(status)]
        o = OriginProcess(port, self.tmp_path / f"origin-{name}-{port}.log", name, args, host)
        self.origins.append(o)
        return o.start() if start else o

    def ferryman(self, yaml_text: str, port: int) -> ProxyProcess:
        workdir = self.tmp_path / f"ferryman-{len(self.proxies)}"
        proxy = start_ferryman(workdir, yaml_text, port)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> list[str]:
        """Stop everything; returns problems seen (non-zero exits, tracebacks)."""
        problems = []
        for proxy in self.proxies:
            children = child_pids(proxy.pid) if proxy.proc.poll() is None else set()
            was_running = proxy.proc.poll() is None
            code = proxy.stop(signal.SIGINT)
            deadline = time.monotonic() + 5
            for pid in children:
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    problems.append(f"child {pid} of ferryman {proxy.pid} had to be killed")
            log = proxy.log_text()
            if was_running and code != 0:
                problems.append(f"ferryman exited with {code}:\n{log}")
            if "Traceback" in log:
                problems.append(f"traceback in ferryman's log:\n{log}")
        for o in self.origins:
            o.kill()
        return problems


def wait_log(
    proxy: ProxyProcess, pattern: str, timeout: float, *, after: int = 0
) -> tuple[float, re.Match[str]]:
    """Wait until ``pattern`` (a regex) appears in ferryman's log at or after character
    offset ``after``; returns (monotonic time it was first seen, the match)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        m = regex.search(proxy.log_text(), after)
        if m is not None:
            return time.monotonic(), m
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{pattern!r} not in ferryman's log within {timeout}s:\n{proxy.log_text()}"
            )
        time.sleep(0.02)


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``cond`` until true; returns the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def get(
    port: int,
    path: str = "/",
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request; on ``conn`` if given (kept open), else on a new connection (closed).
    Header names come back lowercased (the last value of a repeated header wins)."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        resp = c.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        if own:
            c.close()
