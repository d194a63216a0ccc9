"""TLS settings: file paths (resolved against the config file's directory), SNI certificates,
client certificate verification, ALPN, and upstream TLS."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from ferryman.config import (
    ConfigError,
    ListenerTls,
    SniCert,
    UpstreamTls,
    load_config,
    parse_config,
)

READABLE = "a path to a readable file"


@pytest.fixture
def conf_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding placeholder PEM files (only their existence is checked), with the
    current directory elsewhere so that resolution against the cwd would fail."""
    conf = tmp_path / "etc"
    (conf / "certs").mkdir(parents=True)
    for name in ("site.pem", "site.key", "a.pem", "a.key", "b.pem", "b.key", "ca.pem",
                 "client.pem", "client.key"):
        (conf / "certs" / name).write_text("placeholder\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return conf


def listener_tls(tls_yaml: str) -> str:
    """A config whose only listener has the given (indented by 6) ``tls:`` block."""
    head = 'upstreams: {app: {servers: ["h:1"]}}\nlisteners:\n  - bind: ":443"\n'
    head += "    upstream: app\n    tls:\n"
    return head + textwrap.indent(textwrap.dedent(tls_yaml), "      ")


def load(conf: Path, text: str) -> ListenerTls | None:
    path = conf / "ferryman.yaml"
    path.write_text(text)
    return load_config(path).listeners[0].tls


def load_error(conf: Path, text: str) -> str:
    path = conf / "ferryman.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_relative_paths_resolved_against_config_dir(conf_dir: Path) -> None:
    tls = load(conf_dir, listener_tls("cert: certs/site.pem\nkey: ./certs/site.key\n"))
    assert tls == ListenerTls(
        cert=str(conf_dir / "certs" / "site.pem"),
        key=str(conf_dir / "certs" / "site.key"),
        sni=(),
        client_ca=None,
        client_verify="off",
        alpn=("h2", "http/1.1"),
    )
    assert os.path.isabs(tls.cert) and os.path.isabs(tls.key)


def test_relative_config_path(conf_dir: Path) -> None:
    text = listener_tls("cert: certs/site.pem\nkey: certs/site.key\n")
    (conf_dir / "ferryman.yaml").write_text(text)
    relative = os.path.relpath(conf_dir / "ferryman.yaml")  # "../etc/ferryman.yaml"
    config = load_config(relative)
    assert config.source == relative
    assert config.listeners[0].tls is not None
    assert config.listeners[0].tls.cert == str(conf_dir / "certs" / "site.pem")


def test_absolute_and_home_paths(
    conf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(conf_dir))
    cert = conf_dir / "certs" / "site.pem"
    tls = load(conf_dir, listener_tls(f"cert: {cert}\nkey: ~/certs/site.key\n"))
    assert tls is not None
    assert tls.cert == str(cert)
    assert tls.key == str(conf_dir / "certs" / "site.key")


def test_parse_config_base_dir(conf_dir: Path) -> None:
    text = listener_tls("cert: certs/site.pem\nkey: certs/site.key\n")
    with pytest.raises(ConfigError):
        parse_config(text)  # relative to the current directory, where there are no certs
    config = parse_config(text, base_dir=str(conf_dir))
    assert config.listeners[0].tls is not None
    assert config.listeners[0].tls.cert == str(conf_dir / "certs" / "site.pem")
    # A source that is a path gives the base directory too.
    config = parse_config(text, str(conf_dir / "ferryman.yaml"))
    assert config.listeners[0].tls is not None


def test_missing_cert_file(conf_dir: Path) -> None:
    text = listener_tls("cert: certs/nope.pem\nkey: certs/site.key\n")
    assert load_error(conf_dir, text) == (
        f"{conf_dir / 'ferryman.yaml'}:6: listeners[0].tls.cert: expected {READABLE}, got "
        f"'certs/nope.pem' ({conf_dir / 'certs' / 'nope.pem'} does not exist)"
    )


def test_directory_as_key(conf_dir: Path) -> None:
    text = listener_tls("cert: certs/site.pem\nkey: certs\n")
    assert load_error(conf_dir, text) == (
        f"{conf_dir / 'ferryman.yaml'}:7: listeners[0].tls.key: expected {READABLE}, got "
        f"'certs' ({conf_dir / 'certs'} is a directory)"
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_key(conf_dir: Path) -> None:
    key = conf_dir / "certs" / "site.key"
    key.chmod(0)
    try:
        text = listener_tls("cert: certs/site.pem\nkey: certs/site.key\n")
        assert load_error(conf_dir, text) == (
            f"{conf_dir / 'ferryman.yaml'}:7: listeners[0].tls.key: expected {READABLE}, got "
            f"'certs/site.key' ({key} is not readable)"
        )
    finally:
        key.chmod(0o644)


def test_cert_and_key_required(conf_dir: Path) -> None:
    text = listener_tls("alpn: [h2]\n")
    source = conf_dir / "ferryman.yaml"
    assert load_error(conf_dir, text).splitlines() == [
        f'{source}:6: listeners[0].tls: missing required key "cert" (expected a path to the '
        "PEM certificate chain)",
        f'{source}:6: listeners[0].tls: missing required key "key" (expected a path to the '
        "PEM private key)",
    ]


def test_cert_path_type(conf_dir: Path) -> None:
    text = listener_tls("cert: [certs/site.pem]\nkey: certs/site.key\n")
    assert load_error(conf_dir, text) == (
        f"{conf_dir / 'ferryman.yaml'}:6: listeners[0].tls.cert: expected {READABLE}, got a list"
    )


def test_sni_certificates(conf_dir: Path) -> None:
    tls = load(conf_dir, listener_tls("""\
        cert: certs/site.pem
        key: certs/site.key
        sni:
          - server_names: [A.Example.com, "*.example.com"]
            cert: certs/a.pem
            key: certs/a.key
          - server_names: [b.example.org.]
            cert: certs/b.pem
            key: certs/b.key
        """))
    certs = conf_dir / "certs"
    assert tls is not None
    assert tls.sni == (
        SniCert(
            server_names=("a.example.com", "*.example.com"),
            cert=str(certs / "a.pem"),
            key=str(certs / "a.key"),
        ),
        SniCert(server_names=("b.example.org",), cert=str(certs / "b.pem"),
                key=str(certs / "b.key")),
    )


@pytest.mark.parametrize(
    ("sni", "message"),
    [
        ("sni: {server_names: [a.com]}",
         "8: listeners[0].tls.sni: expected a list of mappings with keys server_names, cert, "
         "key, got a mapping"),
        ("sni:\n  - cert: certs/a.pem\n    key: certs/a.key",
         '9: listeners[0].tls.sni[0]: missing required key "server_names" (expected a '
         "non-empty list of server names)"),
        ("sni:\n  - server_names: []\n    cert: certs/a.pem\n    key: certs/a.key",
         "9: listeners[0].tls.sni[0].server_names: expected a non-empty list of server names, "
         "got an empty list"),
        ("sni:\n  - server_names: a.com\n    cert: certs/a.pem\n    key: certs/a.key",
         "9: listeners[0].tls.sni[0].server_names: expected a non-empty list of server names, "
         "got 'a.com'"),
        ('sni:\n  - server_names: ["bad name"]\n    cert: certs/a.pem\n    key: certs/a.key',
         "9: listeners[0].tls.sni[0].server_names[0]: expected a server name such as "
         "\"example.com\" or \"*.example.com\", got 'bad name'"),
        ('sni:\n  - server_names: ["a.*.com"]\n    cert: certs/a.pem\n    key: certs/a.key',
         "9: listeners[0].tls.sni[0].server_names[0]: expected a server name such as "
         "\"example.com\" or \"*.example.com\", got 'a.*.com'"),
        ("sni:\n  - server_names: [a.com]\n    cert: certs/a.pem",
         '9: listeners[0].tls.sni[0]: missing required key "key" (expected a path to the PEM '
         "private key)"),
        ("sni:\n  - server_names: [a.com]\n    cert: certs/a.pem\n    key: certs/a.key\n"
         "    certs: x",
         '12: listeners[0].tls.sni[0].certs: unknown key "certs" (did you mean "cert"?); '
         "expected one of: server_names, cert, key"),
        ("sni:\n  - server_names: [a.com, x.com]\n    cert: certs/a.pem\n    key: certs/a.key\n"
         "  - server_names: [b.com, A.com]\n    cert: certs/b.pem\n    key: certs/b.key",
         "12: listeners[0].tls.sni[1].server_names[1]: expected a server name not listed "
         "before, got 'A.com' (already listed in listeners[0].tls.sni[0])"),
    ],
)
def test_sni_errors(conf_dir: Path, sni: str, message: str) -> None:
    text = listener_tls(f"cert: certs/site.pem\nkey: certs/site.key\n{sni}\n")
    assert load_error(conf_dir, text) == f"{conf_dir / 'ferryman.yaml'}:{message}"


@pytest.mark.parametrize(
    ("extra", "client_ca", "client_verify"),
    [
        ("", None, "off"),
        ("client_verify: 'off'\n", None, "off"),
        ("client_verify: off\n", None, "off"),  # YAML 1.1 reads a bare off as false
        ("client_ca: certs/ca.pem\n", "ca.pem", "required"),
        ("client_ca: certs/ca.pem\nclient_verify: optional\n", "ca.pem", "optional"),
        ("client_ca: certs/ca.pem\nclient_verify: required\n", "ca.pem", "required"),
        ("client_ca: certs/ca.pem\nclient_verify: off\n", "ca.pem", "off"),
    ],
)
def test_client_verify(
    conf_dir: Path, extra: str, client_ca: str | None, client_verify: str
) -> None:
    tls = load(conf_dir, listener_tls(f"cert: certs/site.pem\nkey: certs/site.key\n{extra}"))
    assert tls is not None
    expected_ca = None if client_ca is None else str(conf_dir / "certs" / client_ca)
    assert (tls.client_ca, tls.client_verify) == (expected_ca, client_verify)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("client_verify: required",
         "8: listeners[0].tls.client_verify: expected \"off\" unless client_ca is set, got "
         "'required' (client certificates cannot be verified without client_ca, a CA bundle)"),
        ("client_verify: optional",
         "8: listeners[0].tls.client_verify: expected \"off\" unless client_ca is set, got "
         "'optional' (client certificates cannot be verified without client_ca, a CA bundle)"),
        ("client_ca: certs/ca.pem\nclient_verify: sometimes",
         "9: listeners[0].tls.client_verify: expected \"off\", \"optional\" or \"required\", "
         "got 'sometimes'"),
        ("client_ca: certs/ca.pem\nclient_verify: true",
         "9: listeners[0].tls.client_verify: expected \"off\", \"optional\" or \"required\", "
         "got true"),
        ("client_ca: certs/missing-ca.pem",
         "8: listeners[0].tls.client_ca: expected a path to a readable file, got "
         "'certs/missing-ca.pem' ({certs}/missing-ca.pem does not exist)"),
    ],
)
def test_client_verify_errors(conf_dir: Path, extra: str, message: str) -> None:
    text = listener_tls(f"cert: certs/site.pem\nkey: certs/site.key\n{extra}\n")
    message = message.format(certs=conf_dir / "certs")
    assert load_error(conf_dir, text) == f"{conf_dir / 'ferryman.yaml'}:{message}"


