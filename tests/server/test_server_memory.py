"""Workers tune glibc malloc for large-body traffic (see ferryman.server.memory)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from ferryman.server.memory import tune_malloc


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tune_malloc_applies_on_glibc() -> None:
    assert tune_malloc() is True
    # malloc still works across the new thresholds, small and large blocks alike
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    for size in (64, 256 * 1024, 8 * 1024 * 1024):
        block = libc.malloc(size)
        assert block
        ctypes.memset(block, 1, size)
        libc.free(block)
