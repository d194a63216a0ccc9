"""GoawayFilter: takes GOAWAY frames out of a peer's HTTP/2 byte stream (sans-IO).

A graceful GOAWAY (RFC 9113 §6.8) says "no new streams; those up to ``last_stream_id``
will still be answered". The ``h2`` library closes its whole state machine when it
receives one, so every frame after it (the answers to the streams in flight) would be a
protocol error. The filter sits between the socket and ``h2``: it walks the frame headers
(9 bytes each, §4.1), removes GOAWAY frames from the bytes it passes on and reports each
one as ``(last_stream_id, error_code)``; the caller stops opening streams and lets those
in flight finish.

Only frame headers are read. Bytes pass through unchanged (the same object) unless a
GOAWAY frame or a frame header split across reads is involved; a split header is held back
until it is complete, so a GOAWAY is never half passed on.
"""

from __future__ import annotations

from typing import Final

_GOAWAY: Final = 0x7
_HEADER: Final = 9
_PREFACE: Final = 24  #: the client connection preface, before the first frame
#: GOAWAY payload bytes kept: last-stream-id and error code (debug data is dropped).
_KEEP: Final = 8


class GoawayFilter:
    """Removes GOAWAY frames from a stream of HTTP/2 frames (see the module docstring).

    After each :meth:`feed`, :attr:`received` lists the GOAWAY frames completed so far, as
    ``(last_stream_id, error_code)`` pairs; the caller empties it. With ``preface`` (the
    server side), the client's 24-byte connection preface is passed on first.
    """

    __slots__ = ("received", "_preface", "_head", "_payload_left", "_in_goaway", "_goaway")

    def __init__(self, preface: bool = False) -> None:
        self.received: list[tuple[int, int]] = []
        self._preface = _PREFACE if preface else 0
        self._head = b""  # a frame header split across reads (not yet passed on)
        self._payload_left = 0
        self._in_goaway = False
        self._goaway = b""

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` to give to ``h2``: everything but GOAWAY frames."""
        if self._preface:
            skip = min(self._preface, len(data))
            self._preface -= skip
            if skip == len(data):
                return data
            return data[:skip] + self.feed(data[skip:])
        if self._head:
            data = self._head + data
            self._head = b""
        end = len(data)
        pos = 0
        keep_from = -1 if self._in_goaway else 0  # start of the run being passed on
        out: list[bytes] | None = None
        while pos < end:
            left = self._payload_left
            if left:
                step = left if left < end - pos else end - pos
                if self._in_goaway:
                    if len(self._goaway) < _KEEP:
                        self._goaway += data[pos : pos + min(step, _KEEP - len(self._goaway))]
                    pos += step
                    self._payload_left = left - step
                    if not self._payload_left:
                        self._end_goaway()
                        keep_from = pos
                else:
                    pos += step
                    self._payload_left = left - step
                continue
            if end - pos < _HEADER:
                if out is None:
                    out = []
                if keep_from >= 0 and keep_from < pos:
                    out.append(data[keep_from:pos])
                self._head = data[pos:end]
                keep_from = -1
                break
            length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            if data[pos + 3] == _GOAWAY:
                if out is None:
                    out = []
                if keep_from >= 0 and keep_from < pos:
                    out.append(data[keep_from:pos])
                keep_from = -1
                self._in_goaway = True
                self._goaway = b""
                pos += _HEADER
                self._payload_left = length
                if not length:
                    self._end_goaway()
                    keep_from = pos
            else:
                pos += _HEADER
                self._payload_left = length
        if out is None:
            return data if keep_from == 0 else data[keep_from:] if keep_from > 0 else b""
        if keep_from >= 0 and keep_from < end:
            out.append(data[keep_from:end])
        return b"".join(out)

    def _end_goaway(self) -> None:
        payload = self._goaway
        self._in_goaway = False
        self._goaway = b""
        if len(payload) < _KEEP:
            # a malformed GOAWAY (RFC 9113 §6.8: at least 8 bytes): treat it as a
            # PROTOCOL_ERROR that covers no stream
            self.received.append((0, 0x1))
            return
        last = int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(payload[4:8], "big")
        self.received.append((last, code))
