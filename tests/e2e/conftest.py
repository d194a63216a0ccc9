"""Fixtures for end-to-end tests: the real ``ferryman run`` CLI in front of a real origin.

* ``shared_proxy`` / ``shared_origin`` – one origin and one ferryman process for the whole
  session (tests that do not need a private instance use these; they must leave them usable).
* ``ferryman`` – a factory starting private ferryman processes (stopped at teardown).
* ``private`` – a fresh origin plus a fresh ferryman in front of it, for tests that count
  upstream connections or stop the proxy.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_util import Pair, ProxyProcess, StartFerryman, config_yaml, start_ferryman

from origin import OriginServer, free_port


def _check_clean(proxy: ProxyProcess, code: int) -> None:
    log = proxy.log_text()
    assert code == 0, f"ferryman exited with {code}:\n{log}"
    assert "Traceback" not in log, log
    assert "restarting" not in log, f"a worker died:\n{log}"


@pytest.fixture(scope="session")
def shared_origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_proxy(
    shared_origin: OriginServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("ferryman-shared")
    proxy = start_ferryman(workdir, config_yaml(port, shared_origin.address), port)
    yield proxy
    _check_clean(proxy, proxy.stop(signal.SIGINT))


@pytest.fixture
def ferryman(tmp_path: Path) -> Iterator[StartFerryman]:
    """``ferryman(upstream_address, **config_yaml_kwargs)`` starts a private instance."""
    started: list[ProxyProcess] = []

    def start(upstream: str, **kwargs: str) -> ProxyProcess:
        port = free_port()
        workdir = tmp_path / f"ferryman-{len(started)}"
        proxy = start_ferryman(workdir, config_yaml(port, upstream, **kwargs), port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        stopped_by_test = proxy.proc.poll() is not None
        code = proxy.stop(signal.SIGINT)
        if not stopped_by_test:
            _check_clean(proxy, code)


@pytest.fixture
def private(origin: OriginServer, ferryman: StartFerryman) -> Pair:
    return Pair(origin, ferryman(origin.address))
