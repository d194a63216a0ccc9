"""ferryman.app.static.StaticFiles: a directory served by a proxy's request_filter.

A proxy whose ``request_filter`` calls ``StaticFiles.serve`` and returns True runs in a
harness, in both engine modes (plain ``def`` hooks: sync mode; ``async def``: task mode).
The site is built in a temporary directory; the clients are http.client, raw sockets and
curl, all over 127.0.0.1. The pure helpers (range parsing, paths, preconditions) are also
tested on their own at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from ferryman import Headers, ProxyHttp, ResponseHeader, Session
from ferryman.app.static import (
    StaticFiles,
    content_type_for,
    decode_path,
    etag_for,
    http_date,
    if_range_matches,
    parse_http_date,
    parse_range,
    precondition_status,
    remove_dot_segments,
    resolve_path,
)
from harness import ProxyHarness

IO_TIMEOUT = 10.0
MTIME = 1_700_000_000  # every file's modification time: Tue, 14 Nov 2023 22:13:20 GMT
LAST_MODIFIED = formatdate(MTIME, usegmt=True)
SECRET = b"TOPSECRET"

HELLO = b"hello, world\n"
PAGE = b"<!doctype html><title>t</title><p>page</p>\n"
SUB_INDEX = b"<!doctype html><p>sub index</p>\n"
BIG = os.urandom(5 * 1024 * 1024)
SMALL = os.urandom(4096)
UNICODE_NAME = "sp ace \u00fc.txt"


# --------------------------------------------------------------------------------------
# the site and the proxies serving it


@dataclass
class Site:
    base: Path
    root: Path

    def etag(self, name: str) -> str:
        st = os.stat(self.root / name)
        return f'"{int(st.st_mtime):x}-{st.st_size:x}"'


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    base = tmp_path_factory.mktemp("static")
    root = base / "root"
    root.mkdir()
    (base / "secret.txt").write_bytes(SECRET + b" outside the root\n")
    (base / "outside").mkdir()
    (base / "outside" / "secret.txt").write_bytes(SECRET + b" in a directory outside\n")
    (base / "outside" / "index.html").write_bytes(SECRET + b" index outside\n")
    files = {
        "hello.txt": HELLO,
        "page.html": PAGE,
        "data.json": b'{"a": 1}\n',
        "style.css": b"p { color: red }\n",
        "small.bin": SMALL,
        "big.bin": BIG,
        "empty.txt": b"",
        ".hidden": b"hidden file\n",
        UNICODE_NAME: b"a file with spaces and unicode\n",
        "back\\slash.txt": b"a backslash in the name\n",
        "noext": b"no extension\n",
        "sub/index.html": SUB_INDEX,
        "sub/other.txt": b"other\n",
        "noindex/x.txt": b"x\n",
        "escaping_index/keep.txt": b"keep\n",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "link_in").symlink_to("hello.txt")
    (root / "alias").symlink_to("sub")  # a directory link inside the root
    (root / "chain").symlink_to("link_out")  # a link to a link that leaves the root
    (root / "\u00fcber").mkdir()
    (root / "\u00fcber" / "out").symlink_to(base / "secret.txt")
    (root / "link_out").symlink_to(base / "secret.txt")
    (root / "link_out_rel").symlink_to("../secret.txt")
    (root / "linkdir_out").symlink_to(base / "outside")
    (root / "escaping_index" / "index.html").symlink_to(base / "outside" / "index.html")
    os.mkfifo(root / "fifo")
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            file_path = os.path.join(dirpath, name)
            if not os.path.islink(file_path):
                os.utime(file_path, (MTIME, MTIME))
    return Site(base, root)


def _mark(resp: ResponseHeader) -> None:
    resp.headers.set(b"X-Edited", b"yes")


def answer(files: StaticFiles, session: Session) -> None:
    """``/prefixed/...`` exercises ``path=`` (the prefix removed) and ``edit=``."""
    target = session.req_header.raw_path
    if target.startswith(b"/prefixed/"):
        path = target[len(b"/prefixed") :].partition(b"?")[0]
        files.serve(session, path=path, edit=_mark)
    else:
        files.serve(session)


class SyncStatic(ProxyHttp):
    """Plain hooks: the engine runs in sync mode."""

    def __init__(self, files: StaticFiles) -> None:
        self.files = files

    def request_filter(self, session: Session, ctx: Any) -> bool:
        answer(self.files, session)
        return True

    def upstream_peer(self, session: Session, ctx: Any) -> Any:
        raise AssertionError("a static request never goes upstream")


class AsyncStatic(SyncStatic):
    """``async def`` hooks: the engine runs a task per request."""

    async def request_filter(self, session: Session, ctx: Any) -> bool:  # type: ignore[override]
        await asyncio.sleep(0)
        answer(self.files, session)
        return True

    async def upstream_peer(self, session: Session, ctx: Any) -> Any:
        raise AssertionError("a static request never goes upstream")


def proxy_for(mode: str, files: StaticFiles) -> ProxyHttp:
    cls = SyncStatic if mode == "sync" else AsyncStatic
    assert bool(cls.async_hooks) == (mode == "async")
    return cls(files)


@pytest.fixture
def static(mode: str, site: Site, start_proxy: Any) -> ProxyHarness:
    """The site served with ``max_age=60``, in ``mode``."""
    harness: ProxyHarness = start_proxy(proxy_for(mode, StaticFiles(str(site.root), max_age=60)))
    return harness


# --------------------------------------------------------------------------------------
# clients


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)

    def h(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _resp(status: int, pairs: list[tuple[str, str]], body: bytes) -> Resp:
    headers: dict[str, str] = {}
    for k, v in pairs:
        assert k.lower() not in headers, f"duplicate header {k}"
        headers[k.lower()] = v
    return Resp(status, headers, body, pairs)


def fetch(
    harness: ProxyHarness,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Resp:
    """One request with http.client (a new connection unless ``conn`` is given)."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", harness.port, timeout=IO_TIMEOUT)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        return _resp(r.status, r.getheaders(), body)
    finally:
        if own:
            c.close()


