"""Measure this machine and build a ``kind: host`` device profile from real timings.

Times, with PyTorch on the CPU, the forward and the backward of a regular convolution, a 3x3
depthwise convolution and a linear layer at shapes taken from MobileNetV2 at 128 px, and converts
them to MAC/s (one MAC = one multiply-add; a backward is grad-input + grad-weight, each as many
MACs as the forward). Also measures the copy bandwidth of a large tensor and the time of a tiny
operator (the per-op overhead). Medians of repeated runs after warm-up; ``torch.set_num_threads``
is left as it is.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from ._profile_schema import _NAME_RE
from .errors import ProfileError
from .profiles import DeviceProfile, profile_from_dict
from .units import format_bytes

__all__ = ["TRAINING_MEMORY_FRACTION", "cpu_model", "measure_host", "total_ram_bytes"]

TRAINING_MEMORY_FRACTION = 0.5
"""Share of the machine's RAM that a host profile gives to training."""

# (C_in, C_out, H_in = W_in, kernel, stride, groups) at 128 px input (MobileNetV2 unless noted).
_CONV_FULL = [
    (3, 32, 128, 3, 2, 1),  # stem 3x3
    (16, 96, 64, 1, 1, 1),  # block 2 expansion 1x1
    (64, 64, 16, 3, 1, 1),  # a regular 3x3 at 16x16 (ResNet/MCUNet-style body)
    (96, 576, 8, 1, 1, 1),  # 1x1 expansion at 8x8
]
_DW_FULL = [(96, 96, 64, 3, 2, 96), (144, 144, 32, 3, 1, 144), (384, 384, 8, 3, 1, 384)]
_LINEAR_FULL = [(1280, 1000), (1280, 100)]  # (in_features, out_features): the classifier
_CONV_QUICK = [(32, 32, 16, 3, 1, 1)]
_DW_QUICK = [(144, 144, 16, 3, 1, 144)]
_LINEAR_QUICK = [(1280, 100)]


def total_ram_bytes() -> int:
    """The machine's total RAM, from ``/proc/meminfo`` or else ``os.sysconf``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _median_s(fn: Callable[[], Any], *, repeats: int, warmup: int, inner: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (per call, ``inner`` calls per sample)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return max(statistics.median(samples), 1e-9)


def _time_op(
    torch: Any, op: str, shape: tuple[int, ...], batch: int, *, repeats: int, warmup: int
) -> tuple[int, float, float]:
    """Forward MACs and median forward and backward seconds of one operator at one shape."""
    functional = torch.nn.functional
    if op == "linear":
        c_in, c_out = shape
        x = torch.randn(batch, c_in, requires_grad=True)
        w = torch.randn(c_out, c_in, requires_grad=True)
        b = torch.zeros(c_out, requires_grad=True)

        def forward() -> Any:
            return functional.linear(x, w, b)

        macs = batch * c_out * c_in
    else:
        c_in, c_out, size, k, stride, groups = shape
        x = torch.randn(batch, c_in, size, size, requires_grad=True)
        w = torch.randn(c_out, c_in // groups, k, k, requires_grad=True)
        b = torch.zeros(c_out, requires_grad=True)

        def forward() -> Any:
            return functional.conv2d(x, w, b, stride=stride, padding=k // 2, groups=groups)

        out = (size + 2 * (k // 2) - k) // stride + 1
        macs = batch * c_out * (c_in // groups) * k * k * out * out
    with torch.no_grad():
        fwd_s = _median_s(forward, repeats=repeats, warmup=warmup)
    y = forward()
    grad_y = torch.randn_like(y)

    def backward() -> Any:
        return torch.autograd.grad(y, (x, w, b), grad_y, retain_graph=True)

    bwd_s = _median_s(backward, repeats=repeats, warmup=warmup)
    return macs, fwd_s, bwd_s


def _copy_seconds(torch: Any, n_bytes: int, *, repeats: int, warmup: int) -> float:
    """Median seconds to copy an fp32 tensor of ``n_bytes`` into another."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return _median_s(lambda: dst.copy_(src), repeats=repeats, warmup=warmup)


def _sig(value: float) -> float:
    """Round a measured value to 4 significant digits (the rest is noise)."""
    return float(f"{value:.4g}")


