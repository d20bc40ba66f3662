"""NEq's budgeted channel selection: per-parameter ranking with depthwise counts, parameter
budgets, and a bisection fill equal to the one-evaluation-per-channel greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import LayerScores, Scores, channel_param_counts, random_scores
from budgetsearch.plan import LayerUpdate
from budgetsearch.selectors import channel_params, select
from budgetsearch.selectors.base import SelectionContext

torch.set_num_threads(1)


class SmallNet(nn.Module):
    """A stem, an inverted-residual-like stack with a depthwise conv, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.expand(x))
        x = torch.relu(self.dw(x))
        x = self.project(x)
        return self.fc(x.mean(dim=(2, 3)))


def _uniform_scores(model: nn.Module) -> Scores:
    layers = {
        name: LayerScores(out_channel=np.ones(m.weight.shape[0]), in_channel=None, layer=1.0)
        for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    return Scores.for_model(model, criterion="neq", layers=layers)


@pytest.fixture(scope="module")
def mbv2():
    model = load_model("mobilenet_v2", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=64, model_name="mobilenet_v2")
    return model, graph, CostModel(graph, load_profile("stm32h743"))


def test_channel_params_count_k2_for_depthwise(mbv2):
    model, graph, _ = mbv2
    modules = dict(model.named_modules())
    depthwise = 0
    for name, layer in graph.layers.items():
        module = modules[name]
        has_bias = int(getattr(module, "bias", None) is not None)
        assert channel_params(layer) == channel_param_counts(module)[0] - has_bias
        if layer.groups > 1 and layer.groups == layer.in_channels:
            depthwise += 1
            assert channel_params(layer) == 9  # K², not C·K²
    assert depthwise == 17


def test_equal_scores_rank_depthwise_channels_first(mbv2):
    model, _graph, cm = mbv2
    scores = _uniform_scores(model)
    # one 3×3 depthwise layer of 32 channels = 288 weights; every other conv costs more
    plan = select("neq", cost_model=cm, budget_bytes=None, scores=scores, budget_params=288)
    body = {n: u for n, u in plan.updates.items() if n != plan.updated_layers[-1]}
    assert list(body) == ["features.1.conv.0.0"]
    assert body["features.1.conv.0.0"] == LayerUpdate("weight")
    assert plan.provenance["details"]["weight_params"] == 288


def test_budget_params_is_respected(mbv2):
    model, graph, cm = mbv2
    scores = random_scores(model, seed=1)
    for budget in (12_096, 52_480, 98_560):
        plan = select("neq", cost_model=cm, budget_bytes=None, scores=scores,
                      budget_params=budget)
        head = plan.updated_layers[-1]
        used = 0
        for name, update in plan.updates.items():
            if name == head:
                continue
            layer = graph.layers[name]
            kept = layer.out_channels if update.channels is None else len(update.channels)
            used += kept * channel_params(layer)
        assert used <= budget
        assert used == plan.provenance["details"]["weight_params"]
        assert budget - used < 2 * max(channel_params(graph.layers[n]) for n in graph.layers)


def test_fill_is_cheap(mbv2):
    model, _graph, cm = mbv2
    plan = select("neq", cost_model=cm, budget_bytes=512 * 1024, scores=random_scores(model))
    details = plan.provenance["details"]
    assert details["channels"] > 100
    assert plan.provenance["cost_evaluations"] < details["channels_ranked"] / 20


def _brute_greedy(ctx: SelectionContext, order: list[tuple[str, int]], base: dict) -> dict:
    """One evaluation per channel: take it if the plan still fits, else skip it."""
    chosen: dict[str, list[int]] = {}
    current = dict(base)
    for name, ch in order:
        trial_channels = sorted([*chosen.get(name, []), ch])
        width = ctx.graph.layers[name].out_channels
        update = (LayerUpdate("weight") if len(trial_channels) == width
                  else LayerUpdate("weight", channels=tuple(trial_channels)))
        trial = {**current, name: update}
        if ctx.fits(trial):
            current = trial
            chosen[name] = trial_channels
    return current


@pytest.mark.parametrize("budget", [3000, 6000, 12000, 30000])
def test_bisection_fill_equals_brute_force_greedy(budget):
    torch.manual_seed(0)
    model = SmallNet()
    graph = LayerGraph.from_model(model, input_size=16)
    cm = CostModel(graph, load_profile("stm32f746"))
    scores = random_scores(model, seed=2)
    plan = select("neq", cost_model=cm, budget_bytes=budget, scores=scores)
    ctx = SelectionContext(method="neq", cost_model=cm, budget_bytes=budget,
                           latency_budget_ms=None, scores=scores, seed=0,
                           memory_measure="peak")
    base, _ = ctx.start_with_head("auto")
    entries = []
    for name in ctx.body:
        per = channel_params(graph.layers[name])
        for ch, value in enumerate(scores[name].out_channel):
            entries.append((-value / per, len(entries), name, ch))
    order = [(name, ch) for _v, _i, name, ch in sorted(entries)]
    assert dict(plan.updates) == _brute_greedy(ctx, order, base)


def test_neq_is_a_pure_function_of_scores(mbv2):
    model, _, cm = mbv2
    a, b = random_scores(model, seed=5), random_scores(model, seed=6)
    pa = select("neq", cost_model=cm, budget_bytes=400 * 1024, scores=a)
    pb = select("neq", cost_model=cm, budget_bytes=400 * 1024, scores=b)
    assert pa.updates != pb.updates
    assert select("neq", cost_model=cm, budget_bytes=400 * 1024, scores=a).updates == pa.updates


def test_strict_prefix_takes_no_more_than_the_greedy_fill(mbv2):
    model, _, cm = mbv2
    scores = random_scores(model, seed=3)
    greedy = select("neq", cost_model=cm, budget_bytes=400 * 1024, scores=scores)
    prefix = select("neq", cost_model=cm, budget_bytes=400 * 1024, scores=scores, skip=False)
    assert (prefix.provenance["details"]["channels"]
            <= greedy.provenance["details"]["channels"])
