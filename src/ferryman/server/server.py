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
* ``SIGHUP`` – reload the config (see :meth:`Server.reload`): an invalid one is logged and
  changes nothing; a valid one is applied by the main process and sent to every worker,
  which serves its next requests with it while requests in flight finish on the old one.

Each worker has a control channel (a socketpair) to the main process: the worker says
``ready`` once it accepts, and receives ``reload`` messages with the listening sockets
attached. The main process also hands its sockets to a successor
(:mod:`ferryman.server.upgrade`) for a zero-downtime upgrade.
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

from ferryman.metrics.board import MetricsBoard, WorkerPublisher, worker_slot
from ferryman.metrics.recorder import WorkerMetrics
from ferryman.server.control import (
    FAILED,
    READY,
    RELOADED,
    ChannelClosed,
    MessageReader,
    send_message,
    worker_channel,
)
from ferryman.server.listener import Listener, make_listening_socket
from ferryman.server.memory import tune_malloc
from ferryman.server.process import (
    ProcessSetupError,
    drop_privileges,
    redirect_output,
    remove_pid_file,
    resolve_account,
    write_pid_file,
)
from ferryman.server.tls import (
    read_tls_files,
    server_ssl_context,
    server_ssl_context_from,
    tls_files,
)
from ferryman.server.upgrade import Handover, UpgradeListener

