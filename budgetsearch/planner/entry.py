"""The library's entry point for the job the tool exists for: the plan that trains best for a
model, its data and a budget.

:func:`plan_for` chooses the effort and the objective, splits the data into training and validation
tensors, measures (or reads and checks) the contribution table, refuses a budget no plan meets,
scores the channels (or continues a stored study with the scores it holds), builds the search on
the chosen objective and, for an effort that races, the race's runner, data key, baselines' Fisher
scores and base recipe, then hands them to :func:`~.flow.make_plan`. ``budgetsearch plan`` and the
studies' ``search`` method both call it; the command line only turns its flags into the
arguments and prints the outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..budget import Budget
from ..choices import PLAN_OBJECTIVES, EffortName, PlanObjective, PlanTarget
from ..contrib import ContributionTable, PlanRunner, split_tensors
from ..cost import CostModel
from ..criteria import Scores, fisher_potential, magnitude_scores
from ..data import check_source, default_normalization, load_dataset
from ..errors import DataError, PlanError, SearchError
from ..graph import LayerGraph
from ..recipe import Recipe
from ..search import (
    Search,
    SpaceOptions,
    open_storage,
    parse_pick,
    redact,
    scores_digest,
    storage_kind,
    stored_scores,
)
from ..units import format_bytes
from .effort import Effort, get_effort
from .flow import PlanOutcome, check_recipe, cost_bn, make_plan
from .prepare import contribution_table, fisher_scores, load_contributions, race_data_key
from .race import RaceSettings
from .target import check_target, resolve_target

__all__ = ["ARGUMENT_NAMES", "DEFAULT_TRIALS", "PlanData", "choose_effort", "plan_for"]

Tensors = tuple[torch.Tensor, torch.Tensor]

#: Finished trials the study should hold when the caller does not say (the command line's
#: ``--trials`` default).
DEFAULT_TRIALS = 100

#: How :func:`choose_effort` names the arguments in its errors; the command line passes its flags
#: instead (``--data``, ``--effort``...).
ARGUMENT_NAMES: Mapping[str, str] = {
    "plan": "plan_for", "data": "data", "scores": "scores", "contrib": "contrib",
    "effort": "effort", "objective": "objective"}

#: Search arguments :func:`plan_for` sets itself (refused in ``search_options``).
_SET_HERE = frozenset({"cost_model", "scores", "budget_bytes", "latency_budget_ms",
                       "memory_measure", "seed", "model", "scores_source", "contributions",
                       "contributions_source", "check_budgets"})


@dataclass(frozen=True, kw_only=True)
class PlanData:
    """A data set to plan on, and how it is split into training and validation tensors.

    Attributes:
        source: Anything :func:`~budgetsearch.data.load_dataset` accepts (``cifar10``, an
            ImageFolder directory, a ``.tar.gz``...).
        split: The split drawn from (the test split is never read).
        samples: Images drawn, class-balanced, for the contribution analysis and the race; None:
            1000, or all of them when the split has fewer.
        val_fraction: The stratified share of them held out for validation.
        normalization: ``imagenet`` or ``mcu``; None: what the registered model the graph
            names expects (:func:`~budgetsearch.data.default_normalization` of its
            ``model_name``; ``imagenet`` for a graph without one).
    """

    source: str | os.PathLike[str]
    split: str = "train"
    samples: int | None = None
    val_fraction: float = 0.2
    normalization: str | None = None

    def tensors(self, *, graph: LayerGraph, seed: int) -> tuple[Tensors, Tensors]:
        """The training and validation tensors at the graph's input size (a seeded, stratified
        hold-out)."""
        return split_tensors(
            str(self.source), graph=graph, normalization=self.normalization_for(graph),
            samples=self.samples or 1000, val_fraction=self.val_fraction, seed=seed,
            split=self.split, up_to=self.samples is None)

    def normalization_for(self, graph: LayerGraph) -> str:
        """The normalisation images are loaded with for the graph's model."""
        return self.normalization or default_normalization(graph.model_name)


