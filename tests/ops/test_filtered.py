"""Tests of the gradient-filtered convolution against an independent, loop-based reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from budgetsearch.errors import PlanError
from budgetsearch.ops.filtered import MODES, check_filterable, filter_geometry, filtered_conv2d

torch.set_num_threads(1)
DT = torch.float64
TOL = 1e-10


def reference_filtered_grads(x, w, g, *, stride, r, groups, mode):
    """The formulas of docs/gradient-filtering.md, written out with explicit loops."""
    n, c_in, hx, wx = x.shape
    c_out, cpg, kh, kw = w.shape
    m = c_out // groups
    hy, wy = g.shape[2:]
    big = r * stride
    ph, pw = math.ceil(hy / r), math.ceil(wy / r)
    xph, xpw = math.ceil((ph * big - hx) / 2), math.ceil((pw * big - wx) / 2)
    gph, gpw = math.ceil((ph * r - hy) / 2), math.ceil((pw * r - wy) / 2)

    def x_cell(h, v):
        i, j = (h + xph) // big, (v + xpw) // big
        return (i, j) if 0 <= i < ph and 0 <= j < pw else None

    x_sum = torch.zeros(n, c_in, ph, pw, dtype=x.dtype)
    for h in range(hx):
        for v in range(wx):
            cell = x_cell(h, v)
            if cell is not None:
                x_sum[:, :, cell[0], cell[1]] += x[:, :, h, v]
    g_avg = torch.zeros(n, c_out, ph, pw, dtype=g.dtype)
    for i in range(ph):
        for j in range(pw):
            rows = [i * r - gph + a for a in range(r) if 0 <= i * r - gph + a < hy]
            cols = [j * r - gpw + b for b in range(r) if 0 <= j * r - gpw + b < wy]
            g_avg[:, :, i, j] = g[:, :, rows][:, :, :, cols].mean((2, 3))
    w_sum = w.sum((2, 3))
    scale = 1.0 if mode == "paper" else 1.0 / stride**2
    gx_sum = torch.zeros(n, c_in, ph, pw, dtype=x.dtype)
    gw = torch.zeros(c_out, cpg, dtype=w.dtype)
    for o in range(c_out):
        grp = o // m
        for cl in range(cpg):
            c = grp * cpg + cl
            gx_sum[:, c] += w_sum[o, cl] * g_avg[:, o]
            gw[o, cl] = (g_avg[:, o] * x_sum[:, c]).sum()
    grad_x = torch.zeros_like(x)
    for h in range(hx):
        for v in range(wx):
            cell = x_cell(h, v)
            if cell is not None:
                grad_x[:, :, h, v] = gx_sum[:, :, cell[0], cell[1]]
    grad_w = gw[:, :, None, None].expand(c_out, cpg, kh, kw)
    return grad_x * scale, grad_w * scale, g.sum((0, 2, 3))


CASES = [
    # (batch, c_in, c_out, groups, k, stride, padding, size, r)
    (1, 3, 4, 1, 3, 1, 1, 7, 2),
    (3, 3, 4, 1, 3, 2, 1, 7, 2),
    (2, 4, 5, 1, 1, 1, 0, 9, 3),
    (2, 4, 6, 1, 1, 2, 0, 9, 4),
    (1, 2, 3, 1, 3, 1, 0, 13, 4),
    (3, 4, 4, 4, 3, 1, 1, 13, 3),
    (1, 4, 4, 4, 3, 2, 1, 9, 2),
    (2, 4, 6, 2, 3, 1, 1, 9, 2),
    (1, 6, 4, 2, 3, 2, 0, 13, 3),
    (2, 3, 6, 3, 3, 2, 1, 7, 4),
    (1, 3, 6, 3, 1, 1, 0, 13, 2),
    (1, 2, 3, 1, 3, 1, 0, 14, 4),  # the authors' operator refuses this (negative padding)
    (1, 2, 2, 1, 3, 1, 0, 15, 4),
]


def _run(x, w, b, *, stride, padding, groups, r, mode, g):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = filtered_conv2d(
        x, w, b, stride=stride, padding=padding, groups=groups, patch_size=r, mode=mode
    )
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    return y, gx, gw, gb


@pytest.mark.parametrize("mode", ["paper", "normalized"])
@pytest.mark.parametrize(("n", "c_in", "c_out", "groups", "k", "s", "p", "size", "r"), CASES)
def test_matches_reference(n, c_in, c_out, groups, k, s, p, size, r, mode):
    torch.manual_seed(n * 100 + size * 10 + r)
    x = torch.randn(n, c_in, size, size + 3, dtype=DT)[..., : size + 2]  # non-square, strided
    w = torch.randn(c_out, c_in // groups, k, k, dtype=DT)
    b = torch.randn(c_out, dtype=DT)
    y_ref = F.conv2d(x, w, b, s, p, 1, groups)
    g = torch.randn_like(y_ref)
    y, gx, gw, gb = _run(x, w, b, stride=s, padding=p, groups=groups, r=r, mode=mode, g=g)
    rx, rw, rb = reference_filtered_grads(x, w, g, stride=s, r=r, groups=groups, mode=mode)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=TOL)
    torch.testing.assert_close(gx, rx, rtol=0, atol=TOL)
    torch.testing.assert_close(gw, rw, rtol=0, atol=TOL)
    torch.testing.assert_close(gb, rb, rtol=0, atol=TOL)


@pytest.mark.parametrize(("s", "r", "groups"), [(1, 2, 1), (2, 2, 1), (2, 3, 4), (2, 4, 2)])
def test_normalized_is_paper_over_s2(s, r, groups):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 11, 11, dtype=DT)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=DT)
    b = torch.randn(4, dtype=DT)
    g = torch.randn_like(F.conv2d(x, w, b, s, 1, 1, groups))
    kw = {"stride": s, "padding": 1, "groups": groups, "r": r, "g": g}
    _, px, pw, pb = _run(x, w, b, mode="paper", **kw)
    _, nx, nw, nb = _run(x, w, b, mode="normalized", **kw)
    torch.testing.assert_close(nx, px / s**2, rtol=0, atol=TOL)
    torch.testing.assert_close(nw, pw / s**2, rtol=0, atol=TOL)
    torch.testing.assert_close(nb, pb, rtol=0, atol=0)


def test_dilation_forward_only_and_taps_equal():
    torch.manual_seed(2)
    x, w = torch.randn(1, 2, 12, 12, dtype=DT), torch.randn(3, 2, 3, 3, dtype=DT)
    g = torch.randn(1, 3, 8, 8, dtype=DT)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = filtered_conv2d(xr, wr, dilation=2, padding=0, patch_size=2)
    torch.testing.assert_close(y, F.conv2d(x, w, dilation=2), rtol=0, atol=TOL)
    gx, gw = torch.autograd.grad(y, (xr, wr), g)
    rx, rw, _ = reference_filtered_grads(x, w, g, stride=1, r=2, groups=1, mode="normalized")
    torch.testing.assert_close(gx, rx, rtol=0, atol=TOL)
    torch.testing.assert_close(gw, rw, rtol=0, atol=TOL)
    assert torch.equal(gw, gw[:, :, :1, :1].expand_as(gw))


def test_constant_data_scaling():
    """With constant x and g, normalised gradients are close to dense; the paper's are ~s^2x."""
    for s in (1, 2):
        x = torch.ones(1, 2, 28, 28, dtype=DT)
        w = torch.ones(2, 2, 3, 3, dtype=DT)
        wr = w.clone().requires_grad_()
        dense = torch.autograd.grad(F.conv2d(x, wr, stride=s, padding=1).sum(), wr)[0]
        ratios = {}
        for mode in ("paper", "normalized"):
            wr = w.clone().requires_grad_()
            y = filtered_conv2d(x, wr, stride=s, padding=1, patch_size=2, mode=mode)
            ratios[mode] = (torch.autograd.grad(y.sum(), wr)[0].sum() / dense.sum()).item()
        assert 0.95 < ratios["normalized"] < 1.25
        assert ratios["paper"] == pytest.approx(ratios["normalized"] * s * s)


