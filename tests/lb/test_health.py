"""Active health checks against real servers on 127.0.0.1, and the rise/fall state machine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tiny_http import ScriptedServer, free_port, response

from ferryman.lb.health import (
    MAX_CHECK_RESPONSE,
    HealthCheck,
    HealthState,
    HttpHealthCheck,
    TcpHealthCheck,
)

# HealthState ------------------------------------------------------------------------------

F = "refused"
G = "timeout"

# (rise, fall, results, expected (changed, healthy, reason) after each result)
STATE_CASES: list[tuple[int, int, list[str | None], list[tuple[bool, bool, str]]]] = [
    # starts healthy; successes change nothing
    (2, 3, [None, None], [(False, True, ""), (False, True, "")]),
    # fall=3: down on the third consecutive failure, with its reason
    (2, 3, [F, F, F], [(False, True, ""), (False, True, ""), (True, False, F)]),
    # a success in between resets the failure count
    (2, 3, [F, F, None, F, F, F],
     [(False, True, ""), (False, True, ""), (False, True, ""), (False, True, ""),
      (False, True, ""), (True, False, F)]),
    # rise=2: up again after two consecutive successes
    (2, 1, [F, None, None], [(True, False, F), (False, False, F), (True, True, "")]),
    # a failure in between resets the success count; same reason: no change
    (2, 1, [F, None, F, None, None],
     [(True, False, F), (False, False, F), (False, False, F), (False, False, F),
      (True, True, "")]),
    # while down, a new reason is reported as a change (so the snapshot gets it)
    (2, 1, [F, G, G], [(True, False, F), (True, False, G), (False, False, G)]),
    # rise=1, fall=1: every flip is a change
    (1, 1, [F, None, F, None], [(True, False, F), (True, True, ""), (True, False, F),
                                (True, True, "")]),
]


@pytest.mark.parametrize(("rise", "fall", "results", "expected"), STATE_CASES)
def test_health_state(
    rise: int, fall: int, results: list[str | None], expected: list[tuple[bool, bool, str]]
) -> None:
    state = HealthState(rise=rise, fall=fall)
    assert state.healthy and state.reason == ""
    got = []
    for r in results:
        changed = state.record(r)
        got.append((changed, state.healthy, state.reason))
    assert got == expected
    assert state.checks == len(results)


# helpers ----------------------------------------------------------------------------------


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro_fn()

    return asyncio.run(main())


async def check_against(
    check: HealthCheck, parts: list[bytes], **server_kw: Any
) -> tuple[str | None, ScriptedServer, float]:
    server = await ScriptedServer(parts, **server_kw).start()
    try:
        t0 = time.monotonic()
        result = await check.run(server.address)
        return result, server, time.monotonic() - t0
    finally:
        await server.stop()


# TCP --------------------------------------------------------------------------------------


def test_tcp_check_healthy_and_refused() -> None:
    async def main() -> None:
        server = await ScriptedServer(read_request=False).start()
        check = TcpHealthCheck(timeout=2.0)
        try:
            assert await check.run(server.address) is None
            for _ in range(50):
                if server.connections:
                    break
                await asyncio.sleep(0.01)
            assert server.connections == 1
        finally:
            await server.stop()
        assert await check.run(("127.0.0.1", free_port())) == "connection refused"

    run(main)


def test_tcp_check_settings() -> None:
    check = TcpHealthCheck(interval=0.5, timeout=0.25, rise=4, fall=5)
    assert (check.interval, check.timeout, check.rise, check.fall) == (0.5, 0.25, 4, 5)


# HTTP -------------------------------------------------------------------------------------


def test_http_200_healthy_and_request_sent() -> None:
    async def main() -> None:
        check = HttpHealthCheck(path="/healthz", timeout=2.0)
        result, server, _ = await check_against(check, [response(200, b"ok")])
        assert result is None
        assert server.requests == [check.request_bytes(server.address)]
        head = server.requests[0].decode()
        assert head.startswith("GET /healthz HTTP/1.1\r\n")
        assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head

    run(main)


def test_http_503_unhealthy() -> None:
    check = HttpHealthCheck(timeout=2.0)
    result, _, _ = run(lambda: check_against(check, [response(503, b"busy")]))
    assert result == "status 503"


def test_http_redirect_counts_as_healthy_by_default() -> None:
    check = HttpHealthCheck(timeout=2.0)
    result, _, _ = run(lambda: check_against(check, [response(302, headers="Location: /x\r\n")]))
    assert result is None


def test_http_expect_status() -> None:
    check = HttpHealthCheck(expect_status={204, 503}, timeout=2.0)
    assert run(lambda: check_against(check, [response(503)]))[0] is None
    assert run(lambda: check_against(check, [response(204)]))[0] is None
    assert run(lambda: check_against(check, [response(200)]))[0] == "status 200"


def test_http_body_contains() -> None:
    check = HttpHealthCheck(body_contains=b"READY", timeout=2.0)
    assert run(lambda: check_against(check, [response(200, b"status: READY\n")]))[0] is None
    result = run(lambda: check_against(check, [response(200, b"status: STARTING\n")]))[0]
    assert result == "body lacks b'READY'"
    # the status is checked first
    assert run(lambda: check_against(check, [response(500, b"READY")]))[0] == "status 500"


def test_http_body_contains_in_parts_and_close_delimited() -> None:
    check = HttpHealthCheck(body_contains=b"READY", timeout=2.0)
    parts = [b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nsta", b"tus ", b"READY"]
    assert run(lambda: check_against(check, parts))[0] is None
    # no framing: the body ends when the server closes
    parts = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"all ", b"READY\n"]
    assert run(lambda: check_against(check, parts))[0] is None


def test_http_body_contains_chunked() -> None:
    check = HttpHealthCheck(body_contains=b"READY", timeout=2.0)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    parts = [head, b"4\r\nstat\r\n", b"9\r\nus: READY\r\n", b"0\r\n\r\n"]
    assert run(lambda: check_against(check, parts))[0] is None
    parts = [head, b"4\r\nstat\r\n", b"9\r\nus: LATER\r\n", b"0\r\n\r\n"]
    assert run(lambda: check_against(check, parts))[0] == "body lacks b'READY'"


def test_http_big_body_string_early_does_not_wait_for_the_rest() -> None:
    check = HttpHealthCheck(body_contains=b"READY", timeout=3.0)
    total = 1024 * 1024
    first = b"READY" + b"x" * (MAX_CHECK_RESPONSE + 6 * 1024)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode()
    # the server sends 70 KiB of a 1 MiB body, then stalls: the check stops at 64 KiB
    result, _, elapsed = run(lambda: check_against(check, [head, first], hang=True))
    assert result is None
    assert elapsed < 2.0


def test_http_big_body_string_after_limit() -> None:
    check = HttpHealthCheck(body_contains=b"READY", timeout=3.0)
    body = b"x" * (MAX_CHECK_RESPONSE + 100) + b"READY"
    result, _, elapsed = run(lambda: check_against(check, [response(200, body)], hang=True))
    assert result == "body lacks b'READY'"
    assert elapsed < 2.0


def test_http_headers_only_when_body_not_checked() -> None:
    """Without body_contains the check answers as soon as the status line and headers are in."""
    check = HttpHealthCheck(timeout=3.0)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial"
    result, _, elapsed = run(lambda: check_against(check, [head], hang=True))
    assert result is None
    assert elapsed < 2.0


def test_http_head_does_not_wait_for_a_body() -> None:
    check = HttpHealthCheck(method="HEAD", path="/ping", body_contains=b"ignored", timeout=3.0)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    result, server, elapsed = run(lambda: check_against(check, [head], hang=True))
    assert result is None
    assert elapsed < 2.0
    assert server.requests[0].startswith(b"HEAD /ping HTTP/1.1\r\n")


def test_http_no_answer_times_out() -> None:
    check = HttpHealthCheck(timeout=0.3)
    result, server, elapsed = run(lambda: check_against(check, [], hang=True))
    assert result == "no answer within 0.3s"
    assert 0.25 < elapsed < 2.0
    assert len(server.requests) == 1


def test_http_headers_never_finished_times_out() -> None:
    check = HttpHealthCheck(timeout=0.3)
    result, _, _ = run(lambda: check_against(check, [b"HTTP/1.1 200 OK\r\nX-A: b"], hang=True))
    assert result == "no answer within 0.3s"


def test_http_server_closes_immediately() -> None:
    check = HttpHealthCheck(timeout=2.0)
    result, _, _ = run(lambda: check_against(check, [], close_only=True))
    assert result == "connection closed before a response"


def test_http_server_closes_mid_headers() -> None:
    check = HttpHealthCheck(timeout=2.0)
    result, _, _ = run(lambda: check_against(check, [b"HTTP/1.1 200 OK\r\nContent-"]))
    assert result == "connection closed before a response"


def test_http_garbage_response() -> None:
    check = HttpHealthCheck(timeout=2.0)
    result, _, _ = run(lambda: check_against(check, [b"SSH-2.0-OpenSSH_9.6\r\n\r\n"]))
    assert result is not None and result.startswith("invalid response")


def test_http_connection_refused() -> None:
    check = HttpHealthCheck(timeout=2.0)
    assert run(lambda: check.run(("127.0.0.1", free_port()))) == "connection refused"


def test_request_bytes() -> None:
    check = HttpHealthCheck(method="OPTIONS", path="/status?full=1")
    assert check.request_bytes(("::1", 8080)) == (
        b"OPTIONS /status?full=1 HTTP/1.1\r\nHost: [::1]:8080\r\n"
        b"User-Agent: ferryman-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    assert b"\r\nHost: 10.0.0.1:80\r\n" in HttpHealthCheck().request_bytes(("10.0.0.1", 80))
    assert b"\r\nHost: 2001:db8::1\r\n" not in HttpHealthCheck().request_bytes(
        ("2001:db8::1", 443)
    )
    assert b"\r\nHost: [2001:db8::1]:443\r\n" in HttpHealthCheck().request_bytes(
        ("2001:db8::1", 443)
    )
    custom = HttpHealthCheck(host="api.example.com")
    assert b"\r\nHost: api.example.com\r\n" in custom.request_bytes(("10.0.0.1", 80))


def test_http_check_settings() -> None:
    check = HttpHealthCheck(interval=1.5, timeout=0.5, rise=3, fall=4, expect_status=[200])
    assert (check.interval, check.timeout, check.rise, check.fall) == (1.5, 0.5, 3, 4)
    assert check.expect_status == frozenset({200})


# HealthCheck.run --------------------------------------------------------------------------


class Raising(HealthCheck):
    async def check(self, address: tuple[str, int]) -> str | None:
        raise RuntimeError("boom")


class Slow(HealthCheck):
    timeout = 0.05

    async def check(self, address: tuple[str, int]) -> str | None:
        await asyncio.sleep(5)
        return None


def test_run_never_raises() -> None:
    assert run(lambda: Raising().run(("127.0.0.1", 1))) == "check failed: RuntimeError('boom')"
    assert run(lambda: Slow().run(("127.0.0.1", 1))) == "no answer within 0.05s"
    assert run(lambda: HealthCheck().run(("127.0.0.1", 1))).startswith("check failed")
