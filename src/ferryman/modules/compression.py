"""Response compression (gzip, brotli, zstd), sans-IO.

The rules are pure functions of header values: which coding a request accepts
(:func:`negotiate`, RFC 9110 §12.5.3), whether a response should be compressed at all
(:func:`should_compress`), and the header fix-ups a compressed response needs
(:func:`apply_response_headers`). The codecs are small streaming objects with one API:
an :class:`Encoder` takes body chunks and returns compressed pieces (``compress``,
``flush``, ``finish``); a :class:`Decoder` undoes any of the codings an upstream may send,
with a limit on its output so that a small compressed body cannot expand without bound.
Neither ever holds a whole body: their state is the codec's window and a bounded buffer.

Defaults (:class:`CompressionConfig`) are chosen for a proxy, where the CPU spent per
response matters more than the last percent of ratio: gzip level 5 (a step under zlib's
default 6: nearly its ratio for less CPU), brotli quality 4 with a 256 KiB window, zstd
level 3 (zstd's default). Bodies under 1 KiB are sent as they are: with its head such a
response fits in one TCP segment (MSS ~1460) whether compressed or not, so compressing it
saves no round trip and costs a codec set-up (zlib alone allocates ~256 KiB of state).
"""

from __future__ import annotations

import abc
import zlib
from dataclasses import dataclass, field
from typing import Final

import brotli
import zstandard

from ferryman.protocols.headers import Headers, ResponseHeader

__all__ = [
    "ALGORITHMS",
    "BrotliEncoder",
    "DECODABLE",
    "CompressionConfig",
    "DecodeError",
    "Decoder",
    "DecompressionLimitError",
    "DEFAULT_CONTENT_TYPES",
    "DEFAULT_EXCLUDED_TYPES",
    "Encoder",
    "GzipEncoder",
    "ZstdEncoder",
    "add_vary_accept_encoding",
    "apply_response_headers",
    "decode_response",
    "media_type_matches",
    "negotiate",
    "new_encoder",
    "should_compress",
]

#: The content codings this module can produce, in the default server preference order.
ALGORITHMS: Final[tuple[str, ...]] = ("br", "zstd", "gzip")

#: Media types compressed by default. ``type/*`` matches any subtype, ``*/*+suffix`` (or
#: ``type/*+suffix``) any structured-syntax suffix (RFC 6838 §4.2.8).
DEFAULT_CONTENT_TYPES: Final[tuple[str, ...]] = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/ecmascript",
    "application/x-javascript",
    "application/xml",
    "*/*+xml",  # application/atom+xml, application/rss+xml, image/svg+xml, ...
    "application/wasm",
    "application/manifest+json",
    "application/x-ndjson",
    "application/graphql-response+json",
    "application/vnd.api+json",
    "application/x-www-form-urlencoded",
    "font/ttf",
    "font/otf",
    "application/vnd.ms-fontobject",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
)
#: Media types never compressed even when a pattern above matches them. Server-sent
#: events are delivered event by event; compressing them needs a flush per event (see
#: :meth:`Encoder.flush`), which a proxy cannot do without knowing the event framing.
DEFAULT_EXCLUDED_TYPES: Final[tuple[str, ...]] = ("text/event-stream",)

#: Statuses whose responses are never compressed: no body (1xx, 204, 304) or a part of a
#: representation whose byte ranges refer to the uncompressed one (206).
_NO_COMPRESS_STATUSES: Final = frozenset({204, 206, 304})

_LEVEL_RANGES: Final[dict[str, tuple[int, int]]] = {
    "gzip": (1, 9),
    "br": (0, 11),
    "zstd": (1, 19),  # 19 keeps the window at 8 MiB, RFC 9659's limit for the coding
}


