"""The search in memory: chosen plans fit their budgets by the cost model and beat every
baseline's proxy; baselines are in the study; infeasible trials are kept; same seed, same plan."""

from __future__ import annotations

import pytest
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import magnitude_scores, random_scores
from budgetsearch.errors import BudgetError
from budgetsearch.plan import Plan
from budgetsearch.search import Search, SpaceOptions

torch.set_num_threads(1)
KB = 1024


def _setup(name: str, size: int) -> dict:
    torch.manual_seed(0)
    model = load_model(name, num_classes=10)
    graph = LayerGraph.from_model(model, input_size=size, model_name=name)
    return {"model": model, "graph": graph, "cm": CostModel(graph, load_profile("stm32h743")),
            "magnitude": magnitude_scores(model), "random": random_scores(model, seed=0)}


@pytest.fixture(scope="module")
def mcu(mcunet: dict) -> dict:
    return {**mcunet, "magnitude": magnitude_scores(mcunet["model"]),
            "random": random_scores(mcunet["model"], seed=0)}


def _check_result(setup: dict, result, budget: int, measure: str, beat: bool = True) -> None:
    """The plan fits by the cost model; with ``beat``, its proxy is >= every feasible
    baseline's, and every baseline is Pareto-dominated (proxy, memory) by a front point."""
    plan = result.plan
    Plan.from_dict(plan.to_dict())  # schema-valid
    cost = setup["cm"].summarize(plan)
    memory = cost.peak_memory_bytes if measure == "peak" else cost.training_memory_bytes
    assert memory <= budget
    assert memory == plan.provenance["memory_bytes"]
    assert plan.predicted["latency_ms"] == pytest.approx(cost.latency_ms)
    proxy = plan.predicted["proxy"]
    assert proxy == pytest.approx(result.trial.values[0])
    for name, entry in result.baselines.items():
        m = entry["metrics"]
        if m is None or not m["feasible"]:
            continue
        assert m["memory_bytes"] <= budget, name
        assert not beat or proxy >= m["proxy"] - 1e-12, (name, proxy, m["proxy"])
        # and some point of the front has at least its proxy at no more memory
        assert not beat or any(t.values[0] >= m["proxy"] - 1e-12 and
                               t.values[1] <= m["memory_bytes"] for t in result.front), name
        assert plan.provenance["baselines"][name]["proxy_gain"] == pytest.approx(
            proxy - m["proxy"])


@pytest.mark.parametrize(("budget", "measure"), [
    (49 * KB, "training"), (99 * KB, "training"), (148 * KB, "training"),
    (256 * KB, "training"), (1024 * KB, "peak"),
])
def test_chosen_plan_fits_and_beats_the_baselines(mcu: dict, budget: int, measure: str) -> None:
    search = Search(cost_model=mcu["cm"], scores=mcu["magnitude"], budget_bytes=budget,
                    memory_measure=measure, seed=0, population_size=30)
    result = search.run(n_trials=90)
    _check_result(mcu, result, budget, measure)
    # the warm-start baselines are trials of the study
    in_study = {t.user_attrs.get("baseline") for t in result.trials} - {None}
    with_plan = {n for n, e in result.baselines.items() if e["metrics"] is not None}
    assert with_plan and with_plan <= in_study
    assert {"tinytrain", "neq", "mit", "tinytl", "last-k", "last-k-filtered"} == set(
        result.baselines)
    # infeasible trials are kept, with their constraint values
    assert any(t.constraints["memory"] > 0 for t in result.trials)
    assert len(result.trials) == 90


def test_same_seed_same_plan(mcu: dict) -> None:
    def run(seed: int):
        s = Search(cost_model=mcu["cm"], scores=mcu["random"], budget_bytes=99 * KB,
                   memory_measure="training", seed=seed, population_size=20)
        return s.run(n_trials=70)

    a, b = run(3), run(3)
    assert a.plan.updates == b.plan.updates
    assert a.trial.number == b.trial.number
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert a.plan.provenance["seed"] == 3 and a.plan.provenance["sampler"] == "nsga2"


