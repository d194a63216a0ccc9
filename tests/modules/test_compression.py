"""Response compression's sans-IO core (``ferryman.modules.compression``), table-tested."""

from __future__ import annotations

import gzip
import os
import random
import tracemalloc
import zlib

import brotli
import pytest
import zstandard

from ferryman.modules.compression import (
    BrotliEncoder,
    CompressionConfig,
    DecodeError,
    Decoder,
    DecompressionLimitError,
    GzipEncoder,
    ZstdEncoder,
    apply_response_headers,
    decode_response,
    media_type_matches,
    negotiate,
    new_encoder,
    should_compress,
)
from ferryman.protocols.headers import Headers, ResponseHeader

# -- negotiate (RFC 9110 §12.5.3) ---------------------------------------------------------

NEGOTIATE_CASES = [
    ([], None),  # no Accept-Encoding: send as is
    ([b""], None),  # empty value: identity only
    ([b"gzip"], "gzip"),
    ([b"GZIP"], "gzip"),  # case-insensitive
    ([b"x-gzip"], "gzip"),  # §8.4.1.3
    ([b"gzip, deflate, br, zstd"], "br"),  # equal q: server order
    ([b"gzip, deflate", b"br"], "br"),  # several field lines
    ([b"  gzip ;  q=0.5 ,br;q=0.4"], "gzip"),  # whitespace
    ([b"gzip;q=1.0, br;q=0.999"], "gzip"),
    ([b"br;q=0, gzip"], "gzip"),  # q=0: not acceptable
    ([b"br;q=0.000, zstd;Q=0.0, gzip;q=0.001"], "gzip"),
    ([b"gzip;q=0"], None),
    ([b"*"], "br"),
    ([b"*;q=0.5, br;q=0.2"], "zstd"),  # * covers what is not named
    ([b"*;q=0"], None),
    ([b"br;q=0, *"], "zstd"),
    ([b"identity;q=0"], None),  # nothing else acceptable: send as is
    ([b"identity;q=0, gzip"], "gzip"),
    ([b"gzip;q=0.5, identity"], None),  # identity preferred over gzip
    ([b"gzip;q=0.5, identity;q=0.5"], "gzip"),  # a tie compresses
    ([b"deflate, compress"], None),  # nothing available
    ([b"gzip;q=2"], None),  # malformed q: element ignored
    ([b"gzip;q=abc, br"], "br"),
    ([b"gzip;q=0.1234"], None),  # more than three decimals
    ([b"gzip;q="], None),
    ([b"gzip;q"], None),
    ([b"gzip;q=1.001"], None),
    ([b'gzip;q="0.5"'], "gzip"),  # quoted: tolerated
    ([b"gzip;level=1"], "gzip"),  # other parameters ignored
    ([b"br;q=0.5, br;q=1, gzip;q=0.6"], "gzip"),  # the first element of a coding counts
    ([b"identity;q=bogus, gzip"], "gzip"),
    ([b",,, gzip ,"], "gzip"),  # empty list elements
    ([b"gzip\xff, br"], "br"),  # junk bytes do not raise
]


@pytest.mark.parametrize(("values", "expected"), NEGOTIATE_CASES)
def test_negotiate(values: list[bytes], expected: str | None) -> None:
    assert negotiate(values) == expected


def test_negotiate_server_order() -> None:
    assert negotiate([b"gzip, br, zstd"], ("zstd", "gzip")) == "zstd"
    assert negotiate([b"gzip, br, zstd"], ("gzip",)) == "gzip"
    assert negotiate([b"br"], ()) is None


# -- should_compress -----------------------------------------------------------------------

CONFIG = CompressionConfig()
HTML = [(b"Content-Type", b"text/html; charset=utf-8")]