log = logging.getLogger("ferryman.server")

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: blocked across a fork until the child has its own handlers (a SIGUSR1 relayed to a
#: child that just started is then handled late, not lost)
_FORK_BLOCKED = _STOP_SIGNALS | {signal.SIGUSR1, signal.SIGHUP}
#: Seconds an upgrading server waits for its workers to accept before it gives up (and
#: the old server goes on).
UPGRADE_READY_TIMEOUT = 30.0
#: Seconds the main process waits for a worker to read a control message.
CONTROL_SEND_TIMEOUT = 5.0


class ReloadError(Exception):
    """A config cannot be reloaded; the message names the file, key and reason."""


class ConfigSource(Protocol):
    """Where a server's config comes from, for reloads (see ``ferryman.app.build``)."""

    def load(self) -> Any:
        """Read and validate the config; a picklable object, or :class:`ReloadError`."""

    def addresses(self, config: Any) -> list[tuple[str, tuple[str, int]]]:
        """``(kind, address)`` of every socket ``config`` listens on (``"listener"``, or
        the kind of an extra socket such as ``"metrics"``)."""

    def apply(self, server: Server, config: Any) -> None:
        """Make ``server`` use ``config``: reconfigure its services (in place: in a worker
        they are running), worker count, grace period and helper processes."""

    def wait_ready(self, config: Any) -> None:
        """In the main process, once the helpers run ``config``: wait (bounded) for what
        workers will need at once, such as the first members of new discovered groups."""


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
        #: where SIGHUP re-reads the config from (None: reloads are refused)
        self.config_source: ConfigSource | None = None
        #: called in the main process after each reload attempt with its outcome
        self.on_reload: Callable[[bool], None] | None = None
        self._reload_requested = False
        #: sockets other than the services' listeners: ``kind -> (address, socket)``,
        #: handed to successors too (the metrics endpoint's)
        self.extra_sockets: dict[str, tuple[tuple[str, int], socket.socket]] = {}
        #: the unix socket successors ask for the listening sockets (``upgrade_sock``)
        self.upgrade_sock: str | None = None
        self._upgrade: UpgradeListener | None = None
        #: set by ``--upgrade``: the sockets received from the running server
        self.handover: Handover | None = None
        self._handover_deadline = 0.0
        # main process: index -> (channel to the worker, its reader); in a worker: its end
        self._channels: dict[int, tuple[socket.socket, MessageReader]] = {}
        self._ready: set[int] = set()
        self._channel: socket.socket | None = None
        self._servers: list[asyncio.Server] = []
        self._worker_index = -1
        self._failed = False
        #: in a worker: what copies its metrics to its slot, or None
        self._publisher: WorkerPublisher | None = None
        #: pids of workers draining for good after a reload lowered ``workers``
        self._retiring: set[int] = set()
        #: sockets to bind outside the services: ``kind -> address`` (see :meth:`bind_extra`)
        self.extra_addresses: dict[str, tuple[str, int]] = {}
        #: shared memory the workers publish their metrics to (``server.metrics``), or None
        self.metrics_board: MetricsBoard | None = None
        #: ``--daemon --upgrade``: the pipe to the launcher, told once the handover is done
        self.ready_fd: int | None = None
        #: in a worker applying a reload: access log path -> descriptor the main process
        #: opened for it
        self.reload_log_fds: dict[str, int] = {}

    def add_service(self, service: Service) -> None:
        """Serve ``service`` on its listeners."""
        self.services.append(service)

    def bind(self) -> None:
        """Create every listening socket (done before forking); with :attr:`handover`,
        those received from the running server are used instead of binding anew."""
        if self._sockets:
            return
        try:
            for service in self.services:
                for listener in service.listeners:
                    sock = None
                    if self.handover is not None:
                        sock = self.handover.take("listener", listener.address)
                    if sock is None:
                        sock = listener.make_socket()
                    self._sockets.append((service, listener, sock))
            for kind, address in self.extra_addresses.items():
                if kind not in self.extra_sockets:
                    self.bind_extra(kind, address)
        except OSError:
            for _, _, sock in self._all_sockets():
                sock.close()
            self._sockets = []
            self.extra_sockets = {}
            raise

    def bind_extra(self, kind: str, address: tuple[str, int]) -> socket.socket:
        """Bind (or take over from the running server) a socket of ``kind`` outside the
        services, such as the metrics endpoint's."""
        sock = self.handover.take(kind, address) if self.handover is not None else None
        if sock is None:
            sock = make_listening_socket(address)
        self.extra_sockets[kind] = (address, sock)
        return sock

    def _all_sockets(self) -> list[tuple[str, tuple[str, int], socket.socket]]:
        """Every listening socket as ``(kind, configured address, socket)``."""
        out = [("listener", listener.address, sock) for _, listener, sock in self._sockets]
        out += [(kind, address, sock) for kind, (address, sock) in self.extra_sockets.items()]
        return out

    # supervisor -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Catch SIGTERM/SIGINT in this (supervisor) process from now on.

        Call it as early as possible: a signal that arrives before would kill the process
        the default way. :meth:`run_forever` calls it too.
        """
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_reopen)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_reopen(self, _signum: int, _frame: object) -> None:
        self._reopen = True

    def _on_reload_signal(self, _signum: int, _frame: object) -> None:
        self._reload_requested = True

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
        if self.handover is not None:
            self.handover.close_unused()
            self._handover_deadline = time.monotonic() + UPGRADE_READY_TIMEOUT
        else:
            self.open_upgrade_socket(replace=False)
            if self.pid_file is not None:
                write_pid_file(self.pid_file)
        try:
            return self._run()
        finally:
            if self.pid_file is not None:
                remove_pid_file(self.pid_file)
            if self._upgrade is not None:
                self._upgrade.close()

    def close_upgrade_socket(self) -> None:
        """Stop listening on :attr:`upgrade_sock` (removing the path if still ours)."""
        if self._upgrade is not None:
            self._upgrade.close()
            self._upgrade = None

    def open_upgrade_socket(self, replace: bool) -> None:
        """Listen on :attr:`upgrade_sock` for a successor (``replace``: after taking over
        from the server that listened there)."""
        if self.upgrade_sock is None or self._upgrade is not None:
            return
        upgrade = UpgradeListener(self.upgrade_sock)
        upgrade.open(replace=replace)
        self._upgrade = upgrade

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
            # (a helper serving a socket of its own, the metrics endpoint, waits until the
            # old server's has stopped: two processes would answer alternately)
            if self.handover is None or not _exclusive(fn):
                self._helpers[self._spawn_helper(fn)] = (fn, time.monotonic())
        for index in range(self.workers):
            self._spawn(index)
        code = self._supervise()
        for pid in list(self._helpers):
            _kill_wait(pid, signal.SIGTERM, 2.0)
        self._helpers.clear()
        for _, _, sock in self._all_sockets():
            sock.close()
        for channel, _ in self._channels.values():
            channel.close()
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stop is None or signum == signal.SIGINT:
            self._stop = "fast" if signum == signal.SIGINT else "graceful"

    def _spawn(self, index: int) -> None:
        ours, theirs = worker_channel()
        # Signals stay blocked across the fork until the worker's loop has its handlers,
        # so a SIGTERM during a worker's start still drains it gracefully.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
        if pid == 0:
            code = 1
            try:
                ours.close()
                for channel, _ in self._channels.values():
                    channel.close()  # (the other workers' channels)
                self._channels = {}
                if self._upgrade is not None:
                    self._upgrade.detach()
                if self.handover is not None:
                    self.handover.detach()
                self._close_ready_fd()
                for _, sock in self.extra_sockets.values():
                    sock.close()  # (served by helper processes)
                self._channel = theirs
                self._worker_index = index
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
        theirs.close()
        ours.setblocking(False)
        old = self._channels.pop(index, None)
        if old is not None:
            old[0].close()
        self._channels[index] = (ours, MessageReader())
        self._ready.discard(index)
        self._children[pid] = index
        self._worker_started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)

    def _close_ready_fd(self) -> None:
        """In a forked child: the launcher's pipe is the main process's to write."""
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

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
            for channel, _ in self._channels.values():
                channel.close()
            if self._upgrade is not None:
                self._upgrade.detach()
            if self.handover is not None:
                self.handover.detach()
            self._close_ready_fd()
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
            self._read_channels()
            if self.handover is not None and self._stop is None:
                if self._ready >= set(range(self.workers)):
                    self._finish_handover()
                elif time.monotonic() > self._handover_deadline:
                    log.error(
                        "upgrade: the workers did not start within %.0fs; giving up (the "
                        "running server goes on)", UPGRADE_READY_TIMEOUT,
                    )
                    self.handover.abort()
                    self.handover = None
                    self._release_launcher(b"")  # (it exits 1 now, not after the drain)
                    self._stop = "graceful"  # (workers that accepted finish their requests)
                    self._failed = True
            if self._upgrade is not None and self._stop is None:
                if self._upgrade.poll(self._all_sockets(), self._stop_exclusive_helpers):
                    self._stop = "graceful"  # a successor took over: drain and go
            if self._reload_requested and self.handover is None:
                # (one that arrives during an upgrade's handover waits for its end)
                self._reload_requested = False
                if self._stop is None:
                    self.reload()
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
                    if self._upgrade is not None:
                        self._upgrade.close()  # (the next upgrade is the successor's)
                        self._upgrade = None
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
                if pid not in self._retiring:
                    self._read_channels()  # (its last word may be that it failed a reload)
                index = self._children.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                if pid in self._retiring:
                    # retired by a reload that lowered the worker count
                    self._retiring.discard(pid)
                    log.info("worker %d (pid %d) retired, exited with %s", index, pid, code)
                    if (
                        index is not None
                        and index < self.workers
                        and self._stop is None
                        and index not in self._children.values()
                    ):
                        self._spawn(index)  # a later reload raised the count again
                elif index is not None and self._stop is None:
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
                return 1 if self._failed else 0
            if self._stop is not None and time.monotonic() > deadline:
                for pid in list(self._children):
                    _signal(pid, signal.SIGKILL)
                return 1
            time.sleep(0.05)

    def _read_channels(self) -> None:
        """Take the workers' words (single bytes, never unpickled: a worker may run as an
        unprivileged user) without blocking."""
        for index, (channel, _) in list(self._channels.items()):
            try:
                data = channel.recv(256)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                # (the worker exited: reaped, and restarted if it should be, by the loop)
                channel.close()
                del self._channels[index]
                self._ready.discard(index)
                continue
            if READY in data:
                self._ready.add(index)
            if FAILED in data:
                log.error(
                    "worker %d could not apply the new config: it drains, and a new worker "
                    "replaces it now", index,
                )
                for pid, i in list(self._children.items()):
                    if i == index and pid not in self._retiring:
                        # (it stopped counting in its metrics slot before saying so)
                        self._retire(pid, index)
                        if self._stop is None:
                            self._spawn(index)

    def _finish_handover(self) -> None:
        """Every worker accepts: tell the old server to go, and take its place."""
        assert self.handover is not None
        log.info("upgrade: the workers accept; telling the old server (pid %d) to drain",
                 self.handover.old_pid)
        self.handover.confirm()
        self.handover = None
        # past this point the old server is going: nothing here may stop this one
        try:
            self.open_upgrade_socket(replace=True)  # (first: a script may upgrade again)
        except ProcessSetupError as exc:
            log.error("%s: the next upgrade will not find this server", exc)
        for fn in self.extra_processes:  # (held back until the old server's stopped)
            if _exclusive(fn):
                self._helpers[self._spawn_helper(fn)] = (fn, time.monotonic())
        if self.pid_file is not None:
            try:
                write_pid_file(self.pid_file)
            except OSError as exc:
                log.error("cannot write server.pid_file %s: %s", self.pid_file, exc)
        self._release_launcher(b"1")

    def _stop_exclusive_helpers(self) -> None:
        """A successor takes over: the helpers serving sockets of their own (the metrics
        endpoint) stop before it is told to start its own."""
        for pid, (fn, _) in list(self._helpers.items()):
            if _exclusive(fn):
                _kill_wait(pid, signal.SIGTERM, 2.0)
                del self._helpers[pid]
        self._helper_restarts = [r for r in self._helper_restarts if not _exclusive(r[1])]

    def _release_launcher(self, word: bytes) -> None:
        """``--daemon --upgrade``: let the launcher exit (0 with a byte, 1 without)."""
        fd, self.ready_fd = self.ready_fd, None
        if fd is None:
            return
        try:
            if word:
                os.write(fd, word)
        except OSError:
            pass  # (the launcher is gone: Ctrl-C, a closed terminal)
        finally:
            os.close(fd)

    def reload(self) -> bool:
        """SIGHUP: re-read the config and apply it; returns whether it was applied.

        An invalid config (or one whose new listeners cannot be bound) is logged with the
        file, key path and reason, and changes nothing. A valid one is applied here, and
        sent to every worker with the listening sockets: new listeners are opened and
        removed ones closed, the helper processes (health checks, metrics) restart with
        it, and the number of workers follows ``workers``.
        """
        source = self.config_source
        if source is None:
            log.warning("SIGHUP: this server was not started from a config file; ignored")
            return False
        try:
            config = source.load()
        except ReloadError as exc:
            log.error("reload failed; the running config stays:\n%s", exc)
            self._reloaded(False)
            return False
        current = {
            (kind, _address_key(address)): sock for kind, address, sock in self._all_sockets()
        }
        opened: dict[tuple[str, tuple[str, int]], socket.socket] = {}
        try:
            for kind, address in source.addresses(config):
                key = (kind, _address_key(address))
                if key not in current and key not in opened:
                    opened[key] = make_listening_socket(address)
        except OSError as exc:
            for sock in opened.values():
                sock.close()
            host, port = address
            log.error(
                "reload failed; the running config stays:\n%s: cannot listen on %s:%d: %s",
                getattr(config, "source", "config"), host, port, exc.strerror or exc,
            )
            self._reloaded(False)
            return False
        try:
            source.apply(self, config)
        except Exception:  # noqa: BLE001 - e.g. a user's app failing when built again
            log.exception("reload failed while applying the config; the running one stays")
            for sock in opened.values():
                sock.close()
            self._reloaded(False)
            return False
        pool = {**current, **opened}
        sockets = []
        for service in self.services:
            for listener in service.listeners:
                sock = pool.pop(("listener", _address_key(listener.address)))
                sockets.append((service, listener, sock))
        self._sockets = sockets
        extra = {}
        for kind, address in source.addresses(config):
            if kind != "listener":
                extra[kind] = (address, pool.pop((kind, _address_key(address))))
        self.extra_sockets = extra
        for sock in pool.values():
            sock.close()  # (listeners removed: their addresses stop listening with the workers)
        for pid in list(self._helpers):
            _kill_wait(pid, signal.SIGTERM, 2.0)
        self._helpers.clear()
        self._helper_restarts = []
        self._helper_failures.clear()
        for fn in self.extra_processes:
            self._helpers[self._spawn_helper(fn)] = (fn, time.monotonic())
        try:
            source.wait_ready(config)  # (new groups discovered before workers need them)
        except Exception:  # noqa: BLE001 - the workers then wait (without blocking) instead
            log.exception("reload: waiting for the control process failed")
        fds = [sock.fileno() for _, _, sock in self._sockets]
        # the access logs, opened here (as the main process opened them at start): the
        # workers may have switched to server.user
        log_paths: list[str] = []
        log_fds: list[int] = []
        for _, listener, _ in self._sockets:
            path = getattr(listener.access_log, "path", None)
            if path is not None and path not in log_paths:
                try:
                    log_fds.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
                    log_paths.append(path)
                except OSError as exc:
                    log.warning("reload: cannot open the access log %s: %s", path, exc)
        # the certificates and keys, read here: workers may have switched to server.user
        files: dict[str, bytes] = {}
        for _, listener, _ in self._sockets:
            if listener.tls is not None:
                try:
                    files.update(read_tls_files(listener.tls))
                except OSError as exc:
                    log.warning("reload: cannot read %s for the workers: %s", exc.filename, exc)
        for index, (channel, _) in list(self._channels.items()):
            if index not in self._children.values():
                continue
            try:
                channel.settimeout(CONTROL_SEND_TIMEOUT)
                send_message(channel, ("reload", config, files, log_paths), fds + log_fds)
            except Exception as exc:  # noqa: BLE001 - that worker is replaced, gracefully
                log.error("reload: worker %d did not take the new config (%s); replacing it",
                          index, exc)
                for pid, i in self._children.items():
                    if i == index and pid not in self._retiring:
                        _signal(pid, signal.SIGTERM)
            finally:
                channel.setblocking(False)
        for fd in log_fds:
            os.close(fd)
        for pid, index in list(self._children.items()):
            if index >= self.workers and pid not in self._retiring:
                self._retire(pid, index)
        # an index still held by a retired worker that drains is spawned when it exits: the
        # two would share its metrics slot
        held = set(self._children.values())
        for index in range(self.workers):
            if index not in held and all(i != index for _, i in self._worker_restarts):
                self._spawn(index)
        self._worker_restarts = [r for r in self._worker_restarts if r[1] < self.workers]
        log.info("config reloaded from %s", getattr(config, "source", "config"))
        self._reloaded(True)
        return True

    def _retire(self, pid: int, index: int) -> None:
        """Stop worker ``index`` gracefully for good (a reload lowered ``workers``)."""
        self._retiring.add(pid)
        channel = self._channels.pop(index, None)
        if channel is not None:
            channel[0].close()
        self._ready.discard(index)
        _signal(pid, signal.SIGTERM)

    def _reloaded(self, ok: bool) -> None:
        if self.on_reload is not None:
            try:
                self.on_reload(ok)
            except Exception:  # noqa: BLE001 - bookkeeping must not stop the server
                log.exception("on_reload failed")

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
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (the main process reloads)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
        metrics = self._worker_metrics()
        self._servers = await self.start_services(loop)
        self._publisher = publisher = None
        board = self.metrics_board
        if metrics is not None and board is not None:
            slot = worker_slot(self._worker_index)
            if slot < board.slots:
                self._publisher = publisher = WorkerPublisher(loop, metrics, board, slot)
                publisher.start()
            else:
                log.warning(
                    "worker %d: the metrics board has %d worker slots (set at start); this "
                    "worker's requests are not in /metrics until a restart",
                    self._worker_index, board.slots - 1,
                )
        # the sockets are bound and the access logs open: the rest runs with less rights
        drop_privileges(*self._account)
        channel = self._channel
        if channel is not None:
            channel.setblocking(False)
            reader = MessageReader()
            loop.add_reader(channel.fileno(), self._on_control, loop, channel, reader, stop)
            self._tell_main(READY)
        await stop.wait()
        if channel is not None:
            loop.remove_reader(channel.fileno())
        for srv in self._servers:
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
        if self._publisher is not None:
            self._publisher.stop()  # (the last counts, and no connections left)
        return 0

    def _worker_metrics(self) -> WorkerMetrics | None:
        """In a worker of a server keeping metrics: its counters, given to every service."""
        if self.metrics_board is None or self._worker_index < 0:
            return None
        metrics = WorkerMetrics()
        services = self.services
        for service in services:
            if hasattr(service, "metrics"):
                service.metrics = metrics

        def connections() -> int:
            return sum(len(getattr(svc, "connections", ())) for svc in services)

        def health() -> list[tuple[str, str, bool]]:
            report: list[tuple[str, str, bool]] = []
            for svc in services:
                proxy = getattr(svc, "proxy", None)
                if proxy is not None:
                    report.extend(proxy.health_report())
            return report

        metrics.set_connections_source(connections)
        metrics.set_health_source(health)
        return metrics

    def _tell_main(self, word: bytes) -> None:
        channel = self._channel
        if channel is None:
            return
        try:
            channel.settimeout(CONTROL_SEND_TIMEOUT)
            channel.sendall(word)
        except OSError as exc:
            log.warning("cannot reach the main process: %s", exc)
        finally:
            channel.setblocking(False)

    def _on_control(
        self,
        loop: asyncio.AbstractEventLoop,
        channel: socket.socket,
        reader: MessageReader,
        stop: asyncio.Event,
    ) -> None:
        """A message from the main process (a worker's control channel is readable)."""
        try:
            messages = reader.read_from(channel)
        except (ChannelClosed, OSError):
            loop.remove_reader(channel.fileno())
            return  # (the main process is gone; the server's stop comes by signal)
        for message, fds in messages:
            if isinstance(message, tuple) and message[0] == "reload" and not stop.is_set():
                _, config, tls_contents, log_paths = message
                count = len(fds) - len(log_paths)
                expected = self._listener_count(config)
                if count != expected:
                    log.error("a reload came with %d descriptors, not %d; ignored",
                              len(fds), expected + len(log_paths))
                    for fd in fds:
                        os.close(fd)
                    self._tell_main(FAILED)
                    continue
                log_fds = dict(zip(log_paths, fds[count:], strict=True))
                loop.create_task(
                    self._apply_reload(loop, config, fds[:count], tls_contents, log_fds)
                )
            else:
                for fd in fds:
                    os.close(fd)

    def _listener_count(self, config: Any) -> int:
        if self.config_source is None:
            return -1
        return sum(1 for kind, _ in self.config_source.addresses(config) if kind == "listener")

    async def _apply_reload(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Any,
        fds: list[int],
        tls_contents: dict[str, bytes],
        log_fds: dict[str, int],
    ) -> None:
        """In a worker: serve ``config`` from now on, on the sockets ``fds`` (in the order
        of the services' listeners), with TLS files read and access logs opened by the
        main process."""
        sockets = [socket.socket(fileno=fd) for fd in fds]
        try:
            assert self.config_source is not None
            self.reload_log_fds = log_fds
            try:
                self.config_source.apply(self, config)
            finally:
                self.reload_log_fds = {}
                for fd in log_fds.values():
                    os.close(fd)  # (what the logs use was duplicated)
            pairs = [(svc, lst) for svc in self.services for lst in svc.listeners]
            if len(pairs) != len(sockets):
                raise RuntimeError(f"{len(sockets)} sockets for {len(pairs)} listeners")
            old_servers = self._servers
            old_sockets = self._sockets
            self._sockets = [
                (svc, lst, sock) for (svc, lst), sock in zip(pairs, sockets, strict=True)
            ]
            # accept on the new servers before the old ones stop: no gap
            self._servers = await self._create_servers(loop, tls_contents)
        except Exception as exc:  # noqa: BLE001 - a worker that cannot follow is replaced
            log.error(
                "worker %d cannot apply the new config (%s: %s); draining and exiting (the "
                "main process starts a replacement)", self._worker_index,
                type(exc).__name__, exc,
            )
            log.debug("the reload's failure", exc_info=True)
            for sock in sockets:
                sock.close()
            if self._publisher is not None:
                # its replacement takes over the metrics slot from these counts
                self._publisher.stop()
                self._publisher = None
            self._tell_main(FAILED)
            os.kill(os.getpid(), signal.SIGTERM)  # (graceful: its requests finish)
            return
        for srv in old_servers:
            srv.close()
        for _, _, sock in old_sockets:
            sock.close()
        self._tell_main(RELOADED)

    async def start_services(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Server]:
        """Start every service on ``loop`` using the bound sockets (also used in tests)."""
        self.bind()
        started: set[int] = set()
        for service, _, _ in self._sockets:
            if id(service) not in started:
                service.start(loop)
                started.add(id(service))
        return await self._create_servers(loop)

    async def _create_servers(
        self, loop: asyncio.AbstractEventLoop, tls_contents: dict[str, bytes] | None = None
    ) -> list[asyncio.Server]:
        servers: list[asyncio.Server] = []
        try:
            for service, listener, sock in self._sockets:
                srv = await self._create_server(loop, service, listener, sock, tls_contents)
                servers.append(srv)
        except BaseException:
            for srv in servers:
                srv.close()  # (a half-done set must not keep accepting)
            raise
        return servers

    async def _create_server(
        self,
        loop: asyncio.AbstractEventLoop,
        service: Service,
        listener: Listener,
        sock: socket.socket,
        tls_contents: dict[str, bytes] | None,
    ) -> asyncio.Server:
        """An accepting server for ``listener`` on ``sock``."""
        ctx: ssl.SSLContext | None = None
        if listener.tls is not None:
            if tls_contents and all(f in tls_contents for f in tls_files(listener.tls)):
                ctx = server_ssl_context_from(listener.tls, tls_contents)
            else:
                ctx = server_ssl_context(listener.tls)
        return await loop.create_server(
            service.protocol_factory(listener),
            sock=sock,
            ssl=ctx,
            backlog=listener.backlog,
            ssl_handshake_timeout=getattr(service, "handshake_timeout", 10.0) if ctx else None,
        )

    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` of every listener (after :meth:`bind`)."""
        return [sock.getsockname()[:2] for _, _, sock in self._sockets]


def _exclusive(fn: Callable[[], None]) -> bool:
    """Whether helper ``fn`` serves a socket of its own (marked ``fn.exclusive = True``),
    which only one server may serve at a time."""
    return bool(getattr(fn, "exclusive", False))


def _address_key(address: tuple[str, int]) -> tuple[str, int]:
    host = address[0].strip("[]").lower()
    return ("0.0.0.0" if host in ("", "*") else host, int(address[1]))


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
