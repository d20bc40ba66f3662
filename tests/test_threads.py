"""torch_threads: the count set for the block, the caller's restored after, also on an error;
cpu_kernels: the kernels a run's record names; kernel_key and same_kernels: when two records name
the same kernels."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from budgetsearch._threads import (
    _cpu_flags,
    cpu_kernels,
    kernel_key,
    same_kernels,
    torch_threads,
)


def test_the_count_is_set_inside_and_restored_after_even_on_an_error() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), torch_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_none_leaves_the_count_alone() -> None:
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_cpu_kernels_names_atens_level_and_onednns_cap(monkeypatch) -> None:
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    aten = f"aten={torch.backends.cpu.get_cpu_capability()}"
    cpu = f"cpu={_cpu_flags(torch)}"
    assert cpu_kernels() == f"{aten} onednn=auto {cpu}"
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")  # the older spelling
    assert cpu_kernels() == f"{aten} onednn=AVX2 {cpu}"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")  # the newer one wins
    assert cpu_kernels() == f"{aten} onednn=AVX512_CORE {cpu}"


def test_cpu_flags_name_the_best_vector_set_and_its_extras() -> None:
    def fake(**present: bool) -> SimpleNamespace:
        names = ("_is_avx512_supported", "_is_avx2_supported", "_is_vnni_supported",
                 "_is_avx512_bf16_supported", "_is_amx_tile_supported")
        answers = {n: bool(present.get(n)) for n in names}
        return SimpleNamespace(cpu=SimpleNamespace(
            **{n: functools.partial(answers.get, n) for n in names}))

    assert _cpu_flags(fake(_is_avx2_supported=True)) == "avx2"
    assert _cpu_flags(fake(_is_avx512_supported=True, _is_avx2_supported=True,
                           _is_vnni_supported=True, _is_amx_tile_supported=True)) == \
        "avx512+vnni+amx"
    assert _cpu_flags(fake()) == "base"
    assert _cpu_flags(SimpleNamespace(cpu=SimpleNamespace())) == "?"  # a torch without probes


def test_cpu_kernels_follows_aten_cpu_capability_set_before_torch_starts() -> None:
    # the level is fixed when torch is imported: a fresh process told to use the plain kernels
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    out = subprocess.run([sys.executable, "-c",
                          "from budgetsearch._threads import cpu_kernels; print(cpu_kernels())"],
                         env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().startswith("aten=DEFAULT onednn=SSE41 cpu=")


@pytest.mark.parametrize(("record", "key"), [
    # a cap at AVX2 or lower decides oneDNN's kernels on a CPU with AVX2: the flags say nothing
    ("aten=AVX2 onednn=AVX2 cpu=avx512+vnni", "aten=AVX2 onednn=AVX2"),
    ("aten=AVX2 onednn=AVX2", "aten=AVX2 onednn=AVX2"),  # ATen's AVX2 shows the CPU has it
    # uncapped, or capped above AVX2, the CPU decides: its flags are part of the key
    ("aten=AVX512 onednn=auto cpu=avx512+vnni", "aten=AVX512 onednn=auto cpu=avx512+vnni"),
    ("aten=AVX2 onednn=ALL cpu=avx2", "aten=AVX2 onednn=ALL cpu=avx2"),
    ("aten=AVX2 onednn=AVX512_CORE cpu=avx2", "aten=AVX2 onednn=AVX512_CORE cpu=avx2"),
    # ... and a record made before they were kept does not know them
    ("aten=AVX512 onednn=auto", "aten=AVX512 onednn=auto cpu=?"),
    # nor does a capped record whose ATen level does not show AVX2
    ("aten=DEFAULT onednn=AVX2", "aten=DEFAULT onednn=AVX2 cpu=?"),
])
def test_kernel_key_keeps_the_cpu_flags_where_they_decide_onednns_kernels(record, key) -> None:
    assert kernel_key(record) == key


@pytest.mark.parametrize(("a", "b", "same"), [
    ("aten=AVX2 onednn=AVX2 cpu=avx512", "aten=AVX2 onednn=AVX2 cpu=avx2", True),
    ("aten=AVX2 onednn=AVX2", "aten=AVX2 onednn=AVX2 cpu=avx512", True),  # an older record
    ("aten=AVX2 onednn=auto cpu=avx512", "aten=AVX2 onednn=auto cpu=avx2", False),
    ("aten=AVX2 onednn=auto", "aten=AVX2 onednn=auto cpu=avx512", False),  # not known
    ("aten=AVX2 onednn=AVX512_CORE cpu=avx2", "aten=AVX2 onednn=AVX512_CORE cpu=avx512", False),
    ("aten=AVX2 onednn=AVX2", "aten=AVX512 onednn=AVX2 cpu=avx512", False),
])
def test_same_kernels(a, b, same) -> None:
    assert same_kernels(a, b) is same and same_kernels(b, a) is same
