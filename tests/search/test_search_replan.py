"""Dynamic mode: re-planning with refreshed scores keeps the budget and follows the scores."""

from __future__ import annotations

import torch

from budgetsearch.criteria import random_scores
from budgetsearch.search import replan

torch.set_num_threads(1)
KB = 1024


def test_replan_from_a_previous_plan(mcunet: dict) -> None:
    first = replan(cost_model=mcunet["cm"], scores=random_scores(mcunet["model"], seed=0),
                   budget_bytes=99 * KB, memory_measure="training", trials=60,
                   population_size=20)
    scores = random_scores(mcunet["model"], seed=9)
    second = replan(cost_model=mcunet["cm"], scores=scores, budget_bytes=99 * KB,
                    memory_measure="training", trials=60, population_size=20, previous=first)
    assert mcunet["cm"].summarize(second).training_memory_bytes <= 99 * KB
    assert second.predicted["proxy"] > 0
