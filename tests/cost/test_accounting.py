"""Accountings are built from keyword arguments, with their engine as one value."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

import budgetsearch.cost.rules
from budgetsearch import CostModel, LayerGraph, Plan, load_profile
from budgetsearch.choices import ENGINES
from budgetsearch.cost import Accounting, accounting_for
from budgetsearch.errors import CostError
from budgetsearch.models import load_model

# What each accounting was before it had an engine: (stock_autograd, planned_ops, realises_plan).
_FLAGS = {"pytorch": (True, False, False), "ops": (True, True, True),
          "device": (False, False, True)}


@pytest.mark.parametrize("name", sorted(_FLAGS))
def test_named_accountings_keep_their_flags(name):
    acc = accounting_for(load_profile("stm32f746"), name)
    assert (acc.stock_autograd, acc.planned_ops, acc.realises_plan) == _FLAGS[name]
    assert acc.name == name and acc.engine in ENGINES


def test_fp32_defaults_and_keywords_only():
    profile = load_profile("rpi4")
    assert accounting_for(profile, "pytorch") == Accounting(
        name="pytorch", engine="autograd", activation_bytes=4, weight_bytes=4, bias_bytes=4,
        gradient_bytes=4, optimizer_state_bytes=4, mask_bits=8, frozen_weights_in_ram=True,
        fold_batchnorm=False, in_place_update=False)
    with pytest.raises(TypeError):
        Accounting("pytorch", "autograd")  # type: ignore[misc]
    with pytest.raises(CostError, match="engine must be one of autograd, ops, device"):
        Accounting(name="x", engine="tflite")  # type: ignore[arg-type]


def test_an_accounting_built_by_hand_costs_as_the_named_one():
    graph = LayerGraph.from_model(load_model("mcunet-5fps", num_classes=10), input_size=64)
    profile = load_profile("stm32f746")
    plan = Plan.last_k_blocks(graph, 2)
    for name in _FLAGS:
        by_name = CostModel(graph, profile, accounting=name).summarize(plan)
        acc = dataclasses.replace(accounting_for(profile, name), name=f"my-{name}")
        assert CostModel(graph, profile, accounting=acc).summarize(plan) == by_name


def test_module_examples_run():
    results = doctest.testmod(budgetsearch.cost.rules, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 2 and results.failed == 0


def _conv_bn(batch_norm: bool = True):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1, bias=not batch_norm)]
    layers += [nn.BatchNorm2d(8)] if batch_norm else []
    layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(8, 2)]
    return LayerGraph.from_model(nn.Sequential(*layers), input_size=8)


def test_the_device_folds_batch_norm_only_when_it_is_frozen():
    """Frozen, batch norm folds into its conv and saves nothing; on batch statistics it cannot
    fold: it keeps its input (8 channels x 8 x 8, fp32 on the MCU's activation bytes) and its
    batch mean and inverse std (2 x 8 fp32)."""
    graph = _conv_bn()
    profile = load_profile("stm32f746")
    plan = Plan.full(graph)
    frozen = CostModel(graph, profile, accounting="device", batch_size=1).summarize(plan)
    batch = CostModel(graph, profile, accounting="device", batch_size=1,
                      bn_train=True).summarize(plan)
    act = accounting_for(profile, "device").activation_bytes
    assert batch.saved_activation_bytes - frozen.saved_activation_bytes == (
        8 * 8 * 8 * act + 2 * 8 * 4)


def test_a_functional_conv_is_a_named_error_and_channels_are_checked():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from budgetsearch.errors import PlanError
    from budgetsearch.plan import LayerUpdate

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(F.relu(F.conv2d(x, self.w)).mean((2, 3)))

    graph = LayerGraph.from_model(Functional(), input_size=8)
    with pytest.raises(CostError, match=r"\(conv2d\): its channels were not recorded \(a "
                                        r"functional conv2d call"):
        CostModel(graph, load_profile("stm32f746"))
    graph = _conv_bn()
    cost = CostModel(graph, load_profile("stm32f746"))
    name = next(n for n in graph.layers if graph.layers[n].out_channels == 8)
    with pytest.raises(PlanError, match=rf"layer {name}: channels must be distinct indices in "
                                        r"0\.\.7 of its out axis; got \[8, 9\]"):
        cost.summarize({name: LayerUpdate("weight", channels=tuple(range(10)))})