def choose_effort(
    *,
    effort: EffortName | Effort | None = None,
    objective: PlanObjective | None = None,
    data: bool,
    scores: bool,
    contrib: bool,
    names: Mapping[str, str] = ARGUMENT_NAMES,
) -> tuple[Effort, PlanObjective]:
    """The effort and the objective a plan is made with, by the rules of :func:`plan_for`.

    The effort defaults to ``standard`` with data (unless the objective is ``fisher``, which asks
    for the fast predicted objective), else ``quick``; the objective to ``measured`` with a
    contribution table, or with data at an effort that races, else ``fisher``.

    Args:
        effort: The effort or its name, or None for the default.
        objective: ``measured`` or ``fisher``, or None for the default.
        data: Whether training data is given.
        scores: Whether channel scores are given.
        contrib: Whether a contribution table is given.
        names: How the errors name the arguments (:data:`ARGUMENT_NAMES`; the command line
            passes its flags).

    Raises:
        DataError: Neither data, scores nor a table; an effort that races without data; a
            table with the ``fisher`` objective; the ``measured`` objective without data or
            table.
        PlanError: An unknown effort or objective.
    """
    n = {**ARGUMENT_NAMES, **names}
    if objective is not None and objective not in PLAN_OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; known: {', '.join(PLAN_OBJECTIVES)}")
    if not (scores or data or contrib):
        raise DataError(f"{n['plan']} needs {n['data']} (for the contribution analysis or the "
                        f"Fisher pass), {n['scores']} or {n['contrib']} TABLE")
    if not isinstance(effort, Effort):
        effort = get_effort(effort or ("standard" if data and objective != "fisher" else "quick"))
    if effort.race and not data:
        raise DataError(f"{n['effort']} {effort.name} trains the candidate plans on "
                        f"{n['data']}: give {n['data']}, or {n['effort']} quick")
    chosen: PlanObjective = objective or (
        "measured" if contrib or (data and effort.race) else "fisher")
    if chosen == "fisher" and contrib:
        raise DataError(f"{n['contrib']} goes with {n['objective']} measured")
    if chosen == "measured" and not (data or contrib):
        raise DataError(f"{n['objective']} measured needs {n['data']} (to measure the "
                        f"contributions) or {n['contrib']} TABLE")
    return effort, chosen


