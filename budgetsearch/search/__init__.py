"""The budget search: a joint Optuna search over update set, channels and gradient-filter patch
sizes under a device's memory and latency budgets.

Everything a user, the command line, the planner, the studies and the benchmarks need is imported
from here; the modules behind it are private (their names start with an underscore, as Optuna's
``samplers`` package keeps ``_tpe`` behind its ``__init__``) and may change without notice:

- the search: :class:`Search` (run, resume, workers on any Optuna storage; its samplers
  :data:`SAMPLERS`), its :class:`SearchResult`, and :func:`replan` (re-planning with
  refreshed scores during training);
- its space: :class:`SearchSpace`, :class:`SpaceOptions`, the channel :data:`RATIOS` and
  :data:`PATCH_SIZES` it offers, :func:`offered_patches` (the patch sizes a layer can take) and
  :func:`bias_layers` (the layers a ``bias:K`` update reaches);
- its objectives: the :class:`Evaluator` (objectives and budget constraints of a plan, as an
  :class:`Evaluation`), the accuracy models (:class:`AccuracyModel`: the captured-potential
  :class:`ProxyModel`, the contribution table's :class:`MeasuredModel`);
- its warm start: the published selectors' plans (:data:`BASELINES`, :func:`baseline_plans`,
  :class:`Baseline`);
- its fronts: :func:`feasible`, :func:`pareto_front`, :func:`hypervolume`,
  :class:`FrontTracker` (a running front), :func:`pick` (pick rules; :func:`parse_pick` checks
  one), :func:`front_csv`,
  :func:`trials_csv` and :func:`plot_front`;
- its stored studies: :func:`open_storage`, :func:`storage_kind`, :func:`redact` (a URL without
  its password), :func:`load_study`, :func:`read_config` (what a study stores about itself),
  :func:`stored_scores` (the scores a study continues with), :func:`scores_digest`,
  :data:`CREATOR_KEY` (the attribute naming a study's creator) and :func:`write_trials`.

Nothing a study stores refers to these modules: its configuration, scores and baselines are JSON
and base64 in the study's user attributes, so studies made before the modules moved open as they
did.
"""

from __future__ import annotations

from ._config import CREATOR_KEY, read_config, scores_digest, stored_scores
from ._front import (
    FrontTracker,
    feasible,
    front_csv,
    hypervolume,
    pareto_front,
    parse_pick,
    pick,
    plot_front,
    trials_csv,
)
from ._measured import MeasuredModel, bias_layers
from ._objectives import AccuracyModel, Evaluation, Evaluator, ProxyModel
from ._replan import replan
from ._samplers import SAMPLERS
from ._space import PATCH_SIZES, RATIOS, SearchSpace, SpaceOptions, offered_patches
from ._storage import load_study, open_storage, redact, storage_kind, write_trials
from ._study import Search, SearchResult
from ._warmstart import BASELINES, Baseline, baseline_plans

__all__ = [
    "BASELINES",
    "CREATOR_KEY",
    "PATCH_SIZES",
    "RATIOS",
    "SAMPLERS",
    "AccuracyModel",
    "Baseline",
    "Evaluation",
    "Evaluator",
    "FrontTracker",
    "MeasuredModel",
    "ProxyModel",
    "Search",
    "SearchResult",
    "SearchSpace",
    "SpaceOptions",
    "baseline_plans",
    "bias_layers",
    "feasible",
    "front_csv",
    "hypervolume",
    "load_study",
    "offered_patches",
    "open_storage",
    "pareto_front",
    "parse_pick",
    "pick",
    "plot_front",
    "read_config",
    "redact",
    "replan",
    "scores_digest",
    "storage_kind",
    "stored_scores",
    "trials_csv",
    "write_trials",
]
