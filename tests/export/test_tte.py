"""The Tiny Training Engine export: the 15 published schemes come back as their published
configurations, and what the engine cannot express is refused with the layer named."""

from __future__ import annotations

import json

import pytest
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.cli import main
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import ExportError
from budgetsearch.export import to_tte
from budgetsearch.export.tte import _fmt, _ratio
from budgetsearch.models import mcu_conv_names
from budgetsearch.plan import LayerUpdate
from budgetsearch.selectors import MIT_SCHEMES, select

torch.set_num_threads(1)

SCHEMES = [(model, label) for model, labels in MIT_SCHEMES.items() for label in labels]


@pytest.fixture(scope="module")
def mcu() -> dict:
    out = {}
    for name in MIT_SCHEMES:
        model = load_model(name)
        graph = LayerGraph.from_model(model, input_size=128, model_name=name)
        out[name] = {"scores": magnitude_scores(model),
                     "cm": CostModel(graph, load_profile("stm32f746"), batch_size=1)}
    return out


def _scheme(mcu: dict, model: str, label: str):
    m = mcu[model]
    return select("mit-scheme", cost_model=m["cm"], budget_bytes=None, scores=m["scores"],
                  label=label)


@pytest.mark.parametrize(("model", "label"), SCHEMES)
def test_each_published_scheme_exports_to_its_published_configuration(mcu, model, label):
    plan = _scheme(mcu, model, label)
    doc = to_tte(plan)
    n_bias, weights = MIT_SCHEMES[model][label]
    convs = mcu_conv_names(model)
    # ratio-0 entries of a published scheme are bias updates inside the run: the engine skips
    # them, and a plan (bias only) writes them as part of n_bias_update
    published = sorted((convs.index(name), r) for name, r in weights if r > 0)
    cfg = doc["backward_config"]
    assert cfg["n_bias_update"] == n_bias and cfg["freeze_fc"] == 0
    assert cfg["manual_weight_idx"] == "-".join(str(i) for i, _ in published)
    assert cfg["weight_update_ratio"] == "-".join(f"{r:g}" for _, r in published)
    assert set(doc["layers"].values()) == set(convs[len(convs) - n_bias:])
    # the permutations put the plan's (magnitude+) channels first
    for idx, order in doc["channel_orders"].items():
        update = plan.updates[convs[int(idx)]]
        assert order[:len(update.channels)] == list(update.channels)
        assert sorted(order) == list(range(len(order)))
    assert set(doc["channel_orders"]) == {str(i) for i, r in published if r < 1}


def test_the_index_strings_of_mits_public_training_scripts(mcu):
    """The 50 KB schemes of MCUNet and MobileNetV2 as MIT's scripts pass them (their ratio-0
    entries dropped): the conv indexing is the engine's."""
    mcunet = to_tte(_scheme(mcu, "mcunet-5fps", "49KB"))["backward_config"]
    assert (mcunet["n_bias_update"], mcunet["manual_weight_idx"],
            mcunet["weight_update_ratio"]) == (20, "24-27-30", "0.25-0.5-0.5")
    mbv2 = to_tte(_scheme(mcu, "mbv2-w0.35", "49KB"))["backward_config"]
    assert (mbv2["n_bias_update"], mbv2["manual_weight_idx"], mbv2["weight_update_ratio"]) == (
        16, "36-39-41-42-45-48-49", "1-1-0.25-0.125-0.125-0.125-0.125")


def test_a_ratio_the_engine_truncates_back_to_the_plans_channel_count():
    for width in range(1, 130):
        for k in range(1, width + 1):
            r = float(_fmt(_ratio(k, width)))  # as the engine reads the string back
            assert max(1, int(r * width)) == k, (k, width, r)
    assert _ratio(12, 48) == 0.25 and _ratio(5, 48) == pytest.approx(5 / 48, abs=1e-6)


def test_the_mit_selector_plans_export(mcu):
    m = mcu["mcunet-5fps"]
    for budget in (200, 300, 400):  # KB of training memory (device accounting, fp32)
        plan = select("mit", cost_model=m["cm"], budget_bytes=budget * 1024,
                      scores=m["scores"], memory_measure="training", head="weight")
        doc = to_tte(plan)
        assert doc["backward_config"]["n_bias_update"] >= 1
        assert doc["backward_config"]["freeze_fc"] == 0


def _edit(plan, **updates):
    new = dict(plan.updates)
    for name, u in updates.items():
        if u is None:
            new.pop(name, None)
        else:
            new[name] = u
    return plan.with_(updates=new)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p, c: p.with_(batch_size=8), r"made for batch 8; the engine trains at batch 1"),
    (lambda p, c: _edit(p, **{c[-1]: LayerUpdate("weight", patch_size=2)}),
     r"layer blocks\.\d+\.\w+: a gradient filter \(patch size 2\)"),
    (lambda p, c: _edit(p, **{c[-3]: None}), r"not one run ending at the last conv: "
                                              r"blocks\.\d+\.\w+ between"),
    (lambda p, c: _edit(p, classifier=LayerUpdate("bias")),
     r"layer classifier \(the classifier\): .* bias only"),
    (lambda p, c: _edit(p, **{c[-1]: LayerUpdate("weight", channels=(0, 1), axis="out")}),
     r"trains output channels; the engine trains input channels"),
    (lambda p, c: p.with_(model=None), r"the plan names no model"),
])
def test_what_the_engine_cannot_express_is_refused_by_name(mcu, change, message):
    convs = mcu_conv_names("mcunet-5fps")
    plan = change(_scheme(mcu, "mcunet-5fps", "99KB"), convs)
    with pytest.raises(ExportError, match=message) as info:
        to_tte(plan)
    if "batch" in message or "gradient filter" in message:
        assert "select --method mit-scheme" in str(info.value)


def test_a_kxk_conv_channel_subset_is_refused(mcu):
    plan = _scheme(mcu, "mcunet-5fps", "99KB")
    shapes = plan.layer_shapes
    kxk = next(n for n, s in shapes.items() if len(s) == 4 and s[1] > 1 and s[2] > 1)
    convs = mcu_conv_names("mcunet-5fps")
    run = {n: LayerUpdate("bias") for n in convs[convs.index(kxk):]}
    run[kxk] = LayerUpdate("weight", channels=(0,), axis="in")
    plan = plan.with_(updates={**run, "classifier": LayerUpdate("weight")})
    with pytest.raises(ExportError, match=rf"layer {kxk}: a channel subset on a \dx\d conv"):
        to_tte(plan)


def test_cli_export_writes_the_configuration(mcu, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    _scheme(mcu, "mbv2-w0.35", "73KB").save(plan_path)
    out = tmp_path / "tte.json"
    assert main(["export", "--plan", str(plan_path), "--format", "tte", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "budgetsearch-tte-sparse-update/1"
    assert doc["backward_config"]["n_bias_update"] == 20
    bad = _scheme(mcu, "mbv2-w0.35", "73KB").with_(batch_size=4)
    bad.save(plan_path)
    assert main(["export", "--plan", str(plan_path), "--format", "tte"]) == 2
    assert "batch 4" in capsys.readouterr().err
