"""Messages between processes over unix sockets, with file descriptors attached.

A message is a 4-byte big-endian length and a pickled Python object; listening sockets
travel with it as SCM_RIGHTS ancillary data on its first bytes. The main process talks
to each worker over a socketpair made before the worker is forked (``reload`` and
``ready`` messages), and the upgrade handover (:mod:`ferryman.server.upgrade`) uses the
same framing between an old and a new server.

:class:`MessageReader` is sans-IO in spirit: it is fed whatever ``recvmsg`` returned and
hands back whole messages, so it works for a non-blocking socket read by an event loop
as well as for a blocking one.
"""

from __future__ import annotations

import array
import pickle
import socket
import struct
from typing import Any

__all__ = [
    "MAX_FDS",
    "ChannelClosed",
    "MessageReader",
    "receive_message",
    "send_message",
    "worker_channel",
]

_LENGTH = struct.Struct(">I")
#: The most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 250
#: The largest message accepted (a pickled config is far smaller).
MAX_MESSAGE = 64 * 1024 * 1024
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ChannelClosed(Exception):
    """The other end closed the channel (or sent something that is not a message)."""


def worker_channel() -> tuple[socket.socket, socket.socket]:
    """A connected pair: the main process keeps the first, the worker the second."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def send_message(sock: socket.socket, message: Any, fds: list[int] | None = None) -> None:
    """Send ``message`` (picklable) with ``fds`` attached, on a blocking socket (its
    timeout applies to each write)."""
    fds = fds or []
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = _LENGTH.pack(len(payload)) + payload
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


class MessageReader:
    """Reassembles messages (and their descriptors) from what a socket delivers."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self.closed = False

    def read_from(self, sock: socket.socket) -> list[tuple[Any, list[int]]]:
        """Read what ``sock`` has (one ``recvmsg``) and return the messages completed.

        A non-blocking socket with nothing to read returns ``[]``. Raises
        :class:`ChannelClosed` at end of file.
        """
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(1 << 16, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionError as exc:
            self._fail()
            raise ChannelClosed(str(exc)) from None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self._fail()
            raise ChannelClosed("end of file")
        self._buffer += data
        return self._messages()

    def _messages(self) -> list[tuple[Any, list[int]]]:
        out = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_MESSAGE:
                self._fail()
                raise ChannelClosed(f"a message of {length} bytes")
            if len(self._buffer) < _LENGTH.size + length:
                break
            payload = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            try:
                message = pickle.loads(payload)  # noqa: S301 - from our own processes only
            except Exception as exc:  # noqa: BLE001 - a corrupt message ends the channel
                self._fail()
                raise ChannelClosed(f"an unreadable message: {exc}") from None
            # the descriptors belong to the message they arrived with (one per message)
            out.append((message, self._fds))
            self._fds = []
        return out

    def _fail(self) -> None:
        self.closed = True
        for fd in self._fds:
            try:
                socket.close(fd)
            except OSError:
                pass
        self._fds = []


def receive_message(sock: socket.socket, timeout: float) -> tuple[Any, list[int]]:
    """Block (up to ``timeout`` seconds per read) for one whole message on ``sock``."""
    reader = MessageReader()
    sock.settimeout(timeout)
    while True:
        messages = reader.read_from(sock)
        if messages:
            return messages[0]
