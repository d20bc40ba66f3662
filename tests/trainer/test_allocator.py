"""tune_host_allocator: glibc keeps freed blocks in its heap, so a step reuses its pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from budgetsearch.trainer import tune_host_allocator


def _glibc() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="only glibc has the settings")
def test_large_blocks_come_from_the_heap_after_tuning() -> None:
    """In a fresh process: a freed 64 MB block is mmapped (and unmapped) by default, and comes
    from the heap, at the same address the next time, once tuned. The call is idempotent."""
    code = """
import ctypes, ctypes.util, sys
from budgetsearch.trainer import tune_host_allocator
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.sbrk.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def heap_grows(n):
    before = libc.sbrk(0)
    p = libc.malloc(n)
    grew = libc.sbrk(0) != before
    libc.free(p)
    return grew, p
size = 64 << 20
grew, _ = heap_grows(size)
assert not grew, "a 64 MB block should be mmapped by default"
assert tune_host_allocator() and tune_host_allocator()
grew, first = heap_grows(size)
assert grew, "after tuning it comes from the heap"
again = libc.malloc(size)
assert again == first, "and the freed block is reused, not returned to the system"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_returns_a_bool_and_is_idempotent() -> None:
    first = tune_host_allocator()
    assert isinstance(first, bool) and tune_host_allocator() is first
    assert first == (_glibc() and sys.platform.startswith("linux"))
