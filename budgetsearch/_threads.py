"""torch's intra-op thread count for a block of work, restored after it.

A plan of several layers does not train bit-for-bit alike at another thread count
(``benchmarks/thread_reproducibility.py``), so the commands that take ``--threads`` and the
trainer set it for their work only and put the caller's count back, also on an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, the previous count restored after.

    Args:
        count: Threads (>= 1), or None to leave the count as it is.
    """
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)