class Raw:
    """A raw client socket: exact request bytes, responses framed by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> Resp:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"EOF before a response head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        pairs = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
        resp = _resp(status, pairs, b"")
        assert resp.h("transfer-encoding") is None, "static responses are never chunked"
        if method == "HEAD" or status in (204, 304):
            return resp
        length = resp.h("content-length")
        assert length is not None, resp.headers
        n = int(length)
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"EOF after {len(self.buf)} of {n} body bytes")
        resp.body, self.buf = self.buf[:n], self.buf[n:]
        return resp

    def request(self, method: str, target: str | bytes, headers: str = "") -> Resp:
        if isinstance(target, str):
            target = target.encode("latin-1")
        self.send(
            b"%s %s HTTP/1.1\r\nHost: test.local\r\n%s\r\n"
            % (method.encode(), target, headers.encode("latin-1"))
        )
        return self.response(method)

    def at_eof(self) -> bool:
        if self.buf:
            return False
        try:
            return not self._fill()
        except ConnectionResetError:
            return True


@pytest.fixture
def raw(static: ProxyHarness) -> Iterator[Raw]:
    client = Raw(static.port)
    yield client
    client.close()


def check_file_headers(resp: Resp, site: Site, name: str, ctype: str) -> None:
    """The headers every 200 for ``name`` carries."""
    size = os.stat(site.root / name).st_size
    assert resp.status == 200, resp
    assert resp.h("content-type") == ctype
    assert resp.h("content-length") == str(size)
    assert resp.h("last-modified") == LAST_MODIFIED
    assert resp.h("etag") == site.etag(name)
    assert resp.h("accept-ranges") == "bytes"
    assert resp.h("cache-control") == "max-age=60"
    date = resp.h("date")
    assert date is not None and abs(parse_http_date(date.encode()) - time.time()) < 60


def open_fds_to(path: Path) -> int:
    """How many descriptors of this process (the proxy runs in it) are open on ``path``."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:
            pass
    return count


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


# --------------------------------------------------------------------------------------
# plain GET / HEAD


