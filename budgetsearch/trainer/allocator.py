"""Host allocator tuning for training on a CPU: keep freed memory for the next step.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its
mmap threshold (128 KB, growing to at most 32 MB) with a fresh ``mmap`` and returns it with
``munmap`` when the tensor dies, so each large activation or gradient of every training step is
page-faulted in again, zero-filled by the kernel, page by page: on a small CPU that can take
longer than the elementwise op that writes the tensor (``benchmarks/training_step.py``, run once
as it is and once with ``--system-allocator``, shows the effect on whole training steps).

:func:`tune_host_allocator` tells glibc to serve every block from its heap and never to give
the heap back (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` at its maximum), so the second step
reuses the first step's pages. The process keeps its peak resident size until it exits, which is
what a training process wants. Nothing happens on other C libraries (musl, macOS, Windows).
What autograd saves (the plan's memory) does not change: this is about the host's speed only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_host_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_TUNED: bool | None = None


def tune_host_allocator() -> bool:
    """Keep freed memory in the process heap for reuse (glibc only; idempotent).

    Returns:
        Whether glibc accepted the settings (False on other platforms, where nothing changes).
    """
    global _TUNED
    if _TUNED is not None:
        return _TUNED
    _TUNED = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt as a stub)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _TUNED = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _TUNED