def _default_levels() -> dict[str, int]:
    return {"gzip": 5, "br": 4, "zstd": 3}


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """What to compress and how.

    Attributes:
        algorithms: the codings offered, in server preference order (used among codings
            the client gives the same q-value).
        levels: the level per coding: gzip 1-9, brotli quality 0-11, zstd 1-19.
        brotli_window: brotli's ``lgwin`` (window of 2**lgwin bytes, 10-24); 18 (256 KiB)
            bounds the encoder's memory per stream, where brotli's default 22 takes 4 MiB.
        content_types: media-type patterns compressed (see :func:`media_type_matches`).
        excluded_types: media-type patterns never compressed, checked first.
        min_size: a response whose ``Content-Length`` is below this is sent as is; one
            without ``Content-Length`` (chunked, close-delimited) is compressed.
    """

    algorithms: tuple[str, ...] = ALGORITHMS
    levels: dict[str, int] = field(default_factory=_default_levels)
    brotli_window: int = 18
    content_types: tuple[str, ...] = DEFAULT_CONTENT_TYPES
    excluded_types: tuple[str, ...] = DEFAULT_EXCLUDED_TYPES
    min_size: int = 1024

    def __post_init__(self) -> None:
        for name in self.algorithms:
            if name not in _LEVEL_RANGES:
                raise ValueError(f"unknown compression algorithm {name!r}")
        for name, level in self.levels.items():
            bounds = _LEVEL_RANGES.get(name)
            if bounds is None:
                raise ValueError(f"unknown compression algorithm {name!r}")
            if not bounds[0] <= level <= bounds[1]:
                raise ValueError(
                    f"{name} level {level} out of range {bounds[0]}-{bounds[1]}"
                )
        if not 10 <= self.brotli_window <= 24:
            raise ValueError(f"brotli_window {self.brotli_window} out of range 10-24")
        if self.min_size < 0:
            raise ValueError("min_size must not be negative")

    def level(self, encoding: str) -> int:
        """The configured level of ``encoding`` (its default when not configured)."""
        return self.levels.get(encoding, _default_levels()[encoding])


# -- Accept-Encoding (RFC 9110 §12.5.3) ---------------------------------------------------

#: Codings known under another name (RFC 9110 §8.4.1.3: x-gzip is gzip).
_ALIASES: Final[dict[str, str]] = {"x-gzip": "gzip"}


