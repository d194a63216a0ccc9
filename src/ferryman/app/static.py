"""Static files: answer requests from a directory, the way nginx's static module does.

:class:`StaticFiles` is a plain object a ``request_filter`` hands the session to::

    files = StaticFiles("/srv/www", max_age=3600)

    class Site(ferryman.ProxyHttp):
        def request_filter(self, session, ctx):
            if session.req_header.path.startswith("/assets/"):
                files.serve(session)
                return True
            return False

What it does, per request:

* **Methods**: GET and HEAD; anything else is ``405`` with ``Allow: GET, HEAD``.
* **Paths**: the request path (its query ignored) is percent-decoded (a bad escape or an
  encoded NUL is ``400``), its ``.``/``..`` segments are removed, and it is looked up under
  the root. A path that climbs above the root is ``404``, and so is one whose real path
  (symbolic links resolved) lies outside the root's real path. Hidden files are served;
  a backslash is an ordinary character.
* **Directories**: without a trailing ``/`` they are redirected (``301``, query kept) to the
  same path plus ``/``; with it, the first existing ``index`` file is served, else ``403``
  (no listings).
* **Errors**: missing (or not a regular file) is ``404``, unreadable is ``403``.
* **Headers**: ``Content-Type`` (:mod:`mimetypes`; ``; charset=utf-8`` for text),
  ``Content-Length``, ``Last-Modified``, nginx's ``ETag`` (``"<mtime hex>-<size hex>"``),
  ``Accept-Ranges: bytes``, ``Date``, and ``Cache-Control: max-age=N`` if configured.
* **Conditional requests** (RFC 9110 §13): ``If-Match`` / ``If-Unmodified-Since`` (``412``),
  ``If-None-Match`` / ``If-Modified-Since`` (``304``), ``If-Range``.
* **Ranges** (RFC 9110 §14): one range is a ``206`` with ``Content-Range``; several are a
  ``206 multipart/byteranges``; none satisfiable is ``416``; a malformed ``Range`` is ignored.

Bodies come from one open file descriptor (status and headers from ``fstat`` of that same
descriptor): bodies up to 64 KiB are read and sent in one write, larger ones are streamed
with :meth:`Session.send_body_from`, as fast as the client reads. Reads are ordinary
blocking reads on the event loop's thread (like nginx without ``aio``): fast from the page
cache, slower from a cold disk.

The header parsing and path handling are pure functions (:func:`parse_range`,
:func:`decode_path`, :func:`remove_dot_segments`, :func:`resolve_path`, :func:`etag_for`,
:func:`http_date`, :func:`parse_http_date`, :func:`precondition_status`,
:func:`if_range_matches`), usable and testable on their own.
"""

from __future__ import annotations

import errno
import functools
import mimetypes
import os
import stat
import time
from collections.abc import Callable, Sequence
from email.utils import formatdate, mktime_tz, parsedate_tz
from typing import TYPE_CHECKING, Final
from urllib.parse import quote_from_bytes

from ferryman.modules.compression import (
    CompressionConfig,
    Encoder,
    apply_response_headers,
    negotiate,
    new_encoder,
    should_compress,
)
from ferryman.protocols.headers import Headers, ResponseHeader

if TYPE_CHECKING:
    from ferryman.proxy.session import Session

__all__ = [
    "SMALL_BODY",
    "MAX_RANGES",
    "StaticFiles",
    "content_type_for",
    "decode_path",
    "etag_for",
    "http_date",
    "if_range_matches",
    "parse_http_date",
    "parse_range",
    "precondition_status",
    "remove_dot_segments",
    "resolve_path",
]

#: Bodies up to this size are read whole and sent with the head in one write.
SMALL_BODY: Final = 64 * 1024

#: A Range header with more ranges than this is ignored (the whole file is sent).
MAX_RANGES: Final = 64

