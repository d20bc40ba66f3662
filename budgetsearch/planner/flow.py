"""The planner's flow after the scores and contributions: search, race, plan.

:func:`make_plan` takes a built search (which :func:`~.entry.plan_for`, the entry point that
``budgetsearch plan`` and the studies call, prepares): it runs (or continues) the search, gathers
the race's candidates (:func:`race_candidates`: the search's best front points and every
baseline's plan at the same budget), races them on the validation split (:func:`~.race.race`;
cross-validated when the split is small, else ending with a cross-validated final among the
last rung's best candidates) and returns the winner as a plan that carries its recipe and the
race in its provenance. A baseline that wins the race is the plan: the planner never hands out
a plan that trained worse than one it knew of.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..choices import PlanTarget
from ..errors import BudgetSearchError
from ..plan import LayerUpdate, Plan
from ..recipe import Recipe
from .effort import Effort, final_folds, race_folds
from .race import Candidate, RaceResult, default_race_path, race, race_key
from .target import target_problem

__all__ = ["PlanOutcome", "make_plan", "race_candidates", "separation_figures"]


@dataclass
class PlanOutcome:
    """What :func:`make_plan` produced.

    Attributes:
        plan: The plan to hand out (with its recipe when it was raced).
        search: The search's result (front, trials, baselines' predicted figures).
        race: The race, or None at effort ``quick``.
        skipped: Baselines that did not enter the race, with the reason.
    """

    plan: Plan
    search: Any
    race: RaceResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def margin(self) -> dict[str, Any] | None:
        """How the plan compares with the best baseline in the race: at the furthest rung any
        baseline reached, the winner's best arm there against that baseline's best arm
        (``baseline``, ``rung``, ``epochs``, ``winner_accuracy``, ``baseline_accuracy``,
        ``points``), or None without a race or without baselines. When a baseline won, it is
        the best baseline and ``points`` is 0."""
        if self.race is None:
            return None
        rr = self.race
        baselines = [c.name for c in rr.candidates.values() if c.source == "baseline"]
        if not baselines:
            return None
        best_row: tuple[int, float, str] | None = None
        for i, rung in enumerate(rr.rungs):
            for arm in rung["arms"]:
                if arm["candidate"] in baselines:
                    row = (i, arm["val_accuracy"], arm["candidate"])
                    if best_row is None or row[:2] > best_row[:2]:
                        best_row = row
        assert best_row is not None
        rung_i, acc, name = best_row
        mine = max(a["val_accuracy"] for a in rr.rungs[rung_i]["arms"]
                   if a["candidate"] == rr.winner.name)
        return {"baseline": name, "rung": rung_i, "epochs": rr.rungs[rung_i]["epochs"],
                "winner_accuracy": mine, "baseline_accuracy": acc,
                "points": 100 * (mine - acc)}

    def separation(self) -> dict[str, Any] | None:
        """How clearly the race chose its winner: at the furthest rung another candidate
        reached, the winner's best arm against the best other candidate's (``runner_up``,
        ``rung``, ``epochs``, ``winner_accuracy``, ``runner_up_accuracy``, ``lead_points``),
        with the figures of :func:`separation_figures` (``val_images``, ``lead_images``,
        ``standard_error_points``, ``clear``; ``val_images`` counts every image an arm was
        validated on: the pooled training and validation images of a cross-validated race).
        None without a race, with a single candidate, or when that number is unknown."""
        if self.race is None or not self.race.stats.get("val_images"):
            return None
        rr = self.race
        for i in range(len(rr.rungs) - 1, -1, -1):
            rung = rr.rungs[i]
            n = rung.get("val_images") if rung.get("final") else rr.stats["val_images"]
            arms = rung["arms"]
            others = [a for a in arms if a["candidate"] != rr.winner.name]
            mine = [a["val_accuracy"] for a in arms if a["candidate"] == rr.winner.name]
            if others and mine:
                if not n:  # a final whose runner did not count its images
                    return None
                best = max(others, key=lambda a: a["val_accuracy"])
                return {"runner_up": best["candidate"], "rung": i,
                        "epochs": rr.rungs[i]["epochs"],
                        **separation_figures(winner_accuracy=max(mine),
                                             runner_up_accuracy=best["val_accuracy"],
                                             val_images=n)}
        return None


def separation_figures(*, winner_accuracy: float, runner_up_accuracy: float,
                       val_images: int) -> dict[str, Any]:
    """A lead in validation accuracy against the split's noise.

    Args:
        winner_accuracy: The winner's validation accuracy (a fraction).
        runner_up_accuracy: The runner-up's.
        val_images: Images the accuracies are over (the validation split, or every pooled
            image of a cross-validated race).

    Returns:
        ``winner_accuracy``, ``runner_up_accuracy``, ``val_images``, ``lead_points``,
        ``lead_images``, ``standard_error_points`` (one standard error of an accuracy like the
        winner's on that many images: 100·sqrt(p(1 − p)/n) with p = (k + 1)/(n + 2) for k of n
        images right, so that a perfect score on a few images is not certain) and ``clear``
        (the lead is positive and at least that error; when it is not, the split cannot tell
        the two apart).
    """
    p, q, n = winner_accuracy, runner_up_accuracy, val_images
    smoothed = (p * n + 1) / (n + 2)
    se = 100 * math.sqrt(smoothed * (1 - smoothed) / n)
    lead = 100 * (p - q)
    return {"winner_accuracy": p, "runner_up_accuracy": q, "val_images": n,
            "lead_points": lead, "lead_images": round((p - q) * n, 1),
            "standard_error_points": se, "clear": lead > 0 and lead >= se}


def race_candidates(
    search: Any,
    result: Any,
    *,
    front: int,
    model: nn.Module | None = None,
    seed: int = 0,
    baseline_scores: Any = None,
    target: PlanTarget = "pytorch",
    mcu_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[Candidate], dict[str, str]]:
    """The race's candidates: every baseline's plan that fits the budget (the warm-start
    selectors of :data:`~budgetsearch.search.BASELINES`, the published MIT scheme
    with the largest label within the budget when the model has one, and the classifier
    alone), then the ``front`` best feasible trials by the search's objective whose plans are
    not among them.

    Args:
        search: The :class:`~budgetsearch.search.Search`.
        result: Its :class:`~budgetsearch.search.SearchResult`.
        front: How many front points.
        model: The model (for the MIT scheme's magnitude ranking; None: no MIT scheme).
        seed: Seed of the selectors.
        baseline_scores: Scores the selectors rank channels by (TinyTrain and NEq are defined
            on Fisher potential; default the search's scores).
        target: ``tte``: only plans MIT's Tiny Training Engine can express enter (judged by
            :func:`~budgetsearch.export.to_tte`); a baseline it refuses is left out with the
            exporter's reason (no baseline is converted: none converts exactly).
        mcu_dir: The MCU model files, when not the shipped ones.

    Returns:
        The candidates and, per baseline (or front point) left out, why.
    """
    from ..search import baseline_plans, feasible

    ev = search.evaluator
    out: list[Candidate] = []
    skipped: dict[str, str] = {}
    plans: list[tuple[str | None, dict[str, LayerUpdate] | None, str | None]] = [
        (b.name, b.updates, b.error) for b in baseline_plans(
            evaluator=ev, cost_model=search.cost_model,
            scores=baseline_scores if baseline_scores is not None else search.scores,
            seed=seed)]
    plans.append(_mit_scheme(search, model, seed))
    head = search.graph.layer_names[-1]
    plans.append(("classifier", {head: LayerUpdate("weight")}, None))
    for name, updates, error in plans:
        if name is None:
            continue
        if updates is None:
            skipped[name] = error or "no plan"
            continue
        measured = ev.measure(updates)
        if not measured.feasible:
            skipped[name] = "over the budget"
            continue
        problem = target_problem(target, updates, search=search, mcu_dir=mcu_dir)
        if problem is not None:
            skipped[name] = f"target {target}: {problem}"
            continue
        out.append(_candidate(name, "baseline", updates, measured))
    # the front points: the best by the objective that are not a baseline's plan already (a
    # search point equal to a baseline races under the baseline's name)
    seen = {c.digest() for c in out}
    ranked = sorted((t for t in result.trials if feasible(t)),
                    key=lambda t: (-t.values[0], t.values[1], t.number))
    added = 0
    for t in ranked:
        if added >= front:
            break
        c = _candidate(f"search#{t.number}", "search", ev.updates(t.params),
                       ev.evaluate(t.params), trial=t.number)
        problem = target_problem(target, c.updates, search=search, mcu_dir=mcu_dir)
        if problem is not None:  # not expected: the target's space holds only its plans
            skipped[c.name] = f"target {target}: {problem}"
            continue
        if c.digest() not in seen:
            seen.add(c.digest())
            out.append(c)
            added += 1
    return out, skipped


def _candidate(name: str, source: str, updates: Mapping[str, LayerUpdate], m: Any,
               trial: int | None = None) -> Candidate:
    """A candidate with the predicted figures of its evaluation ``m`` (measured once)."""
    return Candidate(name=name, source=source, updates=dict(updates),
                     memory_bytes=int(m.memory_bytes), latency_ms=float(m.summary.latency_ms),
                     backward_macs=float(m.summary.backward_macs), predicted=float(m.proxy),
                     trial=trial)


def _mit_scheme(search: Any, model: nn.Module | None, seed: int
                ) -> tuple[Any, dict[str, LayerUpdate] | None, str | None]:
    """("mit-scheme LABEL", updates, error) for the largest published label within the budget,
    or (None, None, None) when the model has no published scheme."""
    from ..criteria import magnitude_scores
    from ..selectors import MIT_SCHEMES, select

    name = search.graph.model_name
    if model is None or name not in MIT_SCHEMES:
        return None, None, None
    budget = search.evaluator.budget
    limit = budget.memory_bytes
    labels = [lab for lab in MIT_SCHEMES[name] if limit is None or int(lab[:-2]) * 1024 <= limit]
    if not labels:
        return "mit-scheme", None, (f"no published scheme at or below the budget (labels "
                                    f"{', '.join(MIT_SCHEMES[name])})")
    label = max(labels, key=lambda lab: int(lab[:-2]))
    try:
        plan = select("mit-scheme", cost_model=search.cost_model, **budget.kwargs(),
                      scores=magnitude_scores(model), seed=seed, label=label)
    except BudgetSearchError as exc:
        return f"mit-scheme {label}", None, str(exc)
    return f"mit-scheme {label}", dict(plan.updates), None


def cost_bn(cost_model: Any) -> str:
    """The batch-norm mode (a :class:`~budgetsearch.recipe.Recipe`'s ``bn``) the cost model
    counts: ``train`` when it costs batch norm on batch statistics, else ``frozen``."""
    return "train" if getattr(cost_model, "bn_train", False) else "frozen"


def check_recipe(recipe: Recipe, cost_model: Any) -> None:
    """Refuse a recipe whose training the cost model did not count: the plan would be raced,
    and handed out, with a recipe its budget was not checked for.

    The recipe must train batch norm as the cost model counts it, and its optimizer must keep
    no more state per parameter than the cost model's (a plan costed with momentum's state
    fits when trained with plain SGD, not the other way round).

    Raises:
        PlanError: Naming both modes, or both optimizers and the state each keeps.
    """
    from ..cost.model import OPTIMIZER_STATES
    from ..errors import PlanError

    counted = cost_bn(cost_model)
    if recipe.bn != counted:
        raise PlanError(f"the recipe trains batch norm {recipe.bn!r} but the cost model counts "
                        f"it {counted!r} (bn_train={cost_model.bn_train}); make "
                        "them agree (plan --bn-train sets both)")
    kept, counted_states = (OPTIMIZER_STATES[recipe.optimizer],
                            OPTIMIZER_STATES[cost_model.optimizer])
    if kept > counted_states:
        raise PlanError(f"the recipe's optimizer {recipe.optimizer!r} keeps {kept} state "
                        f"tensor(s) per trained parameter but the cost model counts "
                        f"{cost_model.optimizer!r}, which keeps {counted_states}: the plan "
                        "could exceed its budget when trained; cost it with that optimizer "
                        f"(plan --optimizer {recipe.optimizer}, CostModel(optimizer=...))")


def make_plan(
    search: Any,
    *,
    effort: Effort,
    n_trials: int,
    storage: Any = "memory",
    study_name: str | None = None,
    pick_rule: str = "best",
    runner: Any = None,
    recipe: Recipe | None = None,
    data_key: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
    lrs: Sequence[float] | None = None,
    lr_extensions: int | None = None,
    folds: int | None = None,
    final: int | None = None,
    race_path: str | os.PathLike[str] | None = None,
    race_storage: str | None = None,
    baseline_scores: Any = None,
    progress: bool = True,
    flush_seconds: float = 2.0,
    target: PlanTarget = "pytorch",
    mcu_dir: str | os.PathLike[str] | None = None,
    search_lock: AbstractContextManager[Any] | None = None,
) -> PlanOutcome:
    """Search, race and return the plan that trained best (see the module docstring).

    Args:
        search: The configured :class:`~budgetsearch.search.Search`.
        effort: The effort level (:data:`~.effort.EFFORTS`); without ``effort.race`` the
            search's pick is the plan.
        n_trials: Trials the study should hold.
        storage: Optuna storage URL or opened storage.
        study_name: Study name.
        pick_rule: The search's pick rule (the plan at effort ``quick``).
        runner: Trains plans on the training split and scores them on the validation split
            (a :class:`~budgetsearch.contrib.PlanRunner`); needed for a race.
        recipe: The race's base recipe (optimizer, batch size, seed; learning rates and
            epochs come from the effort). Default: the search's optimizer, batch 32.
        data_key: What the runner's results depend on (model, weights, data), for the race
            file's key. None: the race is kept in memory unless ``race_path`` or
            ``race_storage`` is given.
        model: The model (for the MIT scheme candidate).
        lrs: Learning rates instead of the effort's grid.
        lr_extensions: Rates beyond each edge of the grid a leading candidate may be tried at
            (default the effort's; 0: the grid only).
        folds: Folds the race cross-validates on (1: the runner's validation split as it
            is); None: by the effort's rule (:func:`~.effort.race_folds`) on the sizes of the
            runner's splits when the runner can deal folds, else 1.
        final: Candidates in the cross-validated final of a race on the validation split
            (:attr:`~.race.RaceSettings.final_candidates`; 0: none); None: the effort's. Its
            folds: :func:`~.effort.final_folds` on the runner's splits. No final when the
            runner cannot deal folds.
        race_path: The race file (default under ``$BUDGETSEARCH_CACHE/race/``, by key).
        race_storage: A database URL to keep the race in instead (shared across machines).
        baseline_scores: Scores of the baselines' selectors (:func:`race_candidates`).
        progress: Progress bars.
        flush_seconds: The search's write interval.
        target: The runtime the plan is for (:func:`race_candidates`); the search must run on
            that target's space. Recorded in the plan's provenance when not ``pytorch``.
        mcu_dir: The MCU model files, when not the shipped ones.
        search_lock: Held while the search runs (e.g. a file lock): processes that share a
            study then search it one after another, so the later ones find it complete and
            build the same front, the same candidates and so the same race, which they share.

    Raises:
        PlanError: A race without a runner; a plan the target cannot take (a search whose
            space is not the target's).
        BudgetError: Nothing fits the budget.
    """
    from ..errors import PlanError

    with search_lock if search_lock is not None else contextlib.nullcontext():
        result = search.run(n_trials=n_trials, storage=storage, study_name=study_name,
                            pick_rule=pick_rule, progress=progress, flush_seconds=flush_seconds)
    tagged = {"target": target} if target != "pytorch" else {}
    if not effort.race:
        _check_target(target, result.plan, search, mcu_dir)
        plan = result.plan.with_(provenance={**result.plan.provenance, "effort": effort.name,
                                             **tagged})
        return PlanOutcome(plan, result)
    if runner is None:
        raise PlanError(f"effort {effort.name} races plans: it needs training data (a runner)")
    recipe = recipe or Recipe(optimizer=search.cost_model.optimizer, seed=search.seed,
                              bn=cost_bn(search.cost_model))
    check_recipe(recipe, search.cost_model)
    data = getattr(runner, "data", None)
    sizes = ({"train_images": len(data["train"][1]), "val_images": len(data["val"][1])}
             if isinstance(data, Mapping) and "train" in data and "val" in data
             and callable(getattr(runner, "folds", None)) else None)
    if folds is None:
        folds = 1 if sizes is None else race_folds(**sizes, below=effort.cv_below)
    if sizes is None:  # a runner that cannot deal folds has no cross-validated final
        final = 0
    settings = effort.settings(recipe.optimizer, lrs=tuple(lrs) if lrs else None,
                               lr_extensions=lr_extensions, folds=folds, final=final,
                               final_folds=final_folds(**sizes) if sizes else 5)
    candidates, skipped = race_candidates(search, result, front=effort.front, model=model,
                                          seed=search.seed, baseline_scores=baseline_scores,
                                          target=target, mcu_dir=mcu_dir)
    key = race_key(data_key=data_key or {}, recipe=recipe, settings=settings,
                   candidates=candidates)
    # the default race file is found again by its key: without the data's part, races on
    # other models or data would share it, so such a race is kept in memory
    path = None if race_storage is not None else (
        race_path if race_path is not None
        else default_race_path(key) if data_key is not None else None)
    rr = race(runner, candidates, recipe=recipe, settings=settings, path=path, key=key,
              storage=race_storage, progress=progress)
    winner = rr.winner
    common = dict(study_name=result.study_name, storage=result.storage, pick_rule=pick_rule,
                  baselines=result.baselines, n_trials=len(result.trials),
                  hypervolume=result.hypervolume)
    if winner.source == "search":
        trial = next(t for t in result.trials if t.number == winner.trial)
        plan = search.plan_for(trial, **common)
    else:
        plan = search.plan_of(winner.updates, method=winner.name, **common)
    outcome = PlanOutcome(plan, result, rr, skipped)
    _check_target(target, plan, search, mcu_dir)
    plan = plan.with_(recipe=rr.recipe, filter_mode=rr.recipe.filter_mode, provenance={
        **plan.provenance, "effort": effort.name, **tagged, "race": {
            **rr.provenance(), "skipped": skipped, "margin": outcome.margin(),
            "separation": outcome.separation(),
            "file": str(path) if path is not None else None}})
    outcome.plan = plan
    return outcome


def _check_target(target: PlanTarget, plan: Plan, search: Any,
                  mcu_dir: str | os.PathLike[str] | None) -> None:
    """Refuse to hand out a plan the target cannot take.

    Raises:
        PlanError: The search's space is not the target's (its plans do not all export).
    """
    from ..errors import PlanError

    problem = target_problem(target, plan.updates, search=search, mcu_dir=mcu_dir)
    if problem is not None:
        raise PlanError(f"target {target}: the chosen plan cannot be exported ({problem}); "
                        f"search on SpaceOptions(target={target!r})")