SHOULD_CASES = [
    (200, "GET", HTML, True),
    (200, "get", HTML, True),
    (404, "GET", HTML, True),
    (500, "POST", HTML, True),
    (200, "HEAD", HTML, False),
    (101, "GET", HTML, False),
    (103, "GET", HTML, False),
    (204, "GET", HTML, False),
    (206, "GET", HTML, False),
    (304, "GET", HTML, False),
    (200, "CONNECT", HTML, False),
    (200, "GET", [*HTML, (b"Content-Encoding", b"gzip")], False),
    (200, "GET", [*HTML, (b"Content-Encoding", b"identity")], True),
    (200, "GET", [*HTML, (b"content-encoding", b"Identity, br")], False),
    (200, "GET", [*HTML, (b"Cache-Control", b"public, No-Transform")], False),
    (200, "GET", [*HTML, (b"Cache-Control", b"max-age=60"), (b"Cache-Control", b"no-transform")],
     False),
    (200, "GET", [*HTML, (b"Cache-Control", b"no-cache")], True),
    (200, "GET", [], False),  # no Content-Type
    (200, "GET", [(b"Content-Type", b"image/png")], False),
    (200, "GET", [(b"Content-Type", b"application/octet-stream")], False),
    (200, "GET", [(b"Content-Type", b"APPLICATION/JSON ; charset=utf-8")], True),
    (200, "GET", [(b"Content-Type", b"application/problem+json")], True),
    (200, "GET", [(b"Content-Type", b"application/javascript")], True),
    (200, "GET", [(b"Content-Type", b"application/xml")], True),
    (200, "GET", [(b"Content-Type", b"application/atom+xml")], True),
    (200, "GET", [(b"Content-Type", b"image/svg+xml")], True),
    (200, "GET", [(b"Content-Type", b"text/css")], True),
    (200, "GET", [(b"Content-Type", b"text/event-stream")], False),  # excluded
    (200, "GET", [(b"Content-Type", b"")], False),
    (200, "GET", [*HTML, (b"Content-Length", b"1024")], True),  # == min_size
    (200, "GET", [*HTML, (b"Content-Length", b"1023")], False),
    (200, "GET", [*HTML, (b"Content-Length", b"0")], False),
    (200, "GET", [*HTML, (b"Content-Length", b"5000")], True),
    (200, "GET", [*HTML, (b"Content-Length", b"5000, 5000")], True),
    (200, "GET", [*HTML, (b"Content-Length", b"5000"), (b"Content-Length", b"6000")], False),
    (200, "GET", [*HTML, (b"Content-Length", b"-5")], False),
    (200, "GET", [*HTML, (b"Content-Length", b"abc")], False),
]


@pytest.mark.parametrize(("status", "method", "headers", "expected"), SHOULD_CASES)
def test_should_compress(
    status: int, method: str, headers: list[tuple[bytes, bytes]], expected: bool
) -> None:
    assert should_compress(status, method, Headers(headers), CONFIG) is expected
    # a ResponseHeader works as well
    assert should_compress(status, method, ResponseHeader(status, headers), CONFIG) is expected


def test_should_compress_config() -> None:
    config = CompressionConfig(content_types=("application/octet-stream",), min_size=10)
    headers = Headers([(b"Content-Type", b"application/octet-stream"), (b"Content-Length", b"10")])
    assert should_compress(200, "GET", headers, config)
    assert not should_compress(200, "GET", Headers(HTML), config)
    sse = CompressionConfig(excluded_types=())
    assert should_compress(200, "GET", Headers([(b"Content-Type", b"text/event-stream")]), sse)


MEDIA_CASES = [
    ("text/html", "text/*", True),
    ("text/html", "text/html", True),
    ("text/html", "text/plain", False),
    ("application/json", "text/*", False),
    ("application/ld+json", "application/*+json", True),
    ("application/json", "application/*+json", False),
    ("image/svg+xml", "*+xml", True),
    ("image/svg+xml", "*/*+xml", True),
    ("image/svg+xml", "application/*+xml", False),
    ("anything/else", "*/*", True),
]


@pytest.mark.parametrize(("media_type", "pattern", "expected"), MEDIA_CASES)
def test_media_type_matches(media_type: str, pattern: str, expected: bool) -> None:
    assert media_type_matches(media_type, pattern) is expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithms": ("deflate",)},
        {"levels": {"gzip": 10}},
        {"levels": {"br": 12}},
        {"levels": {"zstd": 20}},
        {"levels": {"lz4": 1}},
        {"brotli_window": 25},
        {"min_size": -1},
    ],
)
def test_config_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CompressionConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    config = CompressionConfig()
    assert config.algorithms == ("br", "zstd", "gzip")
    assert (config.level("gzip"), config.level("br"), config.level("zstd")) == (5, 4, 3)
    assert config.min_size == 1024
    assert CompressionConfig(levels={"gzip": 9}).level("br") == 4  # unset: the default