_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_ALLOW: Final = (b"Allow", b"GET, HEAD")
_PART_HEAD: Final = b"\r\n--%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\n"
_NOT_FOUND_ERRNOS: Final = frozenset(
    (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.ENXIO, errno.ENODEV)
)
_CHARSET_TYPES: Final = frozenset((b"application/javascript", b"application/json"))
_ENCODING_TYPES: Final = {
    "gzip": b"application/gzip",
    "bzip2": b"application/x-bzip2",
    "xz": b"application/x-xz",
    "compress": b"application/x-compress",
}
_TYPE_CACHE_MAX: Final = 1024
_type_cache: dict[str, bytes] = {}


# --------------------------------------------------------------------------------------
# pure helpers


def decode_path(url_path: bytes) -> bytes | None:
    """Percent-decode a URL path; ``None`` if it is invalid.

    Invalid means: not starting with ``/``, a ``%`` not followed by two hex digits, or a
    NUL byte (encoded or not). The result is raw bytes (file names are bytes on POSIX).
    """
    if not url_path.startswith(b"/"):
        return None
    if b"%" in url_path:
        parts = url_path.split(b"%")
        out = [parts[0]]
        for piece in parts[1:]:
            if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
                return None
            out.append(bytes((int(piece[:2], 16),)))
            out.append(piece[2:])
        url_path = b"".join(out)
    if b"\0" in url_path:
        return None
    return url_path


def remove_dot_segments(path: bytes) -> bytes | None:
    """Normalise a decoded absolute path: drop empty and ``.`` segments, apply ``..``.

    Returns the path with one ``/`` between segments, ending in ``/`` when ``path`` ends in
    ``/``, ``/.`` or ``/..`` (it then names a directory), or ``None`` when a ``..`` would
    climb above ``/``.
    """
    if b"/." not in path and b"//" not in path:
        return path  # nothing to do: the common case
    segments: list[bytes] = []
    parts = path.split(b"/")
    for seg in parts:
        if seg == b"" or seg == b".":
            continue
        if seg == b"..":
            if not segments:
                return None
            segments.pop()
        else:
            segments.append(seg)
    last = parts[-1]
    trailing = last == b"" or last == b"." or last == b".."
    out = b"/" + b"/".join(segments)
    if trailing and segments:
        out += b"/"
    return out


def resolve_path(root: str, url_path: bytes) -> str | None:
    """The file-system path for a normalised URL path, or ``None`` if it leads outside.

    ``root`` must be a real path (``os.path.realpath``); ``url_path`` a path as returned by
    :func:`remove_dot_segments`. The components below ``root`` are examined (``lstat``):
    without a symbolic link among them the path is ``root`` + ``url_path`` (no trailing
    ``/``); with one, the real path (links resolved) is returned if it lies within
    ``root``, else ``None``. The file need not exist.
    """
    base = root.rstrip(os.sep)
    return _below(root, base + os.fsdecode(url_path).rstrip("/"), len(base))


def _below(root: str, path: str, start: int) -> str | None:
    """``path`` if no component of it from index ``start`` on is a symbolic link, else its
    real path when that lies within ``root`` (else ``None``)."""
    end = len(path)
    while start < end:
        slash = path.find("/", start + 1)
        if slash < 0:
            slash = end
        try:
            mode = os.lstat(path[:slash]).st_mode
        except OSError:
            return path  # missing or unreadable: opening it gives the 404 / 403
        if stat.S_ISLNK(mode):
            return _contained(root, path)
        start = slash
    return path or os.sep


def etag_for(st: os.stat_result) -> bytes:
    """nginx's strong entity tag for a file: ``"<mtime hex>-<size hex>"``."""
    return b'"%x-%x"' % (int(st.st_mtime), st.st_size)


@functools.lru_cache(maxsize=256)
def http_date(timestamp: int) -> bytes:
    """An IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``) for a Unix time in seconds."""
    return formatdate(timestamp, usegmt=True).encode()


