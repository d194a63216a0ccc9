"""End to end: zero-downtime upgrade (``ferryman run --upgrade``, over
``server.upgrade_sock``) and config reload (SIGHUP) of a running ``ferryman run``.

Every test runs the real CLI in front of real origins on 127.0.0.1 (``origin_proc.py``
processes, whose logs say which connection carried which request, or nginx), with real
clients; each stops what it started. The load test runs wrk for 20 s next to a loop of
fresh connections while the server is upgraded and reloaded three times: nothing may be
lost.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trustme
from e2e_util import ProxyProcess, ferryman_cmd, wait_for_port
from lb_util import Procs, wait_until
from prometheus_client.parser import text_string_to_metric_families
from reload_util import (
    HANDED_OVER,
    NGINX,
    RELOAD_FAILED,
    RELOADED,
    RequestLoop,
    nginx_origin,
    peer_der,
    refused,
    reload,
    request,
    server_processes,
    start,
    tls_client,
    upgrade,
    wait_exit,
    wait_for,
    wait_refused,
    wait_workers,
)

from origin import free_port
from pki import write_leaf
from procs import alive, child_pids


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Origins and ferryman processes of one test, all stopped at teardown (SIGINT: each
    ferryman still running must exit 0, and no log may hold a traceback)."""
    p = Procs(tmp_path)
    yield p
    problems = p.close()
    assert not problems, "\n".join(problems)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for ``upgrade_sock`` (a unix socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="fm-", dir="/tmp") as d:
        yield Path(d)


def _start(procs: Procs, yaml_text: str, port: int, name: str = "fm") -> ProxyProcess:
    proxy = start(procs.tmp_path / name, yaml_text, port)
    procs.proxies.append(proxy)
    return proxy


