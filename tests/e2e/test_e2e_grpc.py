"""gRPC end to end through ``ferryman run`` (issue 6, item 4): a real ``grpcio`` client and
server, with the proxy between them (an h2c listener, an ``h2c`` upstream group).

Messages are raw bytes (generic handlers without serializers), so no generated code is
needed. Checked: the four call kinds, ``grpc-status``/``grpc-message`` and custom
trailers, ``grpc-timeout`` reaching the server, and cancellation both ways: a client that
cancels or whose deadline passes cancels the server's call, and a server that cancels
reaches the client as CANCELLED.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import pytest
from e2e_util import ProxyProcess, start_ferryman

from origin import free_port

grpc = pytest.importorskip("grpc")

SERVICE = "ferryman.test.Echo"


@dataclass
class Seen:
    """What the server's handlers observed."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    time_remaining: list[float | None] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    metadata: list[tuple[str, str]] = field(default_factory=list)
    events: dict[str, threading.Event] = field(default_factory=dict)

    def event(self, name: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(name, threading.Event())


def _handlers(seen: Seen) -> Any:
    def unary(request: bytes, context: Any) -> bytes:
        with seen.lock:
            seen.metadata = list(context.invocation_metadata())
        context.set_trailing_metadata((("x-trailer", "unary-done"),))
        return b"echo:" + request

    def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
        count = int(request or b"5")
        for i in range(count):
            yield b"item-%d" % i

    def client_stream(requests: Iterator[bytes], context: Any) -> bytes:
        total = 0
        messages = 0
        for message in requests:
            total += len(message)
            messages += 1
        return b"%d messages, %d bytes" % (messages, total)

    def bidi(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for message in requests:
            yield message.upper()

    def fail(request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("x-reason", "missing"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        raise AssertionError("unreachable")

    def slow(request: bytes, context: Any) -> bytes:
        name = request.decode()
        with seen.lock:
            seen.time_remaining.append(context.time_remaining())
        context.add_callback(lambda: _note_cancel(seen, name))
        seen.event(name + ":started").set()
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        return b"too late"

    def endless(request: bytes, context: Any) -> Iterator[bytes]:
        name = request.decode()
        context.add_callback(lambda: _note_cancel(seen, name))
        deadline = time.monotonic() + 10
        i = 0
        while context.is_active() and time.monotonic() < deadline:
            yield b"tick-%d" % i
            i += 1
            time.sleep(0.01)

    def server_cancels(request: bytes, context: Any) -> Iterator[bytes]:
        yield b"first"
        time.sleep(0.2)
        context.cancel()

    methods = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Endless": grpc.unary_stream_rpc_method_handler(endless),
        "ServerCancels": grpc.unary_stream_rpc_method_handler(server_cancels),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _note_cancel(seen: Seen, name: str) -> None:
    with seen.lock:
        seen.cancelled.append(name)
    seen.event(name + ":cancelled").set()


@dataclass
class GrpcRig:
    proxy: ProxyProcess
    seen: Seen
    channel: Any


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcRig]:
    workdir = tmp_path_factory.mktemp("ferryman-grpc")
    seen = Seen()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((_handlers(seen),))
    upstream_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port = free_port()
    yaml_text = (
        "server: {workers: 1}\n"
        "listeners:\n"
        f'  - {{bind: "127.0.0.1:{port}", upstream: grpc, h2c: true}}\n'
        "upstreams:\n"
        f'  grpc: {{servers: ["127.0.0.1:{upstream_port}"], protocol: h2c}}\n'
    )
    proxy = start_ferryman(workdir, yaml_text, port)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield GrpcRig(proxy, seen, channel)
    channel.close()
    server.stop(grace=None)
    code = proxy.stop(signal.SIGINT)
    log = proxy.log_text()
    assert code == 0, log
    assert "Traceback" not in log, log


def method(rig: GrpcRig, kind: str, name: str) -> Any:
    return getattr(rig.channel, kind)(f"/{SERVICE}/{name}")


def test_unary_call_with_trailers(rig: GrpcRig) -> None:
    call = method(rig, "unary_unary", "Unary")
    response, info = call.with_call(b"hello", metadata=(("x-client", "test"),), timeout=10)
    assert response == b"echo:hello"
    assert info.code() == grpc.StatusCode.OK
    assert ("x-trailer", "unary-done") in info.trailing_metadata()
    assert ("x-client", "test") in rig.seen.metadata


def test_server_streaming_call(rig: GrpcRig) -> None:
    call = method(rig, "unary_stream", "ServerStream")
    replies = list(call(b"50", timeout=10))
    assert replies == [b"item-%d" % i for i in range(50)]


def test_client_streaming_call(rig: GrpcRig) -> None:
    call = method(rig, "stream_unary", "ClientStream")
    messages = [b"x" * 1000] * 200 + [b"y" * 300_000]
    assert call(iter(messages), timeout=10) == b"201 messages, 500000 bytes"


def test_bidi_streaming_call(rig: GrpcRig) -> None:
    call = method(rig, "stream_stream", "Bidi")
    words = [b"alpha", b"beta", b"gamma", b"delta"]
    assert list(call(iter(words), timeout=10)) == [w.upper() for w in words]


def test_bidi_call_interleaves(rig: GrpcRig) -> None:
    # each reply arrives before the next request is sent: nothing waits for the end
    call = method(rig, "stream_stream", "Bidi")
    outbox: list[bytes] = []
    ready = threading.Event()

    def requests() -> Iterator[bytes]:
        for i in range(5):
            outbox.append(b"m%d" % i)
            yield b"m%d" % i
            assert ready.wait(5)
            ready.clear()

    replies = []
    for reply in call(requests(), timeout=10):
        replies.append(reply)
        ready.set()
    assert replies == [b"M%d" % i for i in range(5)]


def test_error_status_and_message_reach_the_client(rig: GrpcRig) -> None:
    call = method(rig, "unary_unary", "Fail")
    with pytest.raises(grpc.RpcError) as info:
        call(b"widget-7", timeout=10)
    error = info.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing: widget-7"
    assert ("x-reason", "missing") in error.trailing_metadata()


def test_deadline_reaches_the_server_and_expiry_ends_the_call(rig: GrpcRig) -> None:
    call = method(rig, "unary_unary", "Slow")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        call(b"deadline", timeout=2.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    # grpc-timeout went through: the server knew how long it had
    assert rig.seen.event("deadline:started").wait(5)
    remaining = rig.seen.time_remaining[-1]
    assert remaining is not None and 0 < remaining <= 2.05  # (grpc-timeout rounds up)
    # and the call ended at the server too (its own deadline, or the RST_STREAM from the
    # client through the proxy; the cancel tests below show the RST_STREAM alone)
    assert rig.seen.event("deadline:cancelled").wait(5)


def test_client_cancel_cancels_the_server_call(rig: GrpcRig) -> None:
    call = method(rig, "unary_stream", "Endless")
    stream = call(b"client-cancel", timeout=30)
    first = next(stream)
    assert first == b"tick-0"
    stream.cancel()
    assert rig.seen.event("client-cancel:cancelled").wait(5)
    # the shared upstream connection carries on
    assert method(rig, "unary_unary", "Unary")(b"after", timeout=10) == b"echo:after"


def test_cancelled_unary_future_cancels_the_server_call(rig: GrpcRig) -> None:
    call = method(rig, "unary_unary", "Slow")
    future = call.future(b"future-cancel", timeout=30)
    assert rig.seen.event("future-cancel:started").wait(5)
    future.cancel()
    assert rig.seen.event("future-cancel:cancelled").wait(5)


def test_server_cancel_reaches_the_client_as_cancelled(rig: GrpcRig) -> None:
    call = method(rig, "unary_stream", "ServerCancels")
    stream = call(b"", timeout=10)
    assert next(stream) == b"first"
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_many_concurrent_calls_share_the_upstream(rig: GrpcRig) -> None:
    call = method(rig, "unary_unary", "Unary")
    pending = [call.future(b"n%d" % i, timeout=20) for i in range(300)]
    assert [f.result() for f in pending] == [b"echo:n%d" % i for i in range(300)]