def plan_for(
    *,
    model: nn.Module,
    cost_model: CostModel,
    budget: Budget,
    data: PlanData | tuple[Tensors, Tensors] | str | os.PathLike[str] | None = None,
    effort: EffortName | Effort | None = None,
    objective: PlanObjective | None = None,
    target: PlanTarget | None = None,
    scores: Scores | str | os.PathLike[str] | None = None,
    scores_source: str | None = None,
    fisher_samples: int = 64,
    micro_batch: int = 16,
    contrib: str | os.PathLike[str] | None = None,
    database: str | None = None,
    candidates: str | None = None,
    search_options: Mapping[str, Any] | None = None,
    model_spec: Mapping[str, Any] | None = None,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    storage: Any = "memory",
    study_name: str | Callable[[Mapping[str, Any]], str] | None = None,
    pick: str = "best",
    lrs: Sequence[float] | None = None,
    lr_extensions: int | None = None,
    race_folds: int | None = None,
    race_final: int | None = None,
    train_batch: int | None = None,
    recipe: Recipe | None = None,
    race_file: str | os.PathLike[str] | None = None,
    baseline_scores: Scores | None = None,
    progress: bool = True,
    flush_seconds: float = 2.0,
    log: Callable[[str], object] | None = None,
    search_lock: AbstractContextManager[Any] | None = None,
) -> PlanOutcome:
    """The plan that trains best for a model, its data and a budget: choose the effort and
    objective, measure, search, race (see the module docstring).

    Args:
        model: The model with its classifier for the data's classes, in its initial state (the
            contribution table and the race train copies of it).
        cost_model: Its cost model on the device (graph, profile, accounting, batch size,
            optimizer).
        budget: What the plan must fit.
        data: The data: a :class:`PlanData` (a data set and its split options; a bare source is
            read with the default options), or the training and validation tensors
            ``((x, y), (x, y))``. Needed to measure contributions, for the race and for a
            Fisher pass.
        effort: ``quick``, ``standard`` or ``thorough`` (:func:`choose_effort` for the default).
        objective: ``measured`` (the accuracy a contribution table predicts) or ``fisher`` (the
            captured Fisher potential); default by :func:`choose_effort`.
        target: What trains the plan: ``pytorch`` (budgetsearch's trainer, ``apply_plan``;
            every plan) or ``tte`` (MIT's Tiny Training Engine: the search space and the race
            keep to plans ``budgetsearch export --format tte`` takes, so the model must be one
            of the MCU models and the cost model at batch 1; baselines the engine cannot
            express are left out of the race, with the exporter's reason in the outcome's
            ``skipped``). None: the search space's (``search_options["space"].target``), else
            ``pytorch``.
        scores: The channel scores, or a scores ``.npz`` file; None: weight magnitude for the
            ``measured`` objective, a Fisher pass on the data for ``fisher``. Scores given as a
            file or left to compute are not computed when the study already exists: it
            continues with the scores it stores (a file's must equal them).
        scores_source: How the scores were made, for the study's record (default: ``scores
            file``, ``weight magnitude``, ``fisher on SOURCE/SPLIT, N samples``...). It is part
            of the study's identity.
        fisher_samples: Samples of the Fisher pass (the search's scores for the ``fisher``
            objective, and the baselines' scores in a race).
        micro_batch: Micro-batch of the Fisher pass.
        contrib: The contribution table file: measured into it (or resumed) when data is given,
            else read as it is and checked against the model, its initial weights, its input size
            and the channel scores. None: measured into the user cache.
        database: A database URL (SQLite, PostgreSQL, MySQL) holding the contribution table
            and the race instead of files, so that processes on several machines share them
            (``contrib`` then receives a copy of the table).
        candidates: Layers with weight units in the contribution analysis (default: the
            effort's).
        search_options: Further :class:`~budgetsearch.search.Search` arguments (``space``,
            ``third``, ``alpha``, ``bias_credit``, ``sampler``, ``population_size``, ``decay``,
            ``loss_weight``, ``local_search``).
        model_spec: How a worker rebuilds the model (``name``, ``weights``, ``num_classes``,
            ``input_size``, ``mcu_dir``); None for a model that is not registered.
        trials: Finished trials the study should hold.
        seed: Seed of the search, the data split, the contribution units, the race's recipe and
            the baselines' selectors.
        storage: Optuna storage URL or opened storage of the study (``memory`` keeps nothing).
        study_name: The study's name, or a function making it from the study's configuration
            (:meth:`~budgetsearch.search.Search.config` without the scores' digest: known before
            any scores are computed). None: the model, the device, the memory budget and a
            digest of that configuration, so the same arguments continue the same study.
        pick: The search's pick rule (the plan at effort ``quick``).
        lrs: The race's learning rates instead of the effort's grid.
        lr_extensions: How many rates beyond each edge of the grid a leading candidate is
            also tried at in the race's first rung when its best rate there lies on that edge
            (:attr:`~.race.RaceSettings.lr_extensions`); None: the effort's (2 at
            ``standard`` and ``thorough``), 0: the grid only.
        race_folds: Folds the race cross-validates on, over the training and validation
            tensors pooled (1: the validation split as it is); None: by the effort's rule
            (:func:`~.effort.race_folds`: folds of about the split's size when it holds fewer
            than 200 images).
        race_final: Candidates in the cross-validated final of a race on the validation
            split (:attr:`~.race.RaceSettings.final_candidates`; 0: no final); None: the
            effort's (4 at ``standard``, 6 at ``thorough``).
        train_batch: The batch size the race trains at and the plan's recipe records (32); the
            budget stays that of the cost model's batch size.
        recipe: The race's base recipe instead (optimizer, batch size, seed, filter mode).
        race_file: The race's results file (default: ``database`` when given, else the user
            cache, by key).
        baseline_scores: Scores the baselines' selectors rank channels by in the race
            (default: the search's when they are Fisher's, else a Fisher pass on the training
            tensors).
        progress: Progress bars.
        flush_seconds: The search's write interval.
        log: Called with a line for each notable step (a table measured, a study continued);
            None: silent.
        search_lock: Held while the search runs: processes sharing a study (a study's seeds
            sharing one plan) then search it one after another and race the same candidates.

    Returns:
        The plan (with its recipe and the race in its provenance when raced), the search's
        result and the race.

    Raises:
        DataError: Missing data or a contribution table that does not fit (see
            :func:`choose_effort` and :func:`~.prepare.load_contributions`).
        BudgetError: A budget no plan meets, before any scoring or measuring.
        SearchError: An unknown storage, a stored study made for something else or with other
            scores; fewer than one trial or an unknown pick rule (before any work).
        PlanError: Bad arguments; an unknown target, or a model or batch size it cannot
            train.

    Example:
        A quick plan (the search on Fisher potential measured on a few images) for MCUNet with a
        two-class head on an STM32H743, within 64 KB of training memory:

        >>> import torch
        >>> from budgetsearch import Budget, CostModel, LayerGraph, load_model, load_profile
        >>> from budgetsearch import plan_for
        >>> _ = torch.manual_seed(0)
        >>> model = load_model("mcunet-5fps", num_classes=2)
        >>> graph = LayerGraph.from_model(model, input_size=32, model_name="mcunet-5fps")
        >>> cost_model = CostModel(graph, load_profile("stm32h743"))
        >>> images = torch.randn(16, 3, 32, 32), torch.arange(16) % 2
        >>> outcome = plan_for(model=model, cost_model=cost_model, data=(images, images),
        ...                    budget=Budget(memory_bytes=64 * 1024, measure="training"),
        ...                    effort="quick", fisher_samples=8, trials=16,
        ...                    search_options={"population_size": 8}, progress=False)
        >>> plan = outcome.plan
        >>> plan.provenance["effort"], plan.provenance["scores"]["criterion"], outcome.race
        ('quick', 'fisher', None)
        >>> plan.predicted["training_memory_bytes"] <= 64 * 1024 < plan.predicted[
        ...     "peak_memory_bytes"]
        True
    """
    if trials < 1:
        raise SearchError(f"trials must be at least 1; got {trials}")
    if recipe is not None and train_batch is not None:
        raise PlanError("give the race's batch size either as train_batch or in the recipe")
    if recipe is not None:
        check_recipe(recipe, cost_model)
    parse_pick(pick)  # an unknown rule: refused before any work
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise PlanError(f"micro_batch must be an integer >= 1; got {micro_batch!r}")
    if lrs is not None:  # a bad grid or bound: refused before any work
        if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence):
            raise PlanError(f"lrs: give a sequence of learning rates, e.g. (0.00667, 0.02, "
                            f"0.06); got {lrs!r}")
        RaceSettings(lrs=tuple(lrs))
    if lr_extensions is not None:
        RaceSettings(lr_extensions=lr_extensions)
    if race_folds is not None:
        RaceSettings(folds=race_folds)
    if race_final is not None:
        RaceSettings(final_candidates=race_final)
    say = log or _silent
    graph = cost_model.graph
    source, tensors = _data(data)
    if tensors is not None:
        _check_tensors(tensors, graph)
    if source is not None:  # a missing data set: said before any file is made
        check_source(source.source)
    effort, objective = choose_effort(effort=effort, objective=objective,
                                      data=data is not None, scores=scores is not None,
                                      contrib=contrib is not None)
    options = _options(search_options)
    chosen_target = resolve_target(target, options.get("space"))
    mcu_dir = (model_spec or {}).get("mcu_dir")
    if chosen_target != "pytorch":
        check_target(chosen_target, cost_model=cost_model, mcu_dir=mcu_dir)
        options["space"] = replace(options.get("space") or SpaceOptions(), target=chosen_target)
    if isinstance(storage, str):
        storage_kind(storage)  # an unknown scheme: refused before any work
    # budgets no plan can meet are refused before any scoring, measuring or file writing (the
    # scores do not change which plans fit, so cheap magnitude scores do for this check)
    magnitude = magnitude_scores(model)
    Search(cost_model=cost_model, scores=magnitude, space=options.get("space"),
           **budget.kwargs())
    if tensors is None and source is not None and (effort.race or objective == "measured"):
        tensors = source.tensors(graph=graph, seed=seed)
    given = _GivenScores(scores, model)
    contributions: ContributionTable | None = None
    table_source: str | None = None
    if objective == "measured":
        if tensors is not None:
            contributions, table_source = _measure(
                model, graph=graph, tensors=tensors, seed=seed,
                candidates=candidates or effort.candidates, scores=given.scores(),
                contrib=contrib, database=database, progress=progress, log=say)
        else:
            assert contrib is not None  # choose_effort: measured needs data or a table
            contributions = load_contributions(contrib, model=model, graph=graph,
                                               scores=given.scores() or magnitude)
            table_source = str(contrib)
    common: dict[str, Any] = dict(
        cost_model=cost_model, **budget.kwargs(), seed=seed, model=model_spec,
        scores_source=scores_source or given.source(objective, source, fisher_samples),
        contributions=contributions.results if contributions is not None else None,
        contributions_source=table_source, **options)
    probe: dict[str, Any] | None = None
    if not isinstance(study_name, str) or not given.fixed:
        probe = Search(scores=magnitude, check_budgets=False, **common).config()
        probe.pop("scores_digest")
    name = (study_name if isinstance(study_name, str)
            else study_name(probe) if study_name is not None else _default_name(graph, budget,
                                                                                 cost_model,
                                                                                 probe))

    def compute() -> Scores:
        """The search's scores when no stored study provides them."""
        loaded = given.scores()
        if loaded is not None:
            return loaded
        if objective == "measured":  # the channels its table is measured with
            return magnitude
        if source is not None:
            return _fisher_on(source, model=model, graph=graph, samples=fisher_samples,
                              micro_batch=micro_batch, seed=seed, progress=progress)
        assert tensors is not None
        return fisher_scores(model, tensors[0], samples=fisher_samples, micro_batch=micro_batch,
                             seed=seed)

    if given.fixed:
        opened, search_scores = storage, given.scores()
    else:
        assert probe is not None
        opened, search_scores = _open_with_scores(storage, name, probe, compute=compute,
                                                  given=given, log=say)
    assert search_scores is not None
    # a table restricts the space to its measured layers: check that space's budgets too
    search = Search(scores=search_scores, check_budgets=contributions is not None, **common)
    runner = data_key = None
    if effort.race:
        assert tensors is not None
        train, val = tensors
        data_key = race_data_key(graph=graph, model=model, train=train, val=val)
        runner = PlanRunner(model, graph=graph, train=train, val=val)
        # TinyTrain and NEq rank channels by Fisher potential: their plans in the race do too
        if baseline_scores is None:
            baseline_scores = search_scores if search_scores.criterion == "fisher" else (
                fisher_scores(model, train, samples=fisher_samples, micro_batch=micro_batch,
                              seed=seed))
    return make_plan(
        search, effort=effort, n_trials=trials, storage=opened, study_name=name,
        pick_rule=pick, runner=runner, data_key=data_key, model=model, lrs=lrs,
        lr_extensions=lr_extensions, folds=race_folds, final=race_final,
        recipe=recipe or Recipe(optimizer=cost_model.optimizer,
                                batch_size=32 if train_batch is None else train_batch, seed=seed,
                                bn=cost_bn(cost_model)),
        race_path=race_file, baseline_scores=baseline_scores,
        race_storage=database if race_file is None else None, progress=progress,
        flush_seconds=flush_seconds, target=chosen_target, mcu_dir=mcu_dir,
        search_lock=search_lock)