# -- header fix-ups ------------------------------------------------------------------------

HEADER_CASES = [
    # (headers before, encoding, headers after)
    (
        [(b"Content-Type", b"text/html"), (b"Content-Length", b"5000"), (b"ETag", b'"abc"')],
        "gzip",
        [
            (b"Content-Type", b"text/html"),
            (b"ETag", b'W/"abc"'),
            (b"Vary", b"Accept-Encoding"),
            (b"Content-Encoding", b"gzip"),
        ],
    ),
    ([(b"ETag", b'W/"abc"')], "br", [(b"ETag", b'W/"abc"'), (b"Vary", b"Accept-Encoding"),
                                     (b"Content-Encoding", b"br")]),
    ([(b"ETag", b"abc")], "br", [(b"Vary", b"Accept-Encoding"), (b"Content-Encoding", b"br")]),
    (
        [(b"Vary", b"Origin"), (b"Accept-Ranges", b"bytes"), (b"vary", b"Cookie")],
        "zstd",
        [(b"Vary", b"Origin, Cookie, Accept-Encoding"), (b"Content-Encoding", b"zstd")],
    ),
    ([(b"Vary", b"origin, accept-encoding")], "gzip",
     [(b"Vary", b"origin, accept-encoding"), (b"Content-Encoding", b"gzip")]),
    ([(b"Vary", b"*")], "gzip", [(b"Vary", b"*"), (b"Content-Encoding", b"gzip")]),
    ([(b"Vary", b"")], "gzip", [(b"Vary", b"Accept-Encoding"), (b"Content-Encoding", b"gzip")]),
    ([(b"Content-Encoding", b"identity")], "gzip",
     [(b"Content-Encoding", b"gzip"), (b"Vary", b"Accept-Encoding")]),
    # not compressed (client accepts nothing): Vary only, the rest untouched
    (
        [(b"Content-Length", b"5000"), (b"ETag", b'"abc"')],
        None,
        [(b"Content-Length", b"5000"), (b"ETag", b'"abc"'), (b"Vary", b"Accept-Encoding")],
    ),
]


@pytest.mark.parametrize(("before", "encoding", "after"), HEADER_CASES)
def test_apply_response_headers(
    before: list[tuple[bytes, bytes]], encoding: str | None, after: list[tuple[bytes, bytes]]
) -> None:
    headers = Headers(before)
    apply_response_headers(headers, encoding)
    assert headers.items() == after
    response = ResponseHeader(200, before)
    apply_response_headers(response, encoding)
    assert response.headers.items() == after


# -- encoders: round trips -----------------------------------------------------------------