def _line_of(text: str, needle: str) -> int:
    """The 1-based number of the line of ``text`` containing ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# --- the issue's check: wrk + fresh connections across an upgrade and three reloads -------


def _load_yaml(port: int, origin: str, sock: Path, pid: Path, workers: int, gen: int) -> str:
    return (
        f"server: {{workers: {workers}, grace_period: 5s, upgrade_sock: {sock}, "
        f"pid_file: {pid}}}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        "    routes:\n"
        "      - upstream: app\n"
        f'        response_headers: {{set: {{X-Gen: "{gen}"}}}}\n'
        "upstreams:\n"
        f'  app: {{servers: ["{origin}"]}}\n'
    )


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_upgrade_and_three_reloads_under_load_lose_nothing(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    with ExitStack() as stack:
        if os.access(NGINX, os.X_OK):
            origin = f"127.0.0.1:{stack.enter_context(nginx_origin(tmp_path / 'nginx'))}"
        else:
            origin = procs.origin("A").address
        port = free_port()
        sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
        old = start(tmp_path / "fm", _load_yaml(port, origin, sock, pid_file, 2, 0), port)
        procs.proxies.append(old)
        wait_workers(old, 2)
        wait_for(port, "X-Gen", "0")
        assert int(pid_file.read_text()) == old.pid

        loop = RequestLoop(port)
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c50", "-d20s", f"http://127.0.0.1:{port}/"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        began = time.monotonic()
        loop.start()
        try:
            time.sleep(3.0)
            # the upgrade: a new server with 3 workers takes the sockets, the old one drains
            old.config.write_text(_load_yaml(port, origin, sock, pid_file, 3, 1))
            new = upgrade(old, "upgrade")
            procs.proxies.append(new)
            assert wait_exit(old, 10) == 0, old.log_text()
            assert int(pid_file.read_text()) == new.pid
            wait_workers(new, 3)
            wait_for(port, "X-Gen", "1")
            # three reloads of the new server: workers 3 -> 2 -> 3, a header each time
            for gen, workers in ((2, 2), (3, 3), (4, 3)):
                time.sleep(1.5)
                new.config.write_text(_load_yaml(port, origin, sock, pid_file, workers, gen))
                out = reload(new)
                assert RELOADED in out, out
                wait_for(port, "X-Gen", str(gen))
                wait_workers(new, workers)
            assert time.monotonic() - began < 19, "the reloads did not happen under load"
            output, _ = wrk.communicate(timeout=40)
        finally:
            loop.finish()
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait(5)
        report = output.decode(errors="replace")
        assert wrk.returncode == 0, report
        assert "Socket errors" not in report, report
        assert "Non-2xx or 3xx responses" not in report, report
        m = re.search(r"^\s*(\d+) requests in ", report, re.M)
        assert m is not None and int(m.group(1)) > 0, report
        assert loop.failures == [], loop.failures
        assert loop.ok > 100, loop.ok

        # one server process tree is left: the new main process and its children
        assert not os.path.exists(f"/proc/{old.pid}")
        tree = server_processes(str(old.config))
        assert new.pid in tree
        assert all(pid == new.pid or parent == new.pid for pid, parent in tree.items()), (
            tree, new.pid)
        assert len(tree) == 1 + 3
        assert int(pid_file.read_text()) == new.pid
        # the last reload's change is what is served
        status, headers, body = request(port)
        assert (status, headers.get("x-gen")) == (200, "4")
        assert RELOAD_FAILED not in new.log_text()
        assert "restarting" not in new.log_text(), new.log_text()


# --- reload (SIGHUP) --------------------------------------------------------------------


def test_invalid_reload_changes_nothing_and_logs_file_line_key_and_reason(
    tmp_path: Path, procs: Procs
) -> None:
    a, b = procs.origin("A"), procs.origin("B")
    p1, p2 = free_port(), free_port()
    upstreams = (
        "upstreams:\n"
        f'  a: {{servers: ["{a.address}"]}}\n'
        "  app:\n"
        f'    servers: ["{b.address}"]\n'
        "    timeouts: {connect: CONNECT}\n"
    )
    first = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{p1}", upstream: a}}\n'
        + upstreams.replace("CONNECT", "2s")
    )
    proxy = _start(procs, first, p1)
    kept = http.client.HTTPConnection("127.0.0.1", p1, timeout=10)
    try:
        assert request(p1, "/x", conn=kept)[1]["x-origin"] == "A"
        # the new config moves the route to app (origin B) and adds a listener, with a bad
        # duration
        bad = (
            "server: {workers: 1}\n"
            "listeners:\n"
            f'  - {{bind: "127.0.0.1:{p1}", upstream: app}}\n'
            f'  - {{bind: "127.0.0.1:{p2}", upstream: app}}\n'
            + upstreams.replace("CONNECT", "fast")
        )
        proxy.config.write_text(bad)
        out = reload(proxy)
        line = _line_of(bad, "connect: fast")
        assert (
            f"ferryman[{proxy.pid}] ERROR ferryman.server: {RELOAD_FAILED}\n"
            f"{proxy.config}:{line}: upstreams.app.timeouts.connect: expected a duration "
            "such as \"2s\" or \"500ms\", got 'fast'\n"
        ) in out, out
        assert RELOADED not in out
        # nothing changed: the new listener is not opened, the old route still answers
        assert refused(p2)
        status, headers, body = request(p1, "/new")
        assert (status, headers["x-origin"], body) == (200, "A", b"hello from A /new\n")
        status, headers, _ = request(p1, "/kept", conn=kept)
        assert (status, headers["x-origin"]) == (200, "A")
        assert b.requests() == []
        # the same change with a valid duration is applied
        proxy.config.write_text(bad.replace("connect: fast", "connect: 2s"))
        out = reload(proxy)
        assert RELOADED in out, out
        wait_for(p1, "X-Origin", "B")
        wait_for_port(p2, 5)
        status, headers, body = request(p2, "/p2")
        assert (status, headers["x-origin"], body) == (200, "B", b"hello from B /p2\n")
    finally:
        kept.close()


def test_reload_routes_and_upstreams_apply_on_new_and_kept_connections(
    tmp_path: Path, procs: Procs
) -> None:
    a, b = procs.origin("A"), procs.origin("B")
    port = free_port()
    proxy = _start(
        procs,
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{port}", upstream: a}}\n'
        f'upstreams: {{a: {{servers: ["{a.address}"]}}}}\n',
        port,
    )
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        status, headers, body = request(port, "/b/before", conn=kept)
        assert (status, headers["x-origin"], body) == (200, "A", b"hello from A /b/before\n")
        assert "x-gen" not in headers
        assert kept.sock is not None
        local = kept.sock.getsockname()
        proxy.config.write_text(
            "server: {workers: 1}\n"
            "listeners:\n"
            f'  - bind: "127.0.0.1:{port}"\n'
            "    routes:\n"
            "      - {match: {path_prefix: /b}, upstream: b}\n"
            '      - {upstream: a, response_headers: {set: {X-Gen: "2"}}}\n'
            "upstreams:\n"
            f'  a: {{servers: ["{a.address}"]}}\n'
            f'  b: {{servers: ["{b.address}"]}}\n'
        )
        assert RELOADED in reload(proxy)
        wait_for(port, "X-Origin", "B", "/b/probe")
        # a new connection
        status, headers, body = request(port, "/b/new")
        assert (status, headers["x-origin"], body) == (200, "B", b"hello from B /b/new\n")
        status, headers, body = request(port, "/other")
        assert (status, headers["x-origin"], headers.get("x-gen")) == (200, "A", "2")
        # the keep-alive connection opened before the reload, still the same connection
        status, headers, body = request(port, "/b/kept", conn=kept)
        assert (status, headers["x-origin"], body) == (200, "B", b"hello from B /b/kept\n")
        status, headers, body = request(port, "/kept", conn=kept)
        assert (status, headers["x-origin"], headers.get("x-gen")) == (200, "A", "2")
        assert kept.sock is not None and kept.sock.getsockname() == local
        assert "/b/new" in b.requests() and "/b/kept" in b.requests()
        assert "/b/kept" not in a.requests()
    finally:
        kept.close()


def test_request_in_flight_during_reload_finishes_on_the_old_upstream(
    tmp_path: Path, procs: Procs
) -> None:
    a, b = procs.origin("A"), procs.origin("B")
    port = free_port()
    config = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{port}", upstream: UPSTREAM}}\n'
        "upstreams:\n"
        f'  a: {{servers: ["{a.address}"]}}\n'
        f'  b: {{servers: ["{b.address}"]}}\n'
    )
    proxy = _start(procs, config.replace("UPSTREAM", "a"), port)
    assert request(port, "/before")[1]["x-origin"] == "A"
    slow: list[tuple[int, dict[str, str], bytes]] = []
    thread = threading.Thread(
        target=lambda: slow.append(request(port, "/slow?ms=1500&size=1000")), daemon=True
    )
    thread.start()
    try:
        wait_until(lambda: "/slow?ms=1500&size=1000" in a.requests(), 5, "A got the request")
        proxy.config.write_text(config.replace("UPSTREAM", "b"))
        assert RELOADED in reload(proxy)
        wait_for(port, "X-Origin", "B", "/after")
        assert thread.is_alive(), "the slow request ended before the reload was applied"
    finally:
        thread.join(10)
    assert len(slow) == 1, "the slow request failed"
    status, headers, body = slow[0]
    assert (status, headers["x-origin"]) == (200, "A")
    assert body == (b"slow" * 250)[:1000]
    assert a.requests() == ["/before", "/slow?ms=1500&size=1000"]
    assert set(b.requests()) == {"/after"}


def test_reload_opens_added_listeners_and_closes_removed_ones(
    tmp_path: Path, procs: Procs
) -> None:
    a = procs.origin("A")
    p1, p2, p3 = free_port(), free_port(), free_port()

    def config(*ports: int) -> str:
        binds = "".join(f'  - {{bind: "127.0.0.1:{p}", upstream: app}}\n' for p in ports)
        return (
            "server: {workers: 1}\nlisteners:\n" + binds
            + f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )

    proxy = _start(procs, config(p1, p2), p1)
    wait_for_port(p2, 5)
    assert refused(p3)
    on_removed = http.client.HTTPConnection("127.0.0.1", p2, timeout=10)
    try:
        assert request(p2, "/p2", conn=on_removed)[0] == 200
        proxy.config.write_text(config(p1, p3))
        assert RELOADED in reload(proxy)
        wait_for_port(p3, 5)
        status, headers, body = request(p3, "/p3")
        assert (status, body) == (200, b"hello from A /p3\n")
        wait_refused(p2)
        assert request(p1, "/p1")[0] == 200
        # the idle keep-alive connection of the removed listener is closed (drained)
        assert on_removed.sock is not None
        on_removed.sock.settimeout(5)
        assert on_removed.sock.recv(1) == b""
    finally:
        on_removed.close()


def test_reload_keeps_the_pooled_upstream_connection(tmp_path: Path, procs: Procs) -> None:
    a, b = procs.origin("A"), procs.origin("B")
    port = free_port()
    config = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        "    routes:\n"
        '      - {upstream: app, response_headers: {set: {X-Gen: "GEN"}}}\n'
        "upstreams:\n"
        "  app: {servers: [SERVERS], timeouts: {read: READ}}\n"
    )

    def write(gen: int, servers: list[str], read: str) -> str:
        listed = ", ".join(f'"{s}"' for s in servers)
        return config.replace("GEN", str(gen)).replace("SERVERS", listed).replace("READ", read)

    proxy = _start(procs, write(1, [a.address], "10s"), port)
    for i in range(3):
        status, headers, _ = request(port, f"/before-{i}")
        assert (status, headers["x-gen"]) == (200, "1")
    before = a.request_ports()
    assert len(before) == 3 and len(set(before)) == 1, before
    # a route change: the upstream group is the same
    proxy.config.write_text(write(2, [a.address], "10s"))
    assert RELOADED in reload(proxy)
    wait_for(port, "X-Gen", "2")
    for i in range(3):
        status, headers, _ = request(port, f"/after-{i}")
        assert (status, headers["x-gen"]) == (200, "2")
    requests = a.requests()
    assert requests[:3] == ["/before-0", "/before-1", "/before-2"]
    assert requests[-3:] == ["/after-0", "/after-1", "/after-2"]
    # a server joins the group and its timeouts change: A stays
    proxy.config.write_text(write(3, [a.address, b.address], "20s"))
    assert RELOADED in reload(proxy)
    wait_for(port, "X-Gen", "3")
    origins = [request(port, f"/both-{i}")[1]["x-origin"] for i in range(4)]
    assert sorted(origins) == ["A", "A", "B", "B"], origins
    # one upstream connection to A carried every request to A, across both reloads
    ports = a.request_ports()
    assert set(ports) == set(before), (before, ports)
    conns = [int(line[1]) for line in a.lines() if line[0] == "conn"]
    assert conns.count(before[0]) == 1
    assert len(set(b.request_ports())) == 1


Certs = dict[str, tuple[tuple[str, str], bytes]]


def _two_certificates(tmp_path: Path, mode: int | None = None) -> tuple[trustme.CA, Certs]:
    """``cert1`` and ``cert2`` for 127.0.0.1 from one CA: name -> ((cert, key), DER)."""
    ca = trustme.CA()
    certs: Certs = {}
    for name in ("cert1", "cert2"):
        leaf = ca.issue_cert("127.0.0.1")
        cert, key = write_leaf(leaf, tmp_path, name)
        if mode is not None:
            for path in (cert, key):
                os.chmod(path, mode)
        der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        certs[name] = ((str(cert), str(key)), der)
    assert certs["cert1"][1] != certs["cert2"][1]
    return ca, certs


def _tls_config(port: int, cert_key: tuple[str, str], origin: str, server: str) -> str:
    cert, key = cert_key
    return (
        f"server: {{{server}}}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        "    upstream: app\n"
        f"    tls: {{cert: {cert}, key: {key}}}\n"
        f'upstreams: {{app: {{servers: ["{origin}"]}}}}\n'
    )


def _new_tls_connection(port: int, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    """Status of a GET on a new TLS connection, and the DER of the certificate it got."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        conn.request("GET", "/tls")
        resp = conn.getresponse()
        resp.read()
        return resp.status, peer_der(conn)
    finally:
        conn.close()


