"""How one cell is run: make the plan, train it, summarise it: the study's only contact with the
selectors, the search and the trainer.

:func:`run_cell` calls a plan function ``plan_fn(cell, ctx) -> Plan`` and a train function
``train_fn(cell, plan, ctx) -> metrics`` (by default :func:`cell_plan` and :func:`_train`) and
turns their results into the cell's record: predicted costs (the plan's, from the study's cost
model; and under the ``ops`` accounting at the training batch size, which is what the trainer's
measured saved bytes should equal), measured costs and accuracy, and the per-layer update map.

- Selectors: :func:`budgetsearch.selectors.select` with the cell's budget and the entry's scores
  (``mit-scheme`` without a label takes the largest published label at or below the budget;
  ``neq-dynamic`` starts from ``random`` at the budget, Quelennec et al.'s epoch-0 rule).
- Search: :func:`budgetsearch.planner.plan_for` (the search on the method's scores, Fisher by
  default; at an effort that races, on contributions measured on the cell's data, then the race),
  its Optuna study in the study's database (``--storage``) or in the cell's own ``search.db``, so
  a killed cell resumes it; the front and the search's baselines go to ``front.csv`` and
  ``baselines.csv`` in the cell directory.
- Training: :class:`budgetsearch.trainer.Trainer` with the study's recipe, checking the plan
  against the study's cost model (the budget the plan was made for) and resuming its checkpoints
  when a killed cell runs again. Dynamic methods re-plan during training at the same budget:
  ``neq-dynamic`` by NEq velocities with the ``neq`` selector (Quelennec et al.),
  ``search-dynamic`` by the Fisher potential of the current weights with the search's
  re-planning (:func:`budgetsearch.search.replan`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._io import atomic_write_text, locked
from ..contrib import TableError, discard_stale
from ..errors import SearchError, TrainingError
from ..search import SpaceOptions, replan
from ..trainer import DYNAMIC_MODES, Trainer
from ..trainer.metrics import validation_key
from .context import CellContext
from .spec import RUN_OPTIONS, Cell, StudyError

__all__ = ["cell_plan", "layer_fractions", "name_mixed_configurations", "normalise_metrics",
           "plan_summary", "run_cell", "runner_recipe"]

PlanFn = Callable[[Cell, CellContext], Any]
TrainFn = Callable[[Cell, Any, CellContext], dict[str, Any]]


# ----------------------------------------------------------------------------------- plans
def cell_plan(cell: Cell, ctx: CellContext) -> Any:
    """The plan a study trains in ``cell``: a selector's, a published MIT scheme, or the
    search's, with the method's ``filter_mode``, as :func:`run_cell` makes it (so that a
    benchmark can re-train a cell's plan under other conditions).

    Args:
        cell: The cell, from :meth:`StudySpec.cells`.
        ctx: The cell's context (model, data, cost model, scores). Side effects: the search
            writes ``front.csv`` and ``baselines.csv`` into ``ctx.out_dir`` and its Optuna
            study into ``search.db`` there (with ``plan_seed``: beside the study's cells, under
            ``plans/``, with the race file, shared by the seeds), a raced plan measures or
            reads the contribution table under the study's ``contrib/``, and figures the
            record reports go to ``ctx.extras``.

    Returns:
        The :class:`~budgetsearch.plan.Plan`.

    Raises:
        StudyError: The method re-plans during training by scores the trainer does not take.
        BudgetError: No plan of the method fits the cell's budget.
    """
    return _with_filter_mode(cell, _method_plan(cell, ctx))


def _with_filter_mode(cell: Cell, plan: Any) -> Any:
    """The plan with the method's ``filter_mode``, if it sets one."""
    mode = cell.method.filter_mode
    return plan.with_(filter_mode=mode) if mode else plan


def _method_plan(cell: Cell, ctx: CellContext) -> Any:
    """:func:`cell_plan` before the method's filter mode."""
    from ..selectors import select

    entry = cell.method
    _check_dynamic(cell)  # before a search that training could not use
    if entry.selector is None:
        return _search_plan(cell, ctx)
    options = dict(entry.options)
    if entry.method == "mit-scheme" and "label" not in options:
        options["label"] = _mit_label(cell)
    if entry.method == "mit-scheme" and cell.model.mcu_dir and "mcu_dir" not in options:
        options["mcu_dir"] = cell.model.mcu_dir
    plan = select(entry.selector, cost_model=ctx.cost_model, budget_bytes=_budget(cell, ctx),
                  latency_budget_ms=cell.budget.latency_ms, scores=ctx.scores(entry.scores),
                  seed=cell.seed, memory_measure=cell.study.cost["memory_measure"], **options)
    if any(m.selector is None for m in cell.study.methods):  # the report plots it on the front
        ctx.extras["proxy"] = ctx.proxy(plan)
    return plan


def _budget(cell: Cell, ctx: CellContext) -> int:
    b = cell.budget.memory_bytes
    return int(b) if b is not None else int(ctx.cost_model.profile.memory_bytes)


def _mit_label(cell: Cell) -> str:
    """The largest published MIT scheme label at or below the cell's budget."""
    from ..errors import BudgetError
    from ..selectors import MIT_SCHEMES

    labels = MIT_SCHEMES[cell.model.name]
    budget = cell.budget.memory_bytes
    fitting = [lab for lab in labels if budget is None or int(lab[:-2]) * 1024 <= budget]
    if not fitting:
        raise BudgetError(f"no published MIT scheme of {cell.model.name} at or below the budget "
                          f"{cell.budget.label}; labels: {', '.join(labels)}")
    return max(fitting, key=lambda lab: int(lab[:-2]))


def _search_plan(cell: Cell, ctx: CellContext) -> Any:
    """The search's chosen plan at the cell's budget, by :func:`budgetsearch.planner.plan_for`;
    writes ``front.csv`` and ``baselines.csv`` into the cell directory.

    At an effort that races, the search is on the measured objective: contributions measured on
    the cell's training and validation data, in a table under the study's results shared by its
    cells; the race judges plans with the study's optimizer, batch size and filter mode. Every
    method of the study is then still trained with the study's recipe: the race chooses the
    plan, the study's training compares plans at equal tuning.
    """
    from ..budget import Budget
    from ..planner import get_effort, plan_for

    opts = {**cell.study.search, **cell.method.options}
    run = {k: opts.pop(k) for k in RUN_OPTIONS if k in opts}
    if isinstance(opts.get("space"), dict):
        opts["space"] = SpaceOptions.from_dict(opts["space"])
    m, d = cell.model, cell.data
    plan_seed = cell.seed if run.get("plan_seed") is None else int(run["plan_seed"])
    # with plan_seed, every seed's cell makes the same plan: its search study and race live
    # beside the cells, shared, so the first cell does the work and the others read it
    home = ctx.out_dir if run.get("plan_seed") is None else (
        ctx.out_dir.parent.parent / "plans" / (cell.id.rsplit("__", 1)[0] + f"__p{plan_seed}"))
    home.mkdir(parents=True, exist_ok=True)
    storage = ctx.storage if ctx.storage and "://" in ctx.storage and not ctx.storage.startswith(
        "file://") else f"sqlite:///{(home / 'search.db').resolve()}"
    shared = run.get("plan_seed") is not None
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    effort = get_effort(str(run.get("effort", "quick")))
    if run.get("race_rungs") is not None:  # the race judged at the study's schedule
        if not effort.race:
            raise StudyError(f"method {cell.method.name}: race_rungs needs an effort that "
                             f"races (standard or thorough), not {effort.name}")
        effort = dataclasses.replace(effort, rungs=tuple(int(e) for e in run["race_rungs"]))
    model = ctx.model_for_seed(plan_seed)
    common: dict[str, Any] = dict(
        model=model, cost_model=ctx.cost_model, effort=effort, seed=plan_seed,
        budget=Budget(memory_bytes=_budget(cell, ctx), latency_ms=cell.budget.latency_ms,
                      measure=cell.study.cost["memory_measure"]),
        model_spec={"name": m.name, "weights": m.weights, "mcu_dir": m.mcu_dir,
                    "num_classes": len(ctx.train_data.classes),
                    "input_size": cell.study.input_size},
        trials=int(run.get("trials", 200)), storage=storage,
        study_name=f"{cell.study.name}:{home.name}", pick=str(run.get("pick", "best")),
        target=run.get("target"),
        progress=ctx.progress, flush_seconds=float(run.get("flush_seconds", 2.0)))
    # the seeds' cells sharing a plan search it one at a time: the later ones find the study
    # complete, so the same front and candidates, and share the race by its claims (searching
    # together, their draws would part and their races could differ)
    def make() -> Any:
        common["search_lock"] = locked(home / "search") if shared else None  # one use each
        if effort.race:
            return plan_for(**common, **_race_arguments(cell, ctx, model, effort,
                                                        seed=plan_seed, home=home, opts=opts,
                                                        folds=run.get("race_folds")),
                            lr_extensions=run.get("lr_extensions"),
                            race_final=run.get("race_final"))
        return plan_for(**common, objective="fisher", search_options=opts,
                        scores=ctx.scores(cell.method.scores, seed=plan_seed),
                        scores_source=f"{cell.method.scores} on {d.source}/{d.train_split} "
                                      f"({d.name})")

    outcome = _remaking_stale(make, home=home, storage=storage,
                              study_name=common["study_name"])
    if outcome.race is not None:
        ctx.extras["race"] = {"winner": outcome.race.winner.name, "lr": outcome.race.recipe.lr,
                              "margin": outcome.margin(), "skipped": outcome.skipped,
                              "folds": outcome.race.folds,
                              "final": _final_summary(outcome.race),
                              "separation": outcome.separation()}
    result = outcome.search
    names = result.objective_names
    _write_csv(ctx.out_dir / "front.csv", ["trial", "proxy", "memory_bytes", names[2], "chosen"],
               [[t.number, *t.values, int(t.number == result.trial.number)]
                for t in result.front])
    _write_csv(ctx.out_dir / "baselines.csv",
               ["name", "proxy", "memory_bytes", "latency_ms", "backward_macs", "feasible"],
               [[n, *(e["metrics"].get(k) for k in ("proxy", "memory_bytes", "latency_ms",
                                                     "backward_macs", "feasible"))]
                for n, e in sorted(result.baselines.items()) if (e or {}).get("metrics")])
    ctx.extras.update(proxy=outcome.plan.predicted.get("proxy"), front_csv="front.csv",
                      search={"trials": len(result.trials), "front": len(result.front),
                              "hypervolume": result.hypervolume, "chosen": result.trial.number,
                              "stats": result.stats, "effort": effort.name})
    return outcome.plan


def _final_summary(race: Any) -> dict[str, Any] | None:
    """The race's cross-validated final in a cell's extras: its folds, images and arms."""
    final = race.final()
    if final is None:
        return None
    return {"folds": final["folds"], "val_images": final["val_images"],
            "arms": [{k: a[k] for k in ("candidate", "lr", "val_accuracy")}
                     for a in final["arms"]]}


def _race_arguments(cell: Cell, ctx: CellContext, model: Any, effort: Any, *, seed: int,
                    home: Path, opts: dict[str, Any], folds: int | None) -> dict[str, Any]:
    """:func:`~budgetsearch.planner.plan_for`'s arguments for a raced plan: the cell's training
    and validation tensors, the contribution table's file (one per model, data, seed and
    candidates under the study's ``contrib/``), the magnitude scores its channels are chosen
    by, the race's base recipe, folds (``folds``, else the effort's rule) and file
    (``race.json`` on the validation split, ``race-<k>fold.json`` cross-validated, so that
    the two are kept side by side), and the baselines' Fisher scores."""
    import hashlib

    from ..contrib import load_tensors
    from ..planner import race_data_key, race_folds
    from ..recipe import Recipe

    train, val = load_tensors(ctx.train_data), load_tensors(ctx.val_data)
    if folds is None:
        folds = race_folds(train_images=len(train[1]), val_images=len(val[1]),
                           below=effort.cv_below)
    data_key = race_data_key(graph=ctx.graph, model=model, train=train, val=val)
    digest = hashlib.sha256(json.dumps([data_key, seed, effort.candidates],
                                       sort_keys=True).encode()).hexdigest()[:16]
    t = cell.study.training
    mode = cell.method.filter_mode or (t.get("options") or {}).get("filter_mode")
    return {
        "data": (train, val), "objective": "measured",
        "contrib": ctx.out_dir.parent.parent / "contrib" / f"{cell.model.name}-{digest}.json",
        "scores": ctx.scores("magnitude", seed=seed), "scores_source": "magnitude",
        # the measured search takes the study's space, sampler and population only
        "search_options": {k: v for k, v in opts.items()
                           if k in ("space", "sampler", "population_size")},
        "recipe": Recipe(optimizer=str(t.get("optimizer") or ctx.cost_model.optimizer),
                         batch_size=int(t["batch_size"]), seed=seed,
                         # the race judges plans as the study trains them
                         **({"filter_mode": mode} if mode else {})),
        "race_folds": folds,
        "race_file": home / ("race.json" if folds == 1 else f"race-{folds}fold.json"),
        "baseline_scores": ctx.scores("fisher", seed=seed)}


def _check_dynamic(cell: Cell) -> str | None:
    """The trainer's dynamic mode for the cell's method.

    Raises:
        StudyError: If the trainer does not re-plan by the method's scores.
    """
    dynamic = cell.method.dynamic
    if dynamic is not None and dynamic not in DYNAMIC_MODES:
        raise StudyError(f"method {cell.method.name}: the trainer re-plans only by "
                         f"{', '.join(DYNAMIC_MODES)}, not by the {dynamic}")
    return dynamic


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------- training
def _train(cell: Cell, plan: Any, ctx: CellContext) -> dict[str, Any]:
    """Train the plan with the study's recipe; returns the metrics document.

    With ``training.lrs`` the plan is trained once per learning rate of the grid (each run
    written to ``tuning.json`` in the cell directory as it finishes, so a killed cell resumes),
    and the run with the best validation accuracy (then the lower validation loss) is the
    cell's result; its document says the rate (``lr``) and every rate's validation and test
    accuracy (``tuning``). The test accuracy never enters the choice. A rate whose loss
    diverged is left out of the choice (``tuning`` says so); a cell fails only if all did.
    """
    t = cell.study.training
    grid = t.get("lrs")
    engine = _train_runner if t.get("engine") == "runner" else _train_trainer
    if not grid:
        return engine(cell, plan, ctx, lr=float(cell.method.lr or t["lr"]), out_dir=ctx.out_dir)
    path = ctx.out_dir / "tuning.json"
    try:
        done: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        done = {}
    for lr in grid:
        if f"{lr:g}" not in done:
            try:
                done[f"{lr:g}"] = engine(cell, plan, ctx, lr=lr,
                                         out_dir=ctx.out_dir / f"lr-{lr:g}")
            except TrainingError as exc:  # a rate that diverged is left out, the others go on
                if exc.epoch is None:  # not a divergence: a directory in the way
                    raise
                done[f"{lr:g}"] = {"diverged": str(exc)}
            atomic_write_text(path, json.dumps(done, default=str) + "\n")
    diverged = {f"{lr:g}": done[f"{lr:g}"]["diverged"] for lr in grid
                if "diverged" in done[f"{lr:g}"]}
    runs = {lr: done[f"{lr:g}"] for lr in grid if f"{lr:g}" not in diverged}
    if not runs:
        raise TrainingError("every learning rate of training.lrs diverged: "
                            + "; ".join(f"lr {k}: {why}" for k, why in diverged.items()))
    chosen = max(runs, key=lambda lr: validation_key(runs[lr]))
    doc = dict(runs[chosen])
    doc["lr"] = chosen
    metrics = {lr: normalise_metrics(run) for lr, run in runs.items()}
    # the thread count and CPU kernels beside each run: a run at another count, or on another
    # instruction set, does not repeat bit for bit
    doc["tuning"] = {f"{lr:g}": {"val_accuracy": m["best_accuracy"],
                                 "test_accuracy": m["test_accuracy"],
                                 "threads": runs[lr].get("threads"),
                                 "kernels": runs[lr].get("kernels")}
                     for lr, m in metrics.items()}
    doc["tuning"].update({k: {"diverged": why} for k, why in diverged.items()})
    doc["train_seconds"] = sum(float(run.get("train_seconds") or 0.0) for run in runs.values())
    ctx.extras["lr"] = chosen
    return doc


def _train_trainer(cell: Cell, plan: Any, ctx: CellContext, *, lr: float,
                   out_dir: Path) -> dict[str, Any]:
    """One run of budgetsearch's :class:`~budgetsearch.trainer.Trainer` (best epoch on
    validation, test at that epoch, measured memory), resuming its checkpoints."""
    dynamic = _check_dynamic(cell)
    t = cell.study.training
    options = dict(t.get("options") or {})
    if dynamic is not None:  # training.options may still say otherwise (e.g. search_trials)
        options.setdefault("replan_method", cell.method.replan_method)
        if options["replan_method"] in ("auto", "search"):
            options.setdefault("search_replan", replan)
    trainer = Trainer(ctx.model, plan, train_data=ctx.train_data, val_data=ctx.val_data,
                      test_data=ctx.test_data,
                      epochs=cell.data.epochs_or(t["epochs"]), batch_size=t["batch_size"],
                      lr=lr, optimizer=t["optimizer"], seed=cell.seed,
                      out_dir=out_dir, dynamic=dynamic, cost_model=ctx.cost_model,
                      progress=ctx.progress, **options)
    doc = trainer.fit(resume=True)
    if "threads" not in doc:
        import torch

        doc["threads"] = int(trainer.threads) if trainer.threads else torch.get_num_threads()
    doc.setdefault("kernels", (doc.get("config") or {}).get("kernels"))
    name_mixed_configurations(doc)
    epochs = doc.get("epochs") or []
    doc["train_seconds"] = sum(float(r.get("epoch_s") or 0.0) for r in epochs)
    return doc


def name_mixed_configurations(doc: dict[str, Any]) -> None:
    """Set a trainer run's ``threads`` and ``kernels`` from its epoch rows, which record what
    each epoch trained with: the one configuration, or every one joined by ``;`` when a resume
    changed them (threads in numeric order). A run whose rows do not record them (made before
    they were kept) is left as it is."""
    configs = {(r.get("threads"), r["kernels"]) for r in doc.get("epochs") or []
               if isinstance(r, dict) and "kernels" in r}
    if not configs:
        return
    threads = sorted({t for t, _ in configs if t is not None})
    doc["threads"] = (threads[0] if len(threads) == 1 else
                      ";".join(map(str, threads)) or doc.get("threads"))
    doc["kernels"] = ";".join(sorted({k for _, k in configs}))


def runner_recipe(cell: Cell, plan: Any, *, lr: float) -> Any:
    """The recipe a study's ``runner`` engine trains ``plan`` with in ``cell`` at rate ``lr``
    (its optimizer, epochs, batch size and options; the cell's seed; the plan's filter mode
    unless the options name one), so that a benchmark can train a cell's run again.

    Raises:
        StudyError: ``training.options`` holds an option the runner does not take.
    """
    from ..recipe import Recipe

    t = cell.study.training
    options = dict(t.get("options") or {})
    unknown = sorted(set(options) - {"bn", "momentum", "weight_decay", "filter_mode"})
    if unknown:
        raise StudyError(f"training.options {', '.join(unknown)}: not used by engine runner "
                         "(it takes bn, momentum, weight_decay, filter_mode)")
    return Recipe(optimizer=t["optimizer"], lr=lr, epochs=cell.data.epochs_or(t["epochs"]),
                  batch_size=t["batch_size"], seed=cell.seed,
                  filter_mode=options.pop("filter_mode", None) or plan.filter_mode, **options)


def _train_runner(cell: Cell, plan: Any, ctx: CellContext, *, lr: float,
                  out_dir: Path) -> dict[str, Any]:
    """One run of the planner's :class:`~budgetsearch.contrib.PlanRunner`: the same operators
    and recipe as the trainer (:func:`runner_recipe`), the frozen prefix's outputs computed
    once per process and reused, scored after the last epoch (on validation, and on the test
    split, only reported). No per-epoch choice and no measured memory: the record keeps the
    cost model's figures."""
    del out_dir  # nothing to resume within a run: a run takes seconds to a few minutes
    recipe = runner_recipe(cell, plan, lr=lr)
    res = ctx.runner.run(dict(plan.updates), recipe)
    return {"engine": "runner", "recipe": recipe.to_dict(),
            "best_accuracy": res["val_accuracy"], "final_accuracy": res["val_accuracy"],
            "val_loss": res.get("val_loss"), "train_loss": res.get("train_loss"),
            "test_accuracy": res.get("test_accuracy"),
            "final_test_accuracy": res.get("test_accuracy"), "test_loss": res.get("test_loss"),
            "train_seconds": res.get("train_seconds"), "eval_seconds": res.get("eval_seconds"),
            "threads": res.get("threads"), "kernels": res.get("kernels")}


# ----------------------------------------------------------------------------- summarising
_METRIC_KEYS = {  # record field -> names in the metrics, first found wins
    "best_accuracy": ("best_accuracy", "best_val_accuracy"),
    "final_accuracy": ("final_accuracy", "final_val_accuracy"),
    "test_accuracy": ("test_accuracy", "test_accuracy_at_best_epoch"),
    "final_test_accuracy": ("final_test_accuracy",),
    "measured_saved_bytes": ("measured_saved_bytes", "saved_activation_bytes"),
    "measured_backward_ms": ("measured_backward_ms", "backward_ms"),
    "train_seconds": ("train_seconds",),
}


def normalise_metrics(raw: dict[str, Any]) -> dict[str, Any]:
    """The record's metric fields from a metrics document (top-level keys)."""
    def pick(names: tuple[str, ...]) -> float | None:
        for n in names:
            v = raw.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return v
        return None

    return {field: pick(names) for field, names in _METRIC_KEYS.items()}


def layer_fractions(plan: Any) -> dict[str, float | None]:
    """Per layer: None frozen, 0.0 bias only, else the updated fraction of the weight's
    channels (along the plan's axis)."""
    out: dict[str, float | None] = {}
    for name, shape in plan.layer_shapes.items():
        u = plan.updates.get(name)
        if u is None:
            out[name] = None
        elif u.mode == "bias":
            out[name] = 0.0
        else:
            n = shape[1] if u.axis == "in" and len(shape) > 1 and shape[1] > 1 else shape[0]
            out[name] = round(u.fraction(int(n)), 4)
    return out


def plan_summary(plan: Any) -> dict[str, Any]:
    """Predicted costs and provenance facts of a plan, for the record."""
    prov = dict(plan.provenance)
    return {"predicted": dict(plan.predicted), "memory_bytes": prov.get("memory_bytes"),
            "fits": prov.get("fits", prov.get("feasible")), "updated_layers": len(plan.updates),
            "patch_sizes": sorted({u.patch_size for u in plan.updates.values()}),
            "provenance": prov}


def _remaking_stale(make: Callable[[], Any], *, home: Path, storage: str,
                    study_name: str) -> Any:
    """``make()``, after removing what an earlier configuration of the cell left in ``home``
    and no longer fits: its search study (made for other search settings, a refused identity)
    or its race file (made with another key: another recipe, grid or candidates).

    A study and a race are found by name, and a study file edited since would otherwise fail
    the cell for good on them. Only the artifact refused is removed, so what still fits (a race
    that an unrelated edit leaves valid) is kept; a contribution table elsewhere is never.
    """
    removed: set[str] = set()
    while True:
        try:
            return make()
        except (SearchError, TableError) as exc:
            study = exc.stale_study if isinstance(exc, SearchError) else None
            path = exc.stale_path if isinstance(exc, TableError) else None
            if study == study_name and f"study:{study}" not in removed:
                assert isinstance(exc, SearchError)
                with locked(home / "search"):  # not while a seed sharing the home searches
                    _delete_study(storage, study, creator=exc.stale_creator)
                removed.add(f"study:{study}")
            elif (path is not None and Path(path).parent.resolve() == home.resolve()
                  and f"file:{path}" not in removed):
                assert isinstance(exc, TableError) and exc.wanted_key is not None
                if not discard_stale(path, exc.wanted_key):  # another process races on it
                    raise SearchError(f"{exc}; a live worker holds a claim on it, so it is "
                                      "left: run again once that worker is done",
                                      transient=True) from exc
                removed.add(f"file:{path}")
            else:
                raise


def _delete_study(storage: str, name: str, *, creator: str | None) -> None:
    """Delete the study ``name`` if it is still the one refused (made by ``creator``, its
    recorded creator): one another process made anew under the name meanwhile is kept."""
    import optuna

    from ..search import CREATOR_KEY, open_storage

    opened = open_storage(storage)
    if name not in {s.study_name for s in opened.get_all_studies()}:
        return
    study = optuna.load_study(study_name=name, storage=opened)
    if study.user_attrs.get(CREATOR_KEY) == creator:
        optuna.delete_study(study_name=name, storage=opened)


def _prepare_dir(cell: Cell, out_dir: Path) -> None:
    """Keep a killed run's partial state (checkpoints, search study) only if it was made with
    the cell's current configuration."""
    marker = out_dir / "cell.json"
    try:
        same = json.loads(marker.read_text()).get("config_hash") == cell.config_hash()
    except (OSError, ValueError):
        same = not out_dir.exists()
    if not same and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"cell_id": cell.id, "config_hash": cell.config_hash(),
                                          "config": cell.config()}, indent=1) + "\n")