# ------------------------------------------------------------------------------------ helpers
def _silent(_line: str) -> None:
    pass


def _data(data: Any) -> tuple[PlanData | None, tuple[Tensors, Tensors] | None]:
    """(the data set, the tensors) of ``plan_for``'s ``data``: one of them, or neither."""
    if data is None:
        return None, None
    if isinstance(data, PlanData):
        return data, None
    if isinstance(data, (str, os.PathLike)):
        return PlanData(source=data), None
    try:
        (x, y), (vx, vy) = data
    except (TypeError, ValueError):
        raise PlanError("data: give a PlanData, a data set name or path, or the training and "
                        "validation tensors ((x, y), (x, y))") from None
    return None, ((x, y), (vx, vy))


def _check_tensors(tensors: tuple[Tensors, Tensors], graph: LayerGraph) -> None:
    """Refuse training or validation tensors the model cannot be planned on.

    Raises:
        DataError: Naming the split and what is wrong: not tensors, empty, images and labels
            of different counts, images of another shape than the model was traced at, or
            labels that are not class indices of the model's head.
    """
    head = list(graph.layers)[-1]
    outputs = graph.layers[head].out_channels
    for what, pair in (("training", tensors[0]), ("validation", tensors[1])):
        x, y = pair
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(f"data: the {what} images and labels must be tensors; got "
                            f"{type(x).__name__} and {type(y).__name__}")
        if len(x) == 0:
            raise DataError(f"data: the {what} tensors hold no images")
        if len(x) != len(y):
            raise DataError(f"data: the {what} tensors hold {len(x)} images but {len(y)} labels")
        if tuple(x.shape[1:]) != tuple(graph.input_shape):
            raise DataError(f"data: the {what} images are {tuple(x.shape[1:])} but the model "
                            f"was traced and costed at {tuple(graph.input_shape)} (C, H, W)")
        if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(f"data: the {what} labels must be a 1-D tensor of class indices; "
                            f"got {y.dtype} of shape {tuple(y.shape)}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= outputs:
            raise DataError(f"data: the {what} labels run from {low} to {high} but the model's "
                            f"head ({head}) has {outputs} outputs (labels 0 to {outputs - 1})")


def _options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The search options, refusing those plan_for sets itself."""
    options = dict(options or {})
    taken = sorted(_SET_HERE & set(options))
    if taken:
        raise PlanError(f"search_options {', '.join(taken)}: set by plan_for itself (from its "
                        "model, budget, scores, seed and contribution table arguments)")
    return options


class _GivenScores:
    """The ``scores`` argument: Scores (fixed), a file (loaded once, when needed) or None."""

    def __init__(self, scores: Scores | str | os.PathLike[str] | None, model: nn.Module) -> None:
        self.given, self.model = scores, model
        self.fixed = isinstance(scores, Scores)
        self._loaded: Scores | None = scores if isinstance(scores, Scores) else None

    @property
    def file(self) -> str | None:
        return None if self.given is None or self.fixed else str(self.given)

    def scores(self) -> Scores | None:
        """The given scores (a file is read on first use), or None."""
        if self._loaded is None and self.file is not None:
            self._loaded = Scores.load(self.file, model=self.model)
        return self._loaded

    def source(self, objective: PlanObjective, data: PlanData | None, samples: int) -> str:
        """The default record of how the search's scores are made."""
        if self.fixed:
            assert self._loaded is not None
            return f"given {self._loaded.criterion} scores"
        if self.file is not None:
            return "scores file"
        if objective == "measured":
            return "weight magnitude"
        if data is not None:
            return f"fisher on {data.source}/{data.split}, {samples} samples"
        return f"fisher on the training tensors, {samples} samples"


def _measure(model: nn.Module, *, graph: LayerGraph, tensors: tuple[Tensors, Tensors],
             seed: int, candidates: str, scores: Scores | None,
             contrib: str | os.PathLike[str] | None, database: str | None, progress: bool,
             log: Callable[[str], object]) -> tuple[ContributionTable, str]:
    """The contribution table measured (or resumed) on the tensors, and where it is kept."""
    started = time.perf_counter()
    train, val = tensors
    table = contribution_table(
        model, graph=graph, train=train, val=val, seed=seed, candidates=candidates,
        scores=scores, path=None if database else contrib, storage=database, progress=progress)
    if database is not None:
        if contrib is not None:
            table.save(contrib)  # a copy of what the workers measured
        where = f"{redact(database)} (contribution table)"
    else:
        where = str(table.path) if contrib is None else str(contrib)
    if table.stats.get("measured"):
        log(f"contributions: {table.stats['measured']} units measured into {where} "
            f"({time.perf_counter() - started:.0f} s; {len(train[1])} training, "
            f"{len(val[1])} validation images)")
    return table, where


def _fisher_on(data: PlanData, *, model: nn.Module, graph: LayerGraph, samples: int,
               micro_batch: int, seed: int, progress: bool) -> Scores:
    """Fisher potential on a seeded draw of ``samples`` images of the data set's split."""
    dataset = load_dataset(str(data.source), split=data.split,
                           image_size=int(graph.input_shape[-1]),
                           normalization=data.normalization_for(graph), limit=samples, seed=seed)
    loader: Any = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, shuffle=False)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=f"fisher ({len(dataset)} samples)", unit="batch",
                      leave=False, file=sys.stderr)
    return fisher_potential(model, loader, samples=len(dataset), micro_batch=micro_batch)


