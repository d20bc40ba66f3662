"""Gradient-filtered convolution (Yang et al., CVPR'23), reproduced and generalised.

The forward is the ordinary convolution. The backward replaces the output gradient g by its mean
over non-overlapping r x r patches and works on a pooled grid of p_h x p_w = ceil(H_out/r) x
ceil(W_out/r) cells, exactly as ``docs/gradient-filtering.md`` states:

- forward saves ``x_sum`` (N, C_in, p_h, p_w), the sum of x over R x R blocks (R = r*s) with
  ``ceil((p*R - H_x)/2)`` rows/columns of padding on the leading side, i.e. N*C_in*p_h*p_w elements
  instead of x, if the weight gradient is wanted; if the input gradient is needed, references to
  the weight (and the trained slice), from which the backward forms ``w_sum`` (C_out, C_in/G),
  the weight summed over its kernel taps: no new tensor is kept for it (like a stock conv, an
  in-place change of the weight before the backward is an autograd error);
- ``g_avg`` = avg-pool of g (count_include_pad=False, its own padding ``ceil((p*r - H_out)/2)``);
- ``gx_sum = w_sum^T g_avg`` and ``gw = sum_{n,i,j} g_avg * x_sum``, within each group (any G:
  regular, depthwise, channel multiplier, grouped); every kernel tap of ``grad_w`` gets ``gw``;
- ``grad_x`` replicates ``gx_sum`` over each R x R block (not divided), cropped to H_x x W_x;
- ``grad_b`` is exact; dilation and the conv padding matter in the forward only.

Modes: ``"paper"`` is the authors' operator (gx_sum and gw are not divided by s^2, so strided
convs get gradients ~s^2 too large); ``"normalized"`` (default) divides both by s_h*s_w;
``"corrected"`` is ``normalized`` with the border effect removed as well. Near the border of the
map a k x k conv's taps fall outside it (into the padding), so the dense input gradient at a
border pixel sums fewer taps than ``w_sum`` holds, and a border tap's weight gradient sums fewer
positions than ``x_sum`` covers. ``corrected`` scales ``grad_x`` by the separable map
``(count_h[h]·s_h/k_h)(count_w[w]·s_w/k_w)`` (``count[h]``: the (output, tap) pairs that reach
input row h) and tap (kh, kw) of ``grad_w`` by ``(valid_h[kh]·s_h/X_h)(valid_w[kw]·s_w/X_w)``
(``valid[kh]``: the outputs whose tap kh lands inside the input; ``X``: the input rows inside
the pooled grid), which makes both exact for a constant input, output gradient and kernel.
1x1 convs are left as ``normalized`` has them. It matters on small maps: on a 4x4 map a padded
3x3 conv's border pixels are 12 of 16, so ``normalized`` input gradients come out too large,
and the excess compounds through a stack of filtered blocks (``benchmarks/filter_fidelity.py``
prints the norm ratios to the exact gradients per mode).

Shapes the authors' operator rejects (the x grid would need negative padding, e.g. a padding-0 3x3
conv on 14x14 with r = 4): here the pooled grid is cropped symmetrically instead (the formula
``floor((h + xp)/R)`` with negative ``xp``); the at most ``d*(k-1) - 2*pad`` border rows/columns
of x outside the grid enter no block and get a zero input gradient, so ``grad_x`` stays the exact
adjoint of the sum-pool, as in the authors' operator; ``mode="paper"`` uses the same grid there.
:func:`check_filterable` says up front which shapes are accepted, and
:attr:`FilterGeometry.authors_accept` which ones the authors' operator would run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..choices import FILTER_MODES
from ..errors import PlanError
from ._library import define, is_eager
from .epilogue import (
    Epilogue,
    clamp_mask,
    constant_maps,
    map_sums,
    mask_counts,
    masked,
    run_epilogue,
)
from .sparse import (
    ChannelSelection,
    ConvArgs,
    IntPair,
    _pair,
    _wanted,
    _weight_outputs,
    conv_args,
    selection_lists,
    selection_of,
)

__all__ = [
    "MODES",
    "FilterGeometry",
    "check_filterable",
    "filter_geometry",
    "filtered_conv2d",
]

#: The gradient-filter variants (:data:`budgetsearch.choices.FILTER_MODES`).
MODES = FILTER_MODES


@dataclass(frozen=True)
class FilterGeometry:
    """The pooled grid of a filtered conv; every pair is (height, width).

    Attributes:
        patch: r, the output-gradient patch size.
        block: R = r*s, the input block size.
        grid: (p_h, p_w), the pooled grid.
        x_pad: Leading padding of the x grid (negative: cropped).
        g_pad: Padding of the g grid (avg-pool padding, never negative).
        in_hw: Input size.
        out_hw: Output size.
    """

    patch: tuple[int, int]
    block: tuple[int, int]
    grid: tuple[int, int]
    x_pad: tuple[int, int]
    g_pad: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def cells(self) -> int:
        """P = p_h * p_w, the number of pooled cells per channel."""
        return self.grid[0] * self.grid[1]

    @property
    def authors_accept(self) -> bool:
        """Whether the authors' operator runs on this shape (its x pooling padding is valid).

        When False, ``mode="paper"`` still runs, on the cropped grid described above.
        """
        return all(0 <= p <= b // 2 for p, b in zip(self.x_pad, self.block, strict=True))

    @functools.cached_property
    def whole_input(self) -> bool:
        """Whether one cell's R x R block holds the whole input map."""
        return _whole_map(self.in_hw, self.block, self.x_pad, self.grid)

    @functools.cached_property
    def whole_output(self) -> bool:
        """Whether one r x r patch holds the whole output map."""
        return _whole_map(self.out_hw, self.patch, self.g_pad, self.grid)


