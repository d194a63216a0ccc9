"""Session.request_id: the id hooks see is the one sent upstream (both engine modes)."""

from __future__ import annotations

import json
import re
import time

import httpx
from proxy_util import variant

from ferryman import HttpPeer, ProxyHttp
from ferryman.proxy.options import ProxyOptions
from origin import OriginServer


class SeesId(ProxyHttp):
    """Records ``session.request_id`` from a request hook and from logging."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ids: list[tuple[str, str]] = []

    def request_filter(self, session, ctx):
        self.ids.append(("request_filter", session.request_id))
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def logging(self, session, error, ctx):
        self.ids.append(("logging", session.request_id))


def _sent_id(body: bytes) -> list[str]:
    return [v for k, v in json.loads(body) if k.lower() == "x-request-id"]


def test_hooks_see_the_id_sent_upstream(mode: str, origin: OriginServer, start_proxy) -> None:
    proxy = variant(mode, SeesId)(origin.address)
    harness = start_proxy(proxy)
    with httpx.Client(timeout=10) as client:
        made = client.get(f"{harness.url}/headers")
        given = client.get(f"{harness.url}/headers", headers={"X-Request-Id": "abc.123"})
    (sent_made,) = _sent_id(made.content)
    assert re.fullmatch(r"[0-9a-f]{32}", sent_made)
    assert _sent_id(given.content) == ["abc.123"]
    deadline = time.monotonic() + 5
    while len(proxy.ids) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # (the logging hook runs after the response went out)
    assert sorted(proxy.ids) == sorted(
        [
            ("request_filter", sent_made),
            ("logging", sent_made),
            ("request_filter", "abc.123"),
            ("logging", "abc.123"),
        ]
    )


def test_request_id_can_be_turned_off(origin: OriginServer, start_proxy) -> None:
    harness = start_proxy(SeesId(origin.address), ProxyOptions(request_id=False))
    with httpx.Client(timeout=10) as client:
        assert _sent_id(client.get(f"{harness.url}/headers").content) == []
        given = client.get(f"{harness.url}/headers", headers={"X-Request-Id": "has space"})
    assert _sent_id(given.content) == ["has space"]  # passed through untouched