def _saved_bytes(fn, exclude=()):
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in excluded:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize(("size", "s", "r", "groups"), [(13, 1, 4, 1), (16, 2, 2, 4), (9, 2, 3, 2)])
def test_saved_bytes(size, s, r, groups):
    n, c_in, c_out = 3, 4, 8
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(c_out, c_in // groups, 3, 3))
    b = torch.nn.Parameter(torch.randn(c_out))
    nbytes, y = _saved_bytes(
        lambda: filtered_conv2d(x, w, b, stride=s, padding=1, groups=groups, patch_size=r),
        exclude=(w, b),
    )
    p = math.ceil(y.shape[2] / r) * math.ceil(y.shape[3] / r)
    assert nbytes == n * c_in * p * 4  # x_sum; the weight is kept by reference, not as w_sum
    # weight only (x needs no gradient): x_sum alone; bias only: nothing.
    xd, kw = x.detach(), {"stride": s, "padding": 1, "groups": groups, "patch_size": r}
    nbytes, _ = _saved_bytes(lambda: filtered_conv2d(xd, w, b, **kw), exclude=(w, b))
    assert nbytes == n * c_in * p * 4
    nbytes, _ = _saved_bytes(lambda: filtered_conv2d(xd, w.detach(), b, **kw), exclude=(w, b))
    assert nbytes == 0


def test_only_needed_gradients():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    y = filtered_conv2d(x, w, padding=1, patch_size=2, weight_grad=False)
    y.sum().backward()
    assert w.grad is None and x.grad is not None


def test_patch_size_one_refused():
    x, w = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3)
    with pytest.raises(PlanError, match="patch_size"):
        filtered_conv2d(x, w, patch_size=1)
    with pytest.raises(PlanError, match="mode"):
        filtered_conv2d(x, w, patch_size=2, mode="fast")


