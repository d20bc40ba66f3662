"""The 15 published MIT schemes as plans: layers, ratios, magnitude+ channels, and their labels
reproduced by the MIT memory accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import BudgetError, PlanError, ScoresError
from budgetsearch.models import mcu_conv_names
from budgetsearch.models.mcu import find_mcu_files
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
    partial = [r for labels in MIT_SCHEMES.values() for _n, ws in labels.values()
               for _name, r in ws if 0 < r < 1]
    assert len(partial) == 37  # in 13 schemes; the 138KB and 148KB (proxyless) have none


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
    for name, update in plan.updates.items():
        if name == "classifier":
            continue
        ratio = ratios.get(name, 0.0)
        if ratio == 0:
            assert update == LayerUpdate("bias"), name
        elif ratio == 1:
            assert update == LayerUpdate("weight"), name
        else:  # which channels: test_scheme_keeps_the_channels_mit_keeps
            layer = graph.layers[name]
            k = int(layer.in_channels * ratio)
            assert update.axis == "in" and len(update.channels) == k, name
    # MIT's accounting reproduces the published label (KiB, rounded down)
    assert mit_memory_bytes(graph, plan) // 1024 == int(label.removesuffix("KB"))
    assert plan.provenance["details"]["mit_memory_kib"] == int(label.removesuffix("KB"))


def _npz_int8_weights(model: str) -> dict[str, np.ndarray]:
    """The int8 weights of every conv, read straight from the NPZ (no loader involved)."""
    _, npz_path = find_mcu_files(model)
    with np.load(npz_path, allow_pickle=False) as npz:
        out = {key.removesuffix(".params.weight"): npz[key] for key in npz.files
               if key.endswith(".params.weight")}
    assert out and all(w.dtype == np.int8 for w in out.values())
    return out


def _mit_kept_channels(w_int8: np.ndarray, ratio: float, *, depthwise: bool) -> set[int]:
    """MIT's magnitude+ on the int8 weights (O, I, K, K): the int(ratio * C_in) input channels
    with the largest L2 norm over output channels and kernel taps; for a depthwise conv (O, 1,
    K, K) a channel's norm is that of its own kernel. The cut must not fall inside a tie, so the
    answer does not depend on how ties are broken."""
    w = w_int8.astype(np.int64)
    sq = (w**2).sum(axis=(1, 2, 3)) if depthwise else (w**2).sum(axis=(0, 2, 3))
    k = int(len(sq) * ratio)
    order = np.argsort(-sq, kind="stable")
    assert k < len(sq) and sq[order[k - 1]] > sq[order[k]], "tie at the cut"
    return set(order[:k].tolist())


@pytest.mark.parametrize(("model", "label"), SCHEMES)
def test_scheme_keeps_the_channels_mit_keeps(mcu_models, model, label):
    """Every partial-ratio conv keeps the channels MIT's magnitude+ keeps: ranked by the int8
    integer weights of the NPZ, not by the de-quantised float weights of the float model."""
    m = mcu_models[model]
    plan = select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"],
                  label=label)
    ints = _npz_int8_weights(model)
    modules = dict(m["model"].named_modules())
    partial = [(n, r) for n, r in MIT_SCHEMES[model][label][1] if 0 < r < 1]
    for name, ratio in partial:
        conv = modules[name]
        depthwise = conv.groups == conv.in_channels > 1
        expected = _mit_kept_channels(ints[name], ratio, depthwise=depthwise)
        assert set(plan.updates[name].channels) == expected, name


def test_mit_selector_keeps_the_channels_mit_keeps():
    """The ``mit`` selector with magnitude scores ranks the int8 weights too (on a model with a
    replaced head, whose other convs keep their int8 form)."""
    model = load_model("mcunet-5fps", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name="mcunet-5fps")
    cm = CostModel(graph, load_profile("stm32f746"))
    plan = select("mit", cost_model=cm, budget_bytes=50 * 1024, scores=magnitude_scores(model),
                  memory_measure="training")
    ints = _npz_int8_weights("mcunet-5fps")
    modules = dict(model.named_modules())
    partial = {n: u for n, u in plan.updates.items() if u.channels is not None}
    assert partial  # the budget forces input-channel subsets
    for name, update in partial.items():
        conv = modules[name]
        ratio = len(update.channels) / conv.in_channels
        depthwise = conv.groups == conv.in_channels > 1
        assert set(update.channels) == _mit_kept_channels(ints[name], ratio, depthwise=depthwise)


def _mit_formula_bytes(model: nn.Module, model_name: str, label: str) -> int:
    """MIT's count (docs/selectors.md, 'MIT accounting', and MIT's ``nelem_saved_for_backward``),
    in bits, then bytes: per bias-updated conv 1 bit per output element + 32 bits per bias; per
    weight-updated conv 8 bits per element of its kept input channels + 8 bits per kept weight;
    the classifier's weight and bias free but its input activation counted, 8 bits per input
    feature."""
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    hooks = [m.register_forward_hook(
        lambda mod, args, out, n=n: shapes.__setitem__(n, (args[0].shape, out.shape)))
        for n, m in convs.items()]
    training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 128, 128))
    model.train(training)
    for h in hooks:
        h.remove()
    n_bias, weights = MIT_SCHEMES[model_name][label]
    ratios = dict(weights)
    body = [n for n in convs if n != "classifier"]
    bits = 0
    for name in body[len(body) - n_bias:]:
        conv = convs[name]
        (_, c_in, h_in, w_in), out = shapes[name]
        bits += math.prod(out[1:]) + 32 * conv.out_channels
        ratio = ratios.get(name, 0.0)
        if ratio == 0:
            continue
        kept = int(c_in * ratio)
        kh, kw = conv.kernel_size
        per_channel_weights = kh * kw if conv.groups == c_in else conv.out_channels * kh * kw
        bits += 8 * kept * h_in * w_in + 8 * kept * per_channel_weights
    head_in = shapes["classifier"][0]
    bits += 8 * math.prod(head_in[1:])
    return math.ceil(bits / 8)


@pytest.mark.parametrize(("model", "label"), SCHEMES)
def test_scheme_memory_follows_the_mit_formula(mcu_models, model, label):
    """The totals, classifier input included, re-derived from the layers and the formula."""
    m = mcu_models[model]
    plan = select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"],
                  label=label)
    expected = _mit_formula_bytes(m["model"], model, label)
    assert mit_memory_bytes(m["graph"], plan) == expected
    assert plan.provenance["details"]["mit_memory_bytes"] == expected
    assert expected // 1024 == int(label.removesuffix("KB"))


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
    # the classifier: only its int8 input (one byte per input feature), and only for its weight
    head = graph.layers["classifier"]
    assert mit_memory_bytes(graph, {"classifier": LayerUpdate("weight")}) == head.in_channels == 160
    assert mit_memory_bytes(graph, {"classifier": LayerUpdate("bias")}) == 0
    kept = LayerUpdate("weight", channels=(0, 5, 7), axis="in")
    assert mit_memory_bytes(graph, {"classifier": kept}) == 3
    rows = LayerUpdate("weight", channels=(0, 5, 7), axis="out")
    assert mit_memory_bytes(graph, {"classifier": rows}) == 160


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
