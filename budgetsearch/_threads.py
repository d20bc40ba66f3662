"""What a CPU run's bits depend on besides its seed: torch's thread count and the kernels.

A plan of several layers does not train bit-for-bit alike at another thread count
(``benchmarks/thread_reproducibility.py``), so the commands that take ``--threads`` and the
trainer set it for their work only and put the caller's count back, also on an error.

Nor does it train alike with other vector kernels: ATen and oneDNN pick theirs by the CPU's
instruction set (AVX2 or AVX-512), and the two round sums differently. Committed study runs
recorded on a host without AVX-512 repeat bit for bit on one with it only when both libraries
are held to AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, set before torch is
imported; ``studies/results/rerun_cells_avx2.md``; runs recorded at another thread count need
that count too). Records name the kernels with :func:`cpu_kernels` so that a run can be
repeated on the kernels it was made with.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["KERNEL_ENV", "cpu_kernels", "kernel_key", "same_kernels", "torch_threads"]

# oneDNN's cap on its instruction set; the DNNL_ spelling is the older one, read when the
# ONEDNN_ one is not set
_ONEDNN_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
#: The environment variables that lower torch's kernels (read when torch is imported).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", *_ONEDNN_ENV)


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


def cpu_kernels() -> str:
    """The CPU kernels torch computes with in this process, for a run's record.

    Returns:
        ``"aten=<ISA> onednn=<cap> cpu=<flags>"``: ATen's kernel level as torch reports it
        (``AVX512``, ``AVX2``, ``DEFAULT``, ...; ``ATEN_CPU_CAPABILITY`` lowers it), oneDNN's
        cap as ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) sets it, ``auto`` when unset
        (oneDNN then takes the best the CPU has), and what the CPU has, which ``auto`` stands
        for: ``avx512``, ``avx2`` or ``base``, with ``+vnni``, ``+bf16`` and ``+amx`` where
        present (``?`` where torch cannot say).
    """
    import torch

    onednn = next((os.environ[k].upper() for k in _ONEDNN_ENV if os.environ.get(k)), "auto")
    return (f"aten={torch.backends.cpu.get_cpu_capability()} onednn={onednn} "
            f"cpu={_cpu_flags(torch)}")


def _cpu_flags(torch: Any) -> str:
    """The vector instruction sets this CPU has, as torch's CPU probes report them."""
    probe = getattr(torch, "cpu", None)

    def has(name: str) -> bool:
        return bool(getattr(probe, name, lambda: False)())

    if not hasattr(probe, "_is_avx512_supported"):
        return "?"
    base = "avx512" if has("_is_avx512_supported") else "avx2" if has("_is_avx2_supported") \
        else "base"
    extras = [tag for tag, name in (("vnni", "_is_vnni_supported"),
                                    ("bf16", "_is_avx512_bf16_supported"),
                                    ("amx", "_is_amx_tile_supported")) if has(name)]
    return "+".join([base, *extras])


def kernel_key(kernels: str) -> str:
    """The part of a :func:`cpu_kernels` record that decides which kernels ran.

    ATen's level is as torch reported it, so it needs nothing else; oneDNN's cap decides its
    kernels when it is set, and the CPU's flags only where it is not (``onednn=auto`` takes the
    best the CPU has). So ``aten=AVX2 onednn=AVX2 cpu=avx512`` and ``aten=AVX2 onednn=AVX2``
    (recorded before the flags were kept) are the same kernels: ``aten=AVX2 onednn=AVX2``.
    """
    libraries = [p for p in kernels.split() if not p.startswith("cpu=")]
    return kernels if "onednn=auto" in libraries else " ".join(libraries)


def same_kernels(a: str, b: str) -> bool:
    """Whether two :func:`cpu_kernels` records name the same kernels (:func:`kernel_key`); a
    record without the CPU's flags (made before they were kept) is compared on the libraries'
    settings alone."""
    if "cpu=" in a and "cpu=" in b:
        return kernel_key(a) == kernel_key(b)
    return ([p for p in a.split() if not p.startswith("cpu=")]
            == [p for p in b.split() if not p.startswith("cpu=")])
