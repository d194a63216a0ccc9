"""What a server process does about its files and rights: the pid file, the error log,
dropping privileges, and detaching (``--daemon``).

Exit codes, for service managers: 0 after a clean stop, 1 when the server could not run
(a port it cannot bind, rights it cannot switch to), 2 for a bad config or command line.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys


class ProcessSetupError(Exception):
    """The process cannot be set up as asked; the message names the setting."""


def write_pid_file(path: str) -> None:
    """Write this process's pid to ``path`` (replacing the file atomically)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as out:
        out.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid_file(path: str) -> None:
    """Remove ``path`` if it still names this process (a successor may have replaced it)."""
    try:
        with open(path) as src:
            if src.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def resolve_account(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    """The uid and gid to switch to (the user's own group when only ``user`` is given);
    raises :class:`ProcessSetupError` when this process may not switch to them."""
    uid = gid = None
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            uid, gid = entry.pw_uid, entry.pw_gid
        if group is not None:
            gid = grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ProcessSetupError(f"server.user/group: {exc.args[0]}") from None
    if os.geteuid() != 0:
        if uid is not None and uid != os.geteuid():
            raise ProcessSetupError(
                f"server.user: only root can switch to user {user!r} "
                f"(ferryman runs as uid {os.geteuid()})"
            )
        if gid is not None and gid != os.getegid():
            raise ProcessSetupError(
                f"server.group: only root can switch to group {group!r} "
                f"(ferryman runs as gid {os.getegid()})"
            )
    return uid, gid


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Switch this process to ``gid`` then ``uid`` (no-op for None). As root, the
    supplementary groups become those of the new user (or just ``gid``): none of root's
    are kept."""
    if uid is None and gid is None:
        return
    if os.geteuid() == 0:
        if uid is not None:
            os.initgroups(pwd.getpwuid(uid).pw_name, gid if gid is not None else os.getegid())
        elif gid is not None:
            os.setgroups([gid])
    if gid is not None and gid != os.getegid():
        os.setgid(gid)
    if uid is not None and uid != os.geteuid():
        os.setuid(uid)


def redirect_output(path: str, stdout_too: bool) -> None:
    """Send standard error (and standard output with ``stdout_too``) to the file ``path``,
    appending; called again on SIGUSR1 after a rotation."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stderr.flush()
    os.dup2(fd, 2)
    if stdout_too:
        sys.stdout.flush()
        os.dup2(fd, 1)
    os.close(fd)


def daemonize(error_log: str, pid_file: str | None, defer_ready: bool = False) -> int | None:
    """Detach from the terminal: fork twice, start a new session, read from /dev/null and
    write to ``error_log``. The calling process exits 0 once the daemon has written its
    pid file (so a service manager or script can read it at once).

    With ``defer_ready`` (``--upgrade``: the pid file is written once the old server has
    handed over), the daemon gets the pipe to the launcher back instead: writing a byte
    to it makes the launcher exit 0; closing it without one, exit 1."""
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            # one byte: started (children that inherited the pipe may hold it open);
            # end of file without one: the daemon failed to start
            started = ready.read(1)
        os._exit(0 if started else 1)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    redirect_output(error_log, stdout_too=True)
    if defer_ready:
        return ready_w
    if pid_file is not None:
        write_pid_file(pid_file)
    os.write(ready_w, b"1")
    os.close(ready_w)
    return None