def test_reload_serves_the_new_certificate_to_new_tls_connections(
    tmp_path: Path, procs: Procs
) -> None:
    ca, certs = _two_certificates(tmp_path)
    a = procs.origin("A")
    port = free_port()

    def config(name: str) -> str:
        return _tls_config(port, certs[name][0], a.address, "workers: 1")

    proxy = _start(procs, config("cert1"), port)
    ctx = tls_client(ca.cert_pem.bytes())

    def new_connection_der() -> tuple[int, bytes]:
        return _new_tls_connection(port, ctx)

    kept = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        assert new_connection_der() == (200, certs["cert1"][1])
        kept.request("GET", "/kept")
        assert kept.getresponse().read() == b"hello from A /kept\n"
        assert peer_der(kept) == certs["cert1"][1]
        # a certificate file TLS cannot load: refused, cert1 stays
        bad = tmp_path / "bad.pem"
        bad.write_text("not a certificate\n")
        (_, key1), _ = certs["cert1"]
        proxy.config.write_text(config("cert1").replace(certs["cert1"][0][0], str(bad)))
        out = reload(proxy)
        assert re.search(
            re.escape(
                f"ferryman[{proxy.pid}] ERROR ferryman.server: {RELOAD_FAILED}\n"
                f"{proxy.config}: listeners[0].tls: cannot load the certificate, key or CA "
                f"({bad}, {key1}): "
            ) + r"\[SSL\] PEM lib .*\n",
            out,
        ), out
        assert new_connection_der() == (200, certs["cert1"][1])
        proxy.config.write_text(config("cert2"))
        assert RELOADED in reload(proxy)
        wait_until(lambda: new_connection_der() == (200, certs["cert2"][1]), 5,
                   "a new TLS connection gets cert2")
        # the connection opened before goes on, with the certificate it was made with
        kept.request("GET", "/kept-after")
        assert kept.getresponse().read() == b"hello from A /kept-after\n"
        assert peer_der(kept) == certs["cert1"][1]
    finally:
        kept.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_reload_gives_new_certificates_to_workers_running_as_another_user(
    tmp_path: Path, procs: Procs
) -> None:
    """Workers that switched to ``server.user`` cannot read keys only root may read; the
    main process reads them for the workers, which load them without a restart."""
    ca, certs = _two_certificates(tmp_path, mode=0o600)  # (root's only)
    a = procs.origin("A")
    port = free_port()

    def config(name: str) -> str:
        return _tls_config(port, certs[name][0], a.address, "workers: 1, user: nobody")

    proxy = _start(procs, config("cert1"), port)
    ctx = tls_client(ca.cert_pem.bytes())

    def new_connection_der() -> tuple[int, bytes]:
        return _new_tls_connection(port, ctx)

    assert new_connection_der() == (200, certs["cert1"][1])
    (worker,) = wait_workers(proxy, 1)
    assert os.stat(f"/proc/{worker}").st_uid != 0
    proxy.config.write_text(config("cert2"))
    assert RELOADED in reload(proxy)
    wait_until(lambda: new_connection_der() == (200, certs["cert2"][1]), 5,
               "a new TLS connection gets cert2")
    assert wait_workers(proxy, 1) == [worker]  # (applied by the worker, not a restart)
    assert "cannot apply the new config" not in proxy.log_text()


