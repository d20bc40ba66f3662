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


def test_channel_counts_of_ratios_are_not_off_by_one_from_rounding():
    """0.07 × 100 is 7.000000000000001 and 0.29 × 100 is 28.999999999999996 in floating point:
    TinyTrain keeps 7 of 100 output channels (ceil), the MIT scheme 29 of 100 inputs (floor)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 100, 1),
                          nn.ReLU(), nn.Conv2d(100, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    graph = LayerGraph.from_model(model, input_size=8)
    cm = CostModel(graph, load_profile("stm32f746"))
    scores = fisher_potential(model, [(torch.randn(4, 3, 8, 8), torch.arange(4) % 3)])
    plan = select("tinytrain", cost_model=cm, budget_bytes=None, scores=scores, ratios=(0.07,))
    kept = {c["layer"]: c["channels"] for c in plan.provenance["details"]["chosen"]}
    assert kept["2"] == 7
    update = ratio_update(graph, "4", 0.29, magnitude_scores(model)["4"].in_channel)
    assert len(update.channels) == 29


def test_layer_macs_of_a_linear_layer_on_tokens():
    """A linear layer on (N, T, F) tokens does T × in × out MACs, not F × in × out."""
    from torch import nn

    from budgetsearch.selectors import layer_macs

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.proj = nn.Linear(8, 12)
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)  # (N, 16 tokens, 8)
            return self.head(self.proj(t).mean(1))

    graph = LayerGraph.from_model(Tokens(), input_size=4)
    assert layer_macs(graph, graph.layers["proj"]) == 16 * 8 * 12
    assert layer_macs(graph, graph.layers["head"]) == 12 * 2
    assert layer_macs(graph, graph.layers["conv"]) == 16 * 3 * 8