def test_check_filterable():
    ok = {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 1, "groups": 1}
    assert check_filterable(in_hw=7, out_hw=7, patch_size=2, **ok) is None
    strided = {**ok, "stride": 2}
    assert check_filterable(in_hw=(7, 9), out_hw=(4, 5), patch_size=4, **strided) is None
    valid = {**ok, "padding": 0}
    assert check_filterable(in_hw=14, out_hw=12, patch_size=4, **valid) is None  # cropped grid
    assert "patch_size" in check_filterable(in_hw=7, out_hw=7, patch_size=1, **ok)
    assert "does not match" in check_filterable(in_hw=7, out_hw=6, patch_size=2, **ok)
    assert "same" in check_filterable(
        in_hw=8, out_hw=4, patch_size=2, **{**ok, "padding": "same", "stride": 2}
    )
    assert check_filterable(in_hw=8, out_hw=8, patch_size=2, **{**ok, "padding": "same"}) is None


def test_geometry_matches_doc_example():
    geo = filter_geometry(in_hw=7, out_hw=4, stride=2, patch_size=2)  # stride-2 conv on 7x7, r=2
    assert geo.grid == (2, 2) and geo.x_pad == (1, 1) and geo.g_pad == (0, 0)
    assert geo.authors_accept
    geo = filter_geometry(in_hw=14, out_hw=12, stride=1, patch_size=4)
    assert geo.grid == (3, 3) and geo.x_pad == (-1, -1) and not geo.authors_accept


def test_pooling_helpers_match_torch_pooling():
    """The strided-add pooling equals avg_pool2d on every small geometry, cropped ones included."""
    from budgetsearch.ops.filtered import _avg_pool, _sum_pool

    torch.manual_seed(4)
    for size in range(3, 19):
        for k, p, s, r in [(1, 0, 1, 2), (3, 0, 1, 3), (3, 1, 2, 2), (3, 0, 2, 4), (1, 0, 2, 3)]:
            out = (size + 2 * p - k) // s + 1
            if out < 1:
                continue
            geo = filter_geometry(in_hw=size, out_hw=out, stride=s, patch_size=r)
            x = torch.randn(2, 3, size, size, dtype=DT)
            (ph, _), (big, _), (xp, _) = geo.grid, geo.block, geo.x_pad
            padded = F.pad(x, (xp, ph * big - size - xp, xp, ph * big - size - xp))
            expect = F.avg_pool2d(padded, big, big, divisor_override=1)
            torch.testing.assert_close(_sum_pool(x, geo), expect, rtol=0, atol=TOL)
            g = torch.randn(2, 3, out, out, dtype=DT)
            expect = F.avg_pool2d(g, r, r, geo.g_pad, count_include_pad=False)
            torch.testing.assert_close(_avg_pool(g, geo), expect, rtol=0, atol=TOL)


@pytest.mark.parametrize(("size", "k", "s", "p", "r", "groups"), [
    (4, 3, 1, 1, 4, 1), (8, 3, 1, 1, 2, 6), (7, 3, 1, 1, 2, 1), (9, 3, 2, 1, 2, 3),
    (8, 5, 1, 2, 4, 2), (12, 3, 2, 1, 3, 6), (6, 3, 1, 0, 2, 1),
])
def test_corrected_mode_is_exact_for_constant_signals(size, k, s, p, r, groups):
    """Constant input, output gradient and kernel: ``corrected`` gives autograd's gradients
    exactly (the border effect removed), ``normalized`` does not wherever taps hit the padding."""
    from budgetsearch.plan import FILTER_MODES

    assert FILTER_MODES == MODES
    c_in, c_out = 6, 6
    x = torch.full((2, c_in, size, size), 0.7, dtype=torch.float64, requires_grad=True)
    w = torch.full((c_out, c_in // groups, k, k), -0.3, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, None, s, p, 1, groups)
    g = torch.full_like(y, 1.3)
    dense = torch.autograd.grad(y, (x, w), g)
    out = {}
    for mode in ("corrected", "normalized"):
        yf = filtered_conv2d(x, w, stride=s, padding=p, groups=groups, patch_size=r, mode=mode)
        out[mode] = torch.autograd.grad(yf, (x, w), g)
    geo = filter_geometry(in_hw=(size, size), out_hw=tuple(y.shape[-2:]), stride=s,
                          patch_size=r)
    if geo.cells * geo.block[0] ** 2 >= size * size and min(geo.x_pad) >= 0:  # grid covers x
        torch.testing.assert_close(out["corrected"][0], dense[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["corrected"][1], dense[1], rtol=1e-12, atol=1e-12)
    if p > 0:
        assert not torch.allclose(out["normalized"][0], dense[0])
    # the two differ by per-position (grad_x) and per-tap (grad_w) factors only
    for c, n in zip(out["corrected"], out["normalized"], strict=True):
        inside = n != 0
        assert torch.equal(inside, c != 0)
        ratio = torch.where(inside, c / n.where(inside, 1.0), 0.0)
        assert torch.allclose(ratio, ratio[:1, :1].expand_as(ratio))


def test_corrected_mode_leaves_pointwise_convs_alone():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    grads = {}
    for mode in ("corrected", "normalized"):
        y = filtered_conv2d(x, w, stride=2, patch_size=2, mode=mode)
        grads[mode] = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    for a, b in zip(grads["corrected"], grads["normalized"], strict=True):
        assert torch.equal(a, b)