def parse_http_date(value: bytes) -> int | None:
    """Parse an HTTP-date (any of the three RFC 9110 formats) to a Unix time; ``None`` if
    it is not a valid date."""
    try:
        parsed = parsedate_tz(value.decode("latin-1"))
    except (ValueError, IndexError, TypeError):  # pragma: no cover - defensive
        return None
    if parsed is None:
        return None
    year, month, day, hour, minute, second = parsed[:6]
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second <= 60):
        return None
    try:
        return int(mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def content_type_for(name: str) -> bytes:
    """The Content-Type for a file name: from :mod:`mimetypes`, with ``; charset=utf-8``
    for text, JavaScript and JSON; ``application/octet-stream`` when unknown."""
    dot = name.rfind(".")
    suffix = name[dot:] if dot > name.rfind("/") + 1 else ""  # ".bashrc" has no suffix
    cached = _type_cache.get(suffix)
    if cached is not None:
        return cached
    guessed, encoding = mimetypes.guess_type("x" + suffix) if suffix else (None, None)
    if encoding is not None:
        ctype = _ENCODING_TYPES.get(encoding, b"application/octet-stream")
    elif guessed is None:
        ctype = b"application/octet-stream"
    else:
        ctype = guessed.encode("latin-1")
        if ctype.startswith(b"text/") or ctype in _CHARSET_TYPES:
            ctype += b"; charset=utf-8"
    if len(_type_cache) < _TYPE_CACHE_MAX:
        _type_cache[suffix] = ctype
    return ctype


def parse_range(value: bytes, size: int) -> list[tuple[int, int]] | None:
    """Parse a ``Range`` header value for a representation of ``size`` bytes.

    Returns ``None`` when the header is to be ignored (not ``bytes=``, malformed, or more
    than :data:`MAX_RANGES` ranges): the whole file is sent with 200. Otherwise the
    satisfiable ranges as half-open ``(start, stop)`` byte offsets, in the order asked; an
    empty list means none is satisfiable (416). Overlapping ranges are coalesced into
    ascending order (RFC 9110 §14.3 allows it), so a response is never larger than twice
    the file.
    """
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    ranges: list[tuple[int, int]] = []
    count = 0
    for item in spec.split(b","):
        item = item.strip(b" \t")
        if not item:
            continue  # empty list elements are allowed
        count += 1
        if count > MAX_RANGES:
            return None
        first, dash, last = item.partition(b"-")
        if not dash:
            return None
        if first:
            if not first.isdigit() or (last and not last.isdigit()):
                return None
            start = _position(first)
            if last:
                end = _position(last)
                if end < start:
                    return None
                stop = min(end + 1, size)
            else:
                stop = size
            if start < size:
                ranges.append((start, stop))
        else:
            if not last.isdigit():
                return None
            suffix = _position(last)
            if suffix > 0 and size > 0:
                ranges.append((max(size - suffix, 0), size))
    if count == 0:
        return None
    if len(ranges) > 1:
        ordered = sorted(ranges)
        if any(ordered[i][1] > ordered[i + 1][0] for i in range(len(ordered) - 1)):
            merged = [ordered[0]]
            for start, stop in ordered[1:]:
                prev_start, prev_stop = merged[-1]
                if start <= prev_stop:
                    merged[-1] = (prev_start, max(prev_stop, stop))
                else:
                    merged.append((start, stop))
            ranges = merged
    return ranges


def _position(digits: bytes) -> int:
    # a byte position beyond any file: past int()'s digit limit, and no slower to compare
    return int(digits) if len(digits) <= 18 else 10**18


def _etag_list(value: bytes) -> list[bytes]:
    # Entity tags may contain commas, but our own never do: a foreign tag split at a comma
    # only yields pieces that cannot equal ours.
    return [t.strip(b" \t") for t in value.split(b",")]


def _opaque(tag: bytes) -> bytes:
    return tag[2:] if tag.startswith(b"W/") else tag


def precondition_status(headers: Headers, etag: bytes, mtime: int) -> int:
    """Evaluate the request preconditions of RFC 9110 §13.2.2 for a GET or HEAD.

    ``etag`` is the file's (strong) entity tag, ``mtime`` its modification time in whole
    seconds. Returns 412 (``If-Match`` or ``If-Unmodified-Since`` failed), 304
    (``If-None-Match`` matched, weak comparison, or — without ``If-None-Match`` —
    ``If-Modified-Since`` is not older than the file), or 200 to go on. Invalid dates are
    ignored.
    """
    if_match = headers.get_all(b"if-match")
    if if_match:
        tags = _etag_list(b",".join(if_match))
        if b"*" not in tags and etag not in tags:  # strong comparison: W/ never matches
            return 412
    else:
        since = headers.get(b"if-unmodified-since")
        if since is not None:
            date = parse_http_date(since)
            if date is not None and mtime > date:
                return 412
    if_none_match = headers.get_all(b"if-none-match")
    if if_none_match:
        tags = _etag_list(b",".join(if_none_match))
        if b"*" in tags:
            return 304
        mine = _opaque(etag)
        for tag in tags:
            if _opaque(tag) == mine:
                return 304
        return 200
    since = headers.get(b"if-modified-since")
    if since is not None:
        date = parse_http_date(since)
        if date is not None and mtime <= date:
            return 304
    return 200


def if_range_matches(value: bytes, etag: bytes, mtime: int) -> bool:
    """Whether an ``If-Range`` value still holds: an entity tag equal (strong comparison)
    to ``etag``, or an HTTP-date equal to the Last-Modified time ``mtime``."""
    value = value.strip(b" \t")
    if value.startswith(b'"') or value.startswith(b"W/"):
        return value == etag
    return parse_http_date(value) == mtime


# --------------------------------------------------------------------------------------
# body sources (Session.send_body_from)


class _File:
    """An open file descriptor that is closed exactly once, by whoever gets there first."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd = self.fd
        if fd >= 0:
            self.fd = -1
            os.close(fd)


class _FileRange:
    """Bytes ``start`` to ``stop`` of an open file, read on demand (``pread``)."""

    __slots__ = ("file", "pos", "stop")

    def __init__(self, file: _File, start: int, stop: int) -> None:
        self.file = file
        self.pos = start
        self.stop = stop

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` of the bytes left; ``b""`` at the end of the range."""
        n = min(size, self.stop - self.pos)
        if n <= 0:
            return b""
        data = os.pread(self.file.fd, n, self.pos)
        if not data:  # the file shrank under us: the promised length cannot be kept
            raise OSError(errno.EIO, "file truncated while being sent")
        self.pos += len(data)
        return data

    def close(self) -> None:
        """Close the file."""
        self.file.close()


class _Multipart:
    """A ``multipart/byteranges`` body: literal part headers and file slices, in order."""

    __slots__ = ("file", "pieces", "index", "current")

    def __init__(self, file: _File, pieces: list[bytes | tuple[int, int]]) -> None:
        self.file = file
        self.pieces = pieces
        self.index = 0
        self.current: _FileRange | None = None

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes of the body (never crossing a piece); ``b""`` at the end."""
        while True:
            current = self.current
            if current is not None:
                data = current.read(size)
                if data:
                    return data
                self.current = None
            if self.index >= len(self.pieces):
                return b""
            piece = self.pieces[self.index]
            self.index += 1
            if isinstance(piece, bytes):
                if len(piece) > size:
                    self.pieces.insert(self.index, piece[size:])
                    piece = piece[:size]
                return piece
            self.current = _FileRange(self.file, piece[0], piece[1])

    def close(self) -> None:
        """Close the file."""
        self.file.close()


class _Encoded:
    """A file range read through an encoder: what ``send_body_from`` streams when the
    client accepts a coding. ``read`` returns ``b""`` only at the end (a compressor that
    buffers is fed more of the file until it gives bytes)."""

    __slots__ = ("source", "encoder", "done")

    def __init__(self, source: _FileRange, encoder: Encoder) -> None:
        self.source = source
        self.encoder = encoder
        self.done = False

    def read(self, size: int, /) -> bytes:
        """Up to about ``size`` encoded bytes; ``b""`` at the end."""
        if self.done:
            return b""
        encoder = self.encoder
        while True:
            data = self.source.read(size)
            if not data:
                self.done = True
                return encoder.finish()
            out = encoder.compress(data)
            if out:
                return out

    def close(self) -> None:
        """Close the file."""
        self.source.close()


def _read_all(source: _FileRange | _Multipart) -> bytes:
    parts: list[bytes] = []
    while True:
        data = source.read(SMALL_BODY)
        if not data:
            return b"".join(parts)
        parts.append(data)


# --------------------------------------------------------------------------------------
# the handler

_Edit = Callable[[ResponseHeader], None] | None


class StaticFiles:
    """Serve the files under ``root`` (see the module docstring for the full behaviour).

    Args:
        root: the directory served. Request paths never resolve outside its real path.
        index: file names tried, in order, for a request naming a directory (``/dir/``).
        max_age: if set, every 200/206/304 response carries ``Cache-Control: max-age=N``.
    """

    __slots__ = ("root", "index", "max_age", "_real_root", "_cache_control", "compression")

    def __init__(
        self,
        root: str,
        index: Sequence[str] = ("index.html",),
        max_age: int | None = None,
        compression: CompressionConfig | None = None,
    ) -> None:
        self.root = root
        #: how files are compressed for clients that accept it, or None
        self.compression = compression
        self.index = tuple(index)
        self.max_age = max_age
        self._real_root = os.path.realpath(root)
        self._cache_control = b"max-age=%d" % max_age if max_age is not None else None

    def serve(self, session: Session, path: bytes | None = None, edit: _Edit = None) -> None:
        """Answer the request from the directory; always sends a complete response.

        A plain function: call it from ``request_filter`` (sync or async) and return
        ``True``. Large bodies keep streaming after it returns; the engine ends the request
        when they are done.

        Args:
            session: the request to answer.
            path: the URL path to serve, still percent-encoded and without query; default
                the request target's path (an absolute-form target's authority removed).
                Redirects (``/dir`` to ``/dir/``) always use the request target itself.
            edit: called with each response head just before it is sent (to add or change
                headers).
        """
        req = session.req_header
        method = req.raw_method
        if method != b"GET" and method != b"HEAD":
            _send_empty(session, 405, [_ALLOW], edit)
            return
        decoded = decode_path(_target_path(req.raw_path) if path is None else path)
        if decoded is None:
            _send_empty(session, 400, [], edit)
            return
        normal = remove_dot_segments(decoded)
        if normal is None:
            _send_empty(session, 404, [], edit)  # climbs above the root
            return
        fs_path = resolve_path(self._real_root, normal)
        if fs_path is None:
            _send_empty(session, 404, [], edit)  # a symbolic link leads outside the root
            return
        if normal.endswith(b"/"):
            opened = self._open_index(fs_path)
        else:
            opened = _open_file(fs_path, os.fsdecode(normal))
        if isinstance(opened, int):
            if opened == 301:
                _redirect(session, edit)
            else:
                _send_empty(session, opened, [], edit)
            return
        file = _File(opened[0])
        try:
            self._send_file(session, file, opened[1], opened[2], edit)
        except BaseException:
            file.close()
            raise

    # -- lookup -------------------------------------------------------------------------

    def _open_index(self, dir_path: str) -> tuple[int, os.stat_result, str] | int:
        """The first index file of a directory, or the status to answer with."""
        real_root = self._real_root
        for name in self.index:
            path = os.path.join(dir_path, name)
            if "/" in name or name == ".." or name == ".":  # (from the configuration)
                candidate = _contained(real_root, path)
            else:
                candidate = _below(real_root, path, len(dir_path))
            if candidate is None:
                continue  # an index symlink leading outside the root: as if missing
            opened = _open_file(candidate, name)
            if not isinstance(opened, int) or opened == 403 or opened == 500:
                return opened
        return 403 if os.path.isdir(dir_path) else 404  # no listings / "/file.txt/"

    # -- responses ----------------------------------------------------------------------

    def _send_file(
        self, session: Session, file: _File, st: os.stat_result, name: str, edit: _Edit
    ) -> None:
        req = session.req_header
        headers = req.headers
        size = st.st_size
        mtime = int(st.st_mtime)
        etag = etag_for(st)
        validators = [(b"Last-Modified", http_date(mtime)), (b"ETag", etag)]
        if self._cache_control is not None:
            validators.append((b"Cache-Control", self._cache_control))
        ctype = content_type_for(name)
        # compression: whether this file is one that is compressed (then every answer
        # about it says Vary: Accept-Encoding), and the coding this client gets for it
        compression = self.compression
        encoding: str | None = None
        if compression is not None and should_compress(
            200, "GET", Headers([(b"Content-Type", ctype), (b"Content-Length", b"%d" % size)]),
            compression,
        ):
            validators.append((b"Vary", b"Accept-Encoding"))
            encoding = negotiate(headers.get_all(b"accept-encoding"), compression.algorithms)

        status = precondition_status(headers, etag, mtime)
        if status != 200:
            file.close()
            if status == 304:  # no Content-Type / Content-Length, as nginx
                head = Headers(validators)
                if encoding is not None:
                    apply_response_headers(head, encoding)  # (the 200's ETag: weak)
                    head.remove(b"content-encoding")
                _finish_head(session, ResponseHeader(304, _with_date(head.items())), edit)
            else:
                _send_empty(session, status, [], edit)
            return

        ranges: list[tuple[int, int]] | None = None
        range_values = headers.get_all(b"range")
        if len(range_values) == 1:
            if_range = headers.get(b"if-range")
            if if_range is None or if_range_matches(if_range, etag, mtime):
                ranges = parse_range(range_values[0], size)
        if ranges is not None and not ranges:
            file.close()
            _send_empty(session, 416, [(b"Content-Range", b"bytes */%d" % size)], edit)
            return

        source: _FileRange | _Multipart | _Encoded
        encoder: Encoder | None = None
        if ranges is None:
            status = 200
            length = size
            out = [(b"Content-Type", ctype), (b"Content-Length", b"%d" % size)]
            source = whole = _FileRange(file, 0, size)
        elif len(ranges) == 1:
            status = 206
            start, stop = ranges[0]
            length = stop - start
            out = [
                (b"Content-Type", ctype),
                (b"Content-Length", b"%d" % length),
                (b"Content-Range", b"bytes %d-%d/%d" % (start, stop - 1, size)),
            ]
            source = _FileRange(file, start, stop)
        else:
            status = 206
            boundary = os.urandom(8).hex().encode()
            pieces: list[bytes | tuple[int, int]] = []
            length = 0
            for start, stop in ranges:
                part_head = _PART_HEAD % (boundary, ctype, start, stop - 1, size)
                pieces.append(part_head)
                pieces.append((start, stop))
                length += len(part_head) + stop - start
            tail = b"\r\n--%s--\r\n" % boundary
            pieces.append(tail)
            length += len(tail)
            out = [
                (b"Content-Type", b"multipart/byteranges; boundary=" + boundary),
                (b"Content-Length", b"%d" % length),
            ]
            source = _Multipart(file, pieces)
        out.append((b"Accept-Ranges", b"bytes"))
        out += validators
        if encoding is not None and ranges is None:
            # (HEAD says what GET would: Content-Encoding, no Content-Length)
            assert compression is not None
            head = Headers(out)
            apply_response_headers(head, encoding)
            out = head.items()
            encoder = new_encoder(encoding, compression)
            source = _Encoded(whole, encoder)
        resp = ResponseHeader(status, _with_date(out))

        if req.raw_method == b"HEAD":
            source.close()  # (the file, and an encoder never used)
            _finish_head(session, resp, edit)
        elif length <= SMALL_BODY and not isinstance(source, _Encoded):
            try:
                body = _read_all(source)
            except OSError:
                body = None
            file.close()
            if body is None or len(body) != length:
                _send_empty(session, 500, [], edit)  # unreadable after all (EIO, EISDIR)
                return
            if edit is not None:
                edit(resp)
            session.send_response(resp.status, body, resp.headers)  # head and body: one write
        elif length <= SMALL_BODY and encoder is not None:
            # a small file compressed whole: sent with its Content-Length, in one write
            try:
                plain = _read_all(_FileRange(file, 0, size))
            except OSError:
                plain = None
            file.close()
            if plain is None or len(plain) != size:
                _send_empty(session, 500, [], edit)
                return
            body = encoder.compress(plain) + encoder.finish()
            if edit is not None:
                edit(resp)
            session.send_response(resp.status, body, resp.headers)
        else:
            if edit is not None:
                edit(resp)
            session.send_response_header(resp)
            session.send_body_from(source)  # streams, then closes the file whatever happens


#: Characters kept as they are when a normalised path is re-encoded for a Location.
_LOCATION_SAFE = "/!$&'()*+,;=:@-._~"


def _redirect(session: Session, edit: _Edit) -> None:
    """301 to the request's path plus ``/``, query kept. The path is the normalised one
    (decoded, dot segments and repeated slashes resolved, re-encoded), as nginx does: the
    raw target could start with ``//``, which a browser reads as another host."""
    raw, question, query = session.req_header.raw_path.partition(b"?")
    decoded = decode_path(raw)
    normal = remove_dot_segments(decoded) if decoded is not None else None
    if normal is None:
        _send_empty(session, 404, [], edit)
        return
    location = quote_from_bytes(normal.rstrip(b"/"), _LOCATION_SAFE).encode("ascii") + b"/"
    _send_empty(session, 301, [(b"Location", location + question + query)], edit)


