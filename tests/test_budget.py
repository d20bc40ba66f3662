"""Budget: which memory figure it limits, whether a cost fits, and the one "too small" message;
the selectors, the search, the trainer's check and the command line measure plans through it."""

from __future__ import annotations

import dataclasses
import math

import pytest
from _toys import small_cnn

from budgetsearch import Budget, CostModel, LayerGraph, load_profile
from budgetsearch.choices import MEMORY_MEASURES
from budgetsearch.cost import CostSummary
from budgetsearch.errors import BudgetError, PlanError, SearchError
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.selectors import select
from budgetsearch.units import format_kb

KB = 1024
# peak 150 KB, training (peak minus the inference peak) 60 KB, 42 ms per step
SUMMARY = CostSummary(peak_memory_bytes=150 * KB, training_memory_bytes=60 * KB,
                      saved_activation_bytes=40 * KB, forward_macs=10**7, backward_macs=2 * 10**7,
                      latency_ms=42.0, trainable_params=3_000, backward_ms=20.0)
USED = {"peak": 150 * KB, "training": 60 * KB}


@pytest.fixture(scope="module")
def toy() -> dict:
    model = small_cnn()
    graph = LayerGraph.from_model(model, input_size=16)
    cm = CostModel(graph, load_profile("stm32h743"), batch_size=2)
    return {"model": model, "graph": graph, "cm": cm, "head": graph.layer_names[-1]}


@pytest.mark.parametrize("measure", MEMORY_MEASURES)
def test_reads_its_measure_and_fits_up_to_the_byte(measure):
    used = USED[measure]
    assert Budget(memory_bytes=used, measure=measure).field == f"{measure}_memory_bytes"
    assert Budget(memory_bytes=used, measure=measure).memory(SUMMARY) == used
    assert Budget(memory_bytes=used, measure=measure).fits(SUMMARY)
    assert Budget(memory_bytes=used, measure=measure).why_not(SUMMARY) is None
    over = Budget(memory_bytes=used - 1, measure=measure)
    assert not over.fits(SUMMARY) and not over.fits_memory(SUMMARY) and over.fits_latency(SUMMARY)
    why = over.why_not(SUMMARY)
    assert f"{used} bytes ({format_kb(used)}) of {measure} memory" in why
    assert f"memory budget of {used - 1} bytes ({format_kb(used - 1)})" in why
    assert "ms" not in why
    assert Budget(measure=measure).fits(SUMMARY)  # no memory limit


def test_the_other_measure_is_not_what_is_limited():
    # 100 KB: the training memory (60 KB) fits, the peak (150 KB) does not
    assert Budget(memory_bytes=100 * KB, measure="training").fits(SUMMARY)
    assert not Budget(memory_bytes=100 * KB, measure="peak").fits(SUMMARY)


def test_latency_fits_and_does_not_fit():
    assert Budget(latency_ms=42.0).fits(SUMMARY)
    slow = Budget(memory_bytes=200 * KB, latency_ms=40.0)
    assert slow.fits_memory(SUMMARY) and not slow.fits_latency(SUMMARY) and not slow.fits(SUMMARY)
    assert slow.why_not(SUMMARY) == ("it takes 42 ms per step, over the latency budget of 40 ms")
    both = Budget(memory_bytes=100 * KB, latency_ms=40.0)
    why = both.why_not(SUMMARY)
    assert "of peak memory" in why and "latency budget of 40 ms" in why


def test_excess_is_relative_to_each_budget_set():
    assert Budget().excess(SUMMARY) == {}
    excess = Budget(memory_bytes=100 * KB, latency_ms=84.0).excess(SUMMARY)
    assert excess == {"memory": 0.5, "latency": -0.5}
    assert Budget(memory_bytes=60 * KB, measure="training").excess(SUMMARY) == {"memory": 0.0}
    assert Budget(memory_bytes=0).excess(SUMMARY) == {"memory": math.inf}


def test_reads_a_full_cost_and_a_plans_predicted_mapping(toy):
    cm, head = toy["cm"], toy["head"]
    updates = {head: LayerUpdate("weight")}
    full, summary = cm.evaluate(updates), cm.summarize(updates)
    for measure in MEMORY_MEASURES:
        budget = Budget(memory_bytes=10**9, measure=measure)
        assert budget.memory(full) == budget.memory(summary)
        assert budget.memory(dataclasses.asdict(summary)) == budget.memory(summary)
    assert Budget(latency_ms=1e9).fits(dataclasses.asdict(summary))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"measure": "inference"}, "memory_measure must be one of peak, training; got 'inference'"),
    ({"memory_bytes": -1}, "memory budget must be a finite number of bytes >= 0"),
    ({"memory_bytes": math.nan}, "memory budget must be a finite number of bytes >= 0"),
    ({"memory_bytes": math.inf}, "memory budget must be a finite number of bytes >= 0; got inf"),
    ({"latency_ms": -0.5}, "latency budget must be a finite number of ms >= 0; got -0.5"),
    ({"latency_ms": math.nan}, "latency budget must be a finite number of ms >= 0; got nan"),
    ({"memory_bytes": "99KB"}, "memory budget must be a finite number of bytes >= 0; got '99KB'"),
    ({"latency_ms": "5ms"}, "latency budget must be a finite number of ms >= 0; got '5ms'"),
])
def test_refuses_bad_values(kwargs, match):
    with pytest.raises(PlanError, match=match):
        Budget(**kwargs)


def test_an_int_too_large_for_a_float_is_a_budget_not_a_crash():
    assert Budget(memory_bytes=10**400).memory_bytes == 10**400  # math.isfinite overflowed
    with pytest.raises(PlanError, match="latency budget must be a finite number of ms"):
        Budget(latency_ms=10**400)  # float() overflowed


def test_numpy_numbers_are_numbers():
    import numpy as np

    budget = Budget(memory_bytes=np.int64(1024), latency_ms=np.float32(5))
    assert (budget.memory_bytes, budget.latency_ms) == (1024, 5.0)
    assert type(budget.memory_bytes) is int and type(budget.latency_ms) is float
    with pytest.raises(PlanError, match="memory budget must be"):
        Budget(memory_bytes=np.bool_(True))


def test_values_are_normalised_and_keyword_only():
    budget = Budget(memory_bytes=1024.0, latency_ms=5)
    assert budget.memory_bytes == 1024 and type(budget.memory_bytes) is int
    assert type(budget.latency_ms) is float
    with pytest.raises(TypeError):
        Budget(1024)  # type: ignore[misc]
    assert Budget(memory_bytes=64 * KB, measure="training", latency_ms=50).describe() == (
        "65536 bytes (64.0 KB) of training memory and 50 ms per step")
    assert Budget().describe() == "no limit"


@pytest.mark.parametrize("measure", MEMORY_MEASURES)
def test_too_small_names_the_measure_the_bytes_and_the_budget(measure):
    err = Budget(memory_bytes=1000, measure=measure).too_small(
        need_bytes=5000, need_ms=3.0, who="method x", cheapest="the classifier's bias alone")
    assert isinstance(err, BudgetError) and err.minimum_bytes == 5000
    text = str(err)
    assert text.startswith("method x: no plan fits the memory budget of 1000 bytes (1.0 KB) of "
                           f"{measure} memory;")
    assert f"needs at least 5000 bytes (4.9 KB) of {measure} memory" in text
    assert "(the cheapest: the classifier's bias alone)" in text
    assert text.endswith("the minimum feasible memory budget is 5000 bytes (4.9 KB)")
    assert "ms" not in text  # no latency budget: the latency is not the problem


def test_too_small_for_latency():
    err = Budget(memory_bytes=10_000, latency_ms=2.0).too_small(
        need_bytes=5000, need_ms=3.0, who="the search space")
    text = str(err)
    assert "no plan fits the latency budget of 2 ms per step;" in text
    assert "needs at least 5000 bytes (4.9 KB) of peak memory and 3 ms per step" in text
    assert "the minimum feasible latency budget 3 ms" in text
    assert err.minimum_bytes == 5000


def test_from_plan_and_kwargs_round_trip_through_select(toy):
    cm, head = toy["cm"], toy["head"]
    need = cm.summarize({head: LayerUpdate("bias")}).training_memory_bytes
    budget = Budget(memory_bytes=need, measure="training", latency_ms=1e6)
    plan = select("tinytl", cost_model=cm, **budget.kwargs())
    assert Budget.from_plan(plan) == budget
    assert plan.provenance["memory_bytes"] == budget.memory(plan.predicted) <= need
    assert Budget.from_plan(Plan.full(toy["graph"])) == Budget()


def test_selectors_and_search_share_the_message(toy):
    from budgetsearch.criteria import random_scores
    from budgetsearch.search import Search

    cm = toy["cm"]
    with pytest.raises(BudgetError) as by_select:
        select("tinytl", cost_model=cm, budget_bytes=10, memory_measure="training")
    with pytest.raises(BudgetError) as by_search:
        Search(cost_model=cm, scores=random_scores(toy["model"]), budget_bytes=10,
               memory_measure="training")
    for info, who in ((by_select, "method tinytl: "), (by_search, "the search space: ")):
        text = str(info.value)
        assert text.startswith(who + "no plan fits the memory budget of 10 bytes (0.1 KB) of "
                               "training memory; a non-empty plan needs at least ")
        assert f"minimum feasible memory budget is {info.value.minimum_bytes} bytes" in text
    # the search keeps its own error class for its arguments
    with pytest.raises(SearchError, match="memory_measure must be one of peak, training"):
        Search(cost_model=cm, scores=random_scores(toy["model"]), budget_bytes=10**9,
               memory_measure="inference")


def test_trainer_check_names_the_measure(toy):
    from budgetsearch.trainer.checks import check_budget

    cm, head = toy["cm"], toy["head"]
    updates = {head: LayerUpdate("weight")}
    used = cm.summarize(updates).training_memory_bytes
    plan = Plan.from_layers(toy["graph"], updates, device="stm32h743", batch_size=2,
                            memory_budget_bytes=used, provenance={"memory_measure": "training"})
    assert check_budget(plan, cm) == {"memory_bytes": used, "budget_bytes": used,
                                      "measure": "training"}
    tight = dataclasses.replace(plan, memory_budget_bytes=used - 1)
    with pytest.raises(BudgetError, match=f"{used} bytes .* of training memory, over the memory "
                                          f"budget of {used - 1} bytes") as info:
        check_budget(tight, CostModel(toy["graph"], load_profile("stm32h743"), batch_size=4))
    assert "batch size 4" in str(info.value) and "made for batch size 2" in str(info.value)


@pytest.mark.parametrize("module", ["budgetsearch.budget", "budgetsearch.choices"])
def test_module_examples_run(module):
    import doctest
    import importlib

    results = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 3 and results.failed == 0


def test_the_evaluator_and_the_selection_context_read_their_budget_in_one_place():
    """budget_bytes, latency_budget_ms and memory_measure are HasBudget's, read from .budget."""
    from budgetsearch.budget import HasBudget
    from budgetsearch.search import Evaluator
    from budgetsearch.selectors.base import SelectionContext

    for cls in (Evaluator, SelectionContext):
        assert issubclass(cls, HasBudget)
        assert not {"budget_bytes", "latency_budget_ms", "memory_measure"} & set(vars(cls))