def _decode(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "br":
        return brotli.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


ENCODINGS = ["gzip", "br", "zstd"]
TEXT = b"".join(b"<li class=item-%d>item %d of the list</li>\n" % (i % 97, i) for i in range(5000))
CHUNKINGS = [
    [],
    [b""],
    [b"", b"", b""],
    [TEXT],
    [TEXT[:1], b"", TEXT[1:]],
    [TEXT[i : i + 1000] for i in range(0, len(TEXT), 1000)],
    [TEXT[i : i + 7] for i in range(0, 5000, 7)],
    [os.urandom(100_000), b"", TEXT],  # incompressible data too
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("chunks", CHUNKINGS, ids=range(len(CHUNKINGS)))
def test_round_trip(encoding: str, chunks: list[bytes]) -> None:
    encoder = new_encoder(encoding)
    assert encoder.encoding == encoding
    out = b"".join([encoder.compress(c) for c in chunks] + [encoder.finish()])
    assert _decode(encoding, out) == b"".join(chunks)
    decoder = Decoder(encoding)
    assert decoder.decompress(out) + decoder.finish() == b"".join(chunks)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compresses(encoding: str) -> None:
    encoder = new_encoder(encoding)
    out = encoder.compress(TEXT) + encoder.finish()
    assert len(out) < len(TEXT) // 5


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_flush_makes_everything_so_far_decodable(encoding: str) -> None:
    encoder = new_encoder(encoding)
    decoder = Decoder(encoding)
    got = b""
    for event in (b"data: one\n\n", b"data: two\n\n", b"", b"data: three\n\n"):
        got += decoder.decompress(encoder.compress(event) + encoder.flush())
        assert got.endswith(event)
    got += decoder.decompress(encoder.finish()) + decoder.finish()
    assert got == b"data: one\n\ndata: two\n\ndata: three\n\n"


@pytest.mark.parametrize("cls", [GzipEncoder, BrotliEncoder, ZstdEncoder])
def test_no_use_after_finish(cls: type[GzipEncoder]) -> None:
    encoder = cls()
    encoder.finish()
    with pytest.raises(ValueError):
        encoder.compress(b"x")
    with pytest.raises(ValueError):
        encoder.finish()


def test_new_encoder_levels() -> None:
    config = CompressionConfig(levels={"gzip": 1})
    fast = new_encoder("gzip", config)
    assert isinstance(fast, GzipEncoder)
    with pytest.raises(ValueError):
        new_encoder("deflate")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_large_stream_bounded_memory(encoding: str) -> None:
    """20 MB in 64 KiB pieces: output keeps coming and Python memory stays bounded."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(3000)]
    piece = 64 * 1024
    block = b" ".join(rng.choices(words, k=200_000))[: 1024 * 1024]
    total = 20 * 1024 * 1024
    encoder = new_encoder(encoding)
    check = zlib.decompressobj(31) if encoding == "gzip" else None
    out_size = 0
    empty_run = longest_empty_run = 0
    tracemalloc.start()
    try:
        for offset in range(0, total, piece):
            start = offset % len(block)
            out = encoder.compress(block[start : start + piece])
            out_size += len(out)
            empty_run = 0 if out else empty_run + 1
            longest_empty_run = max(longest_empty_run, empty_run)
            if check is not None:
                check.decompress(out)
        out_size += len(encoder.finish())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < out_size < total
    assert longest_empty_run < 64  # output keeps coming: at most ~4 MB held back
    assert peak < 4 * 1024 * 1024  # well below the 20 MB input


# -- decoders ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", gzip.compress(TEXT)),
        ("x-gzip", gzip.compress(TEXT)),
        ("GZIP", gzip.compress(TEXT)),
        ("gzip", gzip.compress(TEXT[:100]) + gzip.compress(TEXT[100:])),  # two members
        ("gzip", gzip.compress(TEXT) + b"\0\0\0"),  # trailing garbage ignored
        ("deflate", zlib.compress(TEXT)),  # zlib format (RFC 1950)
        ("deflate", zlib.compress(TEXT)[2:-4]),  # raw deflate, as some servers send
        ("br", brotli.compress(TEXT)),
        ("zstd", zstandard.ZstdCompressor().compress(TEXT)),
        ("zstd", zstandard.ZstdCompressor().compress(TEXT[:100])
         + zstandard.ZstdCompressor().compress(TEXT[100:])),  # two frames
    ],
    ids=["gzip", "x-gzip", "GZIP", "gzip-2-members", "gzip-trailing", "deflate-zlib",
         "deflate-raw", "br", "zstd", "zstd-2-frames"],
)
@pytest.mark.parametrize("size", [1, 2, 3, 1000, 1 << 20])
def test_decoder(encoding: str, data: bytes, size: int) -> None:
    decoder = Decoder(encoding)
    out = b"".join(decoder.decompress(data[i : i + size]) for i in range(0, len(data), size))
    assert out + decoder.finish() == TEXT


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_decoder_empty_body(encoding: str) -> None:
    decoder = Decoder(encoding)
    assert decoder.decompress(b"") == b""
    assert decoder.finish() == b""


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", gzip.compress(TEXT)[:-10]),
        ("deflate", zlib.compress(TEXT)[:-10]),
        ("deflate", b"x"),
        ("br", brotli.compress(TEXT)[:-10]),
        ("zstd", zstandard.ZstdCompressor().compress(TEXT)[:-10]),
    ],
    ids=["gzip", "deflate", "deflate-1-byte", "br", "zstd"],
)
def test_decoder_truncated(encoding: str, data: bytes) -> None:
    decoder = Decoder(encoding)
    decoder.decompress(data)
    with pytest.raises(DecodeError):
        decoder.finish()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_decoder_garbage(encoding: str) -> None:
    with pytest.raises(DecodeError):
        decoder = Decoder(encoding)
        decoder.decompress(b"\x1f\x8b this is not compressed at all" * 10)
        decoder.finish()


def test_decoder_unsupported() -> None:
    with pytest.raises(DecodeError):
        Decoder("compress")


BOMB = b"\0" * (50 * 1024 * 1024)


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", gzip.compress(BOMB, 9)),
        ("deflate", zlib.compress(BOMB, 9)),
        ("br", brotli.compress(BOMB)),
        ("zstd", zstandard.ZstdCompressor(level=19).compress(BOMB)),
    ],
    ids=["gzip", "deflate", "br", "zstd"],
)
def test_decoder_bomb_limit(encoding: str, data: bytes) -> None:
    limit = 1024 * 1024
    assert len(data) < 100_000
    decoder = Decoder(encoding, max_size=limit)
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionLimitError) as info:
            for i in range(0, len(data), 4096):
                decoder.decompress(data[i : i + 4096])
            decoder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.max_size == limit
    assert isinstance(info.value, DecodeError)
    assert peak < 8 * limit  # never anywhere near the 50 MB the body expands to


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decoder_exact_limit(encoding: str) -> None:
    encoder = new_encoder(encoding)
    data = encoder.compress(TEXT) + encoder.finish()
    decoder = Decoder(encoding, max_size=len(TEXT))
    assert decoder.decompress(data) + decoder.finish() == TEXT
    decoder = Decoder(encoding, max_size=len(TEXT) - 1)
    with pytest.raises(DecompressionLimitError):
        decoder.decompress(data)
        decoder.finish()


# -- decode_response (plain bodies for hooks) ----------------------------------------------

DECODE_RESPONSE_CASES = [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("br", brotli.compress),
    ("zstd", zstandard.ZstdCompressor().compress),
]


@pytest.mark.parametrize(("coding", "encode"), DECODE_RESPONSE_CASES)
def test_decode_response_fixes_the_head_and_decodes(coding: str, encode: object) -> None:
    """An encoded response: Content-Encoding, Content-Length and Accept-Ranges go, the
    ETag turns weak, Vary stays; the decoder gives the plain body back chunk by chunk."""
    assert callable(encode)
    body = encode(TEXT)
    resp = ResponseHeader(200, [
        (b"Content-Type", b"text/html"), (b"Content-Encoding", coding.upper().encode()),
        (b"Content-Length", b"%d" % len(body)), (b"Accept-Ranges", b"bytes"),
        (b"ETag", b'"abc"'), (b"Vary", b"Accept-Encoding"),
    ])  # fmt: skip
    decoder = decode_response(resp)
    assert decoder is not None
    assert resp.headers.items() == [
        (b"Content-Type", b"text/html"), (b"ETag", b'W/"abc"'), (b"Vary", b"Accept-Encoding"),
    ]  # fmt: skip
    plain = b"".join(decoder.decompress(body[i : i + 1000]) for i in range(0, len(body), 1000))
    assert plain + decoder.finish() == TEXT


@pytest.mark.parametrize(
    "encoding",
    [None, b"identity", b"gzip, br", b"compress", b"gzip, gzip"],
)
def test_decode_response_leaves_other_heads_alone(encoding: bytes | None) -> None:
    """Not encoded, identity, stacked codings or an unknown one: None, head untouched."""
    fields = [(b"Content-Length", b"10"), (b"ETag", b'"x"')]
    if encoding is not None:
        fields.append((b"Content-Encoding", encoding))
    resp = ResponseHeader(200, list(fields))
    assert decode_response(resp) is None
    assert resp.headers.items() == fields


@pytest.mark.parametrize(("status", "method"), [(206, "GET"), (304, "GET"), (204, "GET"),
                                                 (200, "HEAD")])  # fmt: skip
def test_decode_response_leaves_bodiless_and_partial_answers_alone(
    status: int, method: str
) -> None:
    """A 206 (its range is of the encoded bytes), a 304, a 204 or a HEAD answer: None."""
    fields = [(b"Content-Encoding", b"gzip"), (b"Content-Length", b"10")]
    resp = ResponseHeader(status, list(fields))
    assert decode_response(resp, request_method=method) is None
    assert resp.headers.items() == fields


def test_decode_response_is_bounded() -> None:
    """A decompression bomb stops at max_size with DecompressionLimitError."""
    resp = ResponseHeader(200, [(b"Content-Encoding", b"gzip")])
    decoder = decode_response(resp, max_size=1000)
    assert decoder is not None
    with pytest.raises(DecompressionLimitError):
        decoder.decompress(gzip.compress(b"\0" * 10_000_000))