def _qvalue(text: str) -> int | None:
    """A qvalue (RFC 9110 §12.4.2) in thousandths, or None when malformed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]  # quoted form: not in the grammar, but harmless to accept
    whole, dot, frac = text.partition(".")
    if whole not in ("0", "1") or len(frac) > 3 or (dot and frac and not frac.isdigit()):
        return None
    value = int(whole) * 1000 + (int(frac.ljust(3, "0")) if frac else 0)
    return value if value <= 1000 else None


def _parse_accept_encoding(values: list[bytes]) -> dict[str, int]:
    """Coding (lowercase) → q in thousandths; the first element naming a coding counts.

    An element whose q-value is malformed is ignored, as if absent: for a coding that
    means not acceptable (unless ``*`` allows it), for ``identity`` acceptable, the
    conservative reading either way.
    """
    accepted: dict[str, int] = {}
    for raw in values:
        for element in raw.decode("latin-1").split(","):
            coding, _, params = element.partition(";")
            coding = coding.strip().lower()
            if not coding or coding in accepted:
                continue
            q: int | None = 1000
            for param in params.split(";"):
                name, eq, value = param.partition("=")
                if name.strip().lower() == "q":
                    q = _qvalue(value) if eq else None
                    break
            if q is not None:
                accepted[_ALIASES.get(coding, coding)] = q
    return accepted


def negotiate(
    accept_encoding_values: list[bytes], available: tuple[str, ...] = ALGORITHMS
) -> str | None:
    """The coding to send for a request's ``Accept-Encoding`` field lines, or None.

    ``available`` lists the codings the server can produce in its order of preference.
    The coding with the highest q-value wins; among equal q-values the server's order
    decides. ``q=0`` means not acceptable; ``*`` gives its q-value to every coding not
    named. None (send the response as is) when no field line was sent (clients that send
    none rarely decode anything), when nothing available is acceptable, or when the client
    names ``identity`` with a q-value higher than every acceptable coding's.
    """
    if not accept_encoding_values:
        return None
    accepted = _parse_accept_encoding(accept_encoding_values)
    star = accepted.get("*", 0)
    best: str | None = None
    best_q = 0
    for coding in available:
        q = accepted.get(coding, star)
        if q > best_q:
            best, best_q = coding, q
    if best is not None and accepted.get("identity", -1) > best_q:
        return None
    return best


# -- should a response be compressed -------------------------------------------------------


def media_type_matches(media_type: str, pattern: str) -> bool:
    """Whether ``media_type`` (``type/subtype``, lowercase) matches ``pattern``.

    Patterns: ``*/*`` (anything), ``type/*``, ``type/subtype``, and the suffix forms
    ``type/*+suffix`` and ``*/*+suffix`` (also written ``*+suffix``).
    """
    if pattern.startswith("*+"):
        pattern = "*/" + pattern
    ptype, _, psub = pattern.partition("/")
    mtype, _, msub = media_type.partition("/")
    if ptype != "*" and ptype != mtype:
        return False
    if psub == "*":
        return True
    if psub.startswith("*+"):
        return msub.endswith(psub[1:])
    return psub == msub


def _media_type(value: bytes) -> str:
    """The media type of a Content-Type value, lowercase, without parameters."""
    return value.decode("latin-1").partition(";")[0].strip().lower()


def _tokens(values: list[bytes]) -> list[str]:
    """The comma-separated items of field lines, stripped and lowercase, empty ones out."""
    out = []
    for raw in values:
        for item in raw.decode("latin-1").split(","):
            item = item.strip().lower()
            if item:
                out.append(item)
    return out


def _headers_of(headers: Headers | ResponseHeader) -> Headers:
    return headers.headers if isinstance(headers, ResponseHeader) else headers


def should_compress(
    status: int,
    request_method: str,
    headers: Headers | ResponseHeader,
    config: CompressionConfig,
) -> bool:
    """Whether a response (``status``, its ``headers``) to ``request_method`` may be compressed.

    Not for HEAD or CONNECT, 1xx, 204, 206 or 304; not when the response is already
    encoded (a ``Content-Encoding`` other than ``identity``), forbids transformation
    (``Cache-Control: no-transform``, RFC 9111 §5.2.2.6), has no ``Content-Type`` or one
    not in ``config.content_types`` (or in ``config.excluded_types``), or declares a
    ``Content-Length`` below ``config.min_size`` (or a malformed one).
    """
    if status < 200 or status in _NO_COMPRESS_STATUSES:
        return False
    method = request_method.upper()
    if method == "HEAD" or method == "CONNECT":
        return False
    h = _headers_of(headers)
    if any(coding != "identity" for coding in _tokens(h.get_all(b"content-encoding"))):
        return False
    for directive in _tokens(h.get_all(b"cache-control")):
        if directive == "no-transform":
            return False
    content_type = h.get(b"content-type")
    if content_type is None:
        return False
    media_type = _media_type(content_type)
    if any(media_type_matches(media_type, p) for p in config.excluded_types):
        return False
    if not any(media_type_matches(media_type, p) for p in config.content_types):
        return False
    lengths = h.get_all(b"content-length")
    if lengths:
        values = {v.strip() for v in b",".join(lengths).split(b",")}
        if len(values) != 1:
            return False
        value = values.pop()
        if not value.isdigit() or int(value) < config.min_size:
            return False
    return True


# -- header fix-ups ------------------------------------------------------------------------


def add_vary_accept_encoding(headers: Headers | ResponseHeader) -> None:
    """Add ``Accept-Encoding`` to ``Vary`` unless listed already or ``Vary`` is ``*``.

    Existing ``Vary`` field lines are merged into one list, in order.
    """
    h = _headers_of(headers)
    existing = h.get_all(b"vary")
    items = [
        item.strip()
        for raw in existing
        for item in raw.decode("latin-1").split(",")
        if item.strip()
    ]
    lowered = {item.lower() for item in items}
    if "*" in lowered or "accept-encoding" in lowered:
        return
    items.append("Accept-Encoding")
    h.set(b"Vary", ", ".join(items))


def apply_response_headers(headers: Headers | ResponseHeader, encoding: str | None) -> None:
    """Fix up a response's headers for a body encoded with ``encoding`` (as nginx does).

    Sets ``Content-Encoding``; removes ``Content-Length`` (the new length is unknown until
    the end, so the body goes chunked) and ``Accept-Ranges`` (ranges of the encoded body
    are not served); makes a strong ``ETag`` weak (``W/"…"``: the encoded bytes differ,
    but the representation is semantically the same) and drops a malformed one; adds
    ``Accept-Encoding`` to ``Vary``. With ``encoding`` None (a compressible response sent
    as is because the client accepts no coding) only ``Vary`` is touched, so that caches
    keep the two forms apart.
    """
    h = _headers_of(headers)
    add_vary_accept_encoding(h)
    if encoding is None:
        return
    h.set(b"Content-Encoding", encoding)
    h.remove(b"content-length")
    h.remove(b"accept-ranges")
    _weaken_etag(h)


def _weaken_etag(h: Headers) -> None:
    """A strong ETag becomes weak (the bytes change, the representation does not); a
    malformed one is dropped."""
    etag = h.get(b"etag")
    if etag is not None:
        etag = etag.strip()
        if etag.startswith(b'"'):
            h.set(b"ETag", b"W/" + etag)
        elif not etag.startswith(b"W/"):
            h.remove(b"etag")


# -- encoders ------------------------------------------------------------------------------


class Encoder(abc.ABC):
    """A streaming compressor: feed body chunks, send what comes back.

    ``compress`` may return ``b""`` while the codec gathers input; ``flush`` returns
    everything given so far in decodable form (costs a little ratio: call it only where a
    streamed response needs timely delivery); ``finish`` ends the stream. An encoder is
    not used after ``finish``. Memory is the codec's window and state, never the body.
    """

    __slots__ = ("encoding", "_done")

    #: the content-coding name, for ``Content-Encoding``
    encoding: str

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._done = False

    @abc.abstractmethod
    def compress(self, chunk: bytes) -> bytes:
        """Compressed bytes for ``chunk`` (possibly empty while buffered)."""

    @abc.abstractmethod
    def flush(self) -> bytes:
        """Everything buffered, so the client can decode all the input given so far."""

    @abc.abstractmethod
    def finish(self) -> bytes:
        """The end of the compressed stream."""

    def _check(self) -> None:
        if self._done:
            raise ValueError(f"{self.encoding} encoder used after finish()")


class GzipEncoder(Encoder):
    """gzip (RFC 1952) with zlib."""

    __slots__ = ("_z",)

    def __init__(self, level: int = 6) -> None:
        super().__init__("gzip")
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def compress(self, chunk: bytes) -> bytes:
        """Compressed bytes for ``chunk`` (possibly empty while buffered)."""
        self._check()
        return self._z.compress(chunk) if chunk else b""

    def flush(self) -> bytes:
        """A sync flush: everything so far, byte-aligned."""
        self._check()
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        """The last block and the gzip trailer."""
        self._check()
        self._done = True
        return self._z.flush(zlib.Z_FINISH)


class BrotliEncoder(Encoder):
    """brotli (RFC 7932) with the ``brotli`` package."""

    __slots__ = ("_b",)

    def __init__(self, quality: int = 4, lgwin: int = 18) -> None:
        super().__init__("br")
        self._b = brotli.Compressor(quality=quality, lgwin=lgwin)

    def compress(self, chunk: bytes) -> bytes:
        """Compressed bytes for ``chunk`` (possibly empty while buffered)."""
        self._check()
        return self._b.process(chunk) if chunk else b""

    def flush(self) -> bytes:
        """Everything so far (an empty metadata block aligns the stream)."""
        self._check()
        return self._b.flush()

    def finish(self) -> bytes:
        """The last meta-block."""
        self._check()
        self._done = True
        return self._b.finish()


class ZstdEncoder(Encoder):
    """zstd (RFC 8878) with the ``zstandard`` package, one frame per response."""

    __slots__ = ("_z",)

    def __init__(self, level: int = 3) -> None:
        super().__init__("zstd")
        self._z = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, chunk: bytes) -> bytes:
        """Compressed bytes for ``chunk`` (possibly empty while buffered)."""
        self._check()
        return self._z.compress(chunk) if chunk else b""

    def flush(self) -> bytes:
        """Ends the current block, so everything so far can be decoded."""
        self._check()
        return self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        """Ends the frame."""
        self._check()
        self._done = True
        return self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


def new_encoder(encoding: str, config: CompressionConfig | None = None) -> Encoder:
    """An encoder for ``encoding`` (``gzip``, ``br`` or ``zstd``) at ``config``'s level."""
    config = config if config is not None else CompressionConfig()
    if encoding == "gzip":
        return GzipEncoder(config.level("gzip"))
    if encoding == "br":
        return BrotliEncoder(config.level("br"), config.brotli_window)
    if encoding == "zstd":
        return ZstdEncoder(config.level("zstd"))
    raise ValueError(f"unknown content coding {encoding!r}")