def test_reload_changes_the_number_of_workers(tmp_path: Path, procs: Procs) -> None:
    a = procs.origin("A")
    port = free_port()
    config = (
        "server: {workers: N, grace_period: 3s}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{port}", upstream: app}}\n'
        f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
    )
    proxy = _start(procs, config.replace("N", "1"), port)
    one = set(wait_workers(proxy, 1))
    proxy.config.write_text(config.replace("N", "3"))
    assert RELOADED in reload(proxy)
    three = set(wait_workers(proxy, 3))
    assert one < three  # the running worker is kept, two are added
    for i in range(10):
        assert request(port, f"/three-{i}")[0] == 200
    proxy.config.write_text(config.replace("N", "2"))
    assert RELOADED in reload(proxy)
    two = set(wait_workers(proxy, 2))
    assert one < two < three  # the one with the highest index is retired
    for i in range(10):
        assert request(port, f"/two-{i}")[0] == 200
    (retired,) = three - two
    wait_until(lambda: f"worker 2 (pid {retired}) retired, exited with 0" in proxy.log_text(), 5,
               "the main process reaped the retired worker")
    log = proxy.log_text()
    assert "restarting" not in log, log


def test_reload_of_a_missing_config_and_of_a_setting_it_cannot_change(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    a = procs.origin("A")
    port = free_port()
    first, second = sock_dir / "one.sock", sock_dir / "two.sock"

    def config(sock: Path, gen: int) -> str:
        return (
            f"server: {{workers: 1, upgrade_sock: {sock}}}\n"
            "listeners:\n"
            f'  - bind: "127.0.0.1:{port}"\n'
            "    routes:\n"
            f'      - {{upstream: app, response_headers: {{set: {{X-Gen: "{gen}"}}}}}}\n'
            f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )

    proxy = _start(procs, config(first, 1), port)
    proxy.config.unlink()
    out = reload(proxy)
    assert (
        f"ferryman[{proxy.pid}] ERROR ferryman.server: {RELOAD_FAILED}\n"
        f"{proxy.config}: cannot read the config file: No such file or directory\n"
    ) in out, out
    status, headers, _ = request(port)
    assert (status, headers["x-gen"]) == (200, "1")
    # upgrade_sock cannot change in a running server: a warning, the rest is applied
    proxy.config.write_text(config(second, 2))
    out = reload(proxy)
    assert RELOADED in out, out
    assert (
        f"ferryman[{proxy.pid}] WARNING ferryman.server: {proxy.config}: server.upgrade_sock "
        f"changed: a reload keeps '{first}' (restart to change it)\n"
    ) in out, out
    wait_for(port, "X-Gen", "2")
    assert stat.S_ISSOCK(os.stat(first).st_mode)
    assert not second.exists()


def test_reload_failing_on_an_occupied_port_changes_nothing(
    tmp_path: Path, procs: Procs
) -> None:
    a = procs.origin("A")
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = (
            "server: {workers: 1}\n"
            "listeners:\n"
            f'  - bind: "127.0.0.1:{port}"\n'
            "    routes:\n"
            '      - {upstream: app, response_headers: {set: {X-Gen: "GEN"}}}\n'
            "EXTRA"
            f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )
        proxy = _start(procs, config.replace("GEN", "1").replace("EXTRA", ""), port)
        assert request(port)[1]["x-gen"] == "1"
        extra = f'  - {{bind: "127.0.0.1:{busy}", upstream: app}}\n'
        proxy.config.write_text(config.replace("GEN", "2").replace("EXTRA", extra))
        out = reload(proxy)
        assert (
            f"ferryman[{proxy.pid}] ERROR ferryman.server: {RELOAD_FAILED}\n"
            f"{proxy.config}: cannot listen on 127.0.0.1:{busy}: Address already in use\n"
        ) in out, out
        assert RELOADED not in out
        for _ in range(3):
            status, headers, _ = request(port)
            assert (status, headers["x-gen"]) == (200, "1")
    # the port is free now: the same config reloads
    assert RELOADED in reload(proxy)
    wait_for(port, "X-Gen", "2")
    wait_for_port(busy, 5)
    assert request(busy, "/busy")[2] == b"hello from A /busy\n"


# --- upgrade (--upgrade over server.upgrade_sock) ------------------------------------------


def _upgrade_yaml(port: int, origin: str, sock: Path, pid: Path, workers: int) -> str:
    return (
        f"server: {{workers: {workers}, grace_period: 5s, upgrade_sock: {sock}, "
        f"pid_file: {pid}}}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{port}", upstream: app}}\n'
        f'upstreams: {{app: {{servers: ["{origin}"]}}}}\n'
    )


