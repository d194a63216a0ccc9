"""Running a function in a forked child process, for tests of state shared by forks."""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any


def in_child(body: Callable[[], Any], *, reap: bool = True) -> tuple[int, Any]:
    """Run ``body`` in a forked child and return ``(pid, what body returned)``. The child
    leaves with ``os._exit`` (no cleanup, no finalizers: guards it holds are never
    released, as with a killed worker), and is reaped unless ``reap`` is False (it is then
    a zombie until the caller reaps it). A failure in the child is raised here as an
    AssertionError carrying its traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(r)
            try:
                payload = pickle.dumps(("ok", body()))
            except BaseException:  # noqa: BLE001 - reported to the parent
                payload = pickle.dumps(("error", traceback.format_exc()))
            with os.fdopen(w, "wb") as out:
                out.write(payload)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()  # (until the child exits)
    if reap:
        os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        raise AssertionError(f"the child failed:\n{value}")
    return pid, value