@pytest.mark.parametrize(
    ("name", "ctype"),
    [
        ("hello.txt", "text/plain; charset=utf-8"),
        ("page.html", "text/html; charset=utf-8"),
        ("data.json", "application/json; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("small.bin", "application/octet-stream"),
        ("noext", "application/octet-stream"),
        ("empty.txt", "text/plain; charset=utf-8"),
        (".hidden", "application/octet-stream"),
    ],
)
def test_get_serves_file_with_headers(
    static: ProxyHarness, site: Site, name: str, ctype: str
) -> None:
    resp = fetch(static, "/" + name)
    check_file_headers(resp, site, name, ctype)
    assert resp.body == (site.root / name).read_bytes()


def test_get_big_file(static: ProxyHarness, site: Site) -> None:
    resp = fetch(static, "/big.bin")
    check_file_headers(resp, site, "big.bin", "application/octet-stream")
    assert hashlib.sha256(resp.body).hexdigest() == hashlib.sha256(BIG).hexdigest()
    assert wait_until(lambda: open_fds_to(site.root / "big.bin") == 0), "file left open"


def test_names_are_percent_decoded(static: ProxyHarness, site: Site) -> None:
    quoted = "/sp%20ace%20%C3%BC.txt"
    resp = fetch(static, quoted)
    check_file_headers(resp, site, UNICODE_NAME, "text/plain; charset=utf-8")
    assert resp.body == b"a file with spaces and unicode\n"
    assert fetch(static, "/%68%65llo.txt").body == HELLO
    assert fetch(static, "/sub%2Findex.html").body == SUB_INDEX  # nginx decodes %2F too
    resp = fetch(static, "/back\\slash.txt")  # a backslash is an ordinary character
    assert (resp.status, resp.body) == (200, b"a backslash in the name\n")


def test_query_string_is_ignored(static: ProxyHarness) -> None:
    resp = fetch(static, "/hello.txt?v=3&x=%2e%2e/secret.txt")
    assert (resp.status, resp.body) == (200, HELLO)


def test_symlink_inside_root_is_served(static: ProxyHarness) -> None:
    resp = fetch(static, "/link_in")
    assert (resp.status, resp.body) == (200, HELLO)
    assert resp.h("content-type") == "application/octet-stream"  # the name asked for


def test_symlinked_directory_inside_root(static: ProxyHarness) -> None:
    resp = fetch(static, "/alias/other.txt")
    assert (resp.status, resp.body) == (200, b"other\n")
    assert fetch(static, "/alias/").body == SUB_INDEX
    resp = fetch(static, "/alias?q=1")
    assert (resp.status, resp.h("location")) == (301, "/alias/?q=1")


def test_dot_segments_inside_root_are_resolved(static: ProxyHarness) -> None:
    for path in ("/sub/../hello.txt", "/./hello.txt", "//hello.txt", "/sub/%2e%2e/hello.txt"):
        resp = fetch(static, path)
        assert (resp.status, resp.body) == (200, HELLO), path


@pytest.mark.parametrize("name", ["hello.txt", "big.bin", "empty.txt"])
def test_head_has_get_headers_and_no_body(
    static: ProxyHarness, raw: Raw, site: Site, name: str
) -> None:
    get = fetch(static, "/" + name)
    head = raw.request("HEAD", "/" + name)
    assert head.status == 200
    get.headers.pop("date")
    head.headers.pop("date")
    assert head.headers == get.headers
    # no body bytes follow: the next response on this connection starts right away
    nxt = raw.request("GET", "/hello.txt")
    assert (nxt.status, nxt.body) == (200, HELLO)
    assert wait_until(lambda: open_fds_to(site.root / name) == 0)


def test_head_with_http_client(static: ProxyHarness) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", static.port, timeout=IO_TIMEOUT)
    try:
        head = fetch(static, "/big.bin", "HEAD", conn=conn)
        sock = conn.sock
        assert (head.status, head.body, head.h("content-length")) == (200, b"", str(len(BIG)))
        assert fetch(static, "/hello.txt", conn=conn).body == HELLO
        assert conn.sock is sock, "the connection was not kept alive"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# directories, errors, methods


def test_directory_index(static: ProxyHarness, site: Site) -> None:
    resp = fetch(static, "/sub/")
    assert resp.status == 200
    assert resp.body == SUB_INDEX
    assert resp.h("content-type") == "text/html; charset=utf-8"
    assert resp.h("etag") == site.etag("sub/index.html")
    assert fetch(static, "/sub/.").body == SUB_INDEX
    assert fetch(static, "/sub/other.txt/..").body == SUB_INDEX


@pytest.mark.parametrize(
    ("target", "location"),
    [
        ("/sub", "/sub/"),
        ("/sub?x=1&y=%20", "/sub/?x=1&y=%20"),
        ("/noindex?", "/noindex/?"),
        ("/prefixed/sub?a=b", "/prefixed/sub/?a=b"),  # the client's URL, not the stripped path
    ],
)
def test_directory_without_slash_redirects(
    static: ProxyHarness, target: str, location: str
) -> None:
    resp = fetch(static, target)
    assert resp.status == 301
    assert resp.h("location") == location
    assert resp.h("content-length") == "0"
    assert resp.body == b""


def test_directory_without_index_is_forbidden(static: ProxyHarness) -> None:
    assert fetch(static, "/noindex/").status == 403
    assert fetch(static, "/").status == 403  # the root has no index.html either
    # an index that is a symbolic link out of the root counts as missing
    resp = fetch(static, "/escaping_index/")
    assert resp.status == 403
    assert SECRET not in resp.body


@pytest.mark.parametrize(
    "path", ["/missing.txt", "/sub/missing/", "/hello.txt/", "/hello.txt/.", "/nodir/x.txt"]
)
def test_missing_is_404(static: ProxyHarness, path: str) -> None:
    resp = fetch(static, path)
    assert (resp.status, resp.body, resp.h("content-length")) == (404, b"", "0")


def test_fifo_is_404_without_blocking(static: ProxyHarness) -> None:
    start = time.monotonic()
    assert fetch(static, "/fifo").status == 404
    assert time.monotonic() - start < 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_is_403(static: ProxyHarness, site: Site, tmp_path: Path) -> None:
    path = site.root / "noperm.txt"
    path.write_bytes(b"private")
    path.chmod(0)
    try:
        assert fetch(static, "/noperm.txt").status == 403
    finally:
        path.unlink()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_are_405(static: ProxyHarness, method: str) -> None:
    resp = fetch(static, "/hello.txt", method)
    assert resp.status == 405
    assert resp.h("allow") == "GET, HEAD"
    assert resp.body == b""


def test_post_with_body_is_405(static: ProxyHarness) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", static.port, timeout=IO_TIMEOUT)
    try:
        conn.request("POST", "/hello.txt", body=b"x" * 1000)
        r = conn.getresponse()
        assert (r.status, r.getheader("allow"), r.read()) == (405, "GET, HEAD", b"")
    finally:
        conn.close()


def test_path_and_edit_arguments(static: ProxyHarness, site: Site) -> None:
    resp = fetch(static, "/prefixed/hello.txt?q")
    assert (resp.status, resp.body, resp.h("x-edited")) == (200, HELLO, "yes")
    resp = fetch(static, "/prefixed/big.bin", headers={"Range": "bytes=0-99999"})
    assert (resp.status, resp.body, resp.h("x-edited")) == (206, BIG[:100000], "yes")
    resp = fetch(static, "/prefixed/big.bin", headers={"Range": "bytes=-3000000"})
    assert (resp.status, resp.body, resp.h("x-edited")) == (206, BIG[-3000000:], "yes")
    resp = fetch(static, "/prefixed/hello.txt", headers={"If-None-Match": site.etag("hello.txt")})
    assert (resp.status, resp.h("x-edited")) == (304, "yes")
    for path, status in [("/prefixed/nope", 404), ("/prefixed/sub", 301), ("/prefixed/%zz", 400)]:
        resp = fetch(static, path)
        assert (resp.status, resp.h("x-edited")) == (status, "yes"), path
    resp = fetch(static, "/prefixed/hello.txt", "POST")
    assert (resp.status, resp.h("x-edited")) == (405, "yes")


def test_index_names_cannot_leave_the_root(mode: str, site: Site, start_proxy: Any) -> None:
    files = StaticFiles(str(site.root), index=("../../secret.txt", "../../outside/index.html"))
    harness = start_proxy(proxy_for(mode, files))
    resp = fetch(harness, "/sub/")
    assert resp.status == 403
    assert SECRET not in resp.body


def test_index_list_and_no_max_age(mode: str, site: Site, start_proxy: Any) -> None:
    files = StaticFiles(str(site.root), index=("missing.html", "other.txt", "index.html"))
    harness = start_proxy(proxy_for(mode, files))
    resp = fetch(harness, "/sub/")
    assert (resp.status, resp.body) == (200, b"other\n")
    assert resp.h("content-type") == "text/plain; charset=utf-8"
    assert resp.h("cache-control") is None


# --------------------------------------------------------------------------------------
# the root is never left


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/../secret.txt", 404),
        ("/..", 404),
        ("/%2e%2e/secret.txt", 404),
        ("/%2E%2E/secret.txt", 404),
        ("/a/../../secret.txt", 404),
        ("/sub/../../secret.txt", 404),
        ("/..%2fsecret.txt", 404),
        ("/%2e%2e%2fsecret.txt", 404),
        ("/sub/..%2f..%2fsecret.txt", 404),
        ("/sub/%2e%2e/%2e%2e/secret.txt", 404),
        ("/..%5csecret.txt", 404),  # a backslash is no separator
        ("/link_out", 404),
        ("/link_out_rel", 404),
        ("/linkdir_out/secret.txt", 404),
        ("/linkdir_out/", 404),
        ("/linkdir_out", 404),
        ("/chain", 404),
        ("/%C3%BCber/out", 404),
        ("/alias/../link_out", 404),
        ("/hello.txt%00", 400),
        ("/%00", 400),
        ("/..%00/secret.txt", 400),
        ("/%zz", 400),
        ("/%2", 400),
        ("/%", 400),
    ],
)
def test_traversal_is_refused(static: ProxyHarness, target: str, status: int) -> None:
    for method in ("GET", "HEAD"):
        resp = fetch(static, target, method)
        assert resp.status == status, (method, target)
        assert SECRET not in resp.body


