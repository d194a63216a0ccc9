"""Access log field escaping and time formats, without sockets."""

from __future__ import annotations

import calendar
import json

from ferryman.proxy.access_log import _Clock, _json_str, _text_escaped


def test_plain_values_are_kept_as_they_are() -> None:
    value = b"/path?q=1&x=%20y"
    assert _text_escaped(value) is value  # (no copy on the common path)
    assert _json_str(value) == b'"/path?q=1&x=%20y"'


def test_text_escapes_quotes_backslashes_and_control_bytes() -> None:
    forged = b'ua" 200 1 "-" "x\r\n127.0.0.1 - - [fake line]\\\x00\xff'
    out = _text_escaped(forged)
    assert out == (
        b'ua\\" 200 1 \\"-\\" \\"x\\x0d\\x0a127.0.0.1 - - [fake line]\\\\\\x00\\xff'
    )
    assert b"\n" not in out and b"\r" not in out


def test_json_strings_stay_one_valid_line() -> None:
    for value in (b'say "hi"\\', b"line\nbreak\x00", b"caf\xe9", b"\x7f\x1b[31m"):
        out = _json_str(value)
        assert b"\n" not in out
        assert json.loads(out) == value.decode("latin-1")


def test_clock_formats() -> None:
    when = calendar.timegm((2026, 11, 27, 16, 50, 1)) + 0.123
    clock = _Clock()
    assert clock.iso(when) == b"2026-11-27T16:50:01.123Z"
    assert clock.clf(when) == b"27/Nov/2026:16:50:01 +0000"
    assert clock.iso(when + 1.5) == b"2026-11-27T16:50:02.623Z"
    assert clock.iso(when + 0.8769) == b"2026-11-27T16:50:01.999Z"  # (never .1000)


def test_pipe_writes_are_whole_lines_of_at_most_pipe_buf() -> None:
    from ferryman.proxy.access_log import PIPE_BUF, _line_pieces

    lines = [b"x" * (n % 300 + 1) + b"\n" for n in range(200)] + [b"y" * 9000 + b"\n", b"z\n"]
    data = b"".join(lines)
    pieces = _line_pieces(data)
    assert b"".join(pieces) == data
    for piece in pieces:
        assert piece.endswith(b"\n")
        assert len(piece) <= PIPE_BUF or piece.count(b"\n") == 1  # (one long line alone)


def test_reopen_that_fails_keeps_the_old_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    import pytest

    from ferryman.proxy.access_log import AccessLog

    path = tmp_path / "logs" / "access.log"
    path.parent.mkdir()
    log = AccessLog(str(path), "json")
    log.open()
    path.rename(tmp_path / "logs" / "access.log.1")
    path.parent.chmod(0o500)  # (the new file cannot be created)
    try:
        if os.geteuid() == 0:
            pytest.skip("root creates the file anyway")
        with pytest.raises(PermissionError):
            log.reopen()
        assert log._fd >= 0  # still writing to the old file
    finally:
        path.parent.chmod(0o700)
        log.close()