def _describe(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return f"{shape[0]}->{shape[1]}"
    c_in, c_out, size, k, stride, groups = shape
    g = f" g{groups}" if groups > 1 else ""
    return f"{c_in}->{c_out} {k}x{k}/s{stride}{g} @{size}px"


def measure_host(
    *,
    name: str = "host",
    repeats: int | None = None,
    quick: bool = False,
    progress: bool = True,
) -> DeviceProfile:
    """Time conv, depthwise and linear layers on this machine's CPU and build a host profile.

    Args:
        name: The profile name; it must be the stem of the file the profile is saved to.
        repeats: Timed runs per measurement, after warm-up (default 10, or 3 with ``quick``).
        quick: Measure one small shape per operator class with less data (well under 5 s), for
            tests and smoke checks; the rates are rougher.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        A validated ``kind: host`` profile (fp32 everywhere, frozen weights in RAM) whose
        ``measured`` section holds the per-class forward and backward MAC/s.

    Raises:
        ProfileError: If ``name`` is not a valid profile name or ``repeats`` is not positive.
    """
    import torch
    from tqdm import tqdm

    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProfileError(
            f"name: expected letters, digits, '.', '_' or '-' (a file stem), got {name!r}"
        )
    repeats = repeats if repeats is not None else (3 if quick else 10)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ProfileError(f"repeats: expected a positive integer, got {repeats!r}")
    warmup = 1 if quick else 3
    batch = 2 if quick else 8
    shapes = {
        "conv": _CONV_QUICK if quick else _CONV_FULL,
        "depthwise": _DW_QUICK if quick else _DW_FULL,
        "linear": _LINEAR_QUICK if quick else _LINEAR_FULL,
    }
    copy_bytes = (32 if quick else 256) * 1024**2
    steps = sum(len(v) for v in shapes.values()) + 2
    measured: dict[str, dict[str, float]] = {}
    best_forward = 0.0
    with tqdm(total=steps, desc="profile-host", unit="op", disable=not progress) as bar:
        for op, op_shapes in shapes.items():
            macs = fwd = bwd = 0.0
            for shape in op_shapes:
                bar.set_postfix_str(f"{op} {_describe(shape)}")
                m, f, b = _time_op(torch, op, shape, batch, repeats=repeats, warmup=warmup)
                macs, fwd, bwd = macs + m, fwd + f, bwd + b
                best_forward = max(best_forward, m / f)
                bar.update()
            # Rates over all shapes of the class: total MACs over total time (MAC-weighted).
            measured[op] = {
                "forward_macs_per_s": _sig(macs / fwd),
                "backward_macs_per_s": _sig(2 * macs / bwd),
            }
        bar.set_postfix_str("memory bandwidth")
        copy_s = _copy_seconds(torch, copy_bytes, repeats=repeats, warmup=warmup)
        bar.update()
        bar.set_postfix_str("op overhead")
        tiny = torch.zeros(1)
        inner = 50 if quick else 200
        overhead_s = _median_s(
            lambda: torch.add(tiny, 1.0), repeats=repeats, warmup=warmup, inner=inner
        )
        bar.update()

    ram = total_ram_bytes()
    training = int(ram * TRAINING_MEMORY_FRACTION) // 1024**2 * 1024**2
    threads = torch.get_num_threads()
    cpu = cpu_model()
    stamp = (
        f"measured by budgetsearch profile-host on {_dt.date.today().isoformat()}, "
        f"torch {torch.__version__}, {cpu}, {threads} threads"
    )
    how = (
        f"median of {repeats} runs after {warmup} warm-up runs, batch {batch}, fp32; forward under "
        "torch.no_grad(); backward = grad-input + grad-weight (+ grad-bias), counted as 2x the "
        "forward MACs; rate = total MACs / total time over the shapes: "
        + "; ".join(f"{op}: " + ", ".join(_describe(s) for s in v) for op, v in shapes.items())
    )
    data: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "display_name": f"This host ({cpu}, {threads} threads, {format_bytes(ram)} RAM)",
        "kind": "host",
        "notes": (
            f"Timed on {platform.platform()} with torch {torch.__version__}"
            f"{' (quick mode: rough rates)' if quick else ''}. The measured section calibrates "
            "latency; other load on the machine while measuring slows the medians. The memory "
            "figure is a rule, not a measurement."
        ),
        "memory": {"training_bytes": training, "flash_bytes": None, "frozen_weights_in": "ram"},
        "dtypes": {
            "weight": 4,
            "bias": 4,
            "activation": 4,
            "gradient": 4,
            "optimizer_state": 4,
            "mask_bits": 1,
        },
        "compute": {
            "peak_macs_per_s": _sig(best_forward),
            "memory_bandwidth_bytes_per_s": _sig(2 * copy_bytes / copy_s),
            "op_overhead_us": _sig(overhead_s * 1e6),
        },
        "training": {
            "default_batch_size": batch,
            "default_optimizer": "momentum",
            "in_place_update": False,
        },
        "measured": measured,
        "sources": {
            "memory.training_bytes": (
                f"{TRAINING_MEMORY_FRACTION:.0%} of this machine's {format_bytes(ram)} RAM "
                "(/proc/meminfo MemTotal, else sysconf), rounded down to a whole MB; "
                "budgetsearch's rule for hosts, leaving the rest to the OS and the runtime"
            ),
            "dtypes": "fp32 PyTorch CPU training on this host",
            "dtypes.mask_bits": (
                "1-bit ReLU mask, what a minimal training engine keeps "
                "(docs/cost-model.md, 'Saved activations'); "
                "stock PyTorch keeps the ReLU output, which is the cost model's pytorch accounting"
            ),
            "compute.peak_macs_per_s": f"{stamp}: the best forward rate of any timed shape",
            "compute.memory_bandwidth_bytes_per_s": (
                f"{stamp}: median time of copying a {format_bytes(copy_bytes)} fp32 tensor "
                "(Tensor.copy_), counting read + write bytes"
            ),
            "compute.op_overhead_us": (
                f"{stamp}: median time of torch.add on a 1-element tensor, over {inner} calls"
            ),
            "training.default_batch_size": f"the batch size the rates were measured at ({batch})",
            "measured": f"{stamp}: {how}",
        },
    }
    return profile_from_dict(data, source=f"<measure_host {name}>")