def _open_with_scores(storage: Any, name: str, probe: Mapping[str, Any], *,
                      compute: Callable[[], Scores], given: _GivenScores,
                      log: Callable[[str], object]) -> tuple[Any, Scores]:
    """The opened storage and the search's scores: a stored study's own when it exists and was
    made for this configuration, else computed.

    Raises:
        SearchError: The study was made for something else, or with other scores than the
            given file.
    """
    new_file = _sqlite_path(storage)
    if new_file is not None and not new_file.exists():
        # a new SQLite file holds no study: open it (the database layer takes about a second
        # to import) while the scores are computed
        with ThreadPoolExecutor(1) as pool:
            opening = pool.submit(open_storage, storage)
            try:
                scores = compute()
            except BaseException:
                # wait for the opening; the new file stays: another plan given the same
                # storage may have opened it meanwhile, and a file deleted under it would take
                # its study with it
                opening.exception()
                raise
            return opening.result(), scores
    opened = open_storage(storage) if isinstance(storage, str) else storage
    found = stored_scores(opened, name, config=probe)
    if found is None:
        return opened, compute()
    scores, finished = found
    file_scores = given.scores() if given.file is not None else None
    if file_scores is not None and scores_digest(file_scores) != scores_digest(scores):
        raise SearchError(f"study {name!r} was made with other scores than {given.file}")
    log(f"continuing study {name!r} ({finished} trials) with its stored scores")
    return opened, scores


def _sqlite_path(storage: Any) -> Path | None:
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return None
    target = storage[len("sqlite:///"):]
    return None if target in ("", ":memory:") else Path(target)


def _default_name(graph: LayerGraph, budget: Budget, cost_model: CostModel,
                  config: Mapping[str, Any] | None) -> str:
    """The model, the device, the memory budget and a digest of the study's configuration."""
    assert config is not None
    key = {k: v for k, v in config.items() if k not in ("version", "n_trials")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    memory = ("unlimited" if budget.memory_bytes is None
              else format_bytes(budget.memory_bytes).replace(" ", ""))
    return f"{graph.model_name or 'model'}-{cost_model.profile.name}-{memory}-{digest[:8]}"
