"""Messages between processes over unix sockets, with file descriptors attached.

A message is a 4-byte big-endian length and an encoded object; listening sockets travel
with it as SCM_RIGHTS ancillary data on its first bytes. The main process sends each
worker ``reload`` messages over a socketpair made before the worker is forked; they are
pickled (a worker trusts its main process). Nothing travelling the other way is ever
unpickled: workers, which may run as an unprivileged ``server.user``, answer with single
bytes (:data:`READY`, :data:`RELOADED`, :data:`FAILED`), and the upgrade handover
(:mod:`ferryman.server.upgrade`) speaks JSON.

:class:`MessageReader` is sans-IO in spirit: it is fed whatever ``recvmsg`` returned and
hands back whole messages, so it works for a non-blocking socket read by an event loop
as well as for a blocking one.
"""

from __future__ import annotations

import array
import json
import pickle
import socket
import struct
from typing import Any, Literal

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

#: A worker accepts connections.
READY = b"R"
#: A worker applied a reload.
RELOADED = b"L"
#: A worker could not apply a reload (it drains and is replaced).
FAILED = b"F"

Encoding = Literal["pickle", "json"]


def _encode(message: Any, encoding: Encoding) -> bytes:
    if encoding == "json":
        return json.dumps(message, separators=(",", ":")).encode()
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _decode(payload: bytes, encoding: Encoding) -> Any:
    if encoding == "json":
        return json.loads(payload)
    return pickle.loads(payload)  # noqa: S301 - only from the main process to its workers


class ChannelClosed(Exception):
    """The other end closed the channel (or sent something that is not a message)."""


def worker_channel() -> tuple[socket.socket, socket.socket]:
    """A connected pair: the main process keeps the first, the worker the second."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def send_message(
    sock: socket.socket,
    message: Any,
    fds: list[int] | None = None,
    encoding: Encoding = "pickle",
) -> None:
    """Send ``message`` with ``fds`` attached, on a blocking socket (its timeout applies
    to each write)."""
    fds = fds or []
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
    payload = _encode(message, encoding)
    data = _LENGTH.pack(len(payload)) + payload
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


class MessageReader:
    """Reassembles messages (and their descriptors) from what a socket delivers."""

    def __init__(self, encoding: Encoding = "pickle") -> None:
        self.encoding: Encoding = encoding
        self._buffer = bytearray()
        # descriptors not yet handed out, with the stream range [start, end) of the read
        # that brought them. Sent with a message's first byte, and the kernel ends a read
        # right after the bytes that carry descriptors, so they belong to the last message
        # that begins within that read (a read may end one message and begin the next)
        self._fds: list[tuple[int, int, list[int]]] = []
        self._consumed = 0  # stream offset of the buffer's first byte
        self.closed = False

    def read_from(self, sock: socket.socket) -> list[tuple[Any, list[int]]]:
        """Read what ``sock`` has (one ``recvmsg``) and return the messages completed.

        A non-blocking socket with nothing to read returns ``[]``. Raises
        :class:`ChannelClosed` at end of file.
        """
        try:
            data, ancillary, flags, _addr = sock.recvmsg(1 << 16, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionError as exc:
            self._fail()
            raise ChannelClosed(str(exc)) from None
        received: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                received.extend(fds)
        if flags & socket.MSG_CTRUNC:
            _close_all(received)
            self._fail()
            raise ChannelClosed("descriptors were cut short (out of descriptors?)")
        if received:
            at = self._consumed + len(self._buffer)
            self._fds.append((at, at + len(data), received))
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
            start = self._consumed
            payload = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            self._consumed = start + _LENGTH.size + length
            try:
                message = _decode(payload, self.encoding)
            except Exception as exc:  # noqa: BLE001 - a corrupt message ends the channel
                self._fail()
                raise ChannelClosed(f"an unreadable message: {exc}") from None
            end = self._consumed
            fds: list[int] = []
            while self._fds and self._fds[0][0] <= start:
                read_start, read_end, batch = self._fds[0]
                if start >= read_end:
                    _close_all(self._fds.pop(0)[2])  # (no message began in that read)
                elif end >= read_end:  # the last message beginning within that read
                    fds.extend(self._fds.pop(0)[2])
                else:
                    break  # (a later message begins within that read: it is theirs)
            out.append((message, fds))
        return out

    def _fail(self) -> None:
        self.closed = True
        for _, _, batch in self._fds:
            _close_all(batch)
        self._fds = []


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            socket.close(fd)
        except OSError:
            pass


def receive_message(
    sock: socket.socket, timeout: float, encoding: Encoding = "pickle"
) -> tuple[Any, list[int]]:
    """Block (up to ``timeout`` seconds per read) for one whole message on ``sock``."""
    reader = MessageReader(encoding)
    sock.settimeout(timeout)
    while True:
        messages = reader.read_from(sock)
        if messages:
            return messages[0]
