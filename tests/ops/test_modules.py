"""Tests of PlannedConv2d / PlannedLinear: drop-in behaviour, training, and composition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetsearch.errors import PlanError
from budgetsearch.ops.filtered import filtered_conv2d
from budgetsearch.ops.modules import PlannedConv2d, PlannedLinear, replace_module

torch.set_num_threads(1)
DT = torch.float64


def slice_of(full, *, groups, out_channels=None, in_channels=None):
    """The trained part of a full weight or gradient (independent of the library's layout code)."""
    if out_channels is not None:
        return full[list(out_channels)]
    c_out, cpg = full.shape[:2]
    m = c_out // groups
    return torch.stack([full[(c // cpg) * m : (c // cpg + 1) * m, c % cpg] for c in in_channels], 1)


def make_conv(c_in, c_out, groups, *, k=3, stride=1, padding=1, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=bias).to(DT)


PLANS = [
    {"weight_grad": True, "bias_grad": True},
    {"weight_grad": False, "bias_grad": True},
    {"weight_grad": False, "bias_grad": False},
    {"weight_grad": True, "bias_grad": False, "out_channels": [5, 1]},
    {"weight_grad": True, "bias_grad": True, "in_channels": [0, 3]},
    {"weight_grad": True, "bias_grad": True, "in_channels": [0, 3], "patch_size": 2},
]


@pytest.mark.parametrize("plan", PLANS)
def test_state_dict_round_trip(plan):
    conv = make_conv(4, 6, 1)
    original = copy.deepcopy(conv.state_dict())
    planned = PlannedConv2d.from_conv(copy.deepcopy(conv), **plan)
    assert list(planned.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 4, 8, 8, dtype=DT)
    torch.testing.assert_close(planned(x), conv(x), rtol=0, atol=1e-12)
    # Loading a plain conv's checkpoint (strict) into the planned layer, and back.
    with torch.no_grad():
        for t in conv.parameters():
            t.add_(1.0)
    planned.load_state_dict(conv.state_dict())
    torch.testing.assert_close(planned(x), conv(x), rtol=0, atol=1e-12)
    back = nn.Conv2d(4, 6, 3, 1, 1).to(DT)
    back.load_state_dict(planned.state_dict())
    torch.testing.assert_close(back.weight, conv.weight)
    assert not torch.equal(back.weight, original["weight"])
    torch.testing.assert_close(planned.to_conv()(x), conv(x), rtol=0, atol=1e-12)


def test_parameters_seen_by_optimizer():
    conv = make_conv(4, 6, 1)
    dense = PlannedConv2d.from_conv(conv, weight_grad=True, bias_grad=True)
    assert dense.weight is conv.weight and dense.bias is conv.bias
    sparse = PlannedConv2d.from_conv(
        make_conv(4, 6, 1), out_channels=[2], weight_grad=True, bias_grad=False
    )
    assert [n for n, _ in sparse.named_parameters()] == ["weight_slice"]
    assert sparse.weight_slice.shape == (1, 4, 3, 3)
    frozen = PlannedConv2d.from_conv(make_conv(4, 6, 1), weight_grad=False, bias_grad=False)
    assert list(frozen.parameters()) == []


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", ["out_channels", "in_channels"])
def test_sparse_training_equals_masked_dense(kind, groups):
    """SGD with momentum on the slice == dense training whose frozen gradient entries are zero."""
    index = [1, 3] if kind == "in_channels" else [0, 5, 2]
    conv = make_conv(4, 6, groups, seed=1)
    reference = copy.deepcopy(conv)
    planned = PlannedConv2d.from_conv(conv, **{kind: index}, weight_grad=True, bias_grad=True)
    mask = torch.zeros_like(reference.weight)
    if kind == "out_channels":
        mask[index] = 1
    else:
        m, cpg = 6 // groups, 4 // groups
        for c in index:
            mask[(c // cpg) * m : (c // cpg + 1) * m, c % cpg] = 1
    opt_p = torch.optim.SGD(planned.parameters(), lr=0.1, momentum=0.9)
    opt_r = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        torch.manual_seed(step)
        x = torch.randn(2, 4, 7, 7, dtype=DT)
        target = torch.randn(2, 6, 7, 7, dtype=DT)
        for model, opt in ((planned, opt_p), (reference, opt_r)):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            if model is reference:
                model.weight.grad *= mask
            opt.step()
    assert planned.weight.grad is None
    torch.testing.assert_close(planned.to_conv().weight, reference.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(planned.bias, reference.bias, rtol=0, atol=1e-12)


COMPOSE = [
    # (c_in, c_out, groups, stride, size, r)
    (4, 6, 1, 1, 9, 2),
    (4, 6, 1, 2, 13, 3),
    (4, 4, 4, 1, 9, 4),
    (4, 8, 4, 2, 9, 2),
    (4, 6, 2, 1, 7, 2),
]


@pytest.mark.parametrize("mode", ["normalized", "paper"])
@pytest.mark.parametrize(("kind", "index"), [("out_channels", [3, 0]), ("in_channels", [2, 1])])
@pytest.mark.parametrize(("c_in", "c_out", "groups", "stride", "size", "r"), COMPOSE)
def test_filtered_and_sparse_compose(c_in, c_out, groups, stride, size, r, kind, index, mode):
    conv = make_conv(c_in, c_out, groups, stride=stride, seed=size)
    x = torch.randn(2, c_in, size, size, dtype=DT)
    planned = PlannedConv2d.from_conv(
        copy.deepcopy(conv),
        **{kind: index},
        weight_grad=True,
        bias_grad=True,
        patch_size=r,
        mode=mode,
    )
    xs = x.clone().requires_grad_()
    y = planned(xs)
    g = torch.randn_like(y)
    y.backward(g)
    # Reference: the dense filtered gradient, restricted to the slice.
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, conv.weight, conv.bias))
    yr = filtered_conv2d(
        xr, wr, br, stride=stride, padding=1, groups=groups, patch_size=r, mode=mode
    )
    yr.backward(g)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-10)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(planned.bias.grad, br.grad, rtol=0, atol=1e-10)
    # The module sorts the selection; the reference slice follows the sorted order too.
    expected = slice_of(wr.grad, groups=groups, **{kind: sorted(index)})
    torch.testing.assert_close(planned.weight_slice.grad, expected, rtol=0, atol=1e-10)


def test_composed_saved_bytes():
    n, c_in, c_out, size, r = 2, 8, 6, 13, 4
    conv = nn.Conv2d(c_in, c_out, 3, 1, 1)
    planned = PlannedConv2d.from_conv(
        conv, in_channels=[1, 4, 6], weight_grad=True, bias_grad=True, patch_size=r
    )
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    owned = {t.untyped_storage().data_ptr() for t in [*planned.parameters(), *planned.buffers()]}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in owned:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        planned(x)
    cells = math.ceil(size / r) ** 2
    assert total == n * 3 * cells * 4  # 3 kept channels of x_sum; weight and slice by reference


def test_patch_size_one_is_plain_conv():
    conv = make_conv(3, 5, 1)
    planned = PlannedConv2d.from_conv(
        copy.deepcopy(conv), weight_grad=True, bias_grad=True, patch_size=1
    )
    assert planned.patch_size is None
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    g = torch.randn(2, 5, 6, 6, dtype=DT)
    planned(x).backward(g)
    conv(x).backward(g)
    torch.testing.assert_close(planned.weight.grad, conv.weight.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [1, 3])
def test_dense_pointwise_conv_on_a_one_pixel_map_equals_the_conv(size):
    conv = make_conv(6, 4, 1, k=1, padding=0)
    planned = PlannedConv2d.from_conv(copy.deepcopy(conv), weight_grad=True, bias_grad=True)
    assert planned._matrix_product
    x = torch.randn(3, 6, size, size, dtype=DT, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 4, size, size, dtype=DT)
    y = planned(x)
    assert y.shape == (3, 4, size, size)
    torch.testing.assert_close(y, conv(x_ref), rtol=1e-12, atol=1e-12)
    y.backward(g)
    conv(x_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(planned.weight.grad, conv.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(planned.bias.grad, conv.bias.grad, rtol=1e-12, atol=1e-12)
    assert planned.weight.grad.shape == conv.weight.shape


def test_linear_module():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).to(DT)
    reference = copy.deepcopy(linear)
    planned = PlannedLinear.from_linear(
        linear, in_channels=[5, 0], weight_grad=True, bias_grad=False
    )
    assert list(planned.state_dict()) == ["weight", "bias"]
    assert [n for n, _ in planned.named_parameters()] == ["weight_slice"]
    x = torch.randn(3, 6, dtype=DT)
    g = torch.randn(3, 4, dtype=DT)
    planned(x).backward(g)
    reference(x).backward(g)
    torch.testing.assert_close(planned.weight_slice.grad, reference.weight.grad[:, [0, 5]])
    with torch.no_grad():
        planned.weight_slice.add_(1.0)
        reference.weight[:, [0, 5]] += 1.0
    torch.testing.assert_close(planned.to_linear().weight, reference.weight)
    restored = PlannedLinear.from_linear(
        nn.Linear(6, 4).to(DT), in_channels=[0, 5], weight_grad=True, bias_grad=False
    )
    restored.load_state_dict(planned.state_dict())
    torch.testing.assert_close(restored(x), reference(x))


def test_replace_module_keeps_names():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 2),
    )
    keys = list(model.state_dict())
    old = replace_module(
        model, "0.0", PlannedConv2d.from_conv(model[0][0], weight_grad=False, bias_grad=False)
    )
    assert isinstance(old, nn.Conv2d) and isinstance(model[0][0], PlannedConv2d)
    replace_module(
        model,
        "2",
        PlannedLinear.from_linear(model[2], out_channels=[1], weight_grad=True, bias_grad=True),
    )
    assert list(model.state_dict()) == keys
    model.load_state_dict(model.state_dict())
    assert model(torch.randn(1, 3, 4, 4)).shape == (1, 2)
    with pytest.raises(PlanError, match="no layer"):
        replace_module(model, "0.7", nn.Identity())


def test_refusals():
    with pytest.raises(PlanError, match="padding_mode"):
        PlannedConv2d.from_conv(
            nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), weight_grad=True, bias_grad=True
        )
    with pytest.raises(PlanError, match="no bias"):
        PlannedConv2d.from_conv(nn.Conv2d(2, 2, 3, bias=False), weight_grad=True, bias_grad=True)
    with pytest.raises(PlanError, match="weight_grad"):
        PlannedConv2d.from_conv(
            nn.Conv2d(2, 2, 3), out_channels=[0], weight_grad=False, bias_grad=True
        )
    with pytest.raises(PlanError, match="mode"):
        PlannedConv2d.from_conv(nn.Conv2d(2, 2, 3), weight_grad=True, bias_grad=True, mode="x")
    # one unbatched image: refused in the forward, frozen, sparse or filtered (it had failed
    # with a bare IndexError, in the backward for the first two)
    for kw in ({"weight_grad": False, "bias_grad": True}, {"out_channels": [0],
               "weight_grad": True, "bias_grad": True},
               {"weight_grad": True, "bias_grad": True, "patch_size": 2}):
        planned = PlannedConv2d.from_conv(nn.Conv2d(2, 2, 3, padding=1), **kw)
        with pytest.raises(PlanError, match=r"takes a batch of images \(N, C, H, W\); got an "
                                            r"input of shape \(2, 4, 4\)"):
            planned(torch.randn(2, 4, 4, requires_grad=True))


def test_dtype_move_and_deepcopy():
    planned = PlannedConv2d.from_conv(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        in_channels=[1],
        weight_grad=True,
        bias_grad=True,
        patch_size=2,
    )
    clone = copy.deepcopy(planned).to(DT)
    assert clone.weight.dtype == DT and clone.weight_slice.dtype == DT
    x = torch.randn(1, 4, 6, 6, dtype=DT, requires_grad=True)
    clone(x).sum().backward()
    assert clone.weight_slice.grad.shape == (1, 1, 3, 3)
    assert "patch_size=(2, 2)" in repr(clone)


def test_mobilenet_v2_swap_all_layers():
    """Every conv/linear of MobileNetV2 swapped under its own name: same keys, output, training."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = mobilenet_v2(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for i, (name, mod) in enumerate(layers):
        if isinstance(mod, nn.Linear):
            new = PlannedLinear.from_linear(mod, weight_grad=True, bias_grad=True)
        elif i >= len(layers) - 6:  # the last convs: half their input channels, filtered
            half = list(range(0, mod.in_channels, 2))
            new = PlannedConv2d.from_conv(
                mod, in_channels=half, weight_grad=True, bias_grad=False, patch_size=2
            )
        else:
            new = PlannedConv2d.from_conv(mod, weight_grad=False, bias_grad=False)
        replace_module(model, name, new)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for m in model.modules() if isinstance(m, PlannedConv2d | PlannedLinear)
                 for p in m.parameters()]  # fmt: skip
    for p in trainable:
        p.requires_grad_(True)
    model(x).sum().backward()
    assert all(p.grad is not None for p in trainable)
