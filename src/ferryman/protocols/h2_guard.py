"""FrameGuard: the HTTP/2 abuse checks the ``h2`` state machine does not make (sans-IO).

It reads the frame headers of what a client sends (9 bytes each, RFC 9113 §4.1) before the
bytes go to ``h2``, and says when a connection must be closed with GOAWAY:

* a header block (HEADERS plus CONTINUATION frames) larger than ``max_header_block``
  bytes: the CONTINUATION flood of CVE-2024-27316, which ``h2`` would buffer without
  limit while it waits for END_HEADERS;
* more than ``max_per_second`` RST_STREAM frames in a second: rapid reset
  (CVE-2023-44487), each reset stream having cost a request upstream;
* more than ``max_per_second`` SETTINGS frames, PING frames (not acknowledgements) or
  empty DATA frames without END_STREAM in a second: floods that cost work (and
  acknowledgements to write) but carry nothing.

Counts are kept per one-second window of the caller's clock. Only frame headers are read;
payloads are skipped.
"""

from __future__ import annotations

from typing import Final

#: The client connection preface, which precedes the first frame.
PREFACE_LENGTH: Final = 24

_DATA: Final = 0x0
_HEADERS: Final = 0x1
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PING: Final = 0x6
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4

#: GOAWAY error code for a peer that behaves in a way that costs too much (RFC 9113 §7).
ENHANCE_YOUR_CALM: Final = 0xB


class FrameGuard:
    """Watches one client connection's frames (see the module docstring).

    :meth:`feed` returns None while all is well, else a short reason; the caller then
    sends GOAWAY with :data:`ENHANCE_YOUR_CALM` and closes the connection.
    """

    __slots__ = (
        "max_header_block",
        "max_per_second",
        "_skip_preface",
        "_head",
        "_payload_left",
        "_block",
        "_in_block",
        "_window_start",
        "_resets",
        "_settings",
        "_pings",
        "_empty_data",
    )

    def __init__(
        self, max_header_block: int = 65536, max_per_second: int = 100, preface: bool = True
    ) -> None:
        self.max_header_block = max_header_block
        self.max_per_second = max_per_second
        self._skip_preface = PREFACE_LENGTH if preface else 0
        self._head = b""  # a frame header split across reads
        self._payload_left = 0
        self._block = 0  # bytes of the header block in progress
        self._in_block = False
        self._window_start = 0.0
        self._resets = 0
        self._settings = 0
        self._pings = 0
        self._empty_data = 0

    def feed(self, data: bytes, now: float) -> str | None:
        """Scan ``data`` (the next bytes from the client) at time ``now`` (seconds)."""
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._resets = self._settings = self._pings = self._empty_data = 0
        pos = 0
        end = len(data)
        if self._skip_preface:
            skip = min(self._skip_preface, end)
            self._skip_preface -= skip
            pos = skip
        while pos < end:
            if self._payload_left:
                step = min(self._payload_left, end - pos)
                self._payload_left -= step
                pos += step
                continue
            need = 9 - len(self._head)
            if end - pos < need:
                self._head += data[pos:end]
                return None
            head = self._head + data[pos : pos + need] if self._head else data[pos : pos + 9]
            self._head = b""
            pos += need
            length = (head[0] << 16) | (head[1] << 8) | head[2]
            kind = head[3]
            flags = head[4]
            self._payload_left = length
            problem = self._frame(kind, flags, length)
            if problem is not None:
                return problem
        return None

    def _frame(self, kind: int, flags: int, length: int) -> str | None:
        limit = self.max_per_second
        if kind == _HEADERS or (kind == _CONTINUATION and self._in_block):
            self._block = length if kind == _HEADERS else self._block + length
            self._in_block = not flags & _END_HEADERS
            if self._block > self.max_header_block:
                return f"header block larger than {self.max_header_block} bytes"
        elif kind == _RST_STREAM:
            self._resets += 1
            if self._resets > limit:
                return f"more than {limit} stream resets in a second"
        elif kind == _SETTINGS and not flags & _ACK:
            self._settings += 1
            if self._settings > limit:
                return f"more than {limit} SETTINGS frames in a second"
        elif kind == _PING and not flags & _ACK:
            self._pings += 1
            if self._pings > limit:
                return f"more than {limit} PING frames in a second"
        elif kind == _DATA and length == 0 and not flags & _END_STREAM:
            self._empty_data += 1
            if self._empty_data > limit:
                return f"more than {limit} empty DATA frames in a second"
        return None
