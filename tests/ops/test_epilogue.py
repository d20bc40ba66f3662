"""The filtered conv's epilogue against the same conv followed by the affine and clamp as
separate autograd ops."""

from __future__ import annotations

import pytest
import torch

from budgetsearch.errors import PlanError
from budgetsearch.ops import filtered_conv2d
from budgetsearch.ops.epilogue import Epilogue, clamp_mask, mask_counts

torch.set_num_threads(1)
DT = torch.float64

# (n, c_in, c_out, groups, k, stride, padding, size, r): one cell (the whole map), several cells
# with ragged borders, strided, depthwise
SHAPES = [
    (3, 4, 6, 1, 1, 1, 0, 4, 4),
    (2, 4, 6, 1, 3, 1, 1, 7, 2),
    (2, 6, 6, 6, 3, 2, 1, 9, 2),
    (2, 4, 8, 2, 3, 1, 1, 5, 8),
]
EPILOGUES = ["affine", "affine+beta", "clamp", "affine+clamp", "affine+beta+clamp"]


def make(shape, *, seed=0):
    n, c_in, c_out, groups, k, s, p, size, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, size, size, generator=gen, dtype=DT)
    w = torch.randn(c_out, c_in // groups, k, k, generator=gen, dtype=DT)
    b = torch.randn(c_out, generator=gen, dtype=DT)
    scale = torch.rand(c_out, generator=gen, dtype=DT) + 0.5
    shift = torch.randn(c_out, generator=gen, dtype=DT)
    beta = torch.randn(c_out, generator=gen, dtype=DT) * 0.3
    return x, w, b, scale, shift, beta, dict(stride=s, padding=p, groups=groups, patch_size=r)


def run(shape, kind, mode, *, fused, g_of):
    x, w, b, scale, shift, beta, conv = make(shape)
    x, w, b, beta = (t.clone().requires_grad_(True) for t in (x, w, b, beta))
    use_beta = "beta" in kind
    affine, clamp = "affine" in kind, "clamp" in kind
    ep = Epilogue(scale=scale if affine else None, shift=shift if affine else None,
                  lo=-0.5 if clamp else None, hi=1.0 if clamp else None, clamp=clamp)
    if fused:
        y = filtered_conv2d(x, w, b, mode=mode, epilogue=ep,
                            epilogue_bias=beta if use_beta else None, **conv)
    else:
        y = filtered_conv2d(x, w, b, mode=mode, **conv)
        if affine:
            offset = shift + beta if use_beta else shift
            y = y * scale.view(1, -1, 1, 1) + offset.view(1, -1, 1, 1)
        if clamp:
            y = y.clamp(-0.5, 1.0)
    y.backward(g_of(y))
    grads = [x.grad, w.grad, b.grad] + ([beta.grad] if use_beta else [])
    return y.detach(), grads


def dense_g(y):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=DT)


def constant_g(y):
    """A gradient stored with stride 0 over H and W, as a whole-map filtered conv's input
    gradient is."""
    per_map = torch.randn(y.shape[:2], generator=torch.Generator().manual_seed(6), dtype=DT)
    return per_map[:, :, None, None].expand(y.shape)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"k{s[4]}s{s[5]}g{s[3]}h{s[7]}r{s[8]}"
                                               for s in SHAPES])
