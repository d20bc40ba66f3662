"""Backward time of dense vs gradient-filtered convs, per distinct conv shape of MobileNetV2.

For each distinct conv of torchvision's MobileNetV2 (at ``--size`` px, batch ``--batch``) this times
the backward (input and weight gradients) of the dense conv (PyTorch autograd) and of
:func:`budgetsearch.ops.filtered_conv2d` for each patch size, and prints the predicted MAC ratio
(dense backward MACs / filtered backward MACs, i.e. K^2*H_out*W_out / P with P = ceil(H_out/r) *
ceil(W_out/r); pooling costs not counted) beside the measured time ratio. A benchmark, not a test.

With ``--input-grad`` it times, per shape, the input gradient alone (what a frozen layer on the
backward path computes) two ways: torch's ``torch.nn.grad.conv2d_input`` (an input-only
``convolution_backward``) and budgetsearch's ``conv2d_input_grad`` (a transposed convolution),
and checks that both give the same tensor.

    PYTHONPATH=. .venv/bin/python benchmarks/filtered_conv_backward.py --threads 1 --repeats 3
    PYTHONPATH=. .venv/bin/python benchmarks/filtered_conv_backward.py --input-grad --batch 32
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2

from budgetsearch.ops.filtered import filtered_conv2d
from budgetsearch.ops.sparse import conv2d_input_grad, conv_args

Shape = tuple[int, int, int, int, int, int, int, int]  # c_in, c_out, k, s, p, groups, h, w


def conv_shapes(size: int) -> dict[Shape, list[str]]:
    """Distinct conv shapes of MobileNetV2 at ``size`` px, with the layers that have them."""
    model = mobilenet_v2(weights=None).eval()
    shapes: dict[Shape, list[str]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):

            def hook(m: nn.Conv2d, inputs: tuple, _out: torch.Tensor, name: str = name) -> None:
                h, w = inputs[0].shape[-2:]
                key = (
                    m.in_channels,
                    m.out_channels,
                    m.kernel_size[0],
                    m.stride[0],
                    m.padding[0],
                    m.groups,
                    h,
                    w,
                )
                shapes.setdefault(key, []).append(name)

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def time_backward(y: torch.Tensor, inputs: tuple, repeats: int) -> float:
    """Median seconds of one backward of ``y`` (its graph is retained between repeats)."""
    g = torch.randn_like(y)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        torch.autograd.grad(y, inputs, g, retain_graph=True)
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_shape(shape: Shape, *, batch: int, patch_sizes: list[int], mode: str, repeats: int):
    """(dense seconds, [(filtered seconds, predicted MAC ratio) per patch size]) for one shape."""
    c_in, c_out, k, s, p, groups, h, w = shape
    x = torch.randn(batch, c_in, h, w, requires_grad=True)
    wt = torch.randn(c_out, c_in // groups, k, k, requires_grad=True)
    dense = time_backward(F.conv2d(x, wt, None, s, p, 1, groups), (x, wt), repeats)
    h_out, w_out = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = []
    for r in patch_sizes:
        y = filtered_conv2d(x, wt, stride=s, padding=p, groups=groups, patch_size=r, mode=mode)
        cells = math.ceil(h_out / r) * math.ceil(w_out / r)
        out.append((time_backward(y, (x, wt), repeats), k * k * h_out * w_out / cells))
    return dense, out


def time_call(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def input_grad_table(shapes: dict[Shape, list[str]], *, batch: int, repeats: int) -> None:
    """Input-gradient time per shape: torch's input-only backward against ours."""
    print(f"{'n':>2} {'cin':>4} {'cout':>4} {'k':>1} {'s':>1} {'G':>4} {'HxW':>7} "
          f"{'torch ms':>9} {'ours ms':>8} {'ratio':>6} {'max |diff|':>11}")
    total_torch = total_ours = 0.0
    for shape, names in shapes.items():
        c_in, c_out, k, s, p, groups, h, w = shape
        x_shape = (batch, c_in, h, w)
        wt = torch.randn(c_out, c_in // groups, k, k)
        y = F.conv2d(torch.zeros(x_shape), wt, None, s, p, 1, groups)
        g = torch.randn_like(y)
        conv = conv_args(kernel_size=k, stride=s, padding=p, dilation=1, groups=groups)
        ref = torch.nn.grad.conv2d_input(x_shape, wt, g, s, p, 1, groups)
        diff = float((conv2d_input_grad(x_shape, wt, g, conv) - ref).abs().max())
        t_torch = time_call(functools.partial(torch.nn.grad.conv2d_input, x_shape, wt, g, s, p,
                                              1, groups), repeats)
        t_ours = time_call(functools.partial(conv2d_input_grad, x_shape, wt, g, conv), repeats)
        total_torch += len(names) * t_torch
        total_ours += len(names) * t_ours
        print(f"{len(names):>2} {c_in:>4} {c_out:>4} {k:>1} {s:>1} {groups:>4} {f'{h}x{w}':>7} "
              f"{t_torch * 1e3:9.3f} {t_ours * 1e3:8.3f} {t_torch / t_ours:6.2f} {diff:11.2e}",
              flush=True)
    print(f"all layers (x n): torch {total_torch * 1e3:.1f} ms, ours {total_ours * 1e3:.1f} ms, "
          f"ratio {total_torch / total_ours:.2f}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one row per distinct conv shape."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128, help="input resolution (px)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--patch-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--mode", default="normalized", choices=["normalized", "paper"])
    ap.add_argument("--input-grad", action="store_true",
                    help="time the input gradient alone, torch's against budgetsearch's")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = conv_shapes(args.size)
    if args.input_grad:
        print(f"MobileNetV2 @ {args.size}px, batch {args.batch}, {args.threads} thread(s), median "
              f"of {args.repeats}: input gradient of each conv shape")
        input_grad_table(shapes, batch=args.batch, repeats=args.repeats)
        return
    rs = args.patch_sizes
    print(
        f"MobileNetV2 @ {args.size}px, batch {args.batch}, {args.threads} thread(s), median of "
        f"{args.repeats}, mode={args.mode}; times in ms; n = layers with this shape; "
        "pred = dense/filtered backward MACs, meas = dense/filtered backward time"
    )
    head = f"{'n':>2} {'cin':>4} {'cout':>4} {'k':>1} {'s':>1} {'G':>4} {'HxW':>7} {'dense':>8}"
    for r in rs:
        head += f" | r={r}: {'ms':>7} {'pred':>6} {'meas':>6}"
    print(head)
    totals = [0.0] * (len(rs) + 1)
    for shape, names in shapes.items():
        c_in, c_out, k, s, _, groups, h, w = shape
        n = len(names)
        dense, filtered = bench_shape(
            shape, batch=args.batch, patch_sizes=rs, mode=args.mode, repeats=args.repeats
        )
        row = f"{n:>2} {c_in:>4} {c_out:>4} {k:>1} {s:>1} {groups:>4} {f'{h}x{w}':>7} "
        row += f"{dense * 1e3:8.3f}"
        totals[0] += n * dense
        for i, (filt, pred) in enumerate(filtered):
            row += f" |      {filt * 1e3:7.3f} {pred:6.1f} {dense / filt:6.1f}"
            totals[i + 1] += n * filt
        print(row, flush=True)
    line = f"{'all layers (x n), backward ms:':>34} {totals[0] * 1e3:8.2f}"
    for i in range(len(rs)):
        line += f" |      {totals[i + 1] * 1e3:7.2f} {'':>6} {totals[0] / totals[i + 1]:6.1f}"
    print(line)


if __name__ == "__main__":
    main()
