"""Server: listening sockets, worker processes, signals and graceful shutdown.

The main process creates every listening socket once, then forks ``workers`` processes
that inherit them; each worker runs one uvloop event loop serving every service. The
main process only supervises: it restarts a worker that dies and relays signals.

Signals (to the main process):

* ``SIGTERM`` – graceful: stop accepting, let in-flight requests finish, close idle
  keep-alive connections, exit 0 within ``grace_period`` (stragglers are closed then).
* ``SIGINT`` – fast: close everything and exit now.
* ``SIGUSR1`` – reopen log files (after logrotate moved them): relayed to the workers,
  which write what they buffered and open each access log's path afresh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import uvloop

from ferryman.server.listener import Listener
from ferryman.server.memory import tune_malloc
from ferryman.server.process import (
    drop_privileges,
    redirect_output,
    remove_pid_file,
    resolve_account,
    write_pid_file,
)
from ferryman.server.tls import server_ssl_context

log = logging.getLogger("ferryman.server")

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: blocked across a fork until the child has its own handlers (a SIGUSR1 relayed to a
#: child that just started is then handled late, not lost)
_FORK_BLOCKED = _STOP_SIGNALS | {signal.SIGUSR1}


class Service(Protocol):
    """What the server needs from a service (e.g. :class:`HttpProxyService`)."""

    listeners: list[Listener]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Per-worker initialisation on ``loop``."""

    def protocol_factory(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        """Factory of connection protocols for ``listener``."""

    async def drain(self, grace: float) -> bool:
        """Finish in-flight work within ``grace`` seconds."""


class Server:
    """Runs services in worker processes.

    Args:
        workers: number of worker processes (default: the number of CPUs).
        grace_period: seconds a graceful shutdown waits for in-flight requests.
        pid_file: where the main process writes its pid while it runs, or None.
        error_log: the file standard error goes to (reopened on SIGUSR1), or None.
        user, group: what the workers and helper processes switch to once the sockets
            are bound and the logs opened (the main process keeps its rights).
        cpus: pin worker ``i`` to ``cpus[i % len(cpus)]``; empty: no pinning.
    """

    def __init__(
        self,
        workers: int | None = None,
        grace_period: float = 10.0,
        *,
        pid_file: str | None = None,
        error_log: str | None = None,
        user: str | None = None,
        group: str | None = None,
        cpus: tuple[int, ...] = (),
    ) -> None:
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        self.grace_period = grace_period
        self.pid_file = pid_file
        self.error_log = error_log
        self.user = user
        self.group = group
        self.cpus = cpus
        #: detached (``--daemon``): standard output goes to the error log too
        self.daemon = False
        #: the supervising (main) process's pid, set when it starts running
        self.supervisor_pid = os.getpid()
        #: (uid, gid) the children switch to, checked by :meth:`check_account`
        self._account: tuple[int | None, int | None] = (None, None)
        self.services: list[Service] = []
        self._sockets: list[tuple[Service, Listener, socket.socket]] = []
        self._children: dict[int, int] = {}
        self._stop: str | None = None
        self._reopen = False
        self._worker_started: dict[int, float] = {}
        self._worker_failures: dict[int, int] = {}
        self._worker_restarts: list[tuple[float, int]] = []
        #: Functions each run in a process of its own next to the workers (the control
        #: process running health checks and discovery), restarted if they exit.
        self.extra_processes: list[Callable[[], None]] = []
        self._helpers: dict[int, tuple[Callable[[], None], float]] = {}
        # helpers waiting to be restarted: (when, function, consecutive quick failures)
        self._helper_restarts: list[tuple[float, Callable[[], None], int]] = []
        self._helper_failures: dict[Callable[[], None], int] = {}

    def add_service(self, service: Service) -> None:
        """Serve ``service`` on its listeners."""
        self.services.append(service)

    def bind(self) -> None:
        """Create every listening socket (done before forking)."""
        if self._sockets:
            return
        for service in self.services:
            for listener in service.listeners:
                self._sockets.append((service, listener, listener.make_socket()))

    # supervisor -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Catch SIGTERM/SIGINT in this (supervisor) process from now on.

        Call it as early as possible: a signal that arrives before would kill the process
        the default way. :meth:`run_forever` calls it too.
        """
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_reopen)

    def _on_reopen(self, _signum: int, _frame: object) -> None:
        self._reopen = True

    def reopen_error_log(self) -> None:
        """SIGUSR1: point standard error (and, detached, standard output) at a fresh open
        of ``error_log``, after a rotation moved the old file."""
        if self.error_log is not None:
            try:
                redirect_output(self.error_log, stdout_too=self.daemon)
            except OSError as exc:
                log.error("cannot reopen server.error_log %s: %s", self.error_log, exc)

    def check_account(self) -> None:
        """Resolve ``user``/``group`` now, in the main process: raises
        :class:`~ferryman.server.process.ProcessSetupError` when they cannot be used."""
        self._account = resolve_account(self.user, self.group)

    def run_forever(self) -> int:
        """Bind, fork the workers and supervise them until a signal; return the exit code."""
        self.install_signal_handlers()
        self.bind()
        self.check_account()
        self.supervisor_pid = os.getpid()
        if self.pid_file is not None:
            write_pid_file(self.pid_file)
        try:
            return self._run()
        finally:
            if self.pid_file is not None:
                remove_pid_file(self.pid_file)

    def _run(self) -> int:
        for service, listener, sock in self._sockets:
            # check TLS material now, so a bad certificate fails before any fork
            if listener.tls is not None:
                server_ssl_context(listener.tls)
            host, port = sock.getsockname()[:2]
            scheme = "https" if listener.tls else "http"
            log.info("listening on %s://%s:%s", scheme, host, port)
            del service
        for fn in self.extra_processes:
            self._helpers[self._spawn_helper(fn)] = (fn, time.monotonic())
        for index in range(self.workers):
            self._spawn(index)
        code = self._supervise()
        for pid in list(self._helpers):
            _kill_wait(pid, signal.SIGTERM, 2.0)
        self._helpers.clear()
        for _, _, sock in self._sockets:
            sock.close()
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stop is None or signum == signal.SIGINT:
            self._stop = "fast" if signum == signal.SIGINT else "graceful"

    def _spawn(self, index: int) -> None:
        # Signals stay blocked across the fork until the worker's loop has its handlers,
        # so a SIGTERM during a worker's start still drains it gracefully.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
        if pid == 0:
            code = 1
            try:
                if self.cpus:
                    # worker i on the i-th CPU of the list, round robin
                    os.sched_setaffinity(0, {self.cpus[index % len(self.cpus)]})
                code = self._worker_main()
            except BaseException:  # noqa: BLE001 - report and exit the child, never return
                log.exception("worker crashed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._children[pid] = index
        self._worker_started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)

    def _spawn_helper(self, fn: Callable[[], None]) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, lambda _s, _f: self.reopen_error_log())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
            for _, _, sock in self._sockets:
                sock.close()
            code = 0
            try:
                drop_privileges(*self._account)
                fn()
            except BaseException:  # noqa: BLE001 - report and exit the child, never return
                log.exception("helper process failed")
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def _supervise(self) -> int:
        sent: str | None = None
        deadline = 0.0
        while True:
            if self._reopen:
                self._reopen = False
                self.reopen_error_log()
                for pid in self._children:
                    _signal(pid, signal.SIGUSR1)
                for pid in self._helpers:
                    _signal(pid, signal.SIGUSR1)
            if self._stop is not None and sent != self._stop:
                if sent is None:
                    # stop listening here too, so that new connections are refused rather
                    # than left in a backlog nobody accepts from any more
                    for _, _, sock in self._sockets:
                        sock.close()
                sent = self._stop
                sig = signal.SIGTERM if sent == "graceful" else signal.SIGINT
                for pid in self._children:
                    _signal(pid, sig)
                wait = self.grace_period + 2.0 if sent == "graceful" else 2.0
                deadline = time.monotonic() + wait
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid and pid in self._helpers:
                fn, started = self._helpers.pop(pid)
                if self._stop is None:
                    # back off while it keeps dying young: 0.5 s, 1 s, 2 s ... 30 s
                    quick = time.monotonic() - started < 30.0
                    failures = self._helper_failures.get(fn, 0) + 1 if quick else 1
                    self._helper_failures[fn] = failures
                    delay = min(0.5 * 2 ** (failures - 1), 30.0)
                    log.warning(
                        "helper process (pid %d) exited with %s; restarting in %.1fs",
                        pid, os.waitstatus_to_exitcode(status), delay,
                    )
                    self._helper_restarts.append((time.monotonic() + delay, fn, failures))
                continue
            if self._helper_restarts and self._stop is None:
                now = time.monotonic()
                due = [r for r in self._helper_restarts if r[0] <= now]
                if due:
                    self._helper_restarts = [r for r in self._helper_restarts if r[0] > now]
                    for _, fn, _ in due:
                        self._helpers[self._spawn_helper(fn)] = (fn, time.monotonic())
            if pid:
                index = self._children.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                if index is not None and self._stop is None:
                    # a worker that dies young again and again is restarted more slowly:
                    # at once, then 0.1 s, 0.2 s ... 30 s; one that lived a while resets it
                    lived = time.monotonic() - self._worker_started.get(index, 0.0)
                    failures = self._worker_failures.get(index, 0) + 1 if lived < 10.0 else 1
                    self._worker_failures[index] = failures
                    delay = restart_delay(failures)
                    log.warning(
                        "worker %d (pid %d) exited with %s; restarting in %.1fs",
                        index, pid, code, delay,
                    )
                    self._worker_restarts.append((time.monotonic() + delay, index))
                continue
            if self._worker_restarts and self._stop is None:
                now = time.monotonic()
                for when, index in [r for r in self._worker_restarts if r[0] <= now]:
                    self._worker_restarts.remove((when, index))
                    self._spawn(index)
            if self._stop is not None and not self._children:
                return 0
            if self._stop is not None and time.monotonic() > deadline:
                for pid in list(self._children):
                    _signal(pid, signal.SIGKILL)
                return 1
            time.sleep(0.05)

    # worker -----------------------------------------------------------------------------

    def _worker_main(self) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        tune_malloc()
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._serve(loop))
        finally:
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> int:
        stop = asyncio.Event()
        fast = asyncio.Event()

        def on_signal(kind: str) -> None:
            stop.set()
            if kind == "fast":
                fast.set()

        def reopen_logs() -> None:
            self.reopen_error_log()
            for service in self.services:
                reopen = getattr(service, "reopen_logs", None)
                if reopen is not None:
                    reopen()

        loop.add_signal_handler(signal.SIGTERM, on_signal, "graceful")
        loop.add_signal_handler(signal.SIGINT, on_signal, "fast")
        loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
        servers = await self.start_services(loop)
        # the sockets are bound and the access logs open: the rest runs with less rights
        drop_privileges(*self._account)
        await stop.wait()
        for srv in servers:
            srv.close()
        grace = 0.0 if fast.is_set() else self.grace_period
        drain: asyncio.Future[Any] = asyncio.gather(*(svc.drain(grace) for svc in self.services))
        interrupt: asyncio.Future[Any] = loop.create_task(fast.wait())
        await asyncio.wait([drain, interrupt], return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():  # SIGINT during a graceful drain: stop waiting now
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)  # (its CancelledError)
            await asyncio.gather(*(svc.drain(0.0) for svc in self.services))
        interrupt.cancel()
        return 0

    async def start_services(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Server]:
        """Start every service on ``loop`` using the bound sockets (also used in tests)."""
        self.bind()
        servers = []
        started: set[int] = set()
        for service, listener, sock in self._sockets:
            if id(service) not in started:
                service.start(loop)
                started.add(id(service))
            ctx: ssl.SSLContext | None = None
            if listener.tls is not None:
                ctx = server_ssl_context(listener.tls)
            srv = await loop.create_server(
                service.protocol_factory(listener),
                sock=sock,
                ssl=ctx,
                backlog=listener.backlog,
                ssl_handshake_timeout=getattr(service, "handshake_timeout", 10.0) if ctx else None,
            )
            servers.append(srv)
        return servers

    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` of every listener (after :meth:`bind`)."""
        return [sock.getsockname()[:2] for _, _, sock in self._sockets]


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that died young ``failures`` times in a row:
    0 the first time, then 0.1 s doubling up to 30 s."""
    return 0.0 if failures <= 1 else min(0.1 * 2 ** (failures - 2), 30.0)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_wait(pid: int, sig: int, timeout: float) -> None:
    _signal(pid, sig)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
    _signal(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