@pytest.mark.parametrize(
    ("target", "statuses"),
    [
        (b"/..", {404}),
        (b"/../secret.txt", {404}),
        (b"/../../../../../../etc/passwd", {404}),
        (b"/sub/../../secret.txt", {404}),
        (b"../secret.txt", {400}),
        (b"..", {400}),
        (b"http://test.local/../secret.txt", {404}),
        (b"http://test.local/hello.txt/../../secret.txt", {404}),
        (b"/hello.txt\x00", {400}),  # a raw NUL: refused by the parser or by serve()
    ],
)
def test_traversal_with_raw_request_lines(
    static: ProxyHarness, target: bytes, statuses: set[int]
) -> None:
    client = Raw(static.port)
    try:
        resp = client.request("GET", target)
        assert resp.status in statuses, (target, resp)
        assert SECRET not in resp.body
        assert SECRET not in client.buf
    finally:
        client.close()


def test_absolute_form_target(static: ProxyHarness, raw: Raw) -> None:
    resp = raw.request("GET", "http://test.local/hello.txt?x")
    assert (resp.status, resp.body) == (200, HELLO)


# --------------------------------------------------------------------------------------
# conditional requests


@pytest.mark.parametrize(
    "value",
    [
        "{etag}",
        '"nope", {etag}',
        '"a",{etag},"b"',
        "*",
        "W/{etag}",
        '"x", W/{etag}',
    ],
)
def test_if_none_match_304(static: ProxyHarness, site: Site, value: str) -> None:
    etag = site.etag("hello.txt")
    for method in ("GET", "HEAD"):
        resp = fetch(static, "/hello.txt", method, {"If-None-Match": value.format(etag=etag)})
        assert resp.status == 304, (method, value)
        assert resp.body == b""
        assert resp.h("etag") == etag
        assert resp.h("last-modified") == LAST_MODIFIED
        assert resp.h("cache-control") == "max-age=60"
        assert resp.h("content-length") is None  # as nginx: a 304 carries no length or type
        assert resp.h("content-type") is None
        assert resp.h("date") is not None