def run_cell(cell: Cell, *, out_dir: str | os.PathLike[str], storage: str | None = None,
             plan_fn: PlanFn | None = None, train_fn: TrainFn | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Make the cell's plan, train it, and return the record's result fields.

    Raises:
        Whatever the plan or train function raises (the runner records it as a failed cell).
    """
    out_dir = Path(out_dir)
    _prepare_dir(cell, out_dir)
    ctx = CellContext(cell, out_dir=out_dir, storage=storage, progress=progress)
    plan = cell_plan(cell, ctx) if plan_fn is None else _with_filter_mode(cell, plan_fn(cell, ctx))
    plan.save(out_dir / "plan.json")
    result: dict[str, Any] = {**plan_summary(plan), "layers": layer_fractions(plan),
                              "plan_file": f"{out_dir.name}/plan.json"}
    if "graph" in ctx.__dict__:  # the model was traced: add the cross-checks
        t = cell.study.training
        ops = ctx.cost_model_with(accounting="ops", batch_size=t["batch_size"],
                                  optimizer=t["optimizer"])
        result["predicted_ops"] = _asdict(ops.summarize(dict(plan.updates)))
        result["mit_memory_bytes"] = _mit_bytes(cell, plan, ctx)
    raw = (train_fn or _train)(cell, plan, ctx)
    result["metrics"] = normalise_metrics(raw)
    result["metrics_raw"] = {k: v for k, v in raw.items() if k != "config"}
    result.update(ctx.extras)
    if not cell.study.training.get("keep_artifacts"):
        _drop_artifacts(out_dir)
    return result


#: What a finished cell's directory loses unless ``training.keep_artifacts``: they serve only to
#: resume a killed cell, and weigh megabytes per cell.
ARTIFACTS = ("checkpoints", "model.safetensors", "search.db", "search.db-wal", "search.db-shm",
             "search.db-journal")


def _drop_artifacts(out_dir: Path) -> None:
    for name in ARTIFACTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _asdict(summary: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(summary)


def _mit_bytes(cell: Cell, plan: Any, ctx: CellContext) -> int | None:
    from ..selectors import MIT_SCHEMES, mit_memory_bytes

    return mit_memory_bytes(ctx.graph, plan) if cell.model.name in MIT_SCHEMES else None
