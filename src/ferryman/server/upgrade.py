"""Zero-downtime upgrade: a new server takes the listening sockets of the running one.

As in Pingora, the sockets themselves change hands, so the kernel's accept queues are
never closed and no connection is refused while the old server hands over:

1. The running server listens on ``server.upgrade_sock`` (:class:`UpgradeListener`,
   polled by its main process).
2. ``ferryman run --upgrade`` connects there and sends ``{"op": "sockets"}``; the old
   server answers with the configured address of each listening socket, the sockets
   attached (SCM_RIGHTS), and its pid (:func:`take_over`).
3. The new server binds only what it did not receive, starts its workers, and once every
   worker accepts, sends ``{"op": "ready"}`` (:meth:`Handover.confirm`).
4. The old server then stops accepting, drains its requests and idle keep-alive
   connections for up to its ``grace_period``, and exits. The new server now listens on
   ``upgrade_sock`` for the next upgrade.

If the new server fails before step 3 (a bad config, a worker that does not start), it
closes the connection and the old one simply goes on serving.

Both sides check that the other runs as the same user (``SO_PEERCRED``) and speak JSON:
nothing received on this socket is ever unpickled.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from ferryman.server.control import ChannelClosed, MessageReader, receive_message, send_message
from ferryman.server.process import ProcessSetupError

__all__ = ["Handover", "UpgradeListener", "take_over"]

log = logging.getLogger("ferryman.server")

#: Seconds the old server waits for the new one's messages at each step.
STEP_TIMEOUT = 5.0
#: Seconds the old server waits for a successor that received the sockets to say ready
#: (the successor itself gives up after 30 s).
READY_TIMEOUT = 45.0
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of the unix socket ``conn``."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    return int(_CREDENTIALS.unpack(data)[1])


class UpgradeListener:
    """The old side: the unix socket a running server listens on for a successor.

    Args:
        path: the socket's path (``server.upgrade_sock``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._inode = 0
        #: connections of successors that received the sockets and have not said ready
        self._waiting: list[tuple[socket.socket, MessageReader, float]] = []

    def open(self, replace: bool = False) -> None:
        """Listen on ``path``; raises :class:`ProcessSetupError` if a running server
        listens there already (that server is to be upgraded, not started next to),
        unless ``replace``: this server has just taken over from it."""
        if not replace and _alive(self.path):
            raise ProcessSetupError(
                f"server.upgrade_sock: a running server listens on {self.path}; "
                "start with --upgrade to take over from it"
            )
        try:
            os.unlink(self.path)  # (a stale socket of a server that died)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ProcessSetupError(
                f"server.upgrade_sock: cannot remove {self.path}: {exc}"
            ) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_mask = os.umask(0o177)  # only this user may take the sockets over
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_mask)
            sock.listen(4)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ProcessSetupError(
                f"server.upgrade_sock: cannot listen on {self.path}: {exc}"
            ) from None
        self._sock = sock
        self._inode = os.stat(self.path).st_ino

    def poll(
        self,
        sockets: list[tuple[str, tuple[str, int], socket.socket]],
        on_ready: Callable[[], None] | None = None,
    ) -> bool:
        """Serve successors without blocking for long; True once one said it is ready
        (this server must then stop accepting and drain).

        ``sockets``: ``(kind, configured address, socket)`` of every listening socket.
        ``on_ready`` runs when a successor is ready, before it is answered (it may then
        start serving what this server must have stopped serving).
        """
        if self._sock is None:
            return False
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.error("upgrade socket %s: %s", self.path, exc)
                break
            self._hand_over(conn, sockets)
        ready = False
        still: list[tuple[socket.socket, MessageReader, float]] = []
        for conn, reader, since in self._waiting:
            try:
                messages = reader.read_from(conn)
            except (ChannelClosed, OSError):
                log.warning("upgrade: the new server went away before it was ready; serving on")
                conn.close()
                continue
            if any(isinstance(m, dict) and m.get("op") == "ready" for m, _ in messages):
                log.info("upgrade: the new server is ready; draining and exiting")
                # the path is the successor's from now on: leave it before saying goodbye
                self._unlink_own_path()
                if on_ready is not None:
                    on_ready()
                try:
                    conn.settimeout(STEP_TIMEOUT)
                    send_message(conn, {"op": "bye", "pid": os.getpid()}, encoding="json")
                except OSError:
                    pass
                conn.close()
                ready = True
            elif time.monotonic() - since > READY_TIMEOUT:
                log.warning("upgrade: the new server never said ready; serving on")
                conn.close()
            else:
                still.append((conn, reader, since))
        self._waiting = still
        return ready

    def _hand_over(
        self, conn: socket.socket, sockets: list[tuple[str, tuple[str, int], socket.socket]]
    ) -> None:
        try:
            if peer_uid(conn) != os.geteuid():
                raise ChannelClosed(f"a process of uid {peer_uid(conn)} asked for the sockets")
            conn.settimeout(STEP_TIMEOUT)
            try:
                request, fds = receive_message(conn, STEP_TIMEOUT, encoding="json")
            except ChannelClosed as exc:
                if str(exc) == "end of file":
                    conn.close()  # (a liveness probe: a server starting up checks the path)
                    return
                raise
            for fd in fds:
                os.close(fd)
            if not (isinstance(request, dict) and request.get("op") == "sockets"):
                raise ChannelClosed(f"unexpected request {request!r}")
            send_message(
                conn,
                {
                    "op": "sockets",
                    "pid": os.getpid(),
                    "sockets": [(kind, list(address)) for kind, address, _ in sockets],
                },
                [sock.fileno() for _, _, sock in sockets],
                encoding="json",
            )
            conn.setblocking(False)
        except Exception as exc:  # noqa: BLE001 - a failed handover leaves this server serving
            log.warning("upgrade: a handover failed: %s", exc)
            conn.close()
            return
        log.info("upgrade: handed %d listening socket(s) to a new server", len(sockets))
        self._waiting.append((conn, MessageReader("json"), time.monotonic()))

    def detach(self) -> None:
        """In a forked child: close this process's copies, leaving the path alone."""
        for conn, _, _ in self._waiting:
            conn.close()
        self._waiting = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Stop listening; the path is removed only if it is still this server's socket
        (a successor has replaced it by its own)."""
        for conn, _, _ in self._waiting:
            conn.close()
        self._waiting = []
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        self._unlink_own_path()

    def _unlink_own_path(self) -> None:
        try:
            if self._inode and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = 0


class Handover:
    """The new side: the sockets received from the running server, and the connection to
    tell it when to go."""

    def __init__(self, conn: socket.socket, old_pid: int, sockets: list[Any]) -> None:
        self._conn = conn
        #: the pid of the server handing over
        self.old_pid = old_pid
        #: ``(kind, (host, port), socket)`` of each listening socket received
        self.sockets: list[tuple[str, tuple[str, int], socket.socket]] = sockets

    def take(self, kind: str, address: tuple[str, int]) -> socket.socket | None:
        """The received socket configured at ``address`` (removed from those left), or
        None: the new server binds it itself."""
        for i, (k, addr, sock) in enumerate(self.sockets):
            if k == kind and _same_address(addr, address):
                del self.sockets[i]
                return sock
        return None

    def close_unused(self) -> None:
        """Close the received sockets the new config does not listen on (the old server
        closes its own copies as it exits, so those addresses stop listening then)."""
        for _, _, sock in self.sockets:
            sock.close()
        self.sockets = []

    def detach(self) -> None:
        """In a forked child: close this process's copy of the connection (so that the
        old server sees the new one go if it dies)."""
        self._conn.close()

    def confirm(self, timeout: float = STEP_TIMEOUT) -> None:
        """Tell the old server to stop accepting and drain; waits for its answer."""
        try:
            send_message(self._conn, {"op": "ready"}, encoding="json")
            receive_message(self._conn, timeout, encoding="json")
        except (ChannelClosed, OSError) as exc:
            log.warning("upgrade: the old server did not acknowledge: %s", exc)
        finally:
            self._conn.close()

    def abort(self) -> None:
        """Give up: the old server keeps serving."""
        self.close_unused()
        self._conn.close()


def take_over(path: str, timeout: float = STEP_TIMEOUT) -> Handover:
    """Ask the server listening on ``path`` for its listening sockets.

    Raises :class:`ProcessSetupError` naming the socket when no server answers there.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
        uid = peer_uid(conn)
        if uid != os.geteuid():
            conn.close()
            raise ProcessSetupError(
                f"server.upgrade_sock: {path} is served by a process of uid {uid}, not this "
                f"user's ({os.geteuid()}): refusing its sockets"
            )
        send_message(conn, {"op": "sockets"}, encoding="json")
        answer, fds = receive_message(conn, timeout, encoding="json")
    except (OSError, ChannelClosed) as exc:
        conn.close()
        raise ProcessSetupError(
            f"server.upgrade_sock: no running server answers on {path}: {exc}"
        ) from None
    listed = answer.get("sockets", []) if isinstance(answer, dict) else []
    if len(listed) != len(fds):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise ProcessSetupError(
            f"server.upgrade_sock: {path}: the running server sent {len(fds)} socket(s) "
            f"for {len(listed)} address(es)"
        )
    sockets = []
    for (kind, address), fd in zip(listed, fds, strict=True):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append((str(kind), (str(address[0]), int(address[1])), sock))
    return Handover(conn, int(answer.get("pid", 0)), sockets)


def _alive(path: str) -> bool:
    """Whether a process accepts connections on the unix socket ``path``."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _same_address(a: tuple[str, int], b: tuple[str, int]) -> bool:
    def norm(address: tuple[str, int]) -> tuple[str, int]:
        host = address[0].strip("[]").lower()
        return ("0.0.0.0" if host in ("", "*") else host, int(address[1]))

    return norm(a) == norm(b)
