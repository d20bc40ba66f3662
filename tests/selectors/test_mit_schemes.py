"""The 15 published MIT schemes as plans: layers, ratios, magnitude+ channels, and their labels
reproduced by the MIT memory accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import BudgetError, PlanError, ScoresError
from budgetsearch.models import mcu_conv_names
from budgetsearch.plan import LayerUpdate
from budgetsearch.selectors import MIT_SCHEMES, mit_memory_bytes, select

torch.set_num_threads(1)

SCHEMES = [(model, label) for model, labels in MIT_SCHEMES.items() for label in labels]


@pytest.fixture(scope="module")
def mcu_models() -> dict:
    out = {}
    for name in MIT_SCHEMES:
        model = load_model(name)
        graph = LayerGraph.from_model(model, input_size=128, model_name=name)
        out[name] = {"model": model, "graph": graph, "scores": magnitude_scores(model),
                     "cm": CostModel(graph, load_profile("stm32f746"))}
    return out


def test_fifteen_schemes_with_the_documented_conv_counts():
    assert len(SCHEMES) == 15
    counts = {name: len(mcu_conv_names(name)) for name in MIT_SCHEMES}
    assert counts == {"mcunet-5fps": 42, "mbv2-w0.35": 51, "proxyless-w0.3": 60}


@pytest.mark.parametrize(("model", "label"), SCHEMES)
def test_scheme_plan_layers_ratios_and_label(mcu_models, model, label):
    m = mcu_models[model]
    graph = m["graph"]
    plan = select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"],
                  label=label)
    n_bias, weights = MIT_SCHEMES[model][label]
    convs = mcu_conv_names(model)
    expected_layers = set(convs[len(convs) - n_bias:]) | {"classifier"}
    assert set(plan.updates) == expected_layers
    assert plan.updates["classifier"] == LayerUpdate("weight")
    ratios = dict(weights)
    modules = dict(m["model"].named_modules())
    for name, update in plan.updates.items():
        if name == "classifier":
            continue
        ratio = ratios.get(name, 0.0)
        if ratio == 0:
            assert update == LayerUpdate("bias"), name
        elif ratio == 1:
            assert update == LayerUpdate("weight"), name
        else:
            layer = graph.layers[name]
            k = int(layer.in_channels * ratio)
            assert update.axis == "in" and len(update.channels) == k, name
            # magnitude+: L2 norm per input channel; a depthwise channel is its own kernel
            w = modules[name].weight.detach().double()
            if layer.groups == layer.in_channels:
                norms = w.reshape(w.shape[0], -1).norm(dim=1).numpy()
            else:
                norms = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).numpy()
            kept = np.sort(norms[list(update.channels)])
            dropped = np.delete(norms, list(update.channels))
            assert kept.min() >= dropped.max(), name
    # MIT's accounting reproduces the published label (KiB, rounded down)
    assert mit_memory_bytes(graph, plan) // 1024 == int(label.removesuffix("KB"))
    assert plan.provenance["details"]["mit_memory_kib"] == int(label.removesuffix("KB"))


def _all_weights_counted(graph, plan) -> int:
    """The alternative reading: every int8 weight of a weight-updated conv, not the kept part."""
    extra = 0
    for name, update in plan.updates.items():
        if name != "classifier" and update.mode == "weight" and update.channels is not None:
            layer = graph.layers[name]
            kept = layer.weight_numel // layer.in_channels * len(update.channels)
            extra += layer.weight_numel - kept
    return mit_memory_bytes(graph, plan) + extra


def test_counting_all_weights_would_not_reproduce_partial_schemes(mcu_models):
    """Only schemes with a partial ratio tell the readings apart; the 'all' reading fails them."""
    mismatched = 0
    for model, label in SCHEMES:
        m = mcu_models[model]
        plan = select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"],
                      label=label)
        if any(u.channels is not None for u in plan.updates.values()):
            mismatched += _all_weights_counted(m["graph"], plan) // 1024 != int(label[:-2])
    assert mismatched == 13  # every scheme with a partial ratio (all but the two all-@1 ones)


def test_mit_memory_counts_masks_biases_inputs_and_weights(mcu_models):
    graph = mcu_models["mcunet-5fps"]["graph"]
    name = "blocks.13.pointwise1"
    layer = graph.layers[name]
    out = graph.nodes[layer.node]
    inp = graph.nodes[out.inputs[0]]
    bias = mit_memory_bytes(graph, {name: LayerUpdate("bias")})
    assert bias == 4 * layer.out_channels + -(-out.numel // 8)
    full = mit_memory_bytes(graph, {name: LayerUpdate("weight")})
    assert full == bias + inp.numel + layer.weight_numel
    half = LayerUpdate("weight", channels=tuple(range(layer.in_channels // 2)), axis="in")
    assert mit_memory_bytes(graph, {name: half}) == bias + (inp.numel + layer.weight_numel) // 2
    assert mit_memory_bytes(graph, {"classifier": LayerUpdate("weight")}) == 0


def test_scheme_must_fit_the_budget(mcu_models):
    m = mcu_models["mcunet-5fps"]
    plan = select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"],
                  label="49KB")
    need = plan.predicted["peak_memory_bytes"]
    with pytest.raises(BudgetError) as info:
        select("mit-scheme", cost_model=m["cm"], budget_bytes=need - 1, scores=m["scores"],
               label="49 KB")
    assert info.value.minimum_bytes == need
    assert f"{need} bytes" in str(info.value)
    ok = select("mit-scheme", cost_model=m["cm"], budget_bytes=need, scores=m["scores"],
                label=49)
    assert ok.updates == plan.updates


def test_scheme_errors(mcu_models):
    m = mcu_models["mcunet-5fps"]
    with pytest.raises(PlanError, match="49KB, 74KB"):
        select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"],
               label="50KB")
    with pytest.raises(PlanError, match="needs a label"):
        select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"])
    with pytest.raises(ScoresError, match="needs scores"):
        select("mit-scheme", cost_model=m["cm"], budget_bytes=None, label="49KB")
    other = mcu_models["mbv2-w0.35"]
    with pytest.raises(PlanError, match="no published MIT scheme"):
        select("mit-scheme", cost_model=other["cm"], budget_bytes=None,
               scores=other["scores"], label="49KB", model="resnet18")
