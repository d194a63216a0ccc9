"""Writes the seed corpus of fuzz_h1_request.py to tests/fuzz/corpus/h1_request/.

Each seed is a client's bytes in the target's input format (control byte, cuts, payload:
see ``fuzz_h1_request.decode``). Run ``python tests/fuzz/make_corpus.py`` after changing
the list; the files are committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fuzz_h1_request import BYTEWISE, RESUME, encode  # noqa: E402

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
SMALL, TINY, BODY64 = 1, 2, 3  # limits profiles

SEEDS: dict[str, bytes] = {
    "get": encode(GET),
    "get_bytewise": encode(b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n", BYTEWISE),
    "get_http10_no_host": encode(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 0, (5,)),
    "post_content_length": encode(
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", BYTEWISE, (20, 50)
    ),
    "chunked_with_trailers": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: two words \r\n\r\n",
        BYTEWISE,
        (60, 70, 80),
    ),
    "pipelined_pair": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" + GET, 0, (48, 50)
    ),
    "pipelined_three_small_limits": encode(GET + GET + GET, SMALL, (27, 40, 60)),
    "ows_padding": encode(
        b"GET / HTTP/1.1\r\nHost:\t a \t\r\nX-A:   b  c  \r\nX-B:\r\n\r\n", BYTEWISE
    ),
    "upgrade_websocket": encode(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x05hello",
        0,
        (70,),
    ),
    "upgrade_refused_resume": encode(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + GET,
        RESUME,
        (70, 80),
    ),
    "h2c_upgrade_with_body": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAA\r\nContent-Length: 4\r\n\r\nbody" + GET,
        BYTEWISE,
    ),
    "connect": encode(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n\x16\x03\x01", 0),
    "smuggle_cl_te": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nG" + GET
    ),
    "te_coding_list": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "smuggle_te_obfuscated": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    ),
    "smuggle_duplicate_cl": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-length: 30\r\n\r\nabc"
    ),
    "smuggle_te_http10": encode(
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "smuggle_bare_lf_chunk": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"
    ),
    "obs_fold": encode(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
    "two_hosts": encode(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"),
    "huge_chunk_size": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffff\r\nx\r\n0\r\n\r\n"
    ),
    "body_past_max_body": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
        TINY | BYTEWISE,
    ),
    "long_target_small_limits": encode(
        b"GET /" + b"x" * 70 + b" HTTP/1.1\r\nHost: a\r\n\r\n", SMALL, (30,)
    ),
    "many_fields_tiny_limits": encode(
        b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", TINY
    ),
    "http2_preface": encode(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    # near the limits of the small profile (max_request_line 64, max_header_bytes 256):
    # a few inserted bytes cross them
    "pipelined_head_near_header_limit": encode(
        GET + b"GET /2 HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 236 + b"\r\n\r\n", SMALL, (40, 100)
    ),
    "padded_head_near_head_limit": encode(
        b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 330 + b"v\r\n\r\n", SMALL, (200, 360)
    ),
    "target_at_line_limit": encode(
        b"GET /" + b"t" * 63 + b" HTTP/1.1\r\nHost: a\r\n\r\n", SMALL | BYTEWISE
    ),
    "trailer_connection_close": encode(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\nConnection: close\r\n\r\n" + GET,
        BODY64,
    ),
}


def main() -> None:
    out = HERE / "corpus" / "h1_request"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (out / f"{name}.bin").write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds to {out}")


if __name__ == "__main__":
    main()
