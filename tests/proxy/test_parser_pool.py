"""Idle keep-alive connections lend their request parser back to the service's pool.

Real sockets: clients interleave partial heads, bodies and pipelined requests across
keep-alive connections, so that parsers change hands between every request; every
response must still belong to its own request.
"""

from __future__ import annotations

import time

from proxy_util import RawClient, build_request, variant

from ferryman import HttpPeer, ProxyHttp
from origin import OriginServer


class Forward(ProxyHttp):
    def __init__(self, address: str) -> None:
        self.address = address

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)


def _parsers_held(harness) -> list[object]:
    return harness.call(lambda: [c.parser for c in harness.service.connections])


def _parsers_after_a_sweep(harness) -> list[object]:
    """The connections' parsers once idle ones were reclaimed (at most a tick later)."""
    deadline = time.monotonic() + 5
    held = _parsers_held(harness)
    while any(p is not None for p in held) and time.monotonic() < deadline:
        time.sleep(0.02)
        held = _parsers_held(harness)
    return held


def test_idle_connections_hold_no_parser_and_requests_interleave(
    mode, origin: OriginServer, start_proxy
) -> None:
    harness = start_proxy(variant(mode, Forward)(origin.address))
    clients = [RawClient(harness.port) for _ in range(4)]
    try:
        for c in clients:
            assert c.request("GET", "/headers").status == 200
        assert _parsers_after_a_sweep(harness) == [None] * 4
        pooled = harness.call(lambda: len(harness.service.parsers))
        assert 1 <= pooled <= 4

        a, b, c, d = clients
        # a stops inside its head, b inside its body: they keep their parsers while
        # c and d run whole requests (taking and giving back parsers) in between
        a.send(b"GET /headers HTTP/1.1\r\nHost: a.example\r\nX-Pa")
        body = b"b" * 3000
        head_b = build_request("POST", "/echo", body, [("Host", "b.example")])
        b.send(head_b[: len(head_b) - 1000])
        for i in range(3):
            rc = c.request("POST", "/echo", f"c{i}".encode(), [("Host", "c.example")])
            assert (rc.status, rc.body) == (200, f"c{i}".encode())
            # two pipelined requests in one write
            d.send(
                build_request("POST", "/echo", b"d1", [("Host", "d.example")])
                + build_request("GET", "/headers", headers=[("Host", "d2.example")])
            )
            r1, r2 = d.read_response("POST"), d.read_response("GET")
            assert (r1.status, r1.body) == (200, b"d1")
            assert r2.status == 200 and b"d2.example" in r2.body
        a.send(b"rt: yes\r\n\r\n")
        ra = a.read_response("GET")
        assert ra.status == 200
        assert b'["Host", "a.example"]' in ra.body and b'["X-Part", "yes"]' in ra.body
        b.send(head_b[len(head_b) - 1000 :])
        rb = b.read_response("POST")
        assert (rb.status, rb.body) == (200, body)
        assert _parsers_after_a_sweep(harness) == [None] * 4
    finally:
        for cl in clients:
            cl.close()


def test_a_connection_that_never_sends_a_byte_holds_no_parser(origin, start_proxy) -> None:
    harness = start_proxy(Forward(origin.address))
    with RawClient(harness.port) as silent:
        deadline = time.monotonic() + 5
        while not _parsers_held(harness) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _parsers_held(harness) == [None]
        busy = RawClient(harness.port)
        assert busy.request("GET", "/headers").status == 200
        assert _parsers_after_a_sweep(harness) == [None, None]
        silent.send(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
        assert silent.read_response().status == 200
        busy.close()


def test_a_burst_of_new_connections_shares_a_few_parsers(origin, start_proxy) -> None:
    # each connection asks for its parser before the sweep could reclaim the last
    # one's: the pool running empty takes back those of the idle connections first
    harness = start_proxy(Forward(origin.address))
    clients = []
    try:
        for _ in range(30):
            client = RawClient(harness.port)
            clients.append(client)
            assert client.request("GET", "/headers").status == 200
        made = harness.call(lambda: harness.service.parsers.pool.made)
        assert 1 <= made <= 3
        assert _parsers_after_a_sweep(harness) == [None] * 30
    finally:
        for client in clients:
            client.close()


def test_connection_close_in_trailers_closes_and_poisons_no_pooled_parser(
    origin, start_proxy
) -> None:
    # llhttp ends the stream at a "Connection: close" trailer although the head said
    # keep-alive: this connection closes after its response, and its parser (which would
    # refuse any further byte) never serves another client
    harness = start_proxy(Forward(origin.address))
    with RawClient(harness.port) as closer, RawClient(harness.port) as other:
        closer.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\na\r\n0\r\nConnection: close\r\n\r\n"
        )
        resp = closer.read_response("POST")
        assert (resp.status, resp.body, resp.header("connection")) == (200, b"a", "close")
        assert closer.read_to_eof() == b""
        assert _parsers_after_a_sweep(harness) == [None]
        for _ in range(3):
            assert other.request("GET", "/headers", headers=[("Host", "v")]).status == 200


def test_empty_lines_between_requests_count_towards_no_later_head(origin, start_proxy) -> None:
    # 64,000 bytes of CRLF between requests (ignored, as RFC 9112 §2.2 allows) must not
    # count towards the head size limit of the next request on any connection
    harness = start_proxy(Forward(origin.address))
    with RawClient(harness.port) as spacer, RawClient(harness.port) as other:
        assert spacer.request("GET", "/headers").status == 200
        for _ in range(4):
            spacer.send(b"\r\n" * 8000)
            time.sleep(0.01)
        assert _parsers_after_a_sweep(harness) == [None, None]
        for client in (other, spacer):
            client.send(b"GET /headers HTTP/1.1\r\n")
            time.sleep(0.05)
            client.send(b"Host: v\r\n\r\n")
            assert client.read_response().status == 200
