"""Headers, RequestHeader, ResponseHeader; and the no-asyncio rule of ferryman.protocols."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from h1_recorders import feed_request, feed_response

import ferryman.protocols
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader, reason_phrase


def sample() -> Headers:
    return Headers(
        [
            (b"Host", b"example.com"),
            (b"X-Dup", b"1"),
            (b"accept", b"*/*"),
            (b"x-dup", b"2"),
            (b"X-DUP", b"3"),
        ]
    )


def test_case_and_order_preserved() -> None:
    h = sample()
    assert list(h) == [
        (b"Host", b"example.com"),
        (b"X-Dup", b"1"),
        (b"accept", b"*/*"),
        (b"x-dup", b"2"),
        (b"X-DUP", b"3"),
    ]
    assert len(h) == 5


def test_get_is_case_insensitive_and_returns_first() -> None:
    h = sample()
    assert h.get("host") == b"example.com"
    assert h.get(b"HOST") == b"example.com"
    assert h.get("x-dup") == b"1"
    assert h.get("ACCEPT") == b"*/*"
    assert h.get("missing") is None
    assert h.get("missing", b"dflt") == b"dflt"


def test_get_all_in_order() -> None:
    h = sample()
    assert h.get_all("X-Dup") == [b"1", b"2", b"3"]
    assert h.get_all(b"x-DUP") == [b"1", b"2", b"3"]
    assert h.get_all("missing") == []


def test_contains() -> None:
    h = sample()
    assert "host" in h
    assert b"X-DUP" in h
    assert "nope" not in h
    assert 42 not in h


def test_add_appends_and_keeps_existing() -> None:
    h = sample()
    h.add("X-Dup", "4")
    h.add(b"New", b"v")
    assert h.get_all("x-dup") == [b"1", b"2", b"3", b"4"]
    assert list(h)[-2:] == [(b"X-Dup", b"4"), (b"New", b"v")]
    assert h.get("new") == b"v"  # the lookup index was refreshed


def test_set_replaces_all_at_first_position_keeping_its_case() -> None:
    h = sample()
    h.set("x-dup", "only")
    assert list(h) == [
        (b"Host", b"example.com"),
        (b"X-Dup", b"only"),
        (b"accept", b"*/*"),
    ]
    assert h.get_all("X-DUP") == [b"only"]


def test_set_absent_appends() -> None:
    h = sample()
    h.set(b"X-New", b"1")
    assert list(h)[-1] == (b"X-New", b"1")
    assert h.get("x-new") == b"1"


def test_remove_returns_count() -> None:
    h = sample()
    assert h.remove("X-DUP") == 3
    assert list(h) == [(b"Host", b"example.com"), (b"accept", b"*/*")]
    assert h.remove("x-dup") == 0
    assert h.get("x-dup") is None
    assert h.get("accept") == b"*/*"


def test_mutations_after_lookups_keep_index_consistent() -> None:
    h = Headers()
    assert h.get("a") is None
    h.add("A", "1")
    assert h.get("a") == b"1"
    h.add("b", "2")
    h.add("a", "3")
    assert h.get_all("A") == [b"1", b"3"]
    h.remove("a")
    assert h.get("b") == b"2"
    assert h.get("a") is None
    h.set("B", "9")
    assert list(h) == [(b"b", b"9")]


def test_items_is_the_underlying_list() -> None:
    h = sample()
    assert h.get("host") == b"example.com"
    items = h.items()
    items.insert(0, (b"Host", b"first.example"))
    assert h.get("host") == b"first.example"


def test_copy_is_independent() -> None:
    h = sample()
    c = h.copy()
    c.add("X-Extra", "1")
    c.set("host", "other")
    assert h.get("x-extra") is None
    assert h.get("host") == b"example.com"
    assert c.get("host") == b"other"


def test_equality_is_order_and_case_sensitive() -> None:
    assert Headers([(b"A", b"1")]) == Headers([(b"A", b"1")])
    assert Headers([(b"A", b"1")]) != Headers([(b"a", b"1")])
    assert Headers([(b"A", b"1"), (b"B", b"2")]) != Headers([(b"B", b"2"), (b"A", b"1")])


def test_str_names_and_values_are_stored_as_latin1_bytes() -> None:
    h = Headers()
    h.add("X-Name", "caf\u00e9")
    assert list(h) == [(b"X-Name", "caf\u00e9".encode("latin-1"))]


def test_append_block() -> None:
    parts: list[bytes] = []
    Headers([(b"A", b"1"), (b"b", b"2")]).append_block(parts)
    assert b"".join(parts) == b"A: 1\r\nb: 2\r\n"


def test_request_header_to_bytes() -> None:
    req = RequestHeader("GET", "/p?q=1", [(b"Host", b"a"), (b"x-Case", b"V"), (b"x-case", b"W")])
    assert req.to_bytes() == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: a\r\nx-Case: V\r\nx-case: W\r\n\r\n"
    )
    req10 = RequestHeader(b"POST", b"/", Headers(), version="1.0")
    assert req10.to_bytes() == b"POST / HTTP/1.0\r\n\r\n"


def test_request_header_accessors() -> None:
    req = RequestHeader("GET", "/a", [(b"HOST", b"h:1")])
    assert (req.method, req.path, req.host, req.version) == ("GET", "/a", "h:1", "1.1")
    req.method = "PUT"
    req.path = "/b"
    assert (req.raw_method, req.raw_path) == (b"PUT", b"/b")
    assert RequestHeader("GET", "/").host is None
    assert req.to_bytes().startswith(b"PUT /b HTTP/1.1\r\n")


def test_request_header_copy_is_independent() -> None:
    req = RequestHeader("GET", "/", [(b"Host", b"a")])
    c = req.copy()
    c.headers.add("X", "1")
    c.path = "/other"
    assert req.to_bytes() == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_parsed_request_head_round_trips() -> None:
    data = b"PATCH /r?x=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n"
    _, rec = feed_request([data])
    assert rec.heads[0].to_bytes() == data


def test_response_header_to_bytes() -> None:
    resp = ResponseHeader(404, [(b"Content-Length", b"0"), (b"x-A", b"1")])
    assert resp.to_bytes() == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nx-A: 1\r\n\r\n"
    custom = ResponseHeader(200, reason="Fine")
    assert custom.to_bytes() == b"HTTP/1.1 200 Fine\r\n\r\n"


def test_response_header_unknown_status_reason() -> None:
    assert ResponseHeader(299).to_bytes() == b"HTTP/1.1 299 Unknown\r\n\r\n"


def test_parsed_response_head_round_trips() -> None:
    data = b"HTTP/1.1 201 Created\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n"
    _, rec = feed_response([data])
    assert rec.heads[0].to_bytes() == data


def test_response_header_copy_is_independent() -> None:
    resp = ResponseHeader(200, [(b"A", b"1")])
    c = resp.copy()
    c.headers.set("A", "2")
    c.status = 500
    assert resp.to_bytes() == b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n"


@pytest.mark.parametrize(
    ("status", "reason"),
    [(200, b"OK"), (400, b"Bad Request"), (413, b"Content Too Large"), (414, b"URI Too Long"),
     (431, b"Request Header Fields Too Large"), (502, b"Bad Gateway"),
     (504, b"Gateway Timeout"), (505, b"HTTP Version Not Supported"), (799, b"Unknown")],
)
def test_reason_phrases(status: int, reason: bytes) -> None:
    assert reason_phrase(status) == reason


# --- the sans-IO rule -------------------------------------------------------------------------

PROTOCOLS_DIR = Path(ferryman.protocols.__file__).parent


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.append("ferryman.protocols." + (node.module or ""))
            elif node.module:
                names.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "__import__" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.append(arg.value)
    return names


def test_protocols_package_has_modules_to_check() -> None:
    files = sorted(p.name for p in PROTOCOLS_DIR.rglob("*.py"))
    assert {"__init__.py", "h1.py", "headers.py"} <= set(files)


@pytest.mark.parametrize(
    "path",
    sorted(PROTOCOLS_DIR.rglob("*.py")),
    ids=lambda p: str(p.relative_to(PROTOCOLS_DIR)),
)
def test_protocols_never_import_asyncio(path: Path) -> None:
    bad = [n for n in _imports(path) if n == "asyncio" or n.startswith("asyncio.")]
    assert bad == [], f"{path} imports {bad}"


@pytest.mark.parametrize(
    "path",
    sorted(PROTOCOLS_DIR.rglob("*.py")),
    ids=lambda p: str(p.relative_to(PROTOCOLS_DIR)),
)
def test_protocols_import_nothing_above_them(path: Path) -> None:
    # the layer rule: protocols may use only themselves and errors.py inside ferryman
    ours = [n for n in _imports(path) if n == "ferryman" or n.startswith("ferryman.")]
    bad = [n for n in ours if not (n.startswith("ferryman.protocols") or n == "ferryman.errors")]
    assert bad == [], f"{path} imports {bad}"


def test_errors_module_does_not_import_asyncio() -> None:
    import ferryman.errors

    # (the source file: the module may be loaded from its mypyc-compiled extension)
    names = _imports(Path(ferryman.errors.__file__).with_name("errors.py"))
    assert not [n for n in names if n == "asyncio" or n.startswith("asyncio.")]
