"""Response compression through the real ``ferryman run``: curl asks for each encoding
and gets a body that decodes to the origin's bytes; what must not be compressed is not;
a 100 MB streamed response keeps the worker's memory flat."""

from __future__ import annotations

import gzip
import http.client
import os
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import brotli
import pytest
import zstandard
from e2e_util import ProxyProcess, start_ferryman

from origin import free_port

JSON = b'{"items": [' + b", ".join(b'{"id": %d, "name": "item %d"}' % (i, i)
                                   for i in range(2000)) + b"]}"  # fmt: skip
STREAM_MB = 100
BIG_TEXT = b"".join(b"%06d: a static text file, long enough to be streamed\n" % i
                    for i in range(20000))  # fmt: skip
PNG = os.urandom(8192)
SMALL_JSON = JSON[:20000]  # (below the 64 KiB a static file is sent in one write)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _send(self, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/json":
            self._send(JSON, "application/json")
        elif self.path == "/small":
            self._send(b'{"ok": true}', "application/json")
        elif self.path == "/png":
            self._send(os.urandom(4096), "image/png")
        elif self.path == "/no-transform":
            self._send(JSON, "application/json", {"Cache-Control": "no-transform"})
        elif self.path == "/encoded":
            self._send(gzip.compress(JSON), "application/json", {"Content-Encoding": "gzip"})
        elif self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            line = b"".join(b"line %08d of a long streamed text response\n" % i
                            for i in range(1500))  # fmt: skip
            sent = 0
            while sent < STREAM_MB * 1_000_000:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                sent += len(line)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_error(404)

    do_HEAD = do_GET