# -- decoders ------------------------------------------------------------------------------


class DecodeError(ValueError):
    """An encoded body is malformed or truncated, or its coding is not supported."""


class DecompressionLimitError(DecodeError):
    """A decoded body grew past the decoder's ``max_size`` (a decompression bomb?)."""

    def __init__(self, max_size: int) -> None:
        super().__init__(f"decoded body exceeds {max_size} bytes")
        self.max_size = max_size


#: zstd's largest expansion per input byte, about: a 3-byte block header (+1 byte of an RLE
#: block) yields a block of at most 128 KiB. Input is fed in slices sized from it.
_ZSTD_BLOCK: Final = 128 * 1024
#: RFC 9659: a zstd content coding's window is at most 8 MiB; larger frames are refused.
_ZSTD_MAX_WINDOW: Final = 8 * 1024 * 1024


class Decoder:
    """A streaming decompressor for ``gzip`` (also ``x-gzip``), ``deflate``, ``br``, ``zstd``.

    ``decompress`` returns the decoded bytes of a chunk; ``finish`` checks that the stream
    was complete (raises :class:`DecodeError` if not; an empty body is complete). Over the
    whole body at most ``max_size`` bytes are produced: one more raises
    :class:`DecompressionLimitError`, and no single call allocates much beyond the limit
    (each codec is driven with a bounded output). ``deflate`` accepts the zlib format
    (RFC 9110 §8.4.1.2) and, as browsers do, raw deflate. Concatenated gzip members and
    zstd frames are decoded in turn; bytes after the end of a gzip or deflate stream that
    do not start another member are ignored, as gzip(1) and browsers do.
    """

    __slots__ = (
        "encoding", "max_size", "_total", "_fed", "_z", "_br", "_zstd", "_head", "_ended",
        "_open",
    )

    def __init__(self, encoding: str, max_size: int = 64 * 1024 * 1024) -> None:
        name = encoding.strip().lower()
        name = _ALIASES.get(name, name)
        self.encoding = name
        self.max_size = max_size
        self._total = 0
        self._fed = False  # whether any input arrived
        self._z: zlib._Decompress | None = None
        self._br: brotli.Decompressor | None = None
        self._zstd: zstandard.ZstdDecompressionObj | None = None
        self._head = b""  # deflate: the first bytes until the format is known; gzip:
        # bytes after a member, until they show whether another member starts
        self._ended = False  # past the end of the stream: the rest is ignored
        self._open = False  # zstd: the current frame has had input and not ended
        if name == "gzip":
            self._z = zlib.decompressobj(31)
        elif name == "br":
            self._br = brotli.Decompressor()
        elif name == "zstd":
            self._zstd = self._zstd_frame()
        elif name != "deflate":
            raise DecodeError(f"unsupported content coding {encoding!r}")

    @staticmethod
    def _zstd_frame() -> zstandard.ZstdDecompressionObj:
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        return dctx.decompressobj()

    def _count(self, out: bytes) -> bytes:
        self._total += len(out)
        if self._total > self.max_size:
            raise DecompressionLimitError(self.max_size)
        return out

    def _room(self) -> int:
        """Output allowed before the limit is passed, plus the one byte that tells."""
        return self.max_size - self._total + 1

    def decompress(self, chunk: bytes) -> bytes:
        """The decoded bytes of ``chunk`` (possibly empty while the codec gathers input)."""
        if not chunk or self._ended:
            return b""
        self._fed = True
        try:
            if self._br is not None:
                return self._brotli(chunk)
            if self._zstd is not None:
                return self._zstd_feed(chunk)
            if self._z is None:  # deflate, format not known yet
                self._head += chunk
                if len(self._head) < 2:
                    return b""
                cmf, flg = self._head[0], self._head[1]
                zlib_format = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
                self._z = zlib.decompressobj(15 if zlib_format else -15)
                chunk, self._head = self._head, b""
            return self._zlib(chunk)
        except (zlib.error, brotli.error, zstandard.ZstdError) as exc:
            raise DecodeError(f"invalid {self.encoding} data: {exc}") from exc

    def _zlib(self, data: bytes) -> bytes:
        z = self._z
        assert z is not None
        pieces = []
        while data:
            if z.eof:  # gzip, between members
                data = self._head + data
                if len(data) < 2:
                    self._head = data
                    break
                self._head = b""
                if data[:2] != b"\x1f\x8b":
                    self._ended = True
                    break
                z = self._z = zlib.decompressobj(31)
            # room bounds the output: all input is used unless the limit is passed
            pieces.append(self._count(z.decompress(data, self._room())))
            data = z.unused_data if z.eof else b""
            if z.eof and self.encoding != "gzip":
                self._ended = True
                break
        return b"".join(pieces)

    def _brotli(self, data: bytes) -> bytes:
        b = self._br
        assert b is not None
        pieces = [self._count(b.process(data, output_buffer_limit=self._room()))]
        while not b.can_accept_more_data():
            pieces.append(self._count(b.process(b"", output_buffer_limit=self._room())))
        return b"".join(pieces)

    def _zstd_feed(self, data: bytes) -> bytes:
        z = self._zstd
        assert z is not None
        pieces = []
        view = memoryview(data)
        while view:
            # about room bytes of output at most per call: 3 input bytes per 128 KiB block
            step = max(3, 3 * (self._room() // _ZSTD_BLOCK))
            pieces.append(self._count(z.decompress(view[:step])))
            self._open = True
            view = view[step:]
            if z.eof:  # another frame may follow
                rest = z.unused_data
                z = self._zstd = self._zstd_frame()
                self._open = False
                if rest:
                    view = memoryview(rest + bytes(view))
        return b"".join(pieces)

    def finish(self) -> bytes:
        """Check the stream is complete; raises :class:`DecodeError` when cut short."""
        if not self._fed or self._ended:
            return b""
        if self._br is not None:
            complete = self._br.is_finished()
        elif self._zstd is not None:
            complete = not self._open  # the last frame ended, no other began
        else:
            complete = self._z is not None and self._z.eof
        if not complete:
            raise DecodeError(f"truncated {self.encoding} data")
        return b""


#: Content codings :class:`Decoder` reads.
DECODABLE: Final[tuple[str, ...]] = ("gzip", "x-gzip", "deflate", "br", "zstd")


def decode_response(
    headers: Headers | ResponseHeader,
    max_size: int = 64 * 1024 * 1024,
    request_method: str = "GET",
) -> Decoder | None:
    """For a hook that needs a response's body as plain bytes (in
    ``response_body_filter``): when the response is encoded with one coding
    :class:`Decoder` reads, fix its head for the decoded body and return the decoder to
    feed the body through; otherwise (not encoded, ``identity``, several codings, or one
    this module does not know; a 1xx, 204, 206 or 304 response, or the answer to a HEAD
    request ``request_method``) None, with the head untouched.

    The head loses ``Content-Encoding``, ``Content-Length`` (the body goes chunked) and
    ``Accept-Ranges``; a strong ``ETag`` becomes weak (the bytes differ); ``Vary`` keeps
    ``Accept-Encoding``, as the response still depended on it. Decoding stops with
    :class:`DecompressionLimitError` past ``max_size`` bytes (a decompression bomb).
    """
    if request_method == "HEAD":
        return None  # (no body)
    if isinstance(headers, ResponseHeader) and (
        headers.status < 200 or headers.status in (204, 206, 304)
    ):
        return None  # (no body, or a range of the encoded bytes: nothing to decode whole)
    h = _headers_of(headers)
    codings = [c for c in _tokens(h.get_all(b"content-encoding")) if c != "identity"]
    if len(codings) != 1 or codings[0] not in DECODABLE:
        return None
    decoder = Decoder(codings[0], max_size)
    h.remove(b"content-encoding")
    h.remove(b"content-length")
    h.remove(b"accept-ranges")
    _weaken_etag(h)
    return decoder
