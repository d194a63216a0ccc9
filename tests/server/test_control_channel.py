"""The control channel's framing (``server/control.py``) and the upgrade handover's checks
(``server/upgrade.py``), over real unix sockets."""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

import pytest

from ferryman.server.control import ChannelClosed, MessageReader, send_message
from ferryman.server.process import ProcessSetupError
from ferryman.server.upgrade import UpgradeListener, take_over

Messages = list[tuple[object, list[int]]]


def _read_all(sock: socket.socket, reader: MessageReader, count: int) -> Messages:
    sock.setblocking(False)
    got: Messages = []
    while len(got) < count:
        ready, _, _ = select.select([sock], [], [], 5)
        assert ready, "no message within 5 s"
        got += reader.read_from(sock)
    return got


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_descriptors_stay_with_their_message_when_a_read_spans_two() -> None:
    """A read can end one message and start the next, with the next one's descriptors:
    they must go to the message they were sent with (a reload storm mixed them up)."""
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(3)]
    try:
        big = "x" * 40_000  # (larger than one read, so reads straddle messages)
        send_message(a, ("one", big), [pipes[0][0]])
        send_message(a, ("two", big), [pipes[1][0], pipes[2][0]])
        send_message(a, ("three", ""), [])
        got = _read_all(b, MessageReader(), 3)
        assert [m[0] for m, _ in got] == ["one", "two", "three"]  # type: ignore[index]
        assert [_inode(fd) for fd in got[0][1]] == [_inode(pipes[0][0])]
        assert [_inode(fd) for fd in got[1][1]] == [_inode(pipes[1][0]), _inode(pipes[2][0])]
        assert got[2][1] == []
        for _, fds in got:
            for fd in fds:
                os.close(fd)
    finally:
        a.close()
        b.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_descriptors_of_a_message_read_together_with_one_without() -> None:
    """A message without descriptors and the next one with: the kernel may hand both
    over in one read, the descriptors going to the second."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        send_message(a, ("plain", ""), [])
        send_message(a, ("with", ""), [r])
        send_message(a, ("small", "x" * 10), [w])
        got = _read_all(b, MessageReader(), 3)
        assert [(m[0], len(fds)) for m, fds in got] == [  # type: ignore[index]
            ("plain", 0), ("with", 1), ("small", 1)
        ]
        assert _inode(got[1][1][0]) == _inode(r)
        assert _inode(got[2][1][0]) == _inode(w)
        for _, fds in got:
            for fd in fds:
                os.close(fd)
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_json_channel_never_unpickles() -> None:
    a, b = socket.socketpair()
    try:
        # a pickle (of anything) sent to a JSON reader is refused, not executed
        send_message(a, {"op": "ready"}, encoding="pickle")
        with pytest.raises(ChannelClosed, match="an unreadable message"):
            _read_all(b, MessageReader("json"), 1)
        a2, b2 = socket.socketpair()
        send_message(a2, {"op": "ready", "pid": 7}, encoding="json")
        assert _read_all(b2, MessageReader("json"), 1) == [({"op": "ready", "pid": 7}, [])]
        a2.close()
        b2.close()
    finally:
        a.close()
        b.close()


def test_end_of_file_closes_the_channel() -> None:
    a, b = socket.socketpair()
    a.close()
    with pytest.raises(ChannelClosed, match="end of file"):
        MessageReader().read_from(b)
    b.close()


def test_take_over_with_nobody_listening_names_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    with pytest.raises(ProcessSetupError) as info:
        take_over(path, timeout=1.0)
    assert str(info.value).startswith(
        f"server.upgrade_sock: no running server answers on {path}: "
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_take_over_refuses_sockets_from_another_user(tmp_path: Path) -> None:
    """A process of another uid (say, a compromised worker that could write the
    directory) answering on upgrade_sock does not get to hand over sockets."""
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="ferryman-up-")  # (pytest's tmp_path is root's only)
    os.chmod(where, 0o777)
    path = os.path.join(where, "up.sock")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the impostor, as nobody
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(1)
            os.write(ready_w, b"1")
            conn, _ = sock.accept()
            conn.recv(1)  # (until the other side closes)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(ProcessSetupError) as info:
            take_over(path, timeout=2.0)
        assert str(info.value) == (
            f"server.upgrade_sock: {path} is served by a process of uid 65534, not this "
            f"user's (0): refusing its sockets"
        )
    finally:
        os.close(ready_r)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        shutil.rmtree(where, ignore_errors=True)


def test_upgrade_listener_hands_sockets_to_the_same_user_and_leaves_the_path(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "up.sock")
    listener = UpgradeListener(path)
    listener.open()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    try:
        with pytest.raises(ProcessSetupError, match="a running server listens on"):
            UpgradeListener(path).open()
        import threading

        result: dict[str, object] = {}

        def successor() -> None:
            result["handover"] = take_over(path, timeout=5.0)

        thread = threading.Thread(target=successor)
        thread.start()
        while thread.is_alive():
            listener.poll([("listener", ("127.0.0.1", 8080), tcp)])
            thread.join(0.01)
        handover = result["handover"]
        kind, address, sock = handover.sockets[0]  # type: ignore[attr-defined]
        assert (kind, address) == ("listener", ("127.0.0.1", 8080))
        assert sock.getsockname() == tcp.getsockname()
        assert handover.take("listener", ("127.0.0.1", 8080)) is sock  # type: ignore[attr-defined]
        confirm = threading.Thread(target=handover.confirm)  # type: ignore[attr-defined]
        confirm.start()
        done = False
        while confirm.is_alive() or not done:
            done = listener.poll([]) or done
            confirm.join(0.01)
        assert done
        # the path is left to the successor (removed here before saying goodbye)
        assert not os.path.exists(path)
        sock.close()
    finally:
        listener.close()
        tcp.close()