@pytest.mark.parametrize("kind", EPILOGUES)
@pytest.mark.parametrize("mode", ["normalized", "paper", "corrected"])
@pytest.mark.parametrize("g_of", [dense_g, constant_g], ids=["dense-g", "constant-g"])
def test_fused_equals_separate_ops(shape, kind, mode, g_of):
    y_sep, g_sep = run(shape, kind, mode, fused=False, g_of=g_of)
    y_fused, g_fused = run(shape, kind, mode, fused=True, g_of=g_of)
    torch.testing.assert_close(y_fused, y_sep, rtol=1e-12, atol=1e-12)
    assert len(g_fused) == len(g_sep) == (4 if "beta" in kind else 3)
    for name, a, b in zip(("x", "weight", "bias", "beta"), g_fused, g_sep, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_with_a_channel_selection():
    shape = SHAPES[1]
    x, w, _, scale, shift, beta, conv = make(shape)
    sl_ref = w[[0, 3]].clone().requires_grad_(True)
    sl = sl_ref.detach().clone().requires_grad_(True)
    beta_ref, beta_f = beta.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    y = filtered_conv2d(x, w, None, sl_ref, out_channels=[0, 3], **conv)
    y = (y * scale.view(1, -1, 1, 1) + (shift + beta_ref).view(1, -1, 1, 1)).clamp(0.0, None)
    g = dense_g(y)
    y.backward(g)
    ep = Epilogue(scale=scale, shift=shift, lo=0.0, clamp=True)
    y2 = filtered_conv2d(x, w, None, sl, out_channels=[0, 3], epilogue=ep, epilogue_bias=beta_f,
                         **conv)
    y2.backward(g)
    torch.testing.assert_close(y2.detach(), y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sl.grad, sl_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(beta_f.grad, beta_ref.grad, rtol=1e-10, atol=1e-12)


def test_saves_the_mask_and_nothing_for_the_affine():
    shape = SHAPES[0]
    x, w, _, scale, shift, beta, conv = make(shape)
    w.requires_grad_(True)
    beta.requires_grad_(True)
    saved: list[torch.Tensor] = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        filtered_conv2d(x, w, None, epilogue=Epilogue(scale=scale, shift=shift),
                        epilogue_bias=beta, **conv)
    assert [t.dtype for t in saved] == [DT]  # the weight, by reference: no activation at all
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = filtered_conv2d(x, w, None, epilogue=Epilogue(scale=scale, shift=shift, lo=0.0,
                                                          clamp=True), **conv)
    masks = [t for t in saved if t.dtype == torch.bool]
    assert len(masks) == 1 and masks[0].shape == y.shape


@pytest.mark.parametrize("hw", [(4, 4), (7, 7), (1, 8), (45, 46)])
def test_mask_counts_are_exact(hw):
    mask = torch.rand(3, 5, *hw, generator=torch.Generator().manual_seed(1)) > 0.4
    want = mask.sum((2, 3), keepdim=True).to(torch.float32)
    assert torch.equal(mask_counts(mask, torch.float32), want)


def test_clamp_mask_bounds():
    x = torch.tensor([-1.0, 0.0, 0.5, 6.0, 7.0])
    assert clamp_mask(x, 0.0, 6.0, inclusive=False).tolist() == [False, False, True, False, False]
    assert clamp_mask(x, 0.0, 6.0, inclusive=True).tolist() == [False, True, True, True, False]
    assert clamp_mask(x, None, 6.0, inclusive=False).tolist() == [True, True, True, False, False]
    assert clamp_mask(x, None, None, inclusive=False).all()


def test_bad_epilogues_are_refused():
    s = torch.ones(4)
    with pytest.raises(PlanError, match="both scale and shift"):
        Epilogue(scale=s)
    with pytest.raises(PlanError, match="does not require grad"):
        Epilogue(scale=s.clone().requires_grad_(True), shift=s)
    with pytest.raises(PlanError, match="needs lo or hi"):
        Epilogue(clamp=True)
    with pytest.raises(PlanError, match="lo < hi"):
        Epilogue(lo=1.0, hi=0.0, clamp=True)
    x, w, _, _, _, beta, conv = make(SHAPES[0])
    with pytest.raises(PlanError, match="4 channels, the conv has 6"):
        filtered_conv2d(x, w, epilogue=Epilogue(scale=s, shift=s), **conv)
    with pytest.raises(PlanError, match="epilogue_bias needs"):
        filtered_conv2d(x, w, epilogue_bias=beta, **conv)


def test_without_a_backward_it_is_the_plain_conv_and_epilogue():
    x, w, b, scale, shift, beta, conv = make(SHAPES[1])
    ep = Epilogue(scale=scale, shift=shift, lo=0.0, hi=6.0, clamp=True)
    w.requires_grad_(True)
    with_grad = filtered_conv2d(x, w, b, epilogue=ep, epilogue_bias=beta, **conv)
    with torch.no_grad():
        plain = filtered_conv2d(x, w, b, epilogue=ep, epilogue_bias=beta, **conv)
    assert plain.grad_fn is None and with_grad.grad_fn is not None
    conv_args = {k: v for k, v in conv.items() if k != "patch_size"}
    want = torch.nn.functional.conv2d(x, w.detach(), b, **conv_args)
    want = (want * scale.view(1, -1, 1, 1) + (shift + beta).view(1, -1, 1, 1)).clamp(0.0, 6.0)
    torch.testing.assert_close(plain, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_grad.detach(), want, rtol=1e-12, atol=1e-12)
