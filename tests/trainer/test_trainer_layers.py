"""FrozenBatchNorm and MaskedActivation: same values and gradients as stock, less saved."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from budgetsearch.errors import PlanError
from budgetsearch.models.mcu import Clamp
from budgetsearch.trainer import FrozenBatchNorm, SavedTensorMeter, masked_activation_for

torch.set_num_threads(1)
DT = torch.float64


def trained_bn(channels: int = 6, *, affine: bool = True, seed: int = 0) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels, affine=affine).to(DT)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize("bias_grad", [False, True])
def test_frozen_bn_matches_eval_bn(bias_grad):
    bn = trained_bn()
    ref = copy.deepcopy(bn)
    ref.weight.requires_grad_(False)
    ref.bias.requires_grad_(bias_grad)
    frozen = FrozenBatchNorm.from_bn(copy.deepcopy(bn), bias_grad=bias_grad)
    x = torch.randn(3, 6, 5, 7, dtype=DT)
    g = torch.randn(3, 6, 5, 7, dtype=DT)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ref(xa), frozen(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-12)
    if bias_grad:
        torch.testing.assert_close(frozen.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)
    assert frozen.weight.grad is None and not frozen.weight.requires_grad
    assert sorted(frozen.state_dict()) == sorted(bn.state_dict())


def test_frozen_bn_saves_nothing_and_shares_tensors():
    bn = trained_bn()
    frozen = FrozenBatchNorm.from_bn(bn, bias_grad=True)
    assert frozen.bias is bn.bias  # the optimizer updates the original parameter
    assert frozen.running_mean is bn.running_mean
    x = torch.randn(2, 6, 4, 4, dtype=DT, requires_grad=True)
    with SavedTensorMeter.for_model(frozen) as meter:
        y = frozen(x * 1.0)
    assert meter.bytes == 0
    y.sum().backward()
    assert x.grad is not None
    assert frozen.bias.grad is not None


def test_frozen_bn_refreshes_after_loading_and_refuses_no_stats():
    bn = trained_bn()
    frozen = FrozenBatchNorm.from_bn(copy.deepcopy(bn))
    other = trained_bn(seed=3)
    frozen.load_state_dict(other.state_dict())
    x = torch.randn(2, 6, 3, 3, dtype=DT)
    torch.testing.assert_close(frozen(x), other(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(PlanError, match="running statistics"):
        FrozenBatchNorm.from_bn(nn.BatchNorm2d(4, track_running_stats=False))


def test_frozen_bn_without_affine():
    bn = trained_bn(affine=False)
    frozen = FrozenBatchNorm.from_bn(copy.deepcopy(bn))
    x = torch.randn(2, 6, 3, 3, dtype=DT)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)


ACTIVATIONS = [
    ("relu", lambda: nn.ReLU()),
    ("relu_inplace", lambda: nn.ReLU(inplace=True)),
    ("relu6", lambda: nn.ReLU6()),
    ("relu6_inplace", lambda: nn.ReLU6(inplace=True)),
    ("hardtanh", lambda: nn.Hardtanh(-1.0, 2.0)),
    ("clamp", lambda: Clamp(-0.5, 1.5)),
]


@pytest.mark.parametrize(("name", "make"), ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_masked_activation_equals_stock(name, make):
    stock = make()
    masked = masked_activation_for(stock)
    assert masked is not None
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=DT) * 3
    # values exactly on the bounds, where strict and inclusive gradients differ
    x[0, 0, 0, :6] = torch.tensor([0.0, 6.0, -1.0, 2.0, -0.5, 1.5], dtype=DT)
    g = torch.randn_like(x)
    results = []
    for module in (stock, masked):
        leaf = x.clone().requires_grad_(True)
        y = module(leaf * 1.0)  # a non-leaf input, so in-place ops are allowed
        y.backward(g)
        results.append((y.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


def test_masked_activation_saves_a_bool_mask_and_keeps_inplace():
    masked = masked_activation_for(nn.ReLU6(inplace=True))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    h = x * 2.0
    with SavedTensorMeter() as meter:
        y = masked(h)
    assert y.data_ptr() == h.data_ptr()  # in place, as the original
    assert meter.dtypes == {"bool": h.numel()}
    with torch.no_grad(), SavedTensorMeter() as meter:
        masked(torch.randn(2, 3))
    assert meter.bytes == 0
    assert masked_activation_for(nn.SiLU()) is None
