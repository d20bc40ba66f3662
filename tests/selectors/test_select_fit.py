"""Every selector's plan fits its budget by the cost model, is reproducible, and refuses budgets
below its cheapest plan with the minimum stated."""

from __future__ import annotations

import re

import pytest
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch._version import __version__
from budgetsearch.criteria import fisher_potential, magnitude_scores, random_scores
from budgetsearch.errors import BudgetError, PlanError, ScoresError
from budgetsearch.plan import Plan
from budgetsearch.selectors import list_methods, select

torch.set_num_threads(1)

KB = 1024


def _setup(name: str, size: int, device: str) -> dict:
    torch.manual_seed(0)
    model = load_model(name, num_classes=10)
    graph = LayerGraph.from_model(model, input_size=size, model_name=name)
    x = torch.randn(8, 3, size, size)
    y = torch.arange(8) % 10
    fisher = fisher_potential(model, [(x, y)], micro_batch=8)
    return {
        "model": model,
        "graph": graph,
        "cm": CostModel(graph, load_profile(device)),
        "scores": {"fisher": fisher, "magnitude": magnitude_scores(model)},
    }


@pytest.fixture(scope="module")
def mbv2() -> dict:
    return _setup("mobilenet_v2", 64, "stm32h743")


@pytest.fixture(scope="module")
def mcunet() -> dict:
    return _setup("mcunet-5fps", 128, "stm32f746")


# (method, scores key, options)
CASES = [
    ("tinytl", None, {}),
    ("last-k", None, {}),
    ("last-k", None, {"blocks": True, "patch_size": 2}),
    ("random", None, {}),
    ("neq", "fisher", {}),
    ("tinytrain", "fisher", {}),
    ("mit", "magnitude", {}),
    ("mit", "fisher", {}),
]
# (setup fixture, memory measure, budgets in bytes)
SETTINGS = [
    ("mbv2", "peak", (256 * KB, 512 * KB, 1024 * KB)),
    ("mcunet", "training", (48 * KB, 96 * KB, 192 * KB)),
]


def _measured(cm: CostModel, plan: Plan, measure: str) -> int:
    summary = cm.summarize(plan)
    return summary.peak_memory_bytes if measure == "peak" else summary.training_memory_bytes


@pytest.mark.parametrize(("setup", "measure", "budgets"), SETTINGS)
@pytest.mark.parametrize(("method", "scores", "options"), CASES)
def test_plans_fit_and_are_reproducible(request, setup, measure, budgets, method, scores,
                                        options):
    s = request.getfixturevalue(setup)
    cm = s["cm"]
    sc = s["scores"][scores] if scores else None
    previous = None
    for budget in budgets:
        plan = select(method, cost_model=cm, budget_bytes=budget, scores=sc, seed=3,
                      memory_measure=measure, **options)
        assert _measured(cm, plan, measure) <= budget
        assert plan.predicted == cm.summarize(plan).__dict__
        assert plan.device == cm.profile.name and plan.memory_budget_bytes == budget
        assert plan.batch_size == cm.batch and plan.optimizer == cm.optimizer
        prov = plan.provenance
        assert prov["method"] == method and prov["seed"] == 3
        assert prov["budgetsearch_version"] == __version__
        assert prov["fits"] is True
        assert set(options) <= set(prov["options"])
        assert list(s["graph"].layers)[-1] in plan.updates  # the classifier is always updated
        if previous is None:
            again = select(method, cost_model=cm, budget_bytes=budget, scores=sc, seed=3,
                           memory_measure=measure, **options)
            assert again.to_dict() == plan.to_dict()
        assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
        memory = _measured(cm, plan, measure)
        if previous is not None:  # a larger budget is used at least as much, roughly
            assert memory >= previous * 0.5
        previous = memory


@pytest.mark.parametrize(("setup", "measure"), [("mbv2", "peak"), ("mcunet", "training")])
@pytest.mark.parametrize(("method", "scores", "options"), CASES)
def test_infeasible_budget_states_the_minimum(request, setup, measure, method, scores, options):
    s = request.getfixturevalue(setup)
    cm = s["cm"]
    sc = s["scores"][scores] if scores else None
    with pytest.raises(BudgetError) as info:
        select(method, cost_model=cm, budget_bytes=0, scores=sc, memory_measure=measure,
               **options)
    err = info.value
    assert err.minimum_bytes is not None and err.minimum_bytes > 0
    assert f"{err.minimum_bytes} bytes" in str(err)
    assert re.search(r"\d+\.\d KB", str(err))
    plan = select(method, cost_model=cm, budget_bytes=err.minimum_bytes, scores=sc,
                  memory_measure=measure, **options)
    assert _measured(cm, plan, measure) <= err.minimum_bytes
    with pytest.raises(BudgetError):
        select(method, cost_model=cm, budget_bytes=err.minimum_bytes - 1, scores=sc,
               memory_measure=measure, **options)


