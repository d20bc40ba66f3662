"""The budget search: a joint Optuna search over update set, channels and gradient-filter patch
sizes under a device's memory and latency budgets.

- :mod:`.space`: the fixed-length parameter space and its decoding into plans;
- :mod:`.objectives`: the captured-potential proxy, objectives and budget constraints;
- :mod:`.warmstart`: the published selectors' plans as the study's first trials;
- :mod:`.study`: :class:`Search` (run, resume, workers) on any Optuna storage;
- :mod:`.front`: Pareto front, hypervolume, pick rules, CSV and PNG;
- :mod:`.replan`: re-planning with refreshed scores during training.
"""

from __future__ import annotations

from .front import hypervolume, pareto_front, pick, plot_front
from .objectives import Evaluation, Evaluator, ProxyModel
from .replan import replan
from .space import PATCH_SIZES, RATIOS, SearchSpace, SpaceOptions
from .storage import open_storage, write_trials
from .study import Search, SearchResult

__all__ = [
    "PATCH_SIZES",
    "RATIOS",
    "Evaluation",
    "Evaluator",
    "ProxyModel",
    "Search",
    "SearchResult",
    "SearchSpace",
    "SpaceOptions",
    "hypervolume",
    "open_storage",
    "pareto_front",
    "pick",
    "plot_front",
    "replan",
    "write_trials",
]
