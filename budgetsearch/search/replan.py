"""Dynamic mode: re-plan during training with refreshed scores, under the same budgets.

A trainer calls :meth:`Replanner.update` every k epochs with scores computed on the current
weights (Fisher potential, or NEq velocities as per-output-channel scores). Each call runs a short
in-memory search seeded with the previous front's parameter sets (re-decoded under the new scores,
so their channels follow the new ranking) and, if asked, the baselines; it returns the best
feasible plan. Budgets, space and proxy definition stay fixed across calls, so every plan fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..cost import CostModel
from ..criteria import Scores
from ..plan import Plan
from .space import SpaceOptions
from .study import Search, SearchResult

__all__ = ["Replanner", "replan"]


class Replanner:
    """Re-plans a model under fixed budgets as its scores change.

    Args:
        cost_model: The cost model of the model on the device.
        budget_bytes: Memory budget under ``memory_measure``.
        latency_budget_ms: Latency budget per step, or None.
        memory_measure: ``peak`` or ``training``.
        third: ``latency`` or ``macs``.
        space: Space options.
        trials: Trials per re-plan.
        seed: Seed of the first re-plan (call i uses ``seed + i``).
        baselines: Also warm-start each re-plan with the baseline selectors' plans.
        carry: How many of the previous front's points seed the next search.
        **options: Further :class:`~.study.Search` options (``alpha``, ``bias_credit``,
            ``sampler``, ``population_size``).
    """

    def __init__(
        self,
        *,
        cost_model: CostModel,
        budget_bytes: int | None,
        latency_budget_ms: float | None = None,
        memory_measure: str = "peak",
        third: str = "latency",
        space: SpaceOptions | None = None,
        trials: int = 300,
        seed: int = 0,
        baselines: bool = False,
        carry: int = 20,
        **options: Any,
    ) -> None:
        self.cost_model = cost_model
        self.kwargs = dict(budget_bytes=budget_bytes, latency_budget_ms=latency_budget_ms,
                           memory_measure=memory_measure, third=third, space=space, **options)
        self.trials, self.seed = int(trials), int(seed)
        self.baselines, self.carry = baselines, int(carry)
        self.points: list[dict[str, Any]] = []
        self.history: list[SearchResult] = []

    def update(self, scores: Scores, *, trials: int | None = None) -> Plan:
        """A new plan for the current scores.

        Raises:
            BudgetError: If the budgets admit no plan.
            SearchError: If no feasible plan was found.
        """
        step = len(self.history)
        search = Search(cost_model=self.cost_model, scores=scores, seed=self.seed + step,
                        **self.kwargs)
        result = search.run(n_trials=max(trials or self.trials, len(self.points) + 1),
                            storage="memory", study_name=f"replan-{step}",
                            warm_start=self.baselines or not self.points,
                            extra_points=list(self.points))
        front = [result.trial, *[t for t in result.front if t.number != result.trial.number]]
        self.points = [dict(t.params) for t in front[: self.carry]]
        self.history.append(result)
        provenance = {**result.plan.provenance, "replan": {
            "step": step, "seeded_with": len(front[: self.carry])}}
        return result.plan.with_(provenance=provenance)


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
        **options: Further :class:`~.study.Search` options (``latency_budget_ms``,
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