@pytest.mark.parametrize(
    ("alpn", "expected"),
    [
        ("", ("h2", "http/1.1")),  # h2_preferred
        ("alpn: h2_preferred\n", ("h2", "http/1.1")),
        ("alpn: h1_only\n", ("http/1.1",)),
        ("alpn: h2_only\n", ("h2",)),
        ("alpn: [h2]\n", ("h2",)),
        ("alpn: [h2, http/1.1]\n", ("h2", "http/1.1")),
        ("alpn: [http/1.1, h2]\n", ("http/1.1", "h2")),
    ],
)
def test_alpn(conf_dir: Path, alpn: str, expected: tuple[str, ...]) -> None:
    tls = load(conf_dir, listener_tls(f"cert: certs/site.pem\nkey: certs/site.key\n{alpn}"))
    assert tls is not None
    assert tls.alpn == expected


@pytest.mark.parametrize(
    ("alpn", "message"),
    [
        ("alpn: []",
         '8: listeners[0].tls.alpn: expected h2_preferred, h1_only or h2_only, or a non-empty '
         'list of protocols among "http/1.1" and "h2", got an empty list'),
        ("alpn: h2",
         '8: listeners[0].tls.alpn: expected h2_preferred, h1_only or h2_only, or a non-empty '
         "list of protocols among \"http/1.1\" and \"h2\", got 'h2'"),
        ("alpn: prefer_h2",
         '8: listeners[0].tls.alpn: expected h2_preferred, h1_only or h2_only, or a non-empty '
         "list of protocols among \"http/1.1\" and \"h2\", got 'prefer_h2'"),
        ("alpn: [h2, h3]",
         "8: listeners[0].tls.alpn[1]: expected a protocol: \"http/1.1\" or \"h2\", got 'h3'"),
        ("alpn: [HTTP/1.1]",
         "8: listeners[0].tls.alpn[0]: expected a protocol: \"http/1.1\" or \"h2\", "
         "got 'HTTP/1.1'"),
        ("alpn: [h2, h2]",
         "8: listeners[0].tls.alpn[1]: expected each protocol once, got 'h2' (listed twice)"),
    ],
)
def test_alpn_errors(conf_dir: Path, alpn: str, message: str) -> None:
    text = listener_tls(f"cert: certs/site.pem\nkey: certs/site.key\n{alpn}\n")
    assert load_error(conf_dir, text) == f"{conf_dir / 'ferryman.yaml'}:{message}"