def filter_geometry(
    *, in_hw: IntPair, out_hw: IntPair, stride: IntPair, patch_size: IntPair
) -> FilterGeometry:
    """The pooled grid for a conv with the given input/output sizes, stride and patch size.

    Args:
        in_hw: Input height and width.
        out_hw: Output height and width.
        stride: Conv stride.
        patch_size: r (>= 2).

    Returns:
        The geometry.

    Raises:
        PlanError: If a size is not positive or the patch size is below 2.
    """
    return _geometry(_pair(in_hw, "in_hw"), _pair(out_hw, "out_hw"), _pair(stride, "stride"),
                     _pair(patch_size, "patch_size"))


@functools.lru_cache(maxsize=1024)
def _geometry(hx: tuple[int, int], hy: tuple[int, int], s: tuple[int, int],
              r: tuple[int, int]) -> FilterGeometry:
    """:func:`filter_geometry` on normalised pairs, cached: a layer has the same one every step."""
    if min(r) < 2:
        raise PlanError(f"patch_size must be >= 2 (1 means no filtering), got {r}")
    if min(*hx, *hy, *s) < 1:
        raise PlanError(f"sizes and stride must be >= 1, got in {hx}, out {hy}, stride {s}")
    block = (r[0] * s[0], r[1] * s[1])
    grid = (math.ceil(hy[0] / r[0]), math.ceil(hy[1] / r[1]))
    x_pad = tuple(-((hx[i] - grid[i] * block[i]) // 2) for i in range(2))  # ceil of deficit/2
    g_pad = tuple(-((hy[i] - grid[i] * r[i]) // 2) for i in range(2))
    return FilterGeometry(r, block, grid, x_pad, g_pad, hx, hy)  # type: ignore[arg-type]


def check_filterable(
    *,
    in_hw: IntPair,
    out_hw: IntPair,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair | str,
    dilation: IntPair,
    groups: int,
    patch_size: IntPair,
) -> str | None:
    """Whether :func:`filtered_conv2d` accepts a conv shape: None if yes, else the reason why not.

    Every valid zero-padded conv is accepted with any patch size >= 2 (shapes whose x grid would
    need negative padding are cropped, see the module docstring). Refused: patch sizes below 2,
    invalid conv arguments (including ``padding="same"`` that is strided or asymmetric), and an
    ``out_hw`` that does not follow from ``in_hw`` and the conv arguments.

    Args:
        in_hw: Input height and width.
        out_hw: Output height and width.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Padding (numbers, ``"valid"`` or ``"same"``).
        dilation: Dilation.
        groups: Groups.
        patch_size: r.

    Returns:
        None, or a human-readable reason.
    """
    try:
        conv = conv_args(
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
        )
        k = _pair(kernel_size, "kernel_size")
        hx, hy = _pair(in_hw, "in_hw"), _pair(out_hw, "out_hw")
        expect = tuple(
            (hx[i] + 2 * conv.padding[i] - conv.dilation[i] * (k[i] - 1) - 1) // conv.stride[i] + 1
            for i in range(2)
        )
        if min(expect) < 1:
            return f"the conv has an empty output for input {hx} (kernel {k}, padding {padding})"
        if expect != hy:
            return f"output size {hy} does not match the conv, which gives {expect} for input {hx}"
        filter_geometry(in_hw=hx, out_hw=hy, stride=conv.stride, patch_size=patch_size)
    except PlanError as exc:
        return str(exc)
    return None


def _block_sums(t: Tensor, dim: int, block: int, pad: int, cells: int) -> Tensor:
    """Sums of ``t`` along ``dim`` over ``cells`` blocks of ``block``, the first starting at -pad.

    Positions outside ``t`` add nothing. One strided in-place add per position within a block,
    much faster on CPU than ``avg_pool2d`` and needing no padded copy of ``t``. While tracing,
    the same additions out of place: ``torch.export``'s joint forward-backward trace keeps the
    in-place ops of a custom op's ``setup_context`` as dead nodes its verifier refuses.
    """
    size = t.shape[dim]
    if _one_cell(size, block, pad, cells):  # a plain sum
        return t.sum(dim, keepdim=True)
    shape = list(t.shape)
    shape[dim] = cells
    out = t.new_zeros(shape)
    eager = is_eager(t)
    for j in range(block):
        first = j - pad  # row j of cell 0
        i0 = 0 if first >= 0 else -(first // block)  # first cell whose row j lies inside t
        start = first + i0 * block
        count = min(cells - i0, -(-(size - start) // block)) if start < size else 0
        if count > 0:
            src = t.narrow(dim, start, (count - 1) * block + 1)
            src = src[(slice(None),) * dim + (slice(None, None, block),)]
            if eager:
                out.narrow(dim, i0, count).add_(src)
            else:  # the same sums, out of place (a trace keeps no in-place op)
                out = out.slice_scatter(out.narrow(dim, i0, count) + src, dim, i0, i0 + count)
    return out


def _block_counts(size: int, block: int, pad: int, cells: int) -> list[int]:
    """How many of the ``size`` positions fall in each block (see :func:`_block_sums`)."""
    return [
        max(0, min(size, (i + 1) * block - pad) - max(0, i * block - pad)) for i in range(cells)
    ]


def _one_cell(size: int, block: int, pad: int, cells: int) -> bool:
    """Whether a single cell holds all ``size`` positions of a dimension."""
    return cells == 1 and pad >= 0 and block - pad >= size


def _whole_map(size: tuple[int, int], block: tuple[int, int], pad: tuple[int, int],
               grid: tuple[int, int]) -> bool:
    """Whether one cell holds the whole map (then a block sum is a plain sum over H and W)."""
    return all(_one_cell(*args) for args in zip(size, block, pad, grid, strict=True))


def _sum_pool(x: Tensor, geo: FilterGeometry) -> Tensor:
    """x summed over the R x R blocks of the grid (zero padding or cropping as needed)."""
    if geo.whole_input:
        return map_sums(x)
    t = _block_sums(x, 2, geo.block[0], geo.x_pad[0], geo.grid[0])
    return _block_sums(t, 3, geo.block[1], geo.x_pad[1], geo.grid[1])


def _patch_sums(g: Tensor, geo: FilterGeometry, mask: Tensor | None = None) -> Tensor:
    """Sums of g (times ``mask``, if given) over the r x r patches of the g grid, which cover
    every output position once: (N, C, p_h, p_w). A g constant over each map (stride 0) with a
    whole-map grid takes no pass over N x C x H x W floats."""
    whole = geo.whole_output
    if whole and constant_maps(g):
        g0 = g[:, :, :1, :1]
        if mask is None:
            return g0 * (geo.out_hw[0] * geo.out_hw[1])
        return g0 * mask_counts(mask, g.dtype)
    if mask is not None:
        g = masked(g, mask)
    if whole:
        return map_sums(g)
    t = _block_sums(g, 2, geo.patch[0], geo.g_pad[0], geo.grid[0])
    return _block_sums(t, 3, geo.patch[1], geo.g_pad[1], geo.grid[1])


def _patch_counts(geo: FilterGeometry, like: Tensor) -> Tensor | float:
    """The valid size of each r x r patch, (p_h, p_w) (a number for a whole-map grid)."""
    if geo.whole_output:
        return float(geo.out_hw[0] * geo.out_hw[1])
    ch = _block_counts(geo.out_hw[0], geo.patch[0], geo.g_pad[0], geo.grid[0])
    cw = _block_counts(geo.out_hw[1], geo.patch[1], geo.g_pad[1], geo.grid[1])
    dev = like.device
    return (torch.tensor(ch, dtype=like.dtype, device=dev)[:, None]
            * torch.tensor(cw, dtype=like.dtype, device=dev))


def _avg_pool(g: Tensor, geo: FilterGeometry) -> Tensor:
    """g averaged over the r x r patches, border patches divided by their own (valid) size."""
    return _patch_sums(g, geo).div_(_patch_counts(geo, g))


def _replicate(gx_sum: Tensor, geo: FilterGeometry) -> Tensor:
    """Each cell copied over its R x R block, then cropped (or zero-extended) to H_x x W_x."""
    (ph, pw), (bh, bw), (xh, xw) = geo.grid, geo.block, geo.x_pad
    n, c = gx_sum.shape[:2]
    if geo.whole_input:  # one value per map: a view
        return gx_sum.expand(n, c, *geo.in_hw)
    full = gx_sum.unsqueeze(-1).expand(n, c, ph, pw, bw).reshape(n, c, ph, pw * bw)
    full = full.unsqueeze(3).expand(n, c, ph, bh, pw * bw).reshape(n, c, ph * bh, pw * bw)
    hx, wx = geo.in_hw
    pad = (-xw, wx - pw * bw + xw, -xh, hx - ph * bh + xh)
    if max(pad) <= 0:  # a pure crop: a view
        return full[:, :, xh : xh + hx, xw : xw + wx]
    return F.pad(full, pad)


def _mix_channels(g_avg: Tensor, w_sum: Tensor, groups: int) -> Tensor:
    """gx_sum[n, c] = sum of w_sum[o, c mod C_in/G] * g_avg[n, o] over the rows o of c's group."""
    n, c_out, ph, pw = g_avg.shape
    m, cpg = c_out // groups, w_sum.shape[1]
    gg = g_avg.reshape(n, groups, m, ph * pw)
    if cpg == 1:  # depthwise (with or without a channel multiplier): no matmul needed
        out = (
            (gg * w_sum.reshape(1, groups, m, 1)).sum(2) if m > 1 else gg * w_sum.view(1, -1, 1, 1)
        )
    elif m == 1:
        out = w_sum.reshape(1, groups, cpg, 1) * gg
    elif groups == 1:  # (N, P, C_out) @ (C_out, C_in): w_sum read in its own layout
        out = torch.matmul(gg[:, 0].transpose(1, 2), w_sum).transpose(1, 2)
    else:  # one (C_in/G x m) @ (m x N*P) product per group, with N folded into the columns
        cols = gg.permute(1, 2, 0, 3).reshape(groups, m, n * ph * pw)
        out = torch.bmm(w_sum.reshape(groups, m, cpg).transpose(1, 2), cols)
        out = out.reshape(groups, cpg, n, ph * pw).permute(2, 0, 1, 3)
    return out.reshape(n, groups * cpg, ph, pw)


def _tap_sum(w: Tensor) -> Tensor:
    """w_sum (C_out, C_in/G): the weight summed over its kernel taps (a view for 1x1 kernels)."""
    return w.flatten(1) if w.shape[2:] == (1, 1) else w.sum((2, 3))


def _cell_products(xb: Tensor, gb: Tensor, groups: int, rows: int, cells: int) -> Tensor:
    """gw[o, c] = sum over n and cells of g_avg[n, o] * x_sum[n, c], within each group.

    Returns a contiguous (rows, C_in/G) tensor (so a 1x1 kernel's gradient is a view of it):
    one matrix product per group with N*P as the inner dimension, or, for depthwise-like groups
    (one input or one output row per group), a product and a sum.
    """
    n = xb.shape[0]
    if groups == 1 and cells == 1 and rows > 1 and xb.shape[1] > 1:  # g_avg^T x_sum, no copies
        return torch.mm(gb.view(n, rows).t(), xb.view(n, -1))
    xg = xb.reshape(n, groups, xb.shape[1] // groups, cells)
    gg = gb.reshape(n, groups, rows // groups, cells)
    if xg.shape[2] == 1 or gg.shape[2] == 1:  # depthwise-like: no matmul needed
        return (gg.unsqueeze(3) * xg.unsqueeze(2)).sum((0, 4)).reshape(rows, -1)
    # (G, m, N*P) @ (G, N*P, C_in/G); with one cell these are transposed views, not copies
    a = gg.permute(1, 2, 0, 3).reshape(groups, rows // groups, n * cells)
    b = xg.permute(1, 0, 3, 2).reshape(groups, n * cells, xg.shape[2])
    out = torch.mm(a[0], b[0]) if groups == 1 else torch.bmm(a, b)
    return out.reshape(rows, -1)


@functools.lru_cache(maxsize=512)
def _border_factors(size: int, out: int, k: int, s: int, p: int, d: int, covered: int
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per dimension: the ``grad_x`` factor of each input row and the ``grad_w`` factor of each
    tap under ``mode="corrected"`` (see the module docstring); ``covered`` is the number of input
    rows inside the pooled grid (all of them unless it is cropped)."""
    count = [0] * size
    valid = [0] * k
    for o in range(out):
        for t in range(k):
            h = o * s - p + t * d
            if 0 <= h < size:
                count[h] += 1
                valid[t] += 1
    return tuple(c * s / k for c in count), tuple(v * s / covered for v in valid)


def _border_maps(geo: FilterGeometry, kernel: tuple[int, int], conv: ConvArgs, like: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(H_x, W_x) factor map of ``grad_x`` and (k_h, k_w) factor map of ``grad_w``."""
    maps = [_border_factors(geo.in_hw[i], geo.out_hw[i], kernel[i], conv.stride[i],
                            conv.padding[i], conv.dilation[i],
                            sum(_block_counts(geo.in_hw[i], geo.block[i], geo.x_pad[i],
                                              geo.grid[i])))
            for i in range(2)]
    t = [(torch.as_tensor(a, dtype=like.dtype, device=like.device),
          torch.as_tensor(b, dtype=like.dtype, device=like.device)) for a, b in maps]
    return t[0][0][:, None] * t[1][0][None, :], t[0][1][:, None] * t[1][1][None, :]


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, weight_slice: Tensor | None,
          sel: ChannelSelection, conv: ConvArgs) -> Tensor:
    """The forward: the conv with the weight (and its trained slice)."""
    w = weight if weight_slice is None else sel.combine(weight, weight_slice)
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# -------------------------------------------------------------- budgetsearch::filtered_conv2d
# Inputs, in order; the backward returns one gradient per input.
_X, _WEIGHT, _BIAS, _SLICE, _OUTS, _INS, _STRIDE, _PADDING, _DILATION, _GROUPS = range(10)
_PATCH, _SCALE, _BORDER, _WEIGHT_GRAD, _BIAS_GRAD = range(10, 15)
_EP_SCALE, _EP_SHIFT, _EP_BIAS, _LO, _HI, _CLAMP = range(15, 21)


def _filtered_conv2d_impl(x: Tensor, weight: Tensor, bias: Tensor | None,
                          weight_slice: Tensor | None, out_channels: list[int],
                          in_channels: list[int], stride: list[int], padding: list[int],
                          dilation: list[int], groups: int, patch_size: list[int], scale: float,
                          border: bool, weight_grad: bool, bias_grad: bool,
                          epilogue_scale: Tensor | None, epilogue_shift: Tensor | None,
                          epilogue_bias: Tensor | None, lo: float | None, hi: float | None,
                          clamp: bool) -> Tensor:
    sel = selection_of(weight, groups, out_channels, in_channels)
    y = _conv(x, weight, bias, weight_slice, sel, _conv_of(stride, padding, dilation, groups))
    return run_epilogue(y, epilogue_scale, epilogue_shift, epilogue_bias, lo, hi, clamp=clamp)


def _conv_of(stride: list[int], padding: list[int], dilation: list[int], groups: int
             ) -> ConvArgs:
    return ConvArgs(tuple(stride), tuple(padding), tuple(dilation), groups)  # type: ignore[arg-type]


def _filtered_setup(ctx, inputs: tuple, output: Tensor) -> None:
    """Saved: ``x_sum`` (if the weight gradient is wanted), the weight and slice by reference (if
    the input gradient is), the clamp's mask (with a clamp)."""
    x, weight, weight_slice = inputs[_X], inputs[_WEIGHT], inputs[_SLICE]
    conv = _conv_of(*inputs[_STRIDE:_PATCH])
    sel = selection_of(weight, conv.groups, inputs[_OUTS], inputs[_INS])
    geo = filter_geometry(
        in_hw=(int(x.shape[-2]), int(x.shape[-1])),
        out_hw=(int(output.shape[-2]), int(output.shape[-1])),
        stride=conv.stride,
        patch_size=tuple(inputs[_PATCH]),  # type: ignore[arg-type]
    )
    _wanted(ctx, weight_grad=inputs[_WEIGHT_GRAD], bias_grad=inputs[_BIAS_GRAD],
            has_slice=weight_slice is not None)
    ctx.sel, ctx.geo, ctx.groups, ctx.scale = sel, geo, conv.groups, inputs[_SCALE]
    ctx.ep_scale = inputs[_EP_SCALE]  # a buffer, like the weight: not an activation
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    ctx.border = (_border_maps(geo, kernel, conv, x)
                  if inputs[_BORDER] and kernel != (1, 1) else None)
    need_x = ctx.needs_input_grad[_X]
    x_sum = sel.saved_input(_sum_pool(x, geo)) if ctx.want_w else None
    mask = (clamp_mask(output, inputs[_LO], inputs[_HI], inclusive=False)
            if inputs[_CLAMP] else None)
    # the weight (and slice) by reference: w_sum is formed in the backward, so no new tensor
    # is kept (a 1x1 conv's w_sum is as large as its weight)
    ctx.save_for_backward(x_sum, weight if need_x else None,
                          weight_slice if need_x else None, mask)


def _filtered_backward(ctx, g: Tensor) -> tuple:
    x_sum, weight, weight_slice, mask = ctx.saved_tensors
    sel, geo, ep_scale = ctx.sel, ctx.geo, ctx.ep_scale
    gx = gb = grad = gbeta = None
    # block sums of the conv output's gradient: through the epilogue's mask and scale, and
    # the only pass over g this backward makes (the bias gradients are sums of the sums)
    sums = _patch_sums(g, geo, mask)
    if ctx.needs_input_grad[_EP_BIAS]:
        gbeta = sums.sum((0, 2, 3))
    if ep_scale is not None:
        sums = sums * ep_scale.view(1, -1, 1, 1)
    if ctx.want_b:
        gb = sums.sum((0, 2, 3))
    if ctx.needs_input_grad[_X] or ctx.want_w:
        g_avg = sums.div_(_patch_counts(geo, g))
    if ctx.needs_input_grad[_X]:
        w = weight if weight_slice is None else sel.combine(weight, weight_slice)
        gx_sum = _mix_channels(g_avg, _tap_sum(w), ctx.groups)
        if ctx.scale != 1:
            gx_sum = gx_sum * ctx.scale
        gx = _replicate(gx_sum, geo)
        if ctx.border is not None:
            gx = gx * ctx.border[0]
    if ctx.want_w:
        kh, kw = sel.tail

        def grad_fn(xb: Tensor, gb_: Tensor, groups: int, rows: int) -> Tensor:
            gsum = _cell_products(xb, gb_, groups, rows, geo.cells)
            if ctx.scale != 1:
                gsum = gsum.mul_(ctx.scale)
            if ctx.border is not None:
                return gsum[:, :, None, None] * ctx.border[1]
            if (kh, kw) == (1, 1):
                return gsum[:, :, None, None]
            return gsum[:, :, None, None].expand(-1, -1, kh, kw).contiguous()

        grad = sel.weight_grad(x_sum, g_avg, grad_fn)
    gw, gs = _weight_outputs(ctx, sel, grad)
    grads: list[Tensor | None] = [None] * 21
    grads[_X], grads[_WEIGHT], grads[_BIAS], grads[_SLICE], grads[_EP_BIAS] = gx, gw, gb, gs, gbeta
    return tuple(grads)


_filtered_conv2d_op = define(
    "filtered_conv2d",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? weight_slice, int[] out_channels, "
    "int[] in_channels, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "int[2] patch_size, float scale, bool border, bool weight_grad, bool bias_grad, "
    "Tensor? epilogue_scale, Tensor? epilogue_shift, Tensor? epilogue_bias, float? lo, "
    "float? hi, bool clamp) -> Tensor",
    _filtered_conv2d_impl,
    setup_context=_filtered_setup,
    backward=_filtered_backward,
)


def filtered_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    weight_slice: Tensor | None = None,
    *,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    patch_size: IntPair,
    mode: str = "normalized",
    out_channels: Sequence[int] | Tensor | None = None,
    in_channels: Sequence[int] | Tensor | None = None,
    bias_grad: bool = True,
    weight_grad: bool = True,
    selection: ChannelSelection | None = None,
    epilogue: Epilogue | None = None,
    epilogue_bias: Tensor | None = None,
) -> Tensor:
    """A 2-D convolution with the gradient-filtering backward.

    Saved for backward (nothing else): ``x_sum``, N*C_in*p_h*p_w elements, if the weight gradient
    is wanted (with a channel selection, only the input channels that the selection needs); and,
    if the input gradient is needed, references to ``weight`` / ``weight_slice`` (no copies).

    With ``out_channels``/``in_channels`` the weight gradient is the filtered one restricted to
    that part (see :class:`~budgetsearch.ops.sparse.ChannelSelection` for the slice layout and
    :func:`~budgetsearch.ops.sparse.sparse_conv2d` for ``weight``/``weight_slice``).

    Args:
        x: Input (N, C_in, H, W).
        weight: Weight (C_out, C_in/G, kh, kw).
        bias: Bias or None.
        weight_slice: Trainable part of the weight (with a selection), or None.
        stride: Stride.
        padding: Padding, as in ``F.conv2d``.
        dilation: Dilation (forward only).
        groups: Groups (any).
        patch_size: r, at least 2.
        mode: ``"normalized"`` (divide by s^2), ``"paper"`` (the authors' scaling) or
            ``"corrected"`` (normalized, and the border effect removed).
        out_channels: Train these output channels only.
        in_channels: Train the columns of these input channels only.
        bias_grad: Whether to compute the bias gradient.
        weight_grad: Whether to compute any weight gradient.
        selection: A prebuilt selection.
        epilogue: A frozen per-channel affine and/or clamp run on the conv output in the same
            autograd node (see :mod:`budgetsearch.ops.epilogue`); the gradients are those of the
            conv followed by ``y·scale + shift + epilogue_bias`` and the clamp.
        epilogue_bias: Trainable per-channel offset added by the epilogue (a frozen batch norm's
            bias), or None.

    Returns:
        The convolution output (identical to ``F.conv2d``, then the epilogue).

    Raises:
        PlanError: For an unknown mode, a patch size below 2, or invalid conv arguments or
            selection.
    """
    if mode not in MODES:
        raise PlanError(f"mode must be one of {MODES}, got {mode!r}")
    patch = _pair(patch_size, "patch_size")
    if min(patch) < 2:
        raise PlanError(f"patch_size must be >= 2 (1 means no filtering), got {patch_size!r}")
    conv = conv_args(
        kernel_size=tuple(weight.shape[2:]),  # type: ignore[arg-type]
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    sel = selection or ChannelSelection(
        weight.shape, groups=groups, out_channels=out_channels, in_channels=in_channels
    )
    if weight_slice is not None and sel.kind == "all":
        raise PlanError("weight_slice needs out_channels or in_channels")
    if epilogue is not None:
        epilogue.check(weight.shape[0])
    if epilogue_bias is not None and (epilogue is None or epilogue.scale is None):
        raise PlanError("epilogue_bias needs an epilogue with scale and shift")
    tensors = (x, weight, bias, weight_slice, epilogue_bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # no backward to come: the plain conv (and epilogue), no x_sum and no mask
        y = _conv(x, weight, bias, weight_slice, sel, conv)
        return y if epilogue is None else epilogue.forward(y, epilogue_bias, mask=False)[0]
    scale = 1.0 if mode == "paper" else 1.0 / (conv.stride[0] * conv.stride[1])
    ep = epilogue or Epilogue()
    return _filtered_conv2d_op(
        x, weight, bias, weight_slice, *selection_lists(sel), list(conv.stride),
        list(conv.padding), list(conv.dilation), conv.groups, list(patch), scale,
        mode == "corrected", weight_grad, bias_grad, ep.scale, ep.shift, epilogue_bias,
        None if ep.lo is None else float(ep.lo), None if ep.hi is None else float(ep.hi),
        ep.clamp,
    )