def test_latency_budget_and_macs_objective(mcu: dict) -> None:
    full = mcu["cm"].summarize(Plan.full(mcu["graph"])).latency_ms
    base = mcu["cm"].summarize({}).latency_ms
    limit = base + 0.3 * (full - base)
    search = Search(cost_model=mcu["cm"], scores=mcu["random"], budget_bytes=148 * KB,
                    latency_budget_ms=limit, memory_measure="training", third="macs")
    result = search.run(n_trials=60)
    cost = mcu["cm"].summarize(result.plan)
    assert cost.latency_ms <= limit
    assert result.objective_names[2] == "backward_macs"
    assert result.trial.values[2] == cost.backward_macs
    assert set(result.trial.constraints) == {"memory", "latency"}


def test_budget_error_before_any_study(mcu: dict, tmp_path) -> None:
    with pytest.raises(BudgetError, match="minimum feasible memory budget") as info:
        Search(cost_model=mcu["cm"], scores=mcu["random"], budget_bytes=20,
               memory_measure="training")
    assert info.value.minimum_bytes > 20
    with pytest.raises(BudgetError, match="minimum feasible"):  # below the inference peak
        Search(cost_model=mcu["cm"], scores=mcu["random"], budget_bytes=256 * KB)


def test_pick_rule_and_block_space(mcu: dict) -> None:
    search = Search(cost_model=mcu["cm"], scores=mcu["magnitude"], budget_bytes=148 * KB,
                    memory_measure="training", space=SpaceOptions(granularity="block"),
                    population_size=20)
    best = search.run(n_trials=60)
    lean = search.run(n_trials=60, pick_rule="min-memory-within 5%")
    assert lean.plan.predicted["proxy"] >= 0.95 * best.plan.predicted["proxy"] - 1e-12
    assert lean.plan.provenance["memory_bytes"] <= best.plan.provenance["memory_bytes"]
    assert lean.plan.provenance["pick"] == "min-memory-within 5%"
    # block units cannot express the baselines' per-layer choices: no dominance claim there
    _check_result(mcu, best, 148 * KB, "training", beat=False)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_other_samplers_on_a_small_space(mcu: dict, sampler: str) -> None:
    search = Search(cost_model=mcu["cm"], scores=mcu["random"], budget_bytes=99 * KB,
                    memory_measure="training", sampler=sampler,
                    space=SpaceOptions(last_n=6), seed=1)
    result = search.run(n_trials=60)
    _check_result(mcu, result, 99 * KB, "training", beat=False)  # the last 6 layers only
    assert result.plan.provenance["sampler"] == sampler


@pytest.mark.slow
@pytest.mark.parametrize(("budget", "measure"), [
    (49 * KB, "training"), (99 * KB, "training"), (148 * KB, "training"),
    (256 * KB, "training"), (1024 * KB, "peak"),
])
def test_mobilenet_v2_beats_the_baselines(budget: int, measure: str) -> None:
    setup = _setup("mobilenet_v2", 128)
    search = Search(cost_model=setup["cm"], scores=setup["magnitude"], budget_bytes=budget,
                    memory_measure=measure)
    _check_result(setup, search.run(n_trials=600), budget, measure)


@pytest.mark.slow
def test_gp_sampler_runs_when_scipy_is_there(mcu: dict) -> None:
    pytest.importorskip("scipy", reason="the gp sampler needs scipy (budgetsearch[gp])")
    search = Search(cost_model=mcu["cm"], scores=mcu["random"], budget_bytes=99 * KB,
                    memory_measure="training", sampler="gp", space=SpaceOptions(last_n=3),
                    population_size=8, local_search=False)
    result = search.run(n_trials=18)
    _check_result(mcu, result, 99 * KB, "training", beat=False)
