"""The ``h2`` state machine as both ends of the proxy use it: the client side
(:class:`~ferryman.proxy.h2_downstream.H2Stream`) and the upstream side
(:class:`~ferryman.upstream.h2_connection.H2Channel`): one configuration, and sending
bodies within the flow-control windows."""

from __future__ import annotations

from typing import Any, Final

import h2.config
import h2.connection

from ferryman.protocols.headers import Headers

#: Fields that are connection-specific in HTTP/1.1 and may not appear in HTTP/2
#: (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


def new_connection(client_side: bool) -> h2.connection.H2Connection:
    """An ``h2`` state machine with bytes for headers. Inbound headers are validated by h2
    (pseudo-headers, connection-specific fields, case, CR/LF/NUL). Outbound ones are built
    by ferryman already lowercase and without connection-specific fields, so h2's checks of
    them are skipped: they cost 10% of a request's CPU in a profile of h2load traffic."""
    config = h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    return h2.connection.H2Connection(config=config)


def send_within_window(conn: Any, stream_id: int, buffer: list[bytes]) -> int:
    """Send DATA frames from the front of ``buffer`` (consumed in place) as far as the
    stream's and the connection's send windows allow; returns the bytes sent. ``conn`` is
    an ``h2.connection.H2Connection``; its errors propagate."""
    sent = 0
    while buffer:
        window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        if window <= 0:
            break
        piece = buffer[0]
        if len(piece) <= window:
            buffer.pop(0)
        else:
            buffer[0] = piece[window:]
            piece = piece[:window]
        sent += len(piece)
        conn.send_data(stream_id, piece)
    return sent


def send_end(conn: Any, stream_id: int, trailers: Headers | None) -> None:
    """END_STREAM: a trailer HEADERS frame (lowercase names, without pseudo-headers or
    connection-specific fields) when there are trailers, else an empty DATA frame."""
    fields = [
        (n.lower(), v)
        for n, v in (trailers._items if trailers else ())
        if n[:1] != b":" and n.lower() not in CONNECTION_SPECIFIC
    ]
    if fields:
        conn.send_headers(stream_id, fields, end_stream=True)
    else:
        conn.send_data(stream_id, b"", end_stream=True)