@pytest.fixture(scope="module")
def origin() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def proxy(origin: ThreadingHTTPServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ProxyProcess]:  # fmt: skip
    port = free_port()
    site = tmp_path_factory.mktemp("site")
    (site / "files").mkdir()
    (site / "files" / "big.txt").write_bytes(BIG_TEXT)
    (site / "files" / "data.json").write_bytes(SMALL_JSON)
    (site / "files" / "photo.png").write_bytes(PNG)
    text = (
        "server: {workers: 1}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", routes: [\n'
        "  {match: {path_prefix: /cached/}, upstream: app, strip_prefix: /cached,\n"
        "   compress: true, cache: {default_ttl: 60s}},\n"
        f"  {{match: {{path_prefix: /files/}}, static: {{root: {site}}}, compress: true}},\n"
        "  {upstream: app, compress: {algorithms: [br, zstd, gzip], min_size: 1KiB}}]}]\n"
        f'upstreams: {{app: {{servers: ["127.0.0.1:{origin.server_port}"], '
        "timeouts: {read: 30s}}}\n"
    )
    proc = start_ferryman(tmp_path_factory.mktemp("compress"), text, port)
    yield proc
    code = proc.stop(signal.SIGTERM)
    assert code == 0 and "Traceback" not in proc.log_text(), proc.log_text()


def _curl(port: int, path: str, *args: str) -> tuple[dict[str, str], bytes]:
    out = subprocess.run(
        ["curl", "-sS", "-D", "-", "--output", "-", *args, f"http://127.0.0.1:{port}{path}"],
        capture_output=True, timeout=60, check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    headers = {":status": head.split(b"\r\n")[0].split()[1].decode()}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


DECODE = {
    "gzip": gzip.decompress,
    "br": brotli.decompress,
    "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
}


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_each_encoding_decodes_to_the_origin_bytes(proxy: ProxyProcess, encoding: str) -> None:
    headers, body = _curl(proxy.port, "/json", "-H", f"Accept-Encoding: {encoding}")
    assert headers["content-encoding"] == encoding
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    assert headers["vary"] == "Accept-Encoding" and headers["etag"] == 'W/"v1"'
    assert len(body) < len(JSON) // 3
    assert DECODE[encoding](body) == JSON


def test_curl_compressed_and_negotiation(proxy: ProxyProcess) -> None:
    headers, body = _curl(proxy.port, "/json", "--compressed")  # curl offers all three
    assert headers["content-encoding"] == "br" and body == JSON  # (curl decoded it)
    headers, _ = _curl(proxy.port, "/json", "-H", "Accept-Encoding: gzip;q=0.5, zstd;q=0.8")
    assert headers["content-encoding"] == "zstd"
    headers, body = _curl(proxy.port, "/json", "-H", "Accept-Encoding: br;q=0, identity")
    assert "content-encoding" not in headers and body == JSON
    assert headers["content-length"] == str(len(JSON)) and headers["vary"] == "Accept-Encoding"


@pytest.mark.parametrize(
    ("path", "why"),
    [("/small", "below min_size"), ("/png", "not a compressible type"),
     ("/no-transform", "Cache-Control: no-transform")],
)
def test_what_is_not_compressed(proxy: ProxyProcess, path: str, why: str) -> None:
    headers, body = _curl(proxy.port, path, "-H", "Accept-Encoding: gzip, br, zstd")
    assert "content-encoding" not in headers, why
    assert headers["content-length"] == str(len(body)), why


def test_an_encoded_response_and_head_pass_as_they_are(proxy: ProxyProcess) -> None:
    headers, body = _curl(proxy.port, "/encoded", "-H", "Accept-Encoding: br")
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == JSON
    headers, body = _curl(proxy.port, "/json", "-I", "-H", "Accept-Encoding: br")
    assert "content-encoding" not in headers and headers["content-length"] == str(len(JSON))


def test_cached_responses_are_stored_plain_and_compressed_per_client(
    proxy: ProxyProcess,
) -> None:
    first, body = _curl(proxy.port, "/cached/json", "-H", "Accept-Encoding: gzip")
    assert first["cache-status"].endswith("stored") and gzip.decompress(body) == JSON
    hit, body = _curl(proxy.port, "/cached/json", "-H", "Accept-Encoding: br")
    assert hit["cache-status"].startswith("ferryman; hit")
    assert hit["content-encoding"] == "br" and brotli.decompress(body) == JSON
    plain, body = _curl(proxy.port, "/cached/json")
    assert "content-encoding" not in plain and body == JSON


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_static_files_are_compressed(proxy: ProxyProcess, encoding: str) -> None:
    """A static route with `compress: true`: a file above 64 KiB streams chunked, a
    smaller one is compressed whole and keeps a Content-Length; both decode to the file's
    bytes, with a weak ETag, Vary and no Accept-Ranges."""
    headers, body = _curl(proxy.port, "/files/big.txt", "-H", f"Accept-Encoding: {encoding}")
    assert headers["content-encoding"] == encoding
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert headers["etag"].startswith('W/"') and headers["vary"] == "Accept-Encoding"
    assert "accept-ranges" not in headers
    assert len(body) < len(BIG_TEXT) // 3 and DECODE[encoding](body) == BIG_TEXT
    headers, body = _curl(proxy.port, "/files/data.json", "-H", f"Accept-Encoding: {encoding}")
    assert headers["content-encoding"] == encoding
    assert headers["content-length"] == str(len(body)) and DECODE[encoding](body) == SMALL_JSON


def test_static_files_not_compressed(proxy: ProxyProcess) -> None:
    """What a static route sends as it is: an image; a client without Accept-Encoding
    (with Vary, Content-Length and Accept-Ranges); a Range request (206 of the plain
    bytes, with Vary). HEAD says what GET would (Content-Encoding, no Content-Length); a
    revalidation with the compressed response's weak ETag gets a 304 with that ETag and
    Vary (RFC 9110 §15.4.5)."""
    headers, body = _curl(proxy.port, "/files/photo.png", "-H", "Accept-Encoding: gzip")
    assert "content-encoding" not in headers and body == PNG and "vary" not in headers
    headers, body = _curl(proxy.port, "/files/big.txt")
    assert "content-encoding" not in headers and body == BIG_TEXT
    assert headers["vary"] == "Accept-Encoding" and headers["accept-ranges"] == "bytes"
    assert headers["content-length"] == str(len(BIG_TEXT)) and not headers["etag"].startswith("W/")
    headers, body = _curl(proxy.port, "/files/big.txt", "-H", "Accept-Encoding: gzip",
                          "-H", "Range: bytes=10-19")  # fmt: skip
    assert headers["content-range"] == f"bytes 10-19/{len(BIG_TEXT)}" and body == BIG_TEXT[10:20]
    assert "content-encoding" not in headers and headers["vary"] == "Accept-Encoding"
    got, _ = _curl(proxy.port, "/files/big.txt", "-H", "Accept-Encoding: gzip")
    headers, body = _curl(proxy.port, "/files/big.txt", "-I", "-H", "Accept-Encoding: gzip")
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
    assert "content-length" not in headers and headers["etag"] == got["etag"]
    weak = _curl(proxy.port, "/files/data.json", "-H", "Accept-Encoding: br")[0]["etag"]
    assert weak.startswith('W/"')
    headers, body = _curl(proxy.port, "/files/data.json", "-H", "Accept-Encoding: br",
                          "-H", f"If-None-Match: {weak}")  # fmt: skip
    assert headers[":status"] == "304" and body == b""
    assert headers["etag"] == weak and headers["vary"] == "Accept-Encoding"
    assert "content-encoding" not in headers


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_100_mb_stream_keeps_memory_flat(proxy: ProxyProcess) -> None:
    workers = [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(proxy.proc.pid)], capture_output=True, text=True
    ).stdout.split()]  # fmt: skip
    assert workers
    before = sum(_rss_kib(pid) for pid in workers)
    peak = before
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    conn.request("GET", "/stream", headers={"Accept-Encoding": "gzip"})
    resp = conn.getresponse()
    assert resp.getheader("Content-Encoding") == "gzip"
    unzip = zlib.decompressobj(31)
    plain = 0
    started = time.monotonic()
    while True:
        piece = resp.read(256 * 1024)
        if not piece:
            break
        plain += len(unzip.decompress(piece))
        peak = max(peak, sum(_rss_kib(pid) for pid in workers))
    plain += len(unzip.flush())
    conn.close()
    assert plain >= STREAM_MB * 1_000_000
    assert time.monotonic() - started < 60
    assert peak - before < 40 * 1024, f"the worker grew by {(peak - before) // 1024} MiB"
