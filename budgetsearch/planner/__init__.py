"""The planner: the plan that trains best under a budget.

It sits above the search (:mod:`budgetsearch.search`) and the trainer and joins them:
:func:`make_plan` runs the search on a predicted objective, then races the best front points and
every baseline's plan on a validation split (:mod:`.race`) and hands out the winner with the
recipe it won with. :mod:`.effort` names how much goes into it (``quick``, ``standard``,
``thorough``).
"""

from __future__ import annotations

from .effort import CENTER_LR, EFFORTS, Effort, get_effort, lr_grid
from .flow import PlanOutcome, make_plan, race_candidates
from .prepare import contribution_table, fisher_scores, race_data_key
from .race import Candidate, RaceResult, RaceSettings, default_race_path, race, race_key

__all__ = [
    "CENTER_LR",
    "EFFORTS",
    "Candidate",
    "Effort",
    "PlanOutcome",
    "RaceResult",
    "RaceSettings",
    "contribution_table",
    "default_race_path",
    "fisher_scores",
    "get_effort",
    "lr_grid",
    "make_plan",
    "race",
    "race_candidates",
    "race_data_key",
    "race_key",
]
