"""Tests of the channel-sparse conv and linear operators against dense autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from budgetsearch.errors import PlanError
from budgetsearch.ops.sparse import (
    ChannelSelection,
    conv2d_input_grad,
    conv_args,
    sparse_conv2d,
    sparse_linear,
)

torch.set_num_threads(1)
DT = torch.float64


def slice_of(full, *, groups, out_channels=None, in_channels=None):
    """The trained part of a full weight (or gradient), written out independently of the library."""
    if out_channels is not None:
        return full[list(out_channels)]
    c_out, cpg = full.shape[:2]
    m = c_out // groups
    cols = [full[(c // cpg) * m : (c // cpg + 1) * m, c % cpg] for c in in_channels]
    return torch.stack(cols, dim=1)


def saved_bytes(fn, exclude=()):
    """Bytes autograd saves while running ``fn``, not counting the tensors in ``exclude``."""
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


CONVS = [
    # (c_in, c_out, groups, k, stride, padding)
    (4, 6, 1, 3, 1, 1),
    (4, 6, 1, 1, 2, 0),
    (4, 4, 4, 3, 2, 1),  # depthwise
    (4, 8, 4, 3, 1, 1),  # depthwise with channel multiplier 2
    (4, 6, 2, 3, 1, 0),  # grouped
    (6, 4, 2, 3, 2, 1),
]
SELECTIONS = [
    ("out_channels", [0]),
    ("out_channels", [3, 1, 2]),
    ("out_channels", "all-reversed"),
    ("in_channels", [2]),
    ("in_channels", [3, 0, 1]),
    ("in_channels", "all-reversed"),
]


@pytest.mark.parametrize(("c_in", "c_out", "groups", "k", "s", "p"), CONVS)
@pytest.mark.parametrize(("kind", "index"), SELECTIONS)
def test_conv_matches_dense(c_in, c_out, groups, k, s, p, kind, index):
    torch.manual_seed(c_in + 10 * c_out + groups)
    if index == "all-reversed":
        index = list(range(c_out if kind == "out_channels" else c_in))[::-1]
    x = torch.randn(3, c_in, 9, 7, dtype=DT)
    w = torch.randn(c_out, c_in // groups, k, k, dtype=DT)
    b = torch.randn(c_out, dtype=DT)
    sel_kw = {kind: index}

    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, b))
    y_dense = F.conv2d(xd, wd, bd, s, p, 1, groups)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)

    xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
    base = w.clone().requires_grad_()  # the frozen base must get no gradient even so
    ws = slice_of(w, groups=groups, **sel_kw).clone().requires_grad_()
    y = sparse_conv2d(xs, base, bs, ws, stride=s, padding=p, groups=groups, **sel_kw)
    y.backward(g)
    torch.testing.assert_close(y, y_dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(bs.grad, bd.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        ws.grad, slice_of(wd.grad, groups=groups, **sel_kw), rtol=0, atol=1e-12
    )
    assert base.grad is None

    # Without a slice, the full weight gets the exact gradient inside the selection, 0 outside.
    wf = w.clone().requires_grad_()
    sparse_conv2d(x, wf, None, stride=s, padding=p, groups=groups, **sel_kw).backward(g)
    sel = ChannelSelection(w.shape, groups=groups, **sel_kw)
    expected = sel.scatter(slice_of(wd.grad, groups=groups, **sel_kw))
    torch.testing.assert_close(wf.grad, expected, rtol=0, atol=1e-12)
    assert wf.grad.count_nonzero() <= ws.numel()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_saved_bytes(groups):
    n, c_in, c_out, h = 2, 4, 8, 10
    x = torch.randn(n, c_in, h, h, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, 3, 3)
    b = torch.nn.Parameter(torch.randn(c_out))
    item = x.element_size()
    m, cpg = c_out // groups, c_in // groups

    def run(**kw):
        sel = ChannelSelection(w.shape, groups=groups, **kw)
        ws = torch.nn.Parameter(sel.gather(w))
        nbytes, _ = saved_bytes(
            lambda: sparse_conv2d(x, w, b, ws, padding=1, groups=groups, selection=sel),
            exclude=(w, b, ws),
        )
        return nbytes

    # Columns: only the kept input channels.
    assert run(in_channels=[1, 3]) == n * 2 * h * h * item
    # Rows: the whole input when ungrouped; the chosen rows' groups' channels when grouped.
    groups_touched = len({o // m for o in (0, 1)})
    expect_rows = c_in if groups == 1 else groups_touched * cpg
    assert run(out_channels=[0, 1]) == n * expect_rows * h * h * item
    # Frozen weight (bias only): no activation at all.
    nbytes, _ = saved_bytes(
        lambda: sparse_conv2d(x, w, b, padding=1, groups=groups, weight_grad=False),
        exclude=(w, b),
    )
    assert nbytes == 0


def test_bias_only_and_weight_grad_flag():
    x = torch.randn(2, 3, 6, 6, dtype=DT, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=DT, requires_grad=True)
    b = torch.randn(4, dtype=DT, requires_grad=True)
    y = sparse_conv2d(x, w, b, padding=1, weight_grad=False)
    g = torch.randn_like(y)
    y.backward(g)
    assert w.grad is None
    torch.testing.assert_close(b.grad, g.sum((0, 2, 3)))
    xd = x.detach().requires_grad_()
    F.conv2d(xd, w.detach(), None, 1, 1).backward(g)
    torch.testing.assert_close(x.grad, xd.grad)
    b.grad = None
    sparse_conv2d(x, w, b, padding=1, bias_grad=False).backward(g)
    assert b.grad is None and w.grad is not None


@pytest.mark.parametrize(("kind", "index"), [("out_channels", [4, 0]), ("in_channels", [1, 5, 2])])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_linear_matches_dense(kind, index, lead):
    torch.manual_seed(3)
    x = torch.randn(*lead, 6, dtype=DT)
    w = torch.randn(5, 6, dtype=DT)
    b = torch.randn(5, dtype=DT)
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, b))
    y_dense = F.linear(xd, wd, bd)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
    ref = wd.grad[index] if kind == "out_channels" else wd.grad[:, index]
    ws = (w[index] if kind == "out_channels" else w[:, index]).clone().requires_grad_()
    y = sparse_linear(xs, w, bs, ws, **{kind: index})
    y.backward(g)
    torch.testing.assert_close(y, y_dense)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(bs.grad, bd.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ws.grad, ref, rtol=0, atol=1e-12)


def test_linear_saved_bytes():
    x = torch.randn(4, 6, requires_grad=True)
    w, b = torch.randn(5, 6), torch.nn.Parameter(torch.randn(5))
    ws_in = torch.nn.Parameter(w[:, [0, 2]].clone())
    nbytes, _ = saved_bytes(
        lambda: sparse_linear(x, w, b, ws_in, in_channels=[0, 2]), (w, b, ws_in)
    )
    assert nbytes == 4 * 2 * 4
    ws_out = torch.nn.Parameter(w[[1]].clone())
    nbytes, _ = saved_bytes(
        lambda: sparse_linear(x, w, b, ws_out, out_channels=[1]), (w, b, ws_out)
    )
    assert nbytes == 4 * 6 * 4
    nbytes, _ = saved_bytes(lambda: sparse_linear(x, w, b, weight_grad=False), (w, b))
    assert nbytes == 0


def test_selection_errors():
    shape = (4, 2, 3, 3)
    with pytest.raises(PlanError, match="not both"):
        ChannelSelection(shape, out_channels=[0], in_channels=[0])
    with pytest.raises(PlanError, match="empty"):
        ChannelSelection(shape, out_channels=[])
    with pytest.raises(PlanError, match="repeated"):
        ChannelSelection(shape, out_channels=[1, 1])
    with pytest.raises(PlanError, match="outside"):
        ChannelSelection(shape, in_channels=[2])
    with pytest.raises(PlanError, match=r"groups must be an integer >= 1; got 0"):
        ChannelSelection(shape, groups=0, out_channels=[0])
    with pytest.raises(PlanError, match=r"integer channel indices; got \[True\]"):
        ChannelSelection(shape, out_channels=[0, True])
    with pytest.raises(PlanError, match=r"integer channel indices; got \[1.0\]"):
        ChannelSelection(shape, out_channels=[1.0])
    # NumPy's integers are channel indices (a selector's argsort gives them)
    assert ChannelSelection(shape, out_channels=np.array([3, 1])).index == [3, 1]
    x, w = torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(PlanError, match="slice has shape"):
        sparse_conv2d(x, w, None, torch.randn(2, 2, 3, 3), out_channels=[0])
    with pytest.raises(PlanError, match="needs out_channels"):
        sparse_conv2d(x, w, None, w.clone())
    with pytest.raises(PlanError, match="same"):
        sparse_conv2d(x, torch.randn(4, 2, 2, 2), padding="same")


def test_grouped_selection_uses_few_calls():
    """Rows spread unevenly over groups are bucketed by block shape, not looped per channel."""
    sel = ChannelSelection((8, 2, 3, 3), groups=4, out_channels=[0, 1, 2, 6])
    assert len(sel.buckets) == 2  # group 0 has two chosen rows; groups 1 and 3 one each
    assert sel.saved_channels == 6  # group 2 is untouched: its 2 input channels are not kept
    sel = ChannelSelection((16, 1, 3, 3), groups=16, in_channels=list(range(0, 16, 3)))
    assert len(sel.buckets) == 1 and sel.saved_channels == 6


@pytest.mark.parametrize(("size", "k", "stride", "padding", "dilation", "groups"), [
    (9, 3, 1, 1, 1, 1), (9, 3, 2, 1, 1, 1), (10, 3, 2, 1, 1, 6), (11, 3, 2, 0, 1, 6),
    (8, 1, 1, 0, 1, 1), (7, 1, 2, 0, 1, 1), (13, 5, 3, 2, 1, 3), (12, 3, 2, 2, 2, 2),
    (6, (3, 1), (2, 1), (1, 0), 1, 1),
])
def test_input_gradient_is_autograds(size, k, stride, padding, dilation, groups):
    """The transposed conv gives exactly what autograd gives, strided sizes that drop rows too."""
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, 6, size, size + 1, dtype=DT, requires_grad=True)
    w = torch.randn(12, 6 // groups, kh, kw, dtype=DT)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, g)
    conv = conv_args(kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    got = conv2d_input_grad(x.shape, w, g, conv)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