def _send_empty(
    session: Session, status: int, headers: list[tuple[bytes, bytes]], edit: _Edit
) -> None:
    """A response with an empty body (``Content-Length: 0``)."""
    headers.append((b"Content-Length", b"0"))
    _finish_head(session, ResponseHeader(status, _with_date(headers)), edit)


def _finish_head(session: Session, resp: ResponseHeader, edit: _Edit) -> None:
    """Send a head and end the response without body bytes (a 304, a HEAD answer, or a
    Content-Length: 0 response).

    ``send_response_header(..., end_of_stream=True)`` is not used: it would add
    ``Content-Length: 0`` to a 304 (and a HEAD answer), which is wrong there.
    """
    if edit is not None:
        edit(resp)
    session.send_response_header(resp)
    session.send_response_body(b"", end_of_stream=True)


class _DateCache:
    second = -1
    value = b""


def _with_date(headers: list[tuple[bytes, bytes]]) -> Headers:
    """``headers`` plus ``Date`` (formatted once per second), as a :class:`Headers`."""
    now = int(time.time())
    if _DateCache.second != now:
        _DateCache.value = formatdate(now, usegmt=True).encode()
        _DateCache.second = now
    headers.append((b"Date", _DateCache.value))
    return Headers._wrap(headers)  # (all bytes already: no per-pair conversion)


