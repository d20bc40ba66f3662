"""The documented greedy rules of ``tinytrain`` (the K rule) and ``mit`` (depth and ratios):
kept channels are the top-scored ones, and nothing left out could still be added."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import LayerScores, Scores, fisher_potential, magnitude_scores
from budgetsearch.plan import LayerUpdate
from budgetsearch.selectors import ratio_update, select

torch.set_num_threads(1)
KB = 1024


@pytest.fixture(scope="module")
def mcunet() -> dict:
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name="mcunet-5fps")
    x, y = torch.randn(6, 3, 128, 128), torch.arange(6) % 10
    return {"model": model, "graph": graph, "cm": CostModel(graph, load_profile("stm32f746")),
            "fisher": fisher_potential(model, [(x, y)], micro_batch=6),
            "magnitude": magnitude_scores(model)}


def _fits(cm, updates, budget, measure="training") -> bool:
    s = cm.summarize(updates)
    return (s.training_memory_bytes if measure == "training" else s.peak_memory_bytes) <= budget


def _top(values: np.ndarray, k: int) -> tuple[int, ...]:
    return tuple(sorted(np.lexsort((np.arange(len(values)), -values))[:k].tolist()))


@pytest.mark.parametrize("budget", [40 * KB, 90 * KB, 160 * KB])
def test_tinytrain_k_rule(mcunet, budget):
    cm, graph, fisher = mcunet["cm"], mcunet["graph"], mcunet["fisher"]
    plan = select("tinytrain", cost_model=cm, budget_bytes=budget, scores=fisher,
                  memory_measure="training")
    details = plan.provenance["details"]
    updates = dict(plan.updates)
    head = list(graph.layers)[-1]
    assert {c["layer"] for c in details["chosen"]} == set(updates) - {head}
    ratios = [1.0, 0.5, 0.25, 0.125]
    for entry in details["chosen"]:
        name, ratio = entry["layer"], entry["ratio"]
        width = graph.layers[name].out_channels
        update = updates[name]
        k = math.ceil(ratio * width)
        if k == width:
            assert update == LayerUpdate("weight")
        else:  # the top-K output channels by Fisher Δ_o
            assert update.channels == _top(fisher[name].out_channel, k)
            bigger = [r for r in ratios if math.ceil(r * width) > k]
            if bigger:  # the next larger K did not fit then, so cannot fit now
                k2 = math.ceil(min(bigger) * width)
                up = (LayerUpdate("weight") if k2 == width else LayerUpdate(
                    "weight", channels=_top(fisher[name].out_channel, k2)))
                assert not _fits(cm, {**updates, name: up}, budget)
    for name in details["skipped"]:  # not even the smallest K fits (or zero potential)
        if fisher[name].layer <= 0:
            continue
        width = graph.layers[name].out_channels
        k = max(1, math.ceil(0.125 * width))
        small = LayerUpdate("weight", channels=_top(fisher[name].out_channel, k))
        assert not _fits(cm, {**updates, name: small}, budget)
    scores = [c["score"] for c in details["chosen"]]
    assert scores == sorted(scores, reverse=True)  # added in TinyTrain's s_l order


def test_tinytrain_without_budget_takes_every_scored_layer_whole(mcunet):
    model, cm = mcunet["model"], mcunet["cm"]
    layers = {}
    for name, ls in mcunet["fisher"].layers.items():
        zero = name == "blocks.3.depthwise"
        layers[name] = LayerScores(ls.out_channel * (0 if zero else 1), ls.in_channel,
                                   0.0 if zero else ls.layer)
    scores = Scores.for_model(model, criterion="fisher", layers=layers)
    plan = select("tinytrain", cost_model=cm, budget_bytes=None, scores=scores)
    assert "blocks.3.depthwise" not in plan.updates  # zero potential: skipped
    assert all(u == LayerUpdate("weight") for u in plan.updates.values())
    assert len(plan.updates) == len(mcunet["graph"].layers) - 1


@pytest.mark.parametrize(("key", "budget"), [("magnitude", 50 * KB), ("magnitude", 120 * KB),
                                             ("fisher", 80 * KB)])
def test_mit_greedy_rule(mcunet, key, budget):
    cm, graph, scores = mcunet["cm"], mcunet["graph"], mcunet[key]
    plan = select("mit", cost_model=cm, budget_bytes=budget, scores=scores,
                  memory_measure="training")
    details = plan.provenance["details"]
    assert details["gain"] == key
    body = list(graph.layers)[:-1]
    depth = details["depth"]
    suffix = body[len(body) - depth:] if depth else []
    updates = dict(plan.updates)
    assert set(updates) - {list(graph.layers)[-1]} == set(suffix)  # biases: the last k layers
    steps = [0.125, 0.25, 0.5, 1.0]
    chosen = dict(item.split("@") for item in details["weights"])
    for name in suffix:
        update = updates[name]
        ratio = float(chosen.get(name, 0))
        expected = ratio_update(graph, name, ratio, scores[name].in_channel)
        assert update == expected, name  # magnitude+ (or Δ) top input channels
        larger = [r for r in steps if r > ratio]
        if larger:  # the greedy stopped this layer because its next step did not fit
            up = ratio_update(graph, name, min(larger), scores[name].in_channel)
            assert not _fits(cm, {**updates, name: up}, budget), name


def test_mit_without_budget_updates_everything(mcunet):
    plan = select("mit", cost_model=mcunet["cm"], budget_bytes=None,
                  scores=mcunet["magnitude"])
    assert all(u == LayerUpdate("weight") for u in plan.updates.values())
    assert len(plan.updates) == len(mcunet["graph"].layers)
