"""The Prometheus endpoint (issue 7, item 5): ``server.metrics`` served by a process of its
own, with the counters of every worker summed. Real ``ferryman run`` processes, a real
origin, and the scrape parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_util import ProxyProcess, start_ferryman, wait_for_port
from prometheus_client.parser import text_string_to_metric_families

from origin import OriginServer, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _config(port: int, metrics_port: int, origin: OriginServer, workers: int = 2) -> str:
    return (
        f"server: {{workers: {workers}, metrics: 127.0.0.1:{metrics_port}}}\n"
        f"upstreams: {{app: {{servers: [\"{origin.address}\"]}}}}\n"
        "listeners:\n"
        f'  - bind: "127.0.0.1:{port}"\n'
        "    routes:\n"
        "      - {name: teapot, match: {path_prefix: /tea}, respond: {status: 418, body: tea}}\n"
        "      - {name: api, upstream: app}\n"
    )


def _scrape(port: int) -> Samples:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _wait_for(port: int, check: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    """Scrape until ``check`` holds (workers publish every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _start(tmp_path: Path, workers: int = 2) -> tuple[ProxyProcess, int, OriginServer]:
    origin = OriginServer().start()
    port, metrics_port = free_port(), free_port()
    proxy = start_ferryman(tmp_path, _config(port, metrics_port, origin, workers), port)
    try:
        wait_for_port(metrics_port, 10.0)
        deadline = time.monotonic() + 10
        while len(proxy.worker_pids()) < workers + 1:  # (and the metrics process)
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
    except BaseException:
        proxy.stop(signal.SIGKILL)
        origin.stop()
        raise
    return proxy, metrics_port, origin


def test_counters_match_the_requests_sent_across_two_workers(tmp_path: Path) -> None:
    proxy, metrics_port, origin = _start(tmp_path)
    try:
        proxied, local = 200, 50
        sent = 0
        for i in range(proxied):
            status, body = _get(proxy.port, f"/item/{i}")
            assert status == 200
            sent += len(body)
        for _ in range(local):
            assert _get(proxy.port, "/tea") == (418, b"tea")
        listener = f"127.0.0.1:{proxy.port}"
        samples = _wait_for(
            metrics_port,
            lambda s: _total(s, "ferryman_requests_total") >= proxied + local,
        )
        assert _value(
            samples, "ferryman_requests_total",
            listener=listener, route="api", upstream="app", status_class="2xx",
        ) == proxied
        assert _value(
            samples, "ferryman_requests_total",
            listener=listener, route="teapot", upstream="", status_class="4xx",
        ) == local
        assert _total(samples, "ferryman_requests_total") == proxied + local
        assert _value(
            samples, "ferryman_request_duration_seconds_count", listener=listener, route="api"
        ) == proxied
        assert _value(
            samples, "ferryman_request_duration_seconds_bucket",
            listener=listener, route="api", le="+Inf",
        ) == proxied
        assert _value(samples, "ferryman_upstream_response_seconds_count", upstream="app") == (
            proxied
        )
        assert _value(samples, "ferryman_sent_bytes_total", listener=listener) == (
            sent + local * 3
        )
        connects = _value(samples, "ferryman_upstream_connects_total", upstream="app")
        reuses = _value(samples, "ferryman_upstream_reuses_total", upstream="app")
        assert connects + reuses == proxied
        assert 1 <= connects <= 2  # (one pooled connection per worker)
        assert origin.connections == connects
        assert _value(samples, "ferryman_upstream_reuse_ratio", upstream="app") == pytest.approx(
            reuses / proxied
        )
        assert _value(
            samples, "ferryman_upstream_server_healthy", upstream="app", server=origin.address
        ) == 1
        assert _value(samples, "ferryman_workers") == 2
        # both workers served: each published its own slot
        assert _value(samples, "ferryman_active_connections") == 0
    finally:
        proxy.stop(signal.SIGTERM)
        origin.stop()
    assert proxy.proc.returncode == 0


def test_a_killed_worker_does_not_take_its_counts_with_it(tmp_path: Path) -> None:
    proxy, metrics_port, origin = _start(tmp_path)
    try:
        for i in range(100):
            assert _get(proxy.port, f"/a/{i}")[0] == 200
        _wait_for(metrics_port, lambda s: _total(s, "ferryman_requests_total") == 100)
        time.sleep(0.3)  # (a worker's last counts are published within 0.1 s)
        victim = sorted(p for p in proxy.worker_pids())[0]
        os.kill(victim, signal.SIGKILL)
        for i in range(50):
            assert _get(proxy.port, f"/b/{i}")[0] == 200
        samples = _wait_for(metrics_port, lambda s: _total(s, "ferryman_requests_total") == 150)
        assert _total(samples, "ferryman_requests_total") == 150
    finally:
        proxy.stop(signal.SIGTERM)
        origin.stop()


def test_reloads_are_counted(tmp_path: Path) -> None:
    proxy, metrics_port, origin = _start(tmp_path, workers=1)
    try:
        proxy.send_signal(signal.SIGHUP)
        samples = _wait_for(
            metrics_port, lambda s: _value(s, "ferryman_config_reloads_total", result="success")
        )
        assert _value(samples, "ferryman_config_reloads_total", result="success") == 1
        assert _value(samples, "ferryman_config_reloads_total", result="failure") == 0
        stamp = _value(samples, "ferryman_config_last_reload_success_timestamp_seconds")
        assert abs(stamp - time.time()) < 60
        proxy.config.write_text(proxy.config.read_text() + "bogus: 1\n")
        proxy.send_signal(signal.SIGHUP)
        samples = _wait_for(
            metrics_port, lambda s: _value(s, "ferryman_config_reloads_total", result="failure")
        )
        assert _value(samples, "ferryman_config_reloads_total", result="failure") == 1
        assert _value(samples, "ferryman_config_reloads_total", result="success") == 1
        assert _get(proxy.port, "/still")[0] == 200
    finally:
        proxy.stop(signal.SIGTERM)
        origin.stop()


def test_the_endpoint_serves_only_metrics(tmp_path: Path) -> None:
    proxy, metrics_port, origin = _start(tmp_path, workers=1)
    try:
        assert _get(metrics_port, "/")[0] == 404
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        conn.request("POST", "/metrics", body=b"x")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 405
        assert resp.getheader("Allow") == "GET, HEAD"
        conn.close()
        # the proxy's listener does not serve it
        assert _get(proxy.port, "/metrics")[0] == 200
        assert origin.requests[-1][1] == "/metrics"
    finally:
        proxy.stop(signal.SIGTERM)
        origin.stop()


def test_metrics_on_a_listener_address_is_refused(tmp_path: Path) -> None:
    from ferryman.config import ConfigError, load_config

    config = tmp_path / "ferryman.yaml"
    config.write_text(
        "server: {metrics: \"127.0.0.1:9999\"}\n"
        "upstreams: {app: {servers: [\"127.0.0.1:1\"]}}\n"
        "listeners: [{bind: \"127.0.0.1:9999\", upstream: app}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(config))
    assert str(info.value) == (
        f"{config}:3: listeners[0].bind: expected an address no other listener binds, "
        "got '127.0.0.1:9999' (already bound by server.metrics)"
    )
