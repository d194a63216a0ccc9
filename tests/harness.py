"""Run a ferryman service in a background thread with its own uvloop loop, for tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import uvloop

from ferryman import HttpProxyService, Listener, ProxyHttp, ProxyOptions, Server


class ProxyHarness:
    """Starts ``proxy`` on 127.0.0.1 (free port) in a thread; ``stop()`` ends it."""

    def __init__(
        self,
        proxy: ProxyHttp,
        options: ProxyOptions | None = None,
        listeners: list[Listener] | None = None,
    ) -> None:
        self.proxy = proxy
        self.listeners = listeners or [Listener("127.0.0.1:0")]
        self.service = HttpProxyService(proxy, self.listeners, options)
        self.server = Server(workers=1)
        self.server.add_service(self.service)
        self.server.bind()
        self.loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._servers: list[asyncio.Server] = []

    @property
    def port(self) -> int:
        return self.server.addresses()[0][1]

    @property
    def url(self) -> str:
        scheme = "https" if self.listeners[0].tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._servers = self.loop.run_until_complete(self.server.start_services(self.loop))
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ProxyHarness:
        self._thread.start()
        self._ready.wait(10)
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the proxy's loop and return its result."""
        fut: Any = asyncio.run_coroutine_threadsafe(_as_coro(fn), self.loop)
        return fut.result(10)

    def stop(self) -> None:
        async def shutdown() -> None:
            for srv in self._servers:
                srv.close()
            await self.service.drain(0.5)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()  # its selector and self-pipe: ~6 descriptors per harness
        for _, _, sock in self.server._sockets:
            sock.close()


async def _as_coro(fn: Callable[[], Any]) -> Any:
    return fn()