def test_listener_tls_unknown_key(conf_dir: Path) -> None:
    text = listener_tls("cert: certs/site.pem\nkey: certs/site.key\nciphers: HIGH\n")
    assert load_error(conf_dir, text) == (
        f'{conf_dir / "ferryman.yaml"}:8: listeners[0].tls.ciphers: unknown key "ciphers"; '
        "expected one of: cert, key, sni, client_ca, client_verify, alpn"
    )


def upstream_tls(tls_yaml: str) -> str:
    head = 'listeners: [{bind: ":80", upstream: app}]\nupstreams:\n  app:\n'
    head += '    servers: ["h:443"]\n    tls:\n'
    return head + textwrap.indent(textwrap.dedent(tls_yaml), "      ")


def load_upstream_tls(conf: Path, text: str) -> UpstreamTls | None:
    path = conf / "ferryman.yaml"
    path.write_text(text)
    return load_config(path).upstreams["app"].tls


def test_upstream_tls_files(conf_dir: Path) -> None:
    tls = load_upstream_tls(conf_dir, upstream_tls("""\
        sni: app.internal
        ca: certs/ca.pem
        cert: certs/client.pem
        key: certs/client.key
        """))
    certs = conf_dir / "certs"
    assert tls == UpstreamTls(
        sni="app.internal",
        verify=True,
        verify_hostname=True,
        ca=str(certs / "ca.pem"),
        cert=str(certs / "client.pem"),
        key=str(certs / "client.key"),
    )


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ("cert: certs/client.pem",
         '6: upstreams.app.tls: missing required key "key" (expected both "cert" and "key" for '
         'a client certificate, or neither; only "cert" is set)'),
        ("verify: false\nkey: certs/client.key",
         '7: upstreams.app.tls: missing required key "cert" (expected both "cert" and "key" for '
         'a client certificate, or neither; only "key" is set)'),
        ("ca: certs/nope.pem",
         "6: upstreams.app.tls.ca: expected a path to a readable file, got 'certs/nope.pem' "
         "({certs}/nope.pem does not exist)"),
    ],
)
def test_upstream_tls_errors(conf_dir: Path, tls: str, message: str) -> None:
    path = conf_dir / "ferryman.yaml"
    path.write_text(upstream_tls(tls + "\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:{message.format(certs=conf_dir / 'certs')}"


@pytest.mark.parametrize(("value", "expected"), [("", False), ("h2c: true", True)])
def test_h2c(conf_dir: Path, value: str, expected: bool) -> None:
    path = conf_dir / "ferryman.yaml"
    path.write_text(
        'upstreams: {app: {servers: ["h:1"]}}\nlisteners:\n  - bind: ":80"\n'
        f"    upstream: app\n    {value}\n"
    )
    assert load_config(path).listeners[0].h2c is expected


def test_h2c_must_be_a_boolean(conf_dir: Path) -> None:
    text = 'upstreams: {app: {servers: ["h:1"]}}\nlisteners:\n  - bind: ":80"\n'
    text += "    upstream: app\n    h2c: sometimes\n"
    assert load_error(conf_dir, text) == (
        f"{conf_dir / 'ferryman.yaml'}:5: listeners[0].h2c: expected true or false, "
        "got 'sometimes'"
    )
