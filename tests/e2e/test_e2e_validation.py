"""End to end: config validation as the ``ferryman`` command line shows it.

``tests/config`` asserts the messages in-process; here the point is that ``ferryman check``
prints them verbatim — ``file:line: key.path: message``, every problem of a file, exit
status 2 — and that ``ferryman run`` refuses a bad config without ever listening.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from e2e_util import ferryman_cmd

from origin import free_port

LISTENER = 'listeners: [{bind: "127.0.0.1:18080", upstream: app}]\n'
UPSTREAM = 'upstreams: {app: {servers: ["127.0.0.1:9001"]}}\n'


def check(tmp_path: Path, text: str, name: str = "bad.yaml") -> subprocess.CompletedProcess[str]:
    """``ferryman check -c NAME`` run in ``tmp_path`` (so messages start with ``NAME:``)."""
    (tmp_path / name).write_text(text)
    return subprocess.run(ferryman_cmd("check", "-c", name), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "ferryman: invalid config:", result.stderr
    return lines[1:]


CASES = [
    pytest.param(
        LISTENER + UPSTREAM + "server: {workers: 2, wokers: 3}\n",
        'bad.yaml:3: server.wokers: unknown key "wokers" (did you mean "workers"?); '
        "expected one of: workers, grace_period, timeouts, limits, forwarded, pid_file, "
        "error_log, user, group, cpu_affinity, upgrade_sock, metrics",
        id="unknown-key",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "server: {workers: yes}\n",
        "bad.yaml:3: server.workers: expected an integer >= 1, got yes (a boolean)",
        id="wrong-type-bool",
    ),
    pytest.param(
        LISTENER + 'upstreams: {app: {servers: ["127.0.0.1:9001"], max_retries: two}}\n',
        "bad.yaml:2: upstreams.app.max_retries: expected an integer >= 0, got 'two'",
        id="wrong-type-string",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "server: {grace_period: 10 minutes}\n",
        'bad.yaml:3: server.grace_period: expected a duration such as "2s" or "500ms", '
        "got '10 minutes' (unknown unit \"minutes\"; use h, m, s or ms)",
        id="bad-duration",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "server: {limits: {max_body: 10 parsecs}}\n",
        'bad.yaml:3: server.limits.max_body: expected a size such as "8KiB", "512k" or "1m", '
        "got '10 parsecs' (unknown unit \"parsecs\"; use k, m, g or t (or KiB, MiB, ...))",
        id="bad-size",
    ),
    pytest.param(
        'listeners: [{bind: "127.0.0.1:99999", upstream: app}]\n' + UPSTREAM,
        'bad.yaml:1: listeners[0].bind: expected an address such as "127.0.0.1:8080", '
        "\"[::1]:8080\" or \":8080\", got '127.0.0.1:99999' (port 99999 is out of range "
        "1..65535)",
        id="bad-bind-address",
    ),
    pytest.param(
        LISTENER + 'upstreams: {app: {servers: ["127.0.0.1"]}}\n',
        'bad.yaml:2: upstreams.app.servers[0]: expected a "host:port" address such as '
        "\"127.0.0.1:9001\" or \"[::1]:9001\", got '127.0.0.1' (missing :port)",
        id="bad-server-address",
    ),
    pytest.param(
        "listeners:\n"
        '  - bind: "127.0.0.1:18080"\n'
        "    routes:\n"
        "      - match: {path_prefix: /api}\n"
        "        upstream: api\n" + UPSTREAM,
        'bad.yaml:5: listeners[0].routes[0].upstream: unknown upstream "api" (defined: app)',
        id="unknown-upstream-in-route",
    ),
    pytest.param(
        "listeners:\n"
        '  - bind: "127.0.0.1:18080"\n'
        "    routes:\n"
        "      - match: {path_prefix: /api}\n"
        "        upstream: app\n"
        "      - match: {path: /api/users, methods: GET}\n"
        "        upstream: app\n" + UPSTREAM,
        "bad.yaml:6: listeners[0].routes[1]: unreachable: listeners[0].routes[0] (line 4) "
        "already matches every request this route matches",
        id="unreachable-route",
    ),
    pytest.param(
        "listeners:\n"
        '  - bind: "127.0.0.1:18080"\n'
        "    routes:\n"
        '      - match: {path_regex: "^/(v1|v2"}\n'
        "        upstream: app\n" + UPSTREAM,
        "bad.yaml:4: listeners[0].routes[0].match.path_regex: expected a regular expression, "
        "got '^/(v1|v2' (missing ), unterminated subpattern at position 2)",
        id="bad-regex",
    ),
]


@pytest.mark.parametrize(("text", "line"), CASES)
def test_check_prints_the_problem(tmp_path: Path, text: str, line: str) -> None:
    assert problems(check(tmp_path, text)) == [line]


def test_check_prints_every_problem_of_a_file(tmp_path: Path) -> None:
    text = (
        "server:\n"
        "  workers: 0\n"
        "  grace_period: soon\n"
        "listeners:\n"
        '  - bind: "127.0.0.1:18080"\n'
        "    colour: blue\n"
        "    routes:\n"
        "      - match: {path_prefix: /api}\n"
        "        upstream: nope\n"
        "      - match: {path_regex: '*'}\n"
        "        upstream: app\n"
        "upstreams:\n"
        "  app:\n"
        '    servers: ["127.0.0.1:9001 weight=0"]\n'
        "    timeouts: {connect: fast}\n"
    )
    assert problems(check(tmp_path, text)) == [
        "bad.yaml:2: server.workers: expected an integer >= 1, got 0",
        'bad.yaml:3: server.grace_period: expected a duration such as "2s" or "500ms", '
        "got 'soon'",
        'bad.yaml:6: listeners[0].colour: unknown key "colour"; expected one of: bind, '
        "upstream, tls, routes, h2c, access_log",
        'bad.yaml:9: listeners[0].routes[0].upstream: unknown upstream "nope" (defined: app)',
        "bad.yaml:10: listeners[0].routes[1].match.path_regex: expected a regular expression, "
        "got '*' (nothing to repeat at position 0)",
        "bad.yaml:14: upstreams.app.servers[0]: expected weight=N with N an integer 1..1000, "
        "got 'weight=0'",
        'bad.yaml:15: upstreams.app.timeouts.connect: expected a duration such as "2s" or '
        "\"500ms\", got 'fast'",
    ]


def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    result = check(tmp_path, LISTENER + UPSTREAM, "good.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "good.yaml: ok (1 listener(s), 1 upstream group(s))\n"
    assert result.stderr == ""


def test_run_with_a_bad_config_never_listens(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "bad.yaml").write_text(
        f'listeners: [{{bind: "127.0.0.1:{port}", upstream: app}}]\n'
        'upstreams: {app: {servers: ["127.0.0.1:9001"], timeouts: {read: 5 parsecs}}}\n'
    )
    proc = subprocess.Popen(ferryman_cmd("run", "-c", "bad.yaml"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # while it runs, nothing may accept on the port
        while proc.poll() is None:
            with socket.socket() as s:
                s.settimeout(0.5)
                assert s.connect_ex(("127.0.0.1", port)) != 0, "ferryman listened"
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 2
    assert out == ""
    assert err.splitlines() == [
        "ferryman: invalid config:",
        'bad.yaml:2: upstreams.app.timeouts.read: expected a duration such as "2s" or '
        "\"500ms\", got '5 parsecs' (unknown unit \"parsecs\"; use h, m, s or ms)",
    ]
    with socket.socket() as s:  # and the port is still free
        s.bind(("127.0.0.1", port))
