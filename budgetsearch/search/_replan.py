"""Dynamic mode: re-plan during training with refreshed scores, under the same budgets.

:func:`replan` is the re-planning function a trainer receives (the trainer's ``search_replan``,
see :mod:`budgetsearch.trainer.dynamic`): every k epochs it is called with scores computed on the
current weights (Fisher potential, or NEq velocities as per-output-channel scores) and runs a short
in-memory search seeded with the plan in use (re-decoded under the new scores, so its channels
follow the new ranking); it returns the best feasible plan. Budgets, space and proxy definition
stay fixed across calls, so every plan fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..cost import CostModel
from ..criteria import Scores
from ..plan import Plan
from ._study import Search

__all__ = ["replan"]


def replan(
    *,
    cost_model: CostModel,
    scores: Scores,
    budget_bytes: int | None,
    previous: Plan | Mapping[str, Any] | None = None,
    trials: int = 300,
    seed: int = 0,
    **options: Any,
) -> Plan:
    """One re-plan under fixed budgets with new scores.

    Args:
        cost_model: The cost model.
        scores: The refreshed scores.
        budget_bytes: Memory budget (the same as the previous plan's).
        previous: The plan in use (its nearest space point seeds the search), or None.
        trials: Trials of the search.
        seed: Sampler seed.
        **options: Further :class:`~._study.Search` options (``latency_budget_ms``,
            ``memory_measure``, ``space``...).
    """
    search = Search(cost_model=cost_model, scores=scores, budget_bytes=budget_bytes, seed=seed,
                    **options)
    points = []
    if previous is not None:
        updates = previous.updates if isinstance(previous, Plan) else previous
        points = [search.space.encode(updates)]
    result = search.run(n_trials=trials, storage="memory", study_name="replan",
                        extra_points=points)
    return result.plan
