"""Building raw HTTP/2 frames for the sans-IO frame tests."""

from __future__ import annotations

import struct


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    """One frame: the 9-byte header (RFC 9113 §4.1), then ``payload``."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )
