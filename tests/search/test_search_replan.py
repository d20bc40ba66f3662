"""Dynamic mode: re-planning with refreshed scores keeps the budget and follows the scores."""

from __future__ import annotations

import pytest
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import random_scores
from budgetsearch.search import Replanner, replan

torch.set_num_threads(1)
KB = 1024


@pytest.fixture(scope="module")
def mcu() -> dict:
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name="mcunet-5fps")
    return {"model": model, "cm": CostModel(graph, load_profile("stm32h743"))}


def test_replanner_keeps_the_budget_as_scores_change(mcu: dict) -> None:
    planner = Replanner(cost_model=mcu["cm"], budget_bytes=64 * KB, memory_measure="training",
                        trials=60, population_size=20, baselines=False)
    plans = [planner.update(random_scores(mcu["model"], seed=s)) for s in range(3)]
    for i, plan in enumerate(plans):
        cost = mcu["cm"].evaluate(plan, detail=False)
        assert cost.training_memory_bytes <= 64 * KB
        assert plan.provenance["replan"]["step"] == i
    assert plans[1].provenance["replan"]["seeded_with"] >= 1
    # channels follow the new scores: some layer keeps other channels
    common = [n for n in plans[0].updates if n in plans[1].updates
              and plans[0].updates[n].channels is not None]
    assert plans[0].updates != plans[1].updates or not common
    assert len(planner.history) == 3


def test_replan_from_a_previous_plan(mcu: dict) -> None:
    first = replan(cost_model=mcu["cm"], scores=random_scores(mcu["model"], seed=0),
                   budget_bytes=99 * KB, memory_measure="training", trials=60,
                   population_size=20)
    scores = random_scores(mcu["model"], seed=9)
    second = replan(cost_model=mcu["cm"], scores=scores, budget_bytes=99 * KB,
                    memory_measure="training", trials=60, population_size=20, previous=first)
    assert mcu["cm"].evaluate(second, detail=False).training_memory_bytes <= 99 * KB
    assert second.predicted["proxy"] > 0