def test_upgrade_one_to_three_workers_and_back_twice_in_a_row(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    a = procs.origin("A")
    port = free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
    old = _start(procs, _upgrade_yaml(port, a.address, sock, pid_file, 1), port)
    wait_workers(old, 1)
    assert int(pid_file.read_text()) == old.pid
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    loops = [RequestLoop(port), RequestLoop(port, keep_alive=True)]
    for loop in loops:
        loop.start()
    try:
        time.sleep(0.5)
        # 1 worker -> 3 workers
        old.config.write_text(_upgrade_yaml(port, a.address, sock, pid_file, 3))
        first = upgrade(old, "upgrade-1")
        procs.proxies.append(first)
        assert wait_exit(old, 10) == 0, old.log_text()
        assert "upgrade: the new server is ready; draining and exiting" in old.log_text()
        assert int(pid_file.read_text()) == first.pid
        wait_workers(first, 3)
        time.sleep(0.5)
        # 3 workers -> 1 worker, through the same socket path
        first.config.write_text(_upgrade_yaml(port, a.address, sock, pid_file, 1))
        second = upgrade(first, "upgrade-2")
        procs.proxies.append(second)
        assert wait_exit(first, 10) == 0, first.log_text()
        assert int(pid_file.read_text()) == second.pid
        wait_workers(second, 1)
        time.sleep(0.5)
    finally:
        for loop in loops:
            loop.finish()
    for loop in loops:
        assert loop.failures == [], loop.failures
        assert loop.ok > 10, loop.ok
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert request(port, "/end")[2] == b"hello from A /end\n"
    assert set(server_processes(str(old.config))) == {second.pid, *second.worker_pids()}


def test_upgrade_without_upgrade_sock_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "ferryman.yaml"
    port = free_port()
    config.write_text(
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:9"]}}\n'
    )
    out = subprocess.run(
        ferryman_cmd("run", "-c", str(config), "--upgrade"), capture_output=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.decode() == (
        f"ferryman: --upgrade needs server.upgrade_sock in {config}: the socket the "
        "running server hands its listening sockets over on\n"
    )
    assert refused(port)


def test_upgrade_with_nobody_on_the_upgrade_sock_exits_1(tmp_path: Path, sock_dir: Path) -> None:
    config = tmp_path / "ferryman.yaml"
    port = free_port()
    sock = sock_dir / "upgrade.sock"
    config.write_text(
        f"server: {{upgrade_sock: {sock}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:9"]}}\n'
    )
    cmd = ferryman_cmd("run", "-c", str(config), "--upgrade")
    # no socket file at all
    out = subprocess.run(cmd, capture_output=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.decode() == (
        f"ferryman: {config}: server.upgrade_sock: no running server answers on {sock}: "
        "[Errno 2] No such file or directory\n"
    )
    # the socket of a server that died: nobody listens on it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))
    out = subprocess.run(cmd, capture_output=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.decode() == (
        f"ferryman: {config}: server.upgrade_sock: no running server answers on {sock}: "
        "[Errno 111] Connection refused\n"
    )
    assert refused(port)


def _second_start_is_refused(second_config: Path, sock: Path) -> None:
    out = subprocess.run(
        ferryman_cmd("run", "-c", str(second_config)), capture_output=True, timeout=30
    )
    assert (out.returncode, out.stderr.decode()) == (
        1,
        f"ferryman: {second_config}: server.upgrade_sock: a running server listens on "
        f"{sock}; start with --upgrade to take over from it\n",
    )


def test_second_server_on_the_same_upgrade_sock_without_upgrade_exits_1(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    a = procs.origin("A")
    port, other_port = free_port(), free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
    running = _start(procs, _upgrade_yaml(port, a.address, sock, pid_file, 1), port)
    # another config (another port) naming the same upgrade_sock
    other = tmp_path / "other.yaml"
    other.write_text(
        f"server: {{workers: 1, upgrade_sock: {sock}}}\n"
        f'listeners: [{{bind: "127.0.0.1:{other_port}", upstream: app}}]\n'
        f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
    )
    _second_start_is_refused(other, sock)
    assert refused(other_port)
    # the running server is untouched: it serves, keeps its pid file, and can be upgraded
    assert request(port, "/still")[2] == b"hello from A /still\n"
    assert int(pid_file.read_text()) == running.pid
    new = upgrade(running, "upgrade")
    procs.proxies.append(new)
    assert wait_exit(running, 10) == 0
    assert request(port, "/upgraded")[2] == b"hello from A /upgraded\n"


def test_a_failed_upgrade_leaves_the_old_server_serving(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    a = procs.origin("A")
    port = free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
    good = _upgrade_yaml(port, a.address, sock, pid_file, 1)
    old = _start(procs, good, port)
    cmd = ferryman_cmd("run", "-c", str(old.config), "--upgrade")
    loop = RequestLoop(port, keep_alive=True)
    loop.start()
    try:
        # an invalid config: refused before the running server is asked for anything
        old.config.write_text(good.replace("grace_period: 5s", "grace_period: soon"))
        out = subprocess.run(cmd, capture_output=True, timeout=30)
        assert (out.returncode, out.stderr.decode()) == (
            2,
            f"ferryman: invalid config:\n{old.config}:1: server.grace_period: expected a "
            "duration such as \"2s\" or \"500ms\", got 'soon'\n",
        )
        # a new listener on an occupied port: the new server has the sockets, then fails
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            old.config.write_text(
                good.replace("listeners:\n", f'listeners:\n  - {{bind: "127.0.0.1:{busy}", '
                             "upstream: app}\n")
            )
            out = subprocess.run(cmd, capture_output=True, timeout=30)
        assert (out.returncode, out.stderr.decode()) == (
            1, "ferryman: cannot listen: [Errno 98] Address already in use\n"
        )
        wait_until(
            lambda: "upgrade: the new server went away before it was ready; serving on"
            in old.log_text(), 5, "the old server noticed",
        )
        assert old.proc.poll() is None
        assert int(pid_file.read_text()) == old.pid
        assert request(port, "/still")[2] == b"hello from A /still\n"
        # the next upgrade works
        old.config.write_text(_upgrade_yaml(port, a.address, sock, pid_file, 2))
        new = upgrade(old, "upgrade")
        procs.proxies.append(new)
        assert wait_exit(old, 10) == 0, old.log_text()
        assert int(pid_file.read_text()) == new.pid
        time.sleep(0.3)
    finally:
        loop.finish()
    assert loop.failures == [], loop.failures
    assert loop.ok > 10


def test_upgrade_to_a_config_with_other_listeners(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    """The new server takes the sockets it still listens on, binds the new ones, and the
    addresses it dropped stop listening once the old server is gone."""
    a = procs.origin("A")
    kept, dropped, added = free_port(), free_port(), free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"

    def config(*ports: int) -> str:
        binds = "".join(f'  - {{bind: "127.0.0.1:{p}", upstream: app}}\n' for p in ports)
        return (
            f"server: {{workers: 2, grace_period: 5s, upgrade_sock: {sock}, "
            f"pid_file: {pid_file}}}\nlisteners:\n" + binds
            + f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )

    old = _start(procs, config(kept, dropped), kept)
    wait_for_port(dropped, 5)
    loop = RequestLoop(kept)
    loop.start()
    try:
        old.config.write_text(config(kept, added))
        new = upgrade(old, "upgrade")
        procs.proxies.append(new)
        assert wait_exit(old, 10) == 0, old.log_text()
        assert request(added, "/added")[2] == b"hello from A /added\n"
        assert refused(dropped)
        time.sleep(0.3)
    finally:
        loop.finish()
    assert loop.failures == [], loop.failures
    assert request(kept, "/kept")[2] == b"hello from A /kept\n"


def test_slow_request_in_flight_on_the_old_server_completes_while_it_drains(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    a = procs.origin("A")
    port = free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
    old = _start(procs, _upgrade_yaml(port, a.address, sock, pid_file, 1), port)
    path = "/slow?ms=3000&size=200000"
    slow: list[tuple[int, dict[str, str], bytes]] = []
    thread = threading.Thread(target=lambda: slow.append(request(port, path)), daemon=True)
    thread.start()
    try:
        wait_until(lambda: path in a.requests(), 5, "A got the slow request")
        old.config.write_text(_upgrade_yaml(port, a.address, sock, pid_file, 2))
        new = upgrade(old, "upgrade")
        procs.proxies.append(new)
        assert thread.is_alive(), "the slow request ended before the handover"
        assert old.proc.poll() is None, "the old server did not wait for its request"
        for i in range(5):
            assert request(port, f"/new-{i}")[0] == 200
    finally:
        thread.join(10)
    assert len(slow) == 1, "the slow request failed"
    status, headers, body = slow[0]
    assert (status, headers["x-origin"], len(body)) == (200, "A", 200000)
    assert body == (b"slow" * 50001)[:200000]
    assert wait_exit(old, 10) == 0, old.log_text()
    assert int(pid_file.read_text()) == new.pid
    assert not os.path.exists(f"/proc/{old.pid}")


def test_signals_after_an_upgrade_go_to_the_new_server(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    """The new server stops gracefully on SIGTERM and removes its pid file and socket."""
    a = procs.origin("A")
    port = free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
    old = _start(procs, _upgrade_yaml(port, a.address, sock, pid_file, 1), port)
    new = upgrade(old, "upgrade")
    procs.proxies.append(new)
    assert wait_exit(old, 10) == 0
    assert request(port)[0] == 200
    new.send_signal(signal.SIGTERM)
    assert wait_exit(new, 10) == 0, new.log_text()
    assert not pid_file.exists()
    assert not sock.exists()
    wait_refused(port)


# --- found wanting: these show bugs (see their docstrings) -------------------------------


def _sockets_of(pid: int) -> int:
    """How many sockets process ``pid`` has open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def test_reload_raising_workers_while_a_retired_one_drains(tmp_path: Path, procs: Procs) -> None:
    """workers 3 -> 2 -> 3 in quick succession: worker 2, retired by the first reload, is
    still draining an idle keep-alive connection (up to DRAIN_IDLE_WAIT) when the second
    asks for 3 workers again. The new worker 2 starts as soon as the retired one exits
    (the two would share worker 2's metrics slot), and that clean exit is no crash to
    restart from with a back-off."""
    a = procs.origin("A")
    port = free_port()
    config = (
        "server: {workers: N, grace_period: 5s}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{port}", upstream: app}}\n'
        f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
    )
    proxy = _start(procs, config.replace("N", "3"), port)
    wait_workers(proxy, 3)
    m = re.search(r"worker 2 started \(pid (\d+)\)", proxy.log_text())
    assert m is not None, proxy.log_text()
    retired = int(m.group(1))
    base = _sockets_of(retired)
    conns: list[http.client.HTTPConnection] = []
    try:
        # idle keep-alive connections until worker 2 holds one of them
        while _sockets_of(retired) <= base:
            assert len(conns) < 300, "worker 2 never got a connection"
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conns.append(conn)
            assert request(port, "/hold", conn=conn)[0] == 200
        proxy.config.write_text(config.replace("N", "2"))
        assert RELOADED in reload(proxy)
        proxy.config.write_text(config.replace("N", "3"))
        assert RELOADED in reload(proxy)
        wait_until(
            lambda: f"worker 2 (pid {retired}) retired, exited with 0" in proxy.log_text(), 10,
            "the retired worker exited",
        )
        workers = wait_workers(proxy, 3)
        assert retired not in workers
        for i in range(10):
            assert request(port, f"/after-{i}")[0] == 200
    finally:
        for conn in conns:
            conn.close()
    log = proxy.log_text()
    exited = log.index(f"worker 2 (pid {retired}) retired, exited with 0")
    restarted = list(re.finditer(r"worker 2 started \(pid (\d+)\)", log))[-1]
    assert int(restarted.group(1)) != retired
    assert "restarting" not in log, log
    assert restarted.start() > exited, f"worker 2 was replaced while the retired one ran:\n{log}"


def test_same_config_started_twice_without_upgrade_names_the_upgrade_sock(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    """The likeliest mistake: running the very same config again, forgetting --upgrade.
    The refusal should say why (the upgrade_sock check exists for this); the listener
    port is bound first, so it fails with "cannot listen: Address already in use"."""
    a = procs.origin("A")
    port = free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
    running = _start(procs, _upgrade_yaml(port, a.address, sock, pid_file, 1), port)
    _second_start_is_refused(running.config, sock)
    assert request(port, "/still")[2] == b"hello from A /still\n"
    assert int(pid_file.read_text()) == running.pid


# --- reload and upgrade: access logs, metrics, --daemon, discovered groups ----------------


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_reload_adds_an_access_log_the_workers_could_not_open_themselves(
    tmp_path: Path, procs: Procs
) -> None:
    """Workers that switched to ``server.user`` cannot create a file in a directory only
    root may write to: a reload adding (then changing) an access log there has the main
    process open it for them, and the same worker writes its lines without a restart."""
    a = procs.origin("A")
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chown(logs, 0, 0)
    os.chmod(logs, 0o755)
    access = logs / "access.log"
    # the premise: the workers' user cannot create the file itself
    probe = subprocess.run(
        ["/bin/sh", "-c", f': >> "{access}"'], user="nobody", capture_output=True, timeout=30
    )
    assert probe.returncode != 0 and b"Permission denied" in probe.stderr, probe
    assert not access.exists()

    def config(flush: str | None) -> str:
        log = (
            f"    access_log: {{format: json, path: {access}, flush: {flush}}}\n"
            if flush is not None else ""
        )
        return (
            "server: {workers: 1, user: nobody}\n"
            "listeners:\n"
            f'  - bind: "127.0.0.1:{port}"\n'
            "    upstream: app\n"
            + log
            + f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )

    def entries() -> list[dict[str, object]]:
        try:
            text = access.read_text()
        except FileNotFoundError:
            return []
        # (whole lines only: one may be half written)
        return [json.loads(line) for line in text.split("\n")[:-1]]

    def logged(path: str) -> list[dict[str, object]]:
        return [e for e in entries() if e["path"] == path]

    proxy = _start(procs, config(None), port)
    (worker,) = wait_workers(proxy, 1)
    nobody = pwd.getpwnam("nobody").pw_uid
    wait_until(lambda: os.stat(f"/proc/{worker}").st_uid == nobody, 5,
               "the worker switched to nobody")
    assert request(port, "/unlogged")[0] == 200

    for gen, flush in ((1, "0.1s"), (2, "0.2s")):
        proxy.config.write_text(config(flush))
        out = reload(proxy)
        assert RELOADED in out, out
        assert "cannot open the access log" not in out, out
        st = os.stat(access)  # (opened, so created, by the main process: root's)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
        # the worker takes the new config a moment after the main process logged it
        deadline = time.monotonic() + 10
        for n in itertools.count():
            path = f"/probe-{gen}-{n}"
            assert request(port, path)[0] == 200
            time.sleep(0.25)  # (> flush)
            if logged(path):
                break
            assert time.monotonic() < deadline, f"reload {gen}: nothing logged\n{entries()}"
        paths = [f"/gen{gen}-{i}" for i in range(5)]
        for path in paths:
            assert request(port, path)[0] == 200
        wait_until(lambda paths=paths: all(logged(p) for p in paths), 5,
                   f"reload {gen}: the five requests are logged")
        for path in paths:
            (entry,) = logged(path)
            assert (entry["method"], entry["status"], entry["upstream_addr"]) == (
                "GET", 200, a.address
            ), entry
        assert wait_workers(proxy, 1) == [worker]  # (applied by the worker: no replacement)
    assert not logged("/unlogged")
    log = proxy.log_text()
    assert "cannot apply the new config" not in log, log
    assert "restarting" not in log, log
    assert "Traceback" not in log, log


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics on a new connection (must answer 200); the samples, parsed by
    prometheus-client."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body)
    finally:
        conn.close()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def _sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_do_not_flap_across_an_upgrade(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    """Across an upgrade, /metrics is answered by one server at a time: the old one until
    it hands over (its metrics process is stopped then, though its workers still drain),
    the new one after, never the old one again. The new server's counters start from 0:
    counters restarting across an upgrade is expected (Prometheus' rate() handles resets)."""
    a = procs.origin("A")
    port, metrics_port = free_port(), free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"

    def config(workers: int) -> str:
        return (
            f"server: {{workers: {workers}, grace_period: 5s, upgrade_sock: {sock}, "
            f"pid_file: {pid_file}, metrics: 127.0.0.1:{metrics_port}}}\n"
            "listeners:\n"
            f'  - {{bind: "127.0.0.1:{port}", upstream: app}}\n'
            f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )

    def wait_total(expected: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        deadline = time.monotonic() + 5
        while True:
            samples = _scrape(metrics_port)
            total = _sum(samples, "ferryman_requests_total")
            if total == expected:
                return samples
            assert total < expected and time.monotonic() < deadline, (total, expected)
            time.sleep(0.05)

    old = _start(procs, config(1), port)
    wait_for_port(metrics_port, 10)
    wait_workers(old, 2)  # (the worker and the metrics process)
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for i in range(49):
            assert request(port, f"/before-{i}")[0] == 200
        assert request(port, "/kept", conn=kept)[0] == 200  # (then idle: the old drains ~1 s)
        samples = wait_total(50)
        assert _sum(samples, "ferryman_workers") == 1
        old.config.write_text(config(2))
        new = upgrade(old, "upgrade")
        procs.proxies.append(new)
        seen: list[tuple[float, bool]] = []  # (ferryman_workers, the old main still ran)
        for _ in range(30):
            samples = _scrape(metrics_port)
            seen.append((_sum(samples, "ferryman_workers"), old.proc.poll() is None))
            time.sleep(0.03)
        values = [w for w, _ in seen]
        assert 2 in values, seen
        first = values.index(2)
        assert all(w == 2 for w in values[first:]), f"the old server answered again: {seen}"
        assert set(values[:first]) <= {1}, seen
        assert seen[first][1], f"the old server was gone before the new one answered: {seen}"
        assert wait_exit(old, 5 + 5) == 0, old.log_text()
    finally:
        kept.close()
    # the new server counts its own requests, from 0
    for i in range(10):
        assert request(port, f"/after-{i}")[0] == 200
    samples = wait_total(10)
    assert _sum(samples, "ferryman_workers") == 2
    time.sleep(0.3)  # (nothing else comes: the old server's 50 are not added)
    assert _sum(_scrape(metrics_port), "ferryman_requests_total") == 10


def _stop_daemons(config: Path) -> list[int]:
    """SIGTERM the main process of every ``--daemon`` server of ``config`` still running,
    wait for the whole tree to go (SIGKILL after 10 s); the pids that had to be killed."""
    def daemons() -> dict[int, int]:
        out = {}
        for pid, parent in server_processes(str(config)).items():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--daemon" in cmdline:
                out[pid] = parent
        return out

    tree = daemons()
    for pid, parent in tree.items():
        if parent not in tree:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while daemons() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = list(daemons())
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


def test_daemon_upgrade_writes_the_pid_file_once_it_took_over(
    tmp_path: Path, sock_dir: Path, procs: Procs
) -> None:
    """``ferryman run --upgrade --daemon`` exits 0 once the detached server has taken over
    (not before, and not only when it stops): the pid file then names it, and the old
    server drains and exits."""
    a = procs.origin("A")
    port = free_port()
    sock, pid_file = sock_dir / "upgrade.sock", tmp_path / "ferryman.pid"
    error_log = tmp_path / "error.log"
    grace = 2

    def config(workers: int) -> str:
        return (
            f"server: {{workers: {workers}, grace_period: {grace}s, upgrade_sock: {sock}, "
            f"pid_file: {pid_file}, error_log: {error_log}}}\n"
            "listeners:\n"
            f'  - {{bind: "127.0.0.1:{port}", upstream: app}}\n'
            f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )

    old = _start(procs, config(1), port)
    wait_until(lambda: pid_file.exists() and pid_file.read_text() == f"{old.pid}\n", 5,
               "the old server wrote its pid file")
    wait_workers(old, 1)
    old.config.write_text(config(2))
    cmd = ferryman_cmd("run", "-c", str(old.config), "--log-level", "info", "--upgrade",
                       "--daemon")
    try:
        began = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "ferryman run --upgrade --daemon did not exit within 60 s; pid file: "
                f"{pid_file.read_text() if pid_file.exists() else None!r}, old server "
                f"running: {old.proc.poll() is None}, daemon(s): "
                f"{server_processes(str(old.config))}\n--- error log:\n"
                f"{error_log.read_text(errors='replace')}"
            )
        took = time.monotonic() - began
        assert (out.returncode, out.stdout, out.stderr) == (0, b"", b""), out
        # right after the launcher returned: the pid file names the new main process
        daemon = int(pid_file.read_text())
        assert daemon != old.pid
        assert alive(daemon)
        cmdline = Path(f"/proc/{daemon}/cmdline").read_bytes().split(b"\0")
        assert b"--upgrade" in cmdline and b"--daemon" in cmdline, cmdline
        assert HANDED_OVER in error_log.read_text(), error_log.read_text()
        assert wait_exit(old, grace + 5) == 0, error_log.read_text()
        assert took < 30, took
        assert request(port, "/daemon")[2] == b"hello from A /daemon\n"
        wait_until(lambda: len(child_pids(daemon)) == 2, 10, "the daemon runs 2 workers")
        assert int(pid_file.read_text()) == daemon
        # it stops on SIGTERM, removing its pid file and upgrade socket
        os.kill(daemon, signal.SIGTERM)
        wait_until(lambda: not alive(daemon), grace + 5, "the daemon exited")
        assert not pid_file.exists()
        assert not sock.exists()
    finally:
        killed = _stop_daemons(old.config)
    assert killed == [], killed
    text = error_log.read_text(errors="replace")
    assert "Traceback" not in text, text


def test_reload_adding_a_discovered_group_serves_it_at_once(
    tmp_path: Path, procs: Procs
) -> None:
    """A reload adding an upstream group whose servers come from a file (the server ran
    no control process until then): the main process waits for the control process's
    first publication before it sends the config to the workers, so the first request
    routed to the new group finds its server."""
    a, b = procs.origin("A"), procs.origin("B")
    port = free_port()
    servers = tmp_path / "servers.yaml"
    servers.write_text(f'- "{b.address}"\n')
    first = (
        "server: {workers: 1, grace_period: 5s}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        "    routes:\n"
        '      - {upstream: a, response_headers: {set: {X-Gen: "1"}}}\n'
        "upstreams:\n"
        f'  a: {{servers: ["{a.address}"]}}\n'
    )
    proxy = _start(procs, first, port)
    (worker,) = wait_workers(proxy, 1)  # (no control process: nothing to discover)
    assert request(port, "/b/before")[1]["x-origin"] == "A"
    proxy.config.write_text(
        "server: {workers: 1, grace_period: 5s}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        "    routes:\n"
        "      - {match: {path_prefix: /b}, upstream: b}\n"
        '      - {upstream: a, response_headers: {set: {X-Gen: "2"}}}\n'
        "upstreams:\n"
        f'  a: {{servers: ["{a.address}"]}}\n'
        f"  b: {{file: {servers}}}\n"
    )
    out = reload(proxy)
    assert RELOADED in out, out
    # the worker has the new config once the other route says so (no request to /b yet)
    wait_for(port, "X-Gen", "2", "/a")
    status, headers, body = request(port, "/b/first")
    assert (status, headers.get("x-origin"), body) == (200, "B", b"hello from B /b/first\n"), (
        status, headers, body, proxy.log_text())
    assert b.requests() == ["/b/first"]
    assert "/b/first" not in a.requests()
    assert wait_workers(proxy, 2) and worker in proxy.worker_pids()  # (+ control process)
    log = proxy.log_text()
    assert "no servers discovered yet" not in log, log
    assert "cannot apply the new config" not in log, log


_FAILING_APP = '''
import os

from ferryman.app.config_proxy import ConfigProxy


class FailingOnReload(ConfigProxy):
    """Refuses to start in a running worker (a reload) while the marker file exists."""

    def worker_start(self, service):
        if getattr(service, "reloading", False) and os.path.exists(os.environ["FM_MARKER"]):
            raise RuntimeError("this worker refuses the new config")
        super().worker_start(service)
'''


def test_a_worker_that_cannot_apply_a_reload_is_replaced_at_once(
    tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose reload fails (here the app's ``worker_start`` raises) says so and
    drains; the main process starts its replacement at once, with the new config, and
    no client sees an error meanwhile."""
    pkg = tmp_path / "apps"
    pkg.mkdir()
    (pkg / "failing_app.py").write_text(_FAILING_APP)
    marker = tmp_path / "marker"
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(pkg) + (os.pathsep + path if path else ""))
    monkeypatch.setenv("FM_MARKER", str(marker))
    a = procs.origin("A")
    port = free_port()

    def config(gen: int) -> str:
        return (
            "app: failing_app:FailingOnReload\n"
            "server: {workers: 2, grace_period: 3s}\n"
            "listeners:\n"
            f'  - bind: "127.0.0.1:{port}"\n'
            "    routes:\n"
            "      - upstream: app\n"
            f'        response_headers: {{set: {{X-Gen: "{gen}"}}}}\n'
            f'upstreams: {{app: {{servers: ["{a.address}"]}}}}\n'
        )

    proxy = _start(procs, config(1), port)
    before = set(wait_workers(proxy, 2))
    loop = RequestLoop(port)
    loop.start()
    try:
        marker.write_text("")
        proxy.config.write_text(config(2))
        assert RELOADED in reload(proxy)
        wait_until(
            lambda: proxy.log_text().count("could not apply the new config") == 2, 10,
            "both workers said they could not apply it",
        )
        wait_until(
            lambda: len(set(wait_workers(proxy, 2, 10)) & before) == 0, 15,
            "both workers replaced",
        )
        for i in range(10):
            status, headers, _ = request(port, f"/after-{i}")
            assert status == 200
            assert headers.get("x-gen") == "2"
    finally:
        loop.finish()
    assert loop.failures == [], loop.failures
    assert loop.ok > 0
    log = proxy.log_text()
    assert "restarting in" not in log, log
