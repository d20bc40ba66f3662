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
# oneDNN caps that decide its kernels on any CPU with AVX2
_AT_MOST_AVX2 = ("SSE41", "AVX", "AVX2")


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

    ATen's level is as torch reported it, so it needs nothing else. oneDNN's kernels follow its
    cap when the cap is AVX2 or lower on a CPU that has AVX2 (as ATen's level ``AVX2`` or
    ``AVX512`` shows), and the CPU otherwise: uncapped (``auto``, ``ALL``) or capped above
    AVX2, the CPU's flags are part of the key, and a record without them (made before they
    were kept) keys as ``cpu=?``, unknown. So ``aten=AVX2 onednn=AVX2 cpu=avx512`` and
    ``aten=AVX2 onednn=AVX2`` are the same kernels (``aten=AVX2 onednn=AVX2``), and
    ``aten=AVX512 onednn=auto`` is not known to equal ``aten=AVX512 onednn=auto cpu=avx512``.
    """
    parts = kernels.split()
    libraries = [p for p in parts if not p.startswith("cpu=")]
    fields = dict(p.split("=", 1) for p in libraries if "=" in p)
    cpu = next((p for p in parts if p.startswith("cpu=")), "cpu=?")
    has_avx2 = (fields.get("aten", "").upper().startswith(("AVX2", "AVX512"))
                or cpu.startswith(("cpu=avx2", "cpu=avx512")))
    if fields.get("onednn", "auto").upper() in _AT_MOST_AVX2 and has_avx2:
        return " ".join(libraries)
    return " ".join([*libraries, cpu])


def same_kernels(a: str, b: str) -> bool:
    """Whether two :func:`cpu_kernels` records are known to name the same kernels (equal
    :func:`kernel_key`)."""
    return kernel_key(a) == kernel_key(b)
