"""Differential test: ``Consistent`` sends every key where real nginx ``hash $key consistent`` does.

Three origins behind a real nginx (``/usr/sbin/nginx`` or whatever is on PATH; skipped when
there is none). Each request carries a key in ``?k=``; which origin nginx chose is read from
the origins' request logs, and must be the backend our ring picks for the same key, weights
and ``host:port`` names. A second upstream marks the weight-2 server ``down``, which makes
nginx walk the ring past it, as our selector does for a rejected backend.
"""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryman.lb.algorithms import Consistent
from ferryman.lb.backend import Backend
from origin import OriginServer, free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
KEYS = [f"user-{i}" for i in range(150)] + [f"k{i * 7919}.x_{i % 13}" for i in range(150)]
WEIGHTS = (1, 2, 1)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed")


def _nginx_version(nginx: str) -> tuple[int, ...]:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def _config(tmp: Path, port: int, origins: list[OriginServer]) -> str:
    def servers(down: int | None) -> str:
        lines = []
        for i, (origin, weight) in enumerate(zip(origins, WEIGHTS, strict=True)):
            extra = " down" if i == down else ""
            lines.append(f"server {origin.address} weight={weight} max_fails=0{extra};")
        return "\n            ".join(lines)

    temp = {
        name: tmp / name
        for name in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp")
    }
    for path in temp.values():
        path.mkdir()
    return f"""
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp["client_body_temp"]};
    proxy_temp_path {temp["proxy_temp"]};
    fastcgi_temp_path {temp["fastcgi_temp"]};
    uwsgi_temp_path {temp["uwsgi_temp"]};
    scgi_temp_path {temp["scgi_temp"]};
    upstream all_up {{
        hash $arg_k consistent;
        {servers(None)}
    }}
    upstream one_down {{
        hash $arg_k consistent;
        {servers(1)}
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_connect_timeout 5s;
        proxy_read_timeout 5s;
        location /up/ {{ proxy_pass http://all_up; }}
        location /down/ {{ proxy_pass http://one_down; }}
    }}
}}
"""


@pytest.fixture
def origins() -> Iterator[list[OriginServer]]:
    servers = [OriginServer().start() for _ in WEIGHTS]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def nginx(tmp_path: Path, origins: list[OriginServer]) -> Iterator[int]:
    """A foreground nginx in front of the origins; yields its port."""
    assert NGINX is not None
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(_config(tmp_path, port, origins))
    cmd = [NGINX, "-p", str(tmp_path), "-c", str(conf)]
    if _nginx_version(NGINX) >= (1, 19, 5):  # -e: no attempt at the compiled-in error log
        cmd[1:1] = ["-e", str(tmp_path / "error.log")]
    log = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                log.flush()
                output = (tmp_path / "stderr.log").read_text(errors="replace")
                error_log = tmp_path / "error.log"
                if error_log.exists():
                    output += error_log.read_text(errors="replace")
                pytest.fail(f"nginx exited with {proc.returncode}:\n{output}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("nginx did not start listening within 15 s")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _nginx_choices(port: int, prefix: str, origins: list[OriginServer]) -> dict[str, str]:
    """Send every key through nginx; return key -> the origin address that served it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for key in KEYS:
            conn.request("GET", f"/{prefix}/?k={key}")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (key, response.status, body)
    finally:
        conn.close()
    chosen: dict[str, str] = {}
    for origin in origins:
        for _method, path, _headers in list(origin.requests):
            m = re.fullmatch(rf"/{prefix}/\?k=(.*)", path)
            if m:
                assert m.group(1) not in chosen, f"{m.group(1)} served twice"
                chosen[m.group(1)] = origin.address
    assert set(chosen) == set(KEYS)
    return chosen


def test_consistent_ring_matches_nginx(nginx: int, origins: list[OriginServer]) -> None:
    backends = [
        Backend(("127.0.0.1", origin.port), weight)
        for origin, weight in zip(origins, WEIGHTS, strict=True)
    ]
    assert [b.name for b in backends] == [o.address for o in origins]
    selector = Consistent(backends)

    up = _nginx_choices(nginx, "up", origins)
    ours = {key: selector.select(key.encode()) for key in KEYS}
    mismatches = {k: (up[k], b) for k, b in ours.items() if b is None or b.name != up[k]}
    assert not mismatches
    assert len(set(up.values())) == 3  # every server got keys: a meaningful comparison

    down = backends[1]
    walked = _nginx_choices(nginx, "down", origins)
    mismatches = {}
    for key, addr in walked.items():
        b = selector.select(key.encode(), accept=lambda b: b is not down)
        if b is None or b.name != addr:
            mismatches[key] = (addr, b)
    assert not mismatches
    assert down.name not in walked.values()
    assert sum(1 for k in KEYS if up[k] == down.name) > 30  # the walk was exercised
