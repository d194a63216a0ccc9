"""The hook pipeline: which hooks run, in which order, in sync mode and in task mode."""

from __future__ import annotations

import http.client
from typing import Any

import pytest
from proxy_util import RawClient, build_request, variant

from ferryman import (
    ErrorKind,
    HttpPeer,
    HttpProxyService,
    Listener,
    ProxyError,
    ProxyHttp,
    status_for,
)
from origin import OriginServer

MAIN_PATH = [
    "new_ctx",
    "early_request_filter",
    "request_filter",
    "upstream_peer",
    "connected_to_upstream",
    "upstream_request_filter",
    "upstream_response_filter",
    "response_filter",
]


class RecordingProxy(ProxyHttp):
    """Overrides all 14 hooks (plain functions) and records every call."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[tuple[str, Any]] = []
        self.ctxs: list[Any] = []
        self.errors: list[ProxyError | None] = []

    def new_ctx(self) -> Any:
        ctx = {"id": len(self.ctxs)}
        self.ctxs.append(ctx)
        self.calls.append(("new_ctx", None))
        return ctx

    def early_request_filter(self, session, ctx):
        self.calls.append(("early_request_filter", ctx))

    def request_filter(self, session, ctx):
        self.calls.append(("request_filter", ctx))
        return False

    def request_body_filter(self, session, body, end_of_stream, ctx):
        self.calls.append(("request_body_filter", (ctx, bytes(body), end_of_stream)))
        return body

    def upstream_peer(self, session, ctx):
        self.calls.append(("upstream_peer", ctx))
        return HttpPeer(self.address)

    def connected_to_upstream(self, session, reused, peer, ctx):
        self.calls.append(("connected_to_upstream", ctx))

    def upstream_request_filter(self, session, upstream_request, ctx):
        self.calls.append(("upstream_request_filter", ctx))

    def upstream_response_filter(self, session, upstream_response, ctx):
        self.calls.append(("upstream_response_filter", ctx))

    def response_filter(self, session, response, ctx):
        self.calls.append(("response_filter", ctx))

    def response_body_filter(self, session, body, end_of_stream, ctx):
        self.calls.append(("response_body_filter", (ctx, bytes(body), end_of_stream)))
        return body

    def fail_to_connect(self, session, peer, ctx, error):
        self.calls.append(("fail_to_connect", ctx))
        return error

    def error_while_proxy(self, session, peer, ctx, error, client_reused):
        self.calls.append(("error_while_proxy", ctx))
        return error

    def fail_to_proxy(self, session, error, ctx):
        self.calls.append(("fail_to_proxy", ctx))
        status = status_for(error)
        session.send_error(status)
        return status

    def logging(self, session, error, ctx):
        self.calls.append(("logging", ctx))
        self.errors.append(error)

    # helpers
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def collapsed(self) -> list[str]:
        """Call names with runs of the same body filter collapsed into one entry."""
        out: list[str] = []
        for name in self.names():
            if out and out[-1] == name and name.endswith("body_filter"):
                continue
            out.append(name)
        return out

    def body_calls(self, hook: str) -> list[tuple[Any, bytes, bool]]:
        return [arg for name, arg in self.calls if name == hook]


class AsyncRecordingProxy(RecordingProxy):
    """The same proxy with every awaitable hook written as ``async def``."""

    async def early_request_filter(self, session, ctx):
        self.calls.append(("early_request_filter", ctx))

    async def request_filter(self, session, ctx):
        self.calls.append(("request_filter", ctx))
        return False

    async def upstream_peer(self, session, ctx):
        self.calls.append(("upstream_peer", ctx))
        return HttpPeer(self.address)

    async def connected_to_upstream(self, session, reused, peer, ctx):
        self.calls.append(("connected_to_upstream", ctx))

    async def upstream_request_filter(self, session, upstream_request, ctx):
        self.calls.append(("upstream_request_filter", ctx))

    async def upstream_response_filter(self, session, upstream_response, ctx):
        self.calls.append(("upstream_response_filter", ctx))

    async def response_filter(self, session, response, ctx):
        self.calls.append(("response_filter", ctx))

    async def fail_to_connect(self, session, peer, ctx, error):
        self.calls.append(("fail_to_connect", ctx))
        return error

    async def error_while_proxy(self, session, peer, ctx, error, client_reused):
        self.calls.append(("error_while_proxy", ctx))
        return error

    async def fail_to_proxy(self, session, error, ctx):
        self.calls.append(("fail_to_proxy", ctx))
        status = status_for(error)
        await session.respond_error(status)
        return status

    async def logging(self, session, error, ctx):
        self.calls.append(("logging", ctx))
        self.errors.append(error)


def recording(mode: str, address: str) -> RecordingProxy:
    cls = variant(mode, RecordingProxy, AsyncRecordingProxy)
    return cls(address)


def test_all_hooks_are_detected_as_overridden() -> None:
    from ferryman.proxy.hooks import HOOKS

    assert RecordingProxy.overridden == frozenset(HOOKS)
    assert RecordingProxy.async_hooks == frozenset()
    assert AsyncRecordingProxy.overridden == frozenset(HOOKS)
    assert AsyncRecordingProxy.async_hooks == frozenset(HOOKS) - {
        "new_ctx",
        "request_body_filter",
        "response_body_filter",
    }


def _get(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_get_runs_the_hooks_in_pipeline_order(mode, origin, start_proxy) -> None:
    proxy = recording(mode, origin.address)
    harness = start_proxy(proxy)
    status, body = _get(harness.port)
    assert (status, body) == (200, b"hello world\n")
    harness.call(lambda: None)  # let logging (run after the response) finish
    assert proxy.collapsed() == [*MAIN_PATH, "response_body_filter", "logging"]
    body_calls = proxy.body_calls("response_body_filter")
    assert len(body_calls) >= 1
    assert body_calls[-1][2] is True
    assert all(not end for _, _, end in body_calls[:-1])
    assert b"".join(chunk for _, chunk, _ in body_calls) == b"hello world\n"
    assert proxy.names().count("logging") == 1
    assert proxy.names()[-1] == "logging"
    assert proxy.errors == [None]
    assert "request_body_filter" not in proxy.names()
    # every hook got the one ctx made by new_ctx
    ctx = proxy.ctxs[0]
    for name, arg in proxy.calls[1:]:
        got = arg[0] if name.endswith("body_filter") else arg
        assert got is ctx, name


def test_post_with_body_also_runs_request_body_filter(mode, origin, start_proxy) -> None:
    proxy = recording(mode, origin.address)
    harness = start_proxy(proxy)
    payload = b"x" * 5000
    with RawClient(harness.port) as client:
        # Expect: 100-continue makes the body arrive after the request hooks ran
        client.send(
            build_request(
                "POST", "/echo", headers=[("Content-Length", "5000"), ("Expect", "100-continue")]
            )
        )
        interim = client.read_head()
        assert interim.status == 100
        client.send(payload)
        resp = client.read_response("POST")
    assert (resp.status, resp.body) == (200, payload)
    harness.call(lambda: None)
    _check_post_calls(proxy, payload)


def _check_post_calls(proxy: RecordingProxy, payload: bytes) -> None:
    names = proxy.names()
    others = [n for n in proxy.collapsed() if n != "request_body_filter"]
    assert others == [*MAIN_PATH, "response_body_filter", "logging"]
    body_calls = proxy.body_calls("request_body_filter")
    assert len(body_calls) >= 1
    assert body_calls[-1][2] is True
    assert all(not end for _, _, end in body_calls[:-1])
    assert b"".join(chunk for _, chunk, _ in body_calls) == payload
    # request body chunks are filtered after request_filter and before the response
    first = names.index("request_body_filter")
    last = len(names) - 1 - names[::-1].index("request_body_filter")
    assert first > names.index("request_filter")
    assert last < names.index("upstream_response_filter")
    ctx = proxy.ctxs[0]
    assert all(c is ctx for c, _, _ in body_calls)
    assert names.count("logging") == 1 and names[-1] == "logging"
    assert proxy.errors == [None]


def test_post_head_and_body_in_one_packet_runs_body_filter_after_request_filter(
    mode, origin, start_proxy
) -> None:
    proxy = recording(mode, origin.address)
    harness = start_proxy(proxy)
    payload = b"0123456789" * 100
    with RawClient(harness.port) as client:
        resp = client.request("POST", "/echo", payload)
    assert (resp.status, resp.body) == (200, payload)
    harness.call(lambda: None)
    _check_post_calls(proxy, payload)


FAILURE_PATH = [
    "new_ctx",
    "early_request_filter",
    "request_filter",
    "upstream_peer",
    "fail_to_connect",
    "upstream_peer",
    "fail_to_connect",
    "fail_to_proxy",
    "logging",
]


def test_dead_upstream_runs_fail_to_connect_then_fail_to_proxy_then_logging(
    mode, dead_port, start_proxy
) -> None:
    proxy = recording(mode, f"127.0.0.1:{dead_port}")
    harness = start_proxy(proxy)  # default max_retries = 1: one failover attempt
    status, body = _get(harness.port)
    assert (status, body) == (502, b"")
    harness.call(lambda: None)
    # (response_body_filter calls on the error page are checked by the test below)
    assert [n for n in proxy.names() if n != "response_body_filter"] == FAILURE_PATH
    (error,) = proxy.errors
    assert isinstance(error, ProxyError)
    assert error.kind is ErrorKind.CONNECT_REFUSED
    assert status_for(error) == 502


def test_dead_upstream_hook_sequence_is_exact(mode, dead_port, start_proxy) -> None:
    proxy = recording(mode, f"127.0.0.1:{dead_port}")
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
    assert (resp.status, resp.body) == (502, b"")
    harness.call(lambda: None)
    assert proxy.names() == FAILURE_PATH
    assert resp.header("content-length") == "0"


def test_logging_runs_once_per_request_on_a_keep_alive_connection(
    mode, origin, start_proxy
) -> None:
    proxy = recording(mode, origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        for i in range(3):
            resp = client.request("GET", f"/?n={i}")
            assert (resp.status, resp.body) == (200, b"hello world\n")
    harness.call(lambda: None)
    assert proxy.names().count("new_ctx") == 3
    assert proxy.names().count("logging") == 3
    assert proxy.errors == [None, None, None]
    # each request's hooks ran with its own ctx, in order, one request after the other
    per_ctx: dict[int, list[str]] = {}
    current = -1
    for name, arg in proxy.calls:
        if name == "new_ctx":
            current = len(per_ctx)
            per_ctx[current] = []
            continue
        ctx = arg[0] if name.endswith("body_filter") else arg
        assert ctx is proxy.ctxs[current]
        if not (per_ctx[current] and per_ctx[current][-1] == name == "response_body_filter"):
            per_ctx[current].append(name)
    expected = [*MAIN_PATH[1:], "response_body_filter", "logging"]
    assert per_ctx == {0: expected, 1: expected, 2: expected}


# --------------------------------------------------------------------------------------
# hooks that are not overridden are not called


class PeerOnly(ProxyHttp):
    def __init__(self, address: str) -> None:
        self.address = address

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)


class AsyncPeerOnly(ProxyHttp):
    def __init__(self, address: str) -> None:
        self.address = address

    async def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)


def test_overridden_and_async_hooks_are_computed_at_class_creation() -> None:
    assert ProxyHttp.overridden == frozenset()
    assert PeerOnly.overridden == frozenset({"upstream_peer"})
    assert PeerOnly.async_hooks == frozenset()
    assert AsyncPeerOnly.overridden == frozenset({"upstream_peer"})
    assert AsyncPeerOnly.async_hooks == frozenset({"upstream_peer"})

    class Mixed(AsyncPeerOnly):
        def request_filter(self, session, ctx):
            return False

        async def logging(self, session, error, ctx):
            pass

        def new_ctx(self):
            return None

    assert Mixed.overridden == frozenset({"upstream_peer", "request_filter", "logging", "new_ctx"})
    assert Mixed.async_hooks == frozenset({"upstream_peer", "logging"})


@pytest.mark.parametrize("hook", ["new_ctx", "request_body_filter", "response_body_filter"])
def test_async_def_for_a_plain_only_hook_is_a_type_error(hook: str) -> None:
    async def bad(self, *args):
        return None

    with pytest.raises(TypeError, match=hook):
        type("Bad", (ProxyHttp,), {hook: bad})


def _spy(name: str, seen: list[str]) -> Any:
    def spy(*args: Any) -> Any:
        seen.append(name)
        raise AssertionError(f"{name} is not overridden and must not be called")

    return spy


@pytest.mark.parametrize("cls", [PeerOnly, AsyncPeerOnly], ids=["sync", "async"])
def test_hooks_not_overridden_are_never_called(cls, origin, dead_port, start_proxy) -> None:
    from ferryman.proxy.hooks import HOOKS

    proxy = cls(origin.address)
    seen: list[str] = []
    # Instance attributes shadow the defaults: they would run if the engine called any
    # hook the class does not override.
    for name in HOOKS:
        if name != "upstream_peer":
            setattr(proxy, name, _spy(name, seen))
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")
        payload = b"p" * 100_000
        resp = client.request("POST", "/echo", payload)
        assert (resp.status, resp.body) == (200, payload)
        resp = client.request("GET", "/chunked?n=4&size=100")
        assert (resp.status, resp.body) == (200, b"x" * 400)
    # the failure path: defaults (send_error with status_for) are used without a call
    proxy.address = f"127.0.0.1:{dead_port}"
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (502, b"")
    harness.call(lambda: None)
    assert seen == []


class NoPeer(ProxyHttp):
    """Overrides hooks, but not the one that has no default."""

    def request_filter(self, session, ctx):
        return False


class AsyncNoPeer(ProxyHttp):
    async def request_filter(self, session, ctx):
        return False


@pytest.mark.parametrize("cls", [NoPeer, AsyncNoPeer], ids=["sync", "async"])
def test_a_proxy_without_upstream_peer_is_refused_up_front(cls) -> None:
    assert "upstream_peer" not in cls.overridden
    with pytest.raises(TypeError, match="must implement upstream_peer"):
        HttpProxyService(cls(), [Listener("127.0.0.1:0")])


def test_origin_fixture_sanity(origin: OriginServer) -> None:
    with RawClient(origin.port) as client:
        client.send(build_request("GET", "/"))
        resp = client.read_response()
    assert (resp.status, resp.body) == (200, b"hello world\n")


def test_invalid_upstream_response_runs_error_while_proxy(mode, origin, start_proxy) -> None:
    proxy = recording(mode, origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/garbage")
        assert (resp.status, resp.body) == (502, b"")
    harness.call(lambda: None)
    assert proxy.names() == [
        "new_ctx",
        "early_request_filter",
        "request_filter",
        "upstream_peer",
        "connected_to_upstream",
        "upstream_request_filter",
        "error_while_proxy",
        "fail_to_proxy",
        "logging",
    ]
    (error,) = proxy.errors
    assert error is not None and error.kind is ErrorKind.INVALID_RESPONSE
    assert status_for(error) == 502