def test_if_none_match_mismatch_200(static: ProxyHarness) -> None:
    for value in ['"nope"', 'W/"nope"', f'"{MTIME:x}-{999:x}"']:
        resp = fetch(static, "/hello.txt", headers={"If-None-Match": value})
        assert (resp.status, resp.body) == (200, HELLO), value


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (LAST_MODIFIED, 304),
        (formatdate(MTIME + 3600, usegmt=True), 304),
        (formatdate(MTIME - 1, usegmt=True), 200),
        ("Tuesday, 14-Nov-23 22:13:20 GMT", 304),  # RFC 850 form
        ("Tue Nov 14 22:13:20 2023", 304),  # asctime form
        ("not a date", 200),
        ("Tue, 32 Nov 2023 22:13:20 GMT", 200),
    ],
)
def test_if_modified_since(static: ProxyHarness, value: str, status: int) -> None:
    resp = fetch(static, "/hello.txt", headers={"If-Modified-Since": value})
    assert resp.status == status
    assert resp.body == (HELLO if status == 200 else b"")


def test_if_none_match_takes_precedence(static: ProxyHarness) -> None:
    resp = fetch(
        static,
        "/hello.txt",
        headers={"If-None-Match": '"nope"', "If-Modified-Since": LAST_MODIFIED},
    )
    assert resp.status == 200


def test_if_match(static: ProxyHarness, site: Site) -> None:
    etag = site.etag("hello.txt")
    for value, status in [
        ('"nope"', 412),
        ("W/" + etag, 412),  # If-Match compares strongly
        (etag, 200),
        ('"a", ' + etag, 200),
        ("*", 200),
    ]:
        resp = fetch(static, "/hello.txt", headers={"If-Match": value})
        assert resp.status == status, value
        assert resp.body == (HELLO if status == 200 else b"")
    old = formatdate(MTIME - 10, usegmt=True)
    assert fetch(static, "/hello.txt", headers={"If-Unmodified-Since": old}).status == 412
    new = LAST_MODIFIED
    assert fetch(static, "/hello.txt", headers={"If-Unmodified-Since": new}).status == 200
    bad = "yesterday"
    assert fetch(static, "/hello.txt", headers={"If-Unmodified-Since": bad}).status == 200


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-s", "-S", "--max-time", "10", *args], capture_output=True, timeout=20
    )


@needs_curl
def test_conditionals_with_curl(static: ProxyHarness, site: Site) -> None:
    url = static.url + "/page.html"
    etag = site.etag("page.html")
    done = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", f"If-None-Match: {etag}", url)
    assert done.stdout == b"304", done.stderr
    # -z sends If-Modified-Since with the given date
    done = curl("-o", "/dev/null", "-w", "%{http_code}", "-z", LAST_MODIFIED, url)
    assert done.stdout == b"304", done.stderr
    older = formatdate(MTIME - 86400, usegmt=True)
    done = curl("-w", "\n%{http_code}", "-z", older, url)
    assert done.stdout == PAGE + b"\n200", done.stderr


# --------------------------------------------------------------------------------------
# ranges


@pytest.mark.parametrize(
    ("spec", "start", "stop"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=1000-1999", 1000, 2000),
        ("bytes=-100", len(BIG) - 100, len(BIG)),
        ("bytes=5242000-", 5242000, len(BIG)),
        ("bytes=0-", 0, len(BIG)),
        ("bytes=100-99999999", 100, len(BIG)),
        ("bytes=-99999999", 0, len(BIG)),
        ("bytes=1000-3000000", 1000, 3000001),  # streamed with send_body_from
        ("bytes=0-99,50-149", 0, 150),  # overlapping ranges are coalesced
        ("bytes=5-5", 5, 6),
    ],
)
def test_single_range(static: ProxyHarness, site: Site, spec: str, start: int, stop: int) -> None:
    resp = fetch(static, "/big.bin", headers={"Range": spec})
    assert resp.status == 206
    assert resp.h("content-range") == f"bytes {start}-{stop - 1}/{len(BIG)}"
    assert resp.h("content-length") == str(stop - start)
    assert resp.h("content-type") == "application/octet-stream"
    assert resp.h("etag") == site.etag("big.bin")
    assert resp.h("accept-ranges") == "bytes"
    assert resp.body == BIG[start:stop]


