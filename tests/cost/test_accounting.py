"""Accountings are built from keyword arguments, with their engine as one value."""

from __future__ import annotations

import dataclasses
import doctest
import itertools

import pytest

import budgetsearch.cost.rules
from budgetsearch import CostModel, LayerGraph, LayerUpdate, Plan, load_profile
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


def _conv_bn_pool(batch_norm: bool):
    import torch
    from torch import nn

    torch.manual_seed(0)
    # without batch norm the conv has the bias a folded batch norm gives it
    layers = [nn.Conv2d(1, 4, 1, bias=not batch_norm)]
    layers += [nn.BatchNorm2d(4)] if batch_norm else []
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)]
    return LayerGraph.from_model(nn.Sequential(*layers), input_size=2, in_channels=1)


def test_a_folded_batch_norm_allocates_nothing_of_its_own():
    """A 1-channel 2 x 2 input (4 elements, int8) into a pointwise conv of 4 channels (16
    elements). Inference: at the conv its input and output are alive, 4 + 16 = 20 B, and the
    folded batch norm adds no tensor after it; on batch statistics the batch norm writes a tensor
    of its own while the conv output is still alive: 16 + 16 = 32 B. Training the conv: the
    folded model costs what the same model without the batch norm costs, its conv carrying
    the folded bias: the batch norm's output gradient is the conv's (64 fp32 bytes held once,
    not twice), and its bias gradient is formed in the conv's backward."""
    profile = dataclasses.replace(load_profile("stm32f746"), activation_bytes=1,
                                  weight_bytes=1, gradient_bytes=4, frozen_weights_in="flash")
    with_bn, without = _conv_bn_pool(True), _conv_bn_pool(False)
    folded = CostModel(with_bn, profile, accounting="device", batch_size=1)
    batch = CostModel(with_bn, profile, accounting="device", batch_size=1, bn_train=True)
    plain = CostModel(without, profile, accounting="device", batch_size=1)
    assert folded.inference_peak_bytes == plain.inference_peak_bytes == 4 + 16
    assert batch.inference_peak_bytes == 16 + 16
    for mode in ("weight", "bias"):  # the bias alone: the gradient reaches the conv's output
        plans = [Plan.from_layers(g, {"0": LayerUpdate(mode)}) for g in (with_bn, without)]
        a, b = folded.evaluate(plans[0]), plain.evaluate(plans[1])
        assert a.peak_memory_bytes == b.peak_memory_bytes, mode
        assert a.saved_activation_bytes == b.saved_activation_bytes, mode
        assert a.trainable_params == b.trainable_params == 4 * (mode == "weight") + 4, mode
    plans = [Plan.from_layers(g, {"0": LayerUpdate("weight")}) for g in (with_bn, without)]
    a = folded.evaluate(plans[0])
    # the unfolded timeline holds the batch norm's output gradient and the conv's at once
    assert (batch.evaluate(plans[0]).peak_memory_bytes - a.peak_memory_bytes
            >= 16 * 4 - 16 * 1)  # one fp32 gradient more, less nothing saved when folded


# registered models with batch norm whose fx-traced fused copy keeps every storage (ResNet's
# in-place ``out += identity`` becomes an out-of-place add in the traced copy, so it is left out)
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5",
                                  "mnasnet0_5", "efficientnet_b0"])
def test_folding_costs_what_pytorch_fusing_the_batch_norms_costs(name):
    """PyTorch's own conv + batch-norm fusion (``torch.fx.experimental.optimization.fuse``)
    gives a model without batch norm; the device accounting of the model with batch norm
    matches it for inference and for training plans (a conv's ``weight`` update trains its
    bias, the batch norm's shift once folded; frozen weights are in flash)."""
    from torch.fx.experimental.optimization import fuse

    model = load_model(name, weights="random", num_classes=10).eval()
    graphs = [LayerGraph.from_model(m, input_size=(64, 64)) for m in (model, fuse(model))]
    assert any(n.kind == "batch_norm" for n in graphs[0].nodes)
    assert not any(n.kind == "batch_norm" for n in graphs[1].nodes)
    profile = load_profile("stm32f746")
    assert profile.frozen_weights_in == "flash"
    models = [CostModel(g, profile, accounting="device", batch_size=1) for g in graphs]
    assert models[0].inference_peak_bytes == models[1].inference_peak_bytes
    names = list(graphs[0].layers)
    assert names == list(graphs[1].layers)
    for k, mode in itertools.product((1, 3, 8, 20, len(names)), ("weight", "bias")):
        updates = {layer: LayerUpdate(mode) for layer in names[-k:]}
        costs = [cm.evaluate(Plan.from_layers(g, updates))
                 for cm, g in zip(models, graphs, strict=True)]
        assert costs[0].peak_memory_bytes == costs[1].peak_memory_bytes, (k, mode)
        assert costs[0].saved_activation_bytes == costs[1].saved_activation_bytes, (k, mode)
        assert costs[0].trainable_params == costs[1].trainable_params, (k, mode)


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