def test_minimum_is_the_classifier_bias_for_budgeted_methods(mcunet):
    cm = mcunet["cm"]
    head = list(mcunet["graph"].layers)[-1]
    from budgetsearch.plan import LayerUpdate

    bias_only = cm.summarize({head: LayerUpdate("bias")}).peak_memory_bytes
    for method, key in (("tinytrain", "fisher"), ("neq", "fisher"), ("mit", "magnitude"),
                        ("random", None), ("tinytl", None)):
        with pytest.raises(BudgetError) as info:
            select(method, cost_model=cm, budget_bytes=bias_only - 1,
                   scores=mcunet["scores"][key] if key else None)
        assert info.value.minimum_bytes == bias_only


def test_latency_budget_is_met(mbv2):
    cm = mbv2["cm"]
    loose = select("tinytl", cost_model=cm, budget_bytes=1024 * KB)
    limit = loose.predicted["latency_ms"] * 0.9
    for method, key in (("tinytl", None), ("random", None), ("neq", "fisher"),
                        ("tinytrain", "fisher"), ("mit", "magnitude"), ("last-k", None)):
        plan = select(method, cost_model=cm, budget_bytes=1024 * KB, latency_budget_ms=limit,
                      scores=mbv2["scores"][key] if key else None)
        assert plan.predicted["latency_ms"] <= limit
        assert plan.latency_budget_ms == limit


def test_random_depends_on_the_seed(mcunet):
    cm = mcunet["cm"]
    a = select("random", cost_model=cm, budget_bytes=96 * KB, seed=0, memory_measure="training")
    b = select("random", cost_model=cm, budget_bytes=96 * KB, seed=1, memory_measure="training")
    assert a.updates != b.updates


def test_full_ignores_the_budget_and_records_the_fit(mbv2):
    cm = mbv2["cm"]
    small = select("full", cost_model=cm, budget_bytes=64 * KB)
    assert small.provenance["fits"] is False
    assert len(small.updates) == len(mbv2["graph"].layers)
    big = select("full", cost_model=cm, budget_bytes=None)
    assert big.provenance["fits"] is True


def test_last_k_explicit_k(mbv2):
    cm = mbv2["cm"]
    plan = select("last-k", cost_model=cm, budget_bytes=None, k=3)
    assert plan.updated_layers == list(mbv2["graph"].layers)[-3:]
    with pytest.raises(BudgetError) as info:
        select("last-k", cost_model=cm, budget_bytes=200 * KB, k=20)
    assert info.value.minimum_bytes > 200 * KB
    with pytest.raises(PlanError, match="between 1 and"):
        select("last-k", cost_model=cm, budget_bytes=None, k=0)


def test_tinytl_is_every_bias_when_it_fits(mbv2):
    plan = select("tinytl", cost_model=mbv2["cm"], budget_bytes=None)
    names = list(mbv2["graph"].layers)
    assert plan.updated_layers == names
    assert all(plan.updates[n].mode == "bias" for n in names[:-1])
    assert plan.updates[names[-1]].mode == "weight"
    assert plan.provenance["details"]["complete"] is True


def test_errors_name_methods_and_options(mbv2):
    cm = mbv2["cm"]
    with pytest.raises(PlanError) as info:
        select("bogus", cost_model=cm, budget_bytes=None)
    for name in list_methods():
        assert name in str(info.value)
    with pytest.raises(PlanError, match="unknown option"):
        select("tinytl", cost_model=cm, budget_bytes=None, k=3)
    with pytest.raises(ScoresError, match="needs scores"):
        select("tinytrain", cost_model=cm, budget_bytes=None)
    with pytest.raises(PlanError, match="memory_measure"):
        select("tinytl", cost_model=cm, budget_bytes=None, memory_measure="rss")


def test_scores_of_another_model_are_refused(mbv2, mcunet):
    other = random_scores(mcunet["model"])
    with pytest.raises(ScoresError, match="another model"):
        select("neq", cost_model=mbv2["cm"], budget_bytes=None, scores=other)


def test_head_bias_on_a_classifier_without_bias_is_a_named_error():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2, bias=False))
    graph = LayerGraph.from_model(net, input_size=8)
    cm = CostModel(graph, load_profile("stm32f746"))
    with pytest.raises(PlanError, match=r"head bias: the classifier 4 has no bias to train "
                                        r"alone; use head weight or auto"):
        select("tinytl", cost_model=cm, budget_bytes=10**6, head="bias")
    plan = select("tinytl", cost_model=cm, budget_bytes=10**6, head="auto")
    assert plan.updates["4"].mode == "weight"  # auto falls back to the weight