def _target_path(target: bytes) -> bytes:
    """The path of a request target, without its query (an absolute-form URL's path)."""
    path = target.partition(b"?")[0]
    if not path.startswith(b"/"):
        scheme, sep, rest = path.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            slash = rest.find(b"/")
            path = rest[slash:] if slash >= 0 else b"/"
    return path


def _contained(real_root: str, path: str) -> str | None:
    """``realpath(path)`` if it is ``real_root`` or inside it, else ``None``."""
    real = os.path.realpath(path)
    base = real_root.rstrip(os.sep)
    if real == real_root or real.startswith(base + os.sep):
        return real
    return None


def _open_file(path: str, name: str) -> tuple[int, os.stat_result, str] | int:
    """Open a regular file: ``(fd, fstat, name)``, or the status to answer with: 301 (a
    directory), 403 (no permission), 404 (missing, or not a regular file), 500.

    ``O_NONBLOCK``: opening a FIFO must not wait for a writer.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        return _status_for_errno(exc.errno)
    try:
        st = os.fstat(fd)
    except OSError as exc:  # pragma: no cover - fstat of an open fd does not fail
        os.close(fd)
        return _status_for_errno(exc.errno)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return fd, st, name
    os.close(fd)
    return 301 if stat.S_ISDIR(mode) else 404


def _status_for_errno(err: int | None) -> int:
    if err in _NOT_FOUND_ERRNOS:
        return 404
    if err == errno.EACCES or err == errno.EPERM:
        return 403
    return 500