def parse_byteranges(resp: Resp) -> list[tuple[str, str, bytes]]:
    """``(content_type, content_range, data)`` of each part of a multipart/byteranges body."""
    ctype = resp.h("content-type") or ""
    assert ctype.startswith("multipart/byteranges; boundary="), ctype
    boundary = ctype.split("boundary=", 1)[1].encode()
    assert resp.h("content-length") == str(len(resp.body))
    delim = b"\r\n--" + boundary
    assert resp.body.startswith(delim + b"\r\n")
    assert resp.body.endswith(delim + b"--\r\n")
    chunks = resp.body.split(delim)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, sep, data = chunk[2:].partition(b"\r\n\r\n")
        assert sep
        fields = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in head.decode().split("\r\n"))
        )
        parts.append((fields["content-type"], fields["content-range"], data))
    return parts


@pytest.mark.parametrize(
    "spec",
    [
        "bytes=0-9,100-199,-5",
        "bytes=0-99999,200000-399999,5000000-",  # large parts: streamed
        "bytes=500-599, 0-9",  # kept in the order asked
        "bytes=0-0,2-2,4-4,,6-6",
    ],
)
def test_multiple_ranges(static: ProxyHarness, spec: str) -> None:
    size = len(BIG)
    wanted = []
    for item in spec.removeprefix("bytes=").split(","):
        item = item.strip()
        if not item:
            continue
        first, _, last = item.partition("-")
        if not first:
            wanted.append((size - int(last), size))
        else:
            wanted.append((int(first), int(last) + 1 if last else size))
    resp = fetch(static, "/big.bin", headers={"Range": spec})
    assert resp.status == 206
    assert resp.h("content-range") is None
    parts = parse_byteranges(resp)
    assert len(parts) == len(wanted)
    for (ctype, crange, data), (start, stop) in zip(parts, wanted, strict=True):
        assert ctype == "application/octet-stream"
        assert crange == f"bytes {start}-{stop - 1}/{size}"
        assert data == BIG[start:stop]


def test_multiple_ranges_head(static: ProxyHarness, raw: Raw) -> None:
    get = fetch(static, "/hello.txt", headers={"Range": "bytes=0-1,3-4"})
    head = raw.request("HEAD", "/hello.txt", "Range: bytes=0-1,3-4\r\n")
    assert (get.status, head.status) == (206, 206)
    assert head.h("content-length") == get.h("content-length")
    assert head.h("content-type").startswith("multipart/byteranges")  # type: ignore[union-attr]
    assert raw.request("GET", "/hello.txt").body == HELLO


@pytest.mark.parametrize("spec", ["bytes=5242880-", "bytes=6000000-7000000", "bytes=-0"])
def test_unsatisfiable_range_416(static: ProxyHarness, spec: str) -> None:
    resp = fetch(static, "/big.bin", headers={"Range": spec})
    assert resp.status == 416
    assert resp.h("content-range") == f"bytes */{len(BIG)}"
    assert resp.body == b""


def test_range_on_empty_file_416(static: ProxyHarness) -> None:
    resp = fetch(static, "/empty.txt", headers={"Range": "bytes=0-"})
    assert (resp.status, resp.h("content-range")) == (416, "bytes */0")


@pytest.mark.parametrize(
    "spec", ["bytes=9-1", "bytes=abc", "items=0-1", "bytes=", "bytes=1-2-3", "bytes 0-1", "0-1"]
)
def test_invalid_range_is_ignored(static: ProxyHarness, spec: str) -> None:
    resp = fetch(static, "/hello.txt", headers={"Range": spec})
    assert (resp.status, resp.body, resp.h("content-range")) == (200, HELLO, None)


def test_if_range(static: ProxyHarness, site: Site) -> None:
    etag = site.etag("big.bin")
    for if_range, status in [
        (etag, 206),
        (LAST_MODIFIED, 206),
        ('"other"', 200),
        ("W/" + etag, 200),  # If-Range needs a strong match
        (formatdate(MTIME + 1, usegmt=True), 200),
        (formatdate(MTIME - 1, usegmt=True), 200),
    ]:
        resp = fetch(static, "/big.bin", headers={"Range": "bytes=10-19", "If-Range": if_range})
        assert resp.status == status, if_range
        assert resp.body == (BIG[10:20] if status == 206 else BIG)


def test_range_on_head(static: ProxyHarness, raw: Raw) -> None:
    resp = raw.request("HEAD", "/big.bin", "Range: bytes=100-199\r\n")
    assert resp.status == 206
    assert resp.h("content-range") == f"bytes 100-199/{len(BIG)}"
    assert resp.h("content-length") == "100"
    assert raw.request("GET", "/hello.txt").body == HELLO


def test_range_after_precondition_304(static: ProxyHarness, site: Site) -> None:
    etag = site.etag("big.bin")
    resp = fetch(static, "/big.bin", headers={"Range": "bytes=0-1", "If-None-Match": etag})
    assert resp.status == 304


