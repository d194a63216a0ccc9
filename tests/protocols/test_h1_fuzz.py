"""The atheris fuzz target of the request parser (tests/fuzz/fuzz_h1_request.py).

* Its seed corpus and saved regressions are replayed in-process through its ``check``
  (no atheris needed), against the parser's Python source and its compiled module.
* It is run under atheris for a bounded time (20 s) on a copy of the corpus; the run must
  end clean after many inputs.
* Parser bugs found while fuzzing are pinned here as regression tests.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from h1_recorders import RequestRecorder

import ferryman
from ferryman.errors import ProxyError, status_for
from ferryman.protocols.h1 import RequestLimits, RequestParser

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
TARGET = FUZZ / "fuzz_h1_request.py"
CORPUS = FUZZ / "corpus" / "h1_request"
REGRESSIONS = FUZZ / "regressions"

#: seconds the fuzzer runs in CI, the most inputs it runs, and the fewest it must run
FUZZ_SECONDS = 20
FUZZ_RUNS_CAP = 2_000_000
FUZZ_RUNS_FLOOR = 2_000


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


target = _load(TARGET)


def _inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".md")


SAVED = _inputs(CORPUS) + _inputs(REGRESSIONS)


def test_the_seed_corpus_is_there_and_as_make_corpus_writes_it() -> None:
    seeds = _load(FUZZ / "make_corpus.py").SEEDS
    assert len(seeds) >= 20
    assert {p.name: p.read_bytes() for p in _inputs(CORPUS)} == {
        f"{name}.bin": data for name, data in seeds.items()
    }


@pytest.mark.parametrize("module", ["source", "compiled"])
@pytest.mark.parametrize("path", SAVED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_inputs_replay_clean(path: Path, module: str) -> None:
    if module == "source":
        parser_module = target.source_module()
        if parser_module is None:
            pytest.skip("ferryman/protocols/h1.py source not installed")
    else:
        parser_module = target.compiled_h1
    target.check(path.read_bytes(), parser_module)


def test_the_input_format_round_trips() -> None:
    data = target.encode(b"GET / HTTP/1.1\r\n", 0x0D, (3, 259, 260))
    assert target.decode(data) == (0x0D, [3, 259, 260], b"GET / HTTP/1.1\r\n")
    assert target.split(b"abcdef", [1, 3, 10]) == [b"a", b"bc", b"def"]
    assert target.decode(b"G") == (0, [], b"G")
    with pytest.raises(ValueError):
        target.encode(b"", 0, (300,))


def test_check_catches_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a parser that loses a body piece is caught."""
    source = target.load_source_module()
    if source is None:
        pytest.skip("ferryman/protocols/h1.py source not installed")
    real = source.RequestParser.on_body

    def lossy(self: object, data: bytes) -> None:
        real(self, data[1:])

    monkeypatch.setattr(source.RequestParser, "on_body", lossy)
    data = target.encode(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab")
    with pytest.raises(AssertionError, match="Content-Length"):
        target.check(data, source)


def test_check_reports_an_exception_the_parser_turned_into_a_400(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httptools makes a parse error of an exception raised in a callback, and the parser
    a 400 of that: ``check`` digs the original out and raises it."""
    source = target.load_source_module()
    if source is None:
        pytest.skip("ferryman/protocols/h1.py source not installed")

    def broken(self: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(source.RequestParser, "on_message_begin", broken)
    with pytest.raises(KeyError, match="bug"):
        target.check(target.encode(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), source)


def test_fuzz_target_runs_clean_for_a_bounded_time(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (the test extra has it)")
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    for path in _inputs(REGRESSIONS):
        shutil.copy(path, corpus / path.name)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    env = dict(os.environ)
    package_root = str(Path(ferryman.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.pop("FERRYMAN_FUZZ_STRICT", None)
    cmd = [
        sys.executable,
        str(TARGET),
        f"-dict={FUZZ / 'h1_request.dict'}",
        f"-max_total_time={FUZZ_SECONDS}",
        f"-runs={FUZZ_RUNS_CAP}",
        "-rss_limit_mb=2048",
        "-timeout=10",
        "-max_len=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=FUZZ_SECONDS + 80
    )
    out = proc.stdout + proc.stderr
    crashes = {p.name: base64.b64encode(p.read_bytes()).decode() for p in artifacts.iterdir()}
    assert proc.returncode == 0 and not crashes, (
        f"fuzzing failed (exit {proc.returncode}); save the input (base64 below) in "
        f"tests/fuzz/regressions/ and replay it with fuzz_h1_request.check:\n"
        f"{crashes}\n{out[-6000:]}"
    )
    found = re.search(r"stat::number_of_executed_units: (\d+)", out) or re.search(
        r"Done (\d+) runs", out
    )
    assert found, out[-3000:]
    runs = int(found.group(1))
    assert runs >= FUZZ_RUNS_FLOOR, f"only {runs} inputs in {FUZZ_SECONDS} s:\n{out[-3000:]}"
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    assert cov and int(cov[-1][0]) > 100, "no coverage feedback from the parser's source"


# --- parser issues found while fuzzing -------------------------------------------------------

SMALL = RequestLimits(max_request_line=64, max_header_bytes=100, max_headers=10)
FIRST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def _outcome(
    chunks: list[bytes], limits: RequestLimits | None = None
) -> tuple[int | None, list[tuple[object, ...]]]:
    rec = RequestRecorder()
    parser = RequestParser(rec, limits)
    for c in chunks:
        try:
            parser.feed(c)
        except ProxyError as exc:
            return status_for(exc), rec.events
    return None, rec.events


@pytest.mark.parametrize("limits", [SMALL, None], ids=["small", "default"])
def test_a_pipelined_head_past_max_header_bytes_is_431_however_it_is_read(
    limits: RequestLimits | None,
) -> None:
    max_bytes = (limits or RequestLimits()).max_header_bytes
    value = b"v" * (max_bytes + 10)  # header section: 9 + len(value) + 5 > max_bytes
    second = b"GET /2 HTTP/1.1\r\nHost: a\r\nX: " + value + b"\r\n\r\n"
    assert _outcome([FIRST + second], limits)[0] == 431  # one read: refused
    # the read that completes the first head carries most of the second
    cut = len(second) - max_bytes // 2
    assert _outcome([FIRST + second[:cut], second[cut:]], limits)[0] == 431


def test_a_head_after_a_body_past_max_header_bytes_is_431_however_it_is_read() -> None:
    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
    second = b"GET /2 HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 110 + b"\r\n\r\n"
    assert _outcome([post + b"abc" + second], SMALL)[0] == 431
    assert _outcome([post, b"abc" + second[:80], second[80:]], SMALL)[0] == 431


def test_after_a_431_for_an_incomplete_head_no_event_follows() -> None:
    # the head's bytes pass max_request_line + max_header_bytes + 64 while incomplete
    # (whitespace padding: the fields themselves are small)
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 300
    rec = RequestRecorder()
    parser = RequestParser(rec, SMALL)
    with pytest.raises(ProxyError) as err:
        parser.feed(head)
    assert status_for(err.value) == 431
    with pytest.raises(ProxyError):
        parser.feed(b"v\r\n\r\n")
    assert rec.events == []
