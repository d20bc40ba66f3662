"""The planner: the plan that trains best under a budget.

It sits above the search (:mod:`budgetsearch.search`) and the trainer and joins them.
:func:`plan_for` (also ``budgetsearch.plan_for``) is the entry point the command line and the
studies call: from a model, its cost model, a :class:`~budgetsearch.budget.Budget` and data
(:class:`PlanData` or tensors) it measures what the effort asks for (:mod:`.prepare`: the
contribution table, the baselines' Fisher scores), then :func:`make_plan` runs the search on a
predicted objective, races the best front points and every baseline's plan on a validation split
(cross-validated when the split is small; :mod:`.race`) and hands out the winner with the recipe
it won with. :mod:`.effort` names how much goes into it (``quick``, ``standard``, ``thorough``;
:func:`choose_effort` the defaults).
"""

from __future__ import annotations

from .effort import CENTER_LR, EFFORTS, Effort, final_folds, get_effort, lr_grid, race_folds
from .entry import ARGUMENT_NAMES, DEFAULT_TRIALS, PlanData, choose_effort, plan_for
from .flow import PlanOutcome, make_plan, race_candidates, separation_figures
from .prepare import contribution_table, fisher_scores, load_contributions, race_data_key
from .race import (
    Candidate,
    RaceResult,
    RaceSettings,
    default_race_path,
    race,
    race_key,
    updates_digest,
)

__all__ = [
    "ARGUMENT_NAMES",
    "CENTER_LR",
    "DEFAULT_TRIALS",
    "EFFORTS",
    "Candidate",
    "Effort",
    "PlanData",
    "PlanOutcome",
    "RaceResult",
    "RaceSettings",
    "choose_effort",
    "contribution_table",
    "default_race_path",
    "final_folds",
    "fisher_scores",
    "get_effort",
    "load_contributions",
    "lr_grid",
    "make_plan",
    "plan_for",
    "race",
    "race_candidates",
    "race_data_key",
    "race_folds",
    "race_key",
    "separation_figures",
    "updates_digest",
]