@needs_curl
def test_range_with_curl(static: ProxyHarness, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = curl("-D", "-", "-o", str(out), "-r", "1000-1999999", static.url + "/big.bin")
    assert done.returncode == 0, done.stderr
    head = done.stdout.decode("latin-1").lower()
    assert head.startswith("http/1.1 206")
    assert f"content-range: bytes 1000-1999999/{len(BIG)}" in head
    assert out.read_bytes() == BIG[1000:2000000]
    done = curl("-o", str(out), "-r", "-16", static.url + "/big.bin")
    assert done.returncode == 0 and out.read_bytes() == BIG[-16:]


# --------------------------------------------------------------------------------------
# connections


def test_keep_alive_across_static_requests(static: ProxyHarness, raw: Raw, site: Site) -> None:
    etag = site.etag("hello.txt")
    steps: list[tuple[str, str, str, int, bytes | None]] = [
        ("GET", "/hello.txt", "", 200, HELLO),
        ("GET", "/big.bin", "", 200, BIG),
        ("HEAD", "/big.bin", "", 200, None),
        ("GET", "/hello.txt", f"If-None-Match: {etag}\r\n", 304, None),
        ("GET", "/missing", "", 404, b""),
        ("GET", "/big.bin", "Range: bytes=0-99,-100\r\n", 206, None),
        ("GET", "/big.bin", "Range: bytes=100-2999999\r\n", 206, BIG[100:3000000]),
        ("GET", "/sub", "", 301, b""),
        ("GET", "/sub/", "", 200, SUB_INDEX),
        ("GET", "/hello.txt", 'If-Match: "x"\r\n', 412, b""),
        ("GET", "/big.bin", "Range: bytes=9999999-\r\n", 416, b""),
        ("GET", "/empty.txt", "", 200, b""),
        ("GET", "/hello.txt", "", 200, HELLO),
    ]
    for method, target, headers, status, body in steps:
        resp = raw.request(method, target, headers)
        assert resp.status == status, (method, target)
        assert resp.h("connection") is None, (target, resp.headers)
        if body is not None:
            assert resp.body == body, target
    assert not raw.buf


def test_pipelined_requests(static: ProxyHarness, raw: Raw) -> None:
    raw.send(
        b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert raw.response().body == BIG
    assert raw.response("HEAD").status == 200
    assert raw.response().body == HELLO


def test_client_leaving_mid_body_closes_the_file(static: ProxyHarness, site: Site) -> None:
    sock = socket.create_connection(("127.0.0.1", static.port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    got = sock.recv(65536)
    assert got.startswith(b"HTTP/1.1 200")
    assert wait_until(lambda: open_fds_to(site.root / "big.bin") == 1)
    sock.close()
    assert wait_until(lambda: open_fds_to(site.root / "big.bin") == 0), "file left open"
    assert fetch(static, "/hello.txt").body == HELLO


def test_http10_client(static: ProxyHarness, raw: Raw) -> None:
    raw.send(b"GET /hello.txt HTTP/1.0\r\n\r\n")
    resp = raw.response()
    assert (resp.status, resp.body) == (200, HELLO)
    assert raw.at_eof()


# --------------------------------------------------------------------------------------
# the pure helpers


def test_parse_range() -> None:
    assert parse_range(b"bytes=0-4", 10) == [(0, 5)]
    assert parse_range(b"bytes=-3", 10) == [(7, 10)]
    assert parse_range(b"bytes=-30", 10) == [(0, 10)]
    assert parse_range(b"bytes=8-", 10) == [(8, 10)]
    assert parse_range(b"bytes=8-100", 10) == [(8, 10)]
    assert parse_range(b"Bytes = 1-2", 10) == [(1, 3)]
    assert parse_range(b"bytes=0-1, 4-5", 10) == [(0, 2), (4, 6)]
    assert parse_range(b"bytes=4-5,0-1", 10) == [(4, 6), (0, 2)]
    assert parse_range(b"bytes=0-5,3-8,9-9", 10) == [(0, 10)]  # overlapping: coalesced
    assert parse_range(b"bytes=10-,0-1", 10) == [(0, 2)]  # the satisfiable subset
    assert parse_range(b"bytes=10-", 10) == []
    assert parse_range(b"bytes=-0", 10) == []
    assert parse_range(b"bytes=0-", 0) == []
    assert parse_range(b"bytes=" + b"9" * 5000 + b"-", 10) == []
    assert parse_range(b"bytes=0-" + b"9" * 5000, 10) == [(0, 10)]
    for bad in [
        b"bytes=5-1",
        b"bytes=x-1",
        b"bytes=1",
        b"bytes=",
        b"bytes=,",
        b"bits=0-1",
        b"bytes=-",
        b"bytes=1-2-3",
        b"bytes=+1-2",
        b"bytes=1--2",
        b"bytes=0x1-2",
        b"",
    ]:
        assert parse_range(bad, 10) is None, bad
    assert parse_range(b"bytes=" + b",".join([b"0-0"] * 64), 10) == [(0, 1)]
    assert parse_range(b"bytes=" + b",".join([b"0-0"] * 65), 10) is None


def test_decode_and_normalise() -> None:
    assert decode_path(b"/a%20b/%C3%BC") == b"/a b/\xc3\xbc"
    assert decode_path(b"/%2e%2E") == b"/.."
    for bad in [b"a", b"", b"/%", b"/%2", b"/%g0", b"/%00", b"/a\x00", b"%2fa"]:
        assert decode_path(bad) is None, bad
    cases = {
        b"/": b"/",
        b"/a/b": b"/a/b",
        b"/a/b/": b"/a/b/",
        b"//a///b": b"/a/b",
        b"/a/./b": b"/a/b",
        b"/a/.": b"/a/",
        b"/a/..": b"/",
        b"/a/b/../c": b"/a/c",
        b"/.hidden": b"/.hidden",
        b"/...": b"/...",
        b"/a/..b": b"/a/..b",
        b"/..": None,
        b"/../a": None,
        b"/a/../..": None,
        b"/a/../../b": None,
    }
    for path, expected in cases.items():
        assert remove_dot_segments(path) == expected, path


def test_resolve_path(site: Site) -> None:
    root = os.path.realpath(site.root)
    assert resolve_path(root, b"/hello.txt") == os.path.join(root, "hello.txt")
    assert resolve_path(root, b"/") == root
    assert resolve_path(root, b"/missing/x") == os.path.join(root, "missing", "x")
    assert resolve_path(root, b"/link_in") == os.path.join(root, "hello.txt")
    assert resolve_path(root, b"/link_out") is None
    assert resolve_path(root, b"/chain") is None
    assert resolve_path(root, b"/alias/other.txt") == os.path.join(root, "sub", "other.txt")
    assert resolve_path(root, b"/sub/") == os.path.join(root, "sub")
    assert resolve_path(root, "/\u00fcber/x".encode()) == os.path.join(root, "\u00fcber", "x")
    assert resolve_path(root, "/\u00fcber/out".encode()) is None
    assert resolve_path(root, b"/\xff/x") == os.path.join(root, os.fsdecode(b"\xff"), "x")
    assert resolve_path("/", b"/etc") == "/etc"
    assert resolve_path("/", b"/") == "/"
    assert resolve_path(root, b"/linkdir_out/secret.txt") is None
    # a sibling directory sharing the root's name as a prefix is outside too
    sibling = site.base / "root2"
    sibling.mkdir(exist_ok=True)
    (site.root / "to_sibling").symlink_to(sibling)
    try:
        assert resolve_path(root, b"/to_sibling") is None
    finally:
        (site.root / "to_sibling").unlink()


def test_validators_and_dates() -> None:
    st = os.stat_result((0o100644, 0, 0, 1, 0, 0, 0x1234, 0, MTIME, 0))
    assert etag_for(st) == b'"%x-1234"' % MTIME
    assert http_date(784111777) == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == 784111777
    assert parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert parse_http_date(b"Sun Nov  6 08:49:37 1994") == 784111777
    for bad in [b"", b"garbage", b"Sun, 06 Nov 1994", b"Sun, 06 Nov 1994 24:00:00 GMT"]:
        assert parse_http_date(bad) is None, bad
    etag = b'"5f-10"'

    def pre(**headers: str) -> int:
        return precondition_status(
            Headers([(k.replace("_", "-"), v) for k, v in headers.items()]), etag, 1000
        )

    date = http_date(1000).decode()
    assert pre() == 200
    assert pre(if_none_match='"5f-10"') == 304
    assert pre(if_none_match='W/"5f-10"') == 304
    assert pre(if_none_match='"x"') == 200
    assert pre(if_modified_since=date) == 304
    assert pre(if_modified_since=http_date(999).decode()) == 200
    assert pre(if_match='"x"', if_none_match='"5f-10"') == 412
    assert pre(if_unmodified_since=http_date(999).decode()) == 412
    assert pre(if_match="*", if_unmodified_since=http_date(999).decode()) == 200
    assert if_range_matches(b'"5f-10"', etag, 1000)
    assert not if_range_matches(b'W/"5f-10"', etag, 1000)
    assert if_range_matches(date.encode(), etag, 1000)
    assert not if_range_matches(b"junk", etag, 1000)


def test_content_types() -> None:
    assert content_type_for("/a/b.txt") == b"text/plain; charset=utf-8"
    assert content_type_for("x.HTML") == b"text/html; charset=utf-8"
    assert content_type_for("x.json") == b"application/json; charset=utf-8"
    assert content_type_for("x.png") == b"image/png"
    assert content_type_for("x.tar.gz") == b"application/gzip"  # never Content-Encoding
    assert content_type_for(".bashrc") == b"application/octet-stream"
    assert content_type_for("/a.d/noext") == b"application/octet-stream"
    assert content_type_for("x.unknown-ext") == b"application/octet-stream"
