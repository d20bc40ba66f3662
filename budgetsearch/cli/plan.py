"""``budgetsearch plan``, ``front`` and ``worker``: the budget search from the command line.

``plan`` turns its flags into the arguments of :func:`budgetsearch.planner.plan_for` (which scores
the model, measures the contributions, runs or continues the study and races the candidates; the
study is SQLite next to ``--out`` unless ``--storage`` says otherwise), writes the chosen plan and
prints it against every baseline. ``front`` writes a study's Pareto front as CSV and PNG.
``worker`` joins an existing study from any machine that reaches its storage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from ..budget import Budget
from ..choices import (
    EFFORT_NAMES,
    MEMORY_MEASURES,
    PLAN_OBJECTIVES,
    PLAN_TARGETS,
    THIRD_OBJECTIVES,
)
from ..errors import PlanError, SearchError
from ..planner.race import MAX_FINAL, MAX_FOLDS, MAX_LR_EXTENSIONS, final_count_ok
from ..units import format_bytes
from ._common import (
    MAX_BATCH_SIZE,
    MAX_COUNT,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_THREADS,
    MAX_TRIALS,
    add_budget_args,
    add_device_args,
    add_model_args,
    budget_from_args,
    check_out_path,
    float_range,
    int_range,
    write_text,
)

__all__ = [
    "DEFAULT_TRIALS",
    "race_table",
    "register",
    "run_front",
    "run_plan",
    "run_worker",
    "summary_table",
]

#: Default trial count: the whole ``plan`` command for MobileNetV2 at 128 px on stm32h743,
#: Fisher pass included, takes 6.2-6.7 s on the idle 2-core reference machine
#: (benchmarks/search_speed.py), within the 10 s the command is meant to take.
DEFAULT_TRIALS = 100
_MAX_POPULATION = 100_000


def register(subparsers: Any) -> None:
    """Add the ``plan``, ``front`` and ``worker`` commands."""
    p = subparsers.add_parser(
        "plan", help="search the best plan under a budget (Optuna study, Pareto front)",
        description="Jointly search which layers, channels and gradient-filter patch sizes to "
                    "train under a memory (and latency) budget; warm-started with the published "
                    "selectors' plans; resumable (re-run the same command to continue).")
    add_model_args(p)
    add_device_args(p)
    add_budget_args(p)
    g = p.add_argument_group("scores")
    g.add_argument("--data", default=None,
                   help="data for the Fisher pass: cifar10, an ImageFolder directory, .tar.gz...")
    g.add_argument("--scores", default=None, help="a scores .npz instead of the Fisher pass")
    g.add_argument("--objective", choices=PLAN_OBJECTIVES, default=None,
                   help="what the search maximises: measured (validation accuracy predicted "
                        "from a contribution table, measured on --data first unless --contrib "
                        "names an existing one; default with --contrib, or with --data at "
                        "an effort that races) or fisher "
                        "(the Fisher-potential proxy; default with --scores alone)")
    g.add_argument("--contrib", default=None,
                   help="the contribution table (`budgetsearch contrib`) of the measured "
                        "objective: with --data it is measured into this file (or resumed), "
                        "without it read as it is (default: $BUDGETSEARCH_CACHE or "
                        "~/.cache/budgetsearch /contrib/, one table per model, data and "
                        "recipe); channels chosen by weight magnitude unless --scores")
    g.add_argument("--contrib-samples", type=int_range(2, MAX_SAMPLES), default=None,
                   help="images drawn from --data (class-balanced) for the contribution "
                        "analysis and the race (default: 1000, or all if --data has fewer)")
    g.add_argument("--val-fraction", type=float_range(0, 1, low_open=True, high_open=True),
                   default=0.2, help="share of them held out for validation (0.2)")
    g.add_argument("--candidates", default=None,
                   help="layers with weight units in the analysis (see `budgetsearch contrib "
                        "--help`; the effort's: top:6, thorough top:10)")
    g.add_argument("--decay", type=float_range(0, 1, low_open=True), default=0.2,
                   help="measured objective: discount of each further weight-updated layer's "
                        "gain, in (0, 1] (0.2, calibrated; 1: additive)")
    g.add_argument("--loss-weight", type=float_range(0, 100), default=0.05,
                   help="measured objective: weight of a unit's validation-loss gain beside "
                        "its accuracy gain (0.05, calibrated)")
    g.add_argument("--samples", type=int_range(1, MAX_SAMPLES), default=64,
                   help="samples of the Fisher pass (64)")
    g.add_argument("--split", default="train", help="data split (default train)")
    g.add_argument("--micro-batch", type=int_range(1, MAX_BATCH_SIZE), default=16,
                   help="Fisher micro-batch (16)")
    g.add_argument("--normalization", choices=("imagenet", "mcu"), default=None,
                   help="input normalisation (default: the model's)")
    r = p.add_argument_group("effort and race")
    r.add_argument("--effort", choices=EFFORT_NAMES, default=None,
                   help="quick: the search on a predicted objective only (seconds); standard: "
                        "measured contributions, the search, then a race of the best front "
                        "points and every baseline trained on a validation split of --data "
                        "(minutes); thorough: more of each (default: standard with --data, "
                        "else quick; quick with --objective fisher)")
    r.add_argument("--lrs", default=None,
                   help="the race's learning rates, comma-separated (default: the effort's "
                        "grid around the optimizer's usual rate, e.g. sgd 0.00667,0.02,0.06)")
    r.add_argument("--lr-extensions", type=int_range(0, MAX_LR_EXTENSIONS), default=None,
                   help="when a leading candidate's best rate in the race's first rung is the "
                        "lowest or highest it was tried at, also try it one grid step further, "
                        "up to this many steps beyond each edge (default: the effort's, 2; 0: "
                        "the grid only)")
    r.add_argument("--race-folds", type=int_range(1, MAX_FOLDS), default=None,
                   help="score the race's arms by cross-validation on this many folds of the "
                        "training and validation images pooled (1: the validation split as it "
                        "is; default: folds of the split's size when it holds fewer than 200 "
                        "images, else 1; a --race-file made with other folds is refused: give "
                        "its folds or another file)")
    r.add_argument("--race-final", type=_final_count, default=None,
                   help="after a race on the validation split, train the best arm of each of "
                        "this many of the last rung's best candidates again by cross-"
                        "validation on folds of the pooled images and keep the best (0: no "
                        "final; default: the effort's, 4 at standard, 6 at thorough)")
    r.add_argument("--train-batch", type=int_range(1, MAX_BATCH_SIZE), default=32,
                   help="batch size the race trains at, recorded in the plan's recipe (32); "
                        "the budget stays that of --batch-size on the device")
    r.add_argument("--race-file", default=None,
                   help="the race's results file, resumable and shared by workers racing the "
                        "same candidates (default: the --storage database when one is given, "
                        "so plan processes on several machines share the race and the "
                        "contributions; else under $BUDGETSEARCH_CACHE or "
                        "~/.cache/budgetsearch/race/, by model, data and candidates)")
    s = p.add_argument_group("search")
    s.add_argument("--trials", type=int_range(1, MAX_TRIALS), default=DEFAULT_TRIALS,
                   help=f"finished trials the study should hold (default {DEFAULT_TRIALS})")
    s.add_argument("--memory-measure", choices=MEMORY_MEASURES, default="peak",
                   help="what the budget limits: peak memory (default) or training memory "
                        "(peak minus the inference peak)")
    s.add_argument("--third", choices=THIRD_OBJECTIVES, default="latency",
                   help="third objective: latency per step (default) or backward MACs")
    s.add_argument("--granularity", choices=("layer", "block"), default="layer")
    s.add_argument("--last-n", type=int_range(1, MAX_COUNT), default=None,
                   help="only the last N layers are candidates (smaller space)")
    s.add_argument("--no-filters", action="store_true", help="never use gradient filters")
    s.add_argument("--target", choices=PLAN_TARGETS, default=None,
                   help="what trains the plan: pytorch (budgetsearch's trainer, apply_plan; "
                        "default) or tte (MIT's Tiny Training Engine: the search and the race "
                        "keep to plans `budgetsearch export --format tte` takes, baselines it "
                        "cannot express are left out of the race; MCU models, --batch-size 1, "
                        "the default then)")
    s.add_argument("--alpha", type=float_range(0, 100, low_open=True), default=1.0,
                   help="proxy exponent on the scores, in (0, 100] (1)")
    s.add_argument("--bias-credit", type=float_range(0, 1), default=0.25,
                   help="proxy credit of a bias-only update, share of the channel score, in "
                        "[0, 1] (0.25)")
    s.add_argument("--sampler", choices=("nsga2", "tpe", "gp", "random"), default="nsga2")
    s.add_argument("--population", type=int_range(2, _MAX_POPULATION), default=None,
                   help="NSGA-II population (50)")
    s.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="sampler seed (0)")
    s.add_argument("--pick", type=_pick_rule, default="best",
                   help="which feasible trial becomes the plan: best (highest proxy) or e.g. "
                        "'min-memory-within 1%%' / 'min-latency-within 2%%'")
    _add_storage_args(p, required=False)
    p.add_argument("--front-dir", default=None, help="also write the front CSV and PNG here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=None,
                   help="torch threads while measuring and racing, 1 to "
                        f"{MAX_THREADS} (default: torch's). A plan of several layers does not "
                        "train bit-for-bit alike at another count, so to repeat a race give "
                        "the count its plan's provenance (race.threads) names")
    p.add_argument("--out", required=True, help="plan file to write (JSON)")
    p.set_defaults(func=run_plan)

    f = subparsers.add_parser("front", help="write a study's Pareto front (CSV + PNG)")
    _add_storage_args(f, required=True)
    f.add_argument("--pick", type=_pick_rule, default="best",
                   help="rule marking the chosen trial (best)")
    f.add_argument("--out", required=True, help="directory for front.csv, trials.csv, front.png")
    f.set_defaults(func=run_front)

    w = subparsers.add_parser("worker", help="join an existing study and run trials for it")
    _add_storage_args(w, required=True)
    w.add_argument("--trials", type=int_range(1, MAX_TRIALS), default=None,
                   help="trials this worker adds (default: until the study reaches its target)")
    w.add_argument("--seed", type=int_range(0, MAX_SEED), default=None,
                   help="this worker's sampler seed (default: drawn at random)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=run_worker)


def _add_storage_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--storage", required=required, default=None,
                   help="Optuna storage URL: sqlite:///file.db (default: next to --out), "
                        "postgresql://user:pw@host/db, journal:///file.log")
    p.add_argument("--study", required=required, default=None,
                   help="study name (default: derived from the model, device and budgets)")
    p.add_argument("--flush-seconds", type=float_range(0, 86400, unit="s"), default=2.0,
                   help="interval of the batched writes to the storage, 0 (after every trial) "
                        "to 86400 s (2 s)")


def _graceful_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C: the trials done so far are written first."""
    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


#: How the planner's argument errors name the flags (see budgetsearch.planner.choose_effort).
_FLAGS = {"plan": "plan", "data": "--data", "scores": "--scores FILE", "contrib": "--contrib",
          "effort": "--effort", "objective": "--objective"}


def run_plan(args: argparse.Namespace) -> int:
    """Score, search, write the plan, print the comparison: the flags become the arguments of
    :func:`budgetsearch.planner.plan_for`, which does the work (with ``--threads``, at that
    torch thread count, restored after)."""
    from .._threads import torch_threads

    check_out_path(args.out, "--out")  # before minutes of work, not after
    check_out_path(args.front_dir, "--front-dir", directory=True)
    with torch_threads(args.threads):
        return _run_plan(args)


def _run_plan(args: argparse.Namespace) -> int:
    """:func:`run_plan` at the thread count it set."""
    import time

    import torch

    from ..planner import PlanData, choose_effort, plan_for
    from ..profiles import load_profile
    from ..search import SpaceOptions, storage_kind
    from ._common import build_cost_model, build_model

    started = time.perf_counter()
    _graceful_sigterm()
    # the effort and objective rules (--objective fisher: quick unless --effort says), before
    # any work, in the flags' words
    effort, objective = choose_effort(
        effort=args.effort, objective=args.objective, data=args.data is not None,
        scores=args.scores is not None, contrib=args.contrib is not None, names=_FLAGS)
    if args.trials < 1:
        raise SearchError(f"--trials must be at least 1; got {args.trials}")
    lrs = _parse_lrs(args.lrs)
    if args.target == "tte":  # the engine trains at batch 1
        if args.batch_size not in (None, 1):
            raise PlanError(f"--target tte: the engine trains at batch 1; --batch-size is "
                            f"{args.batch_size}")
        args.batch_size = 1
    torch.manual_seed(args.seed)  # a replaced classifier head is initialised from it
    model, graph = build_model(args)
    cost_model = build_cost_model(args, graph)
    budget = budget_from_args(args, load_profile(args.device))
    out = Path(args.out)
    storage = args.storage or f"sqlite:///{out.with_suffix('.study.db').resolve()}"
    storage_kind(storage)  # unknown scheme: refuse before any work
    if storage.startswith("sqlite:///"):
        out.parent.mkdir(parents=True, exist_ok=True)
    data = None if args.data is None else PlanData(
        source=args.data, split=args.split, samples=args.contrib_samples,
        val_fraction=args.val_fraction, normalization=args.normalization)
    outcome = plan_for(
        model=model, cost_model=cost_model, budget=budget, data=data, effort=effort,
        objective=objective, target=args.target, scores=args.scores, fisher_samples=args.samples,
        micro_batch=args.micro_batch, contrib=args.contrib, database=_shared_database(args),
        candidates=args.candidates,
        search_options={
            "space": SpaceOptions(granularity=args.granularity, last_n=args.last_n,
                                  filters=not args.no_filters),
            "third": args.third, "alpha": args.alpha, "bias_credit": args.bias_credit,
            "sampler": args.sampler, "population_size": args.population, "decay": args.decay,
            "loss_weight": args.loss_weight},
        model_spec={"name": args.model, "weights": args.weights,
                    "num_classes": args.num_classes, "input_size": int(graph.input_shape[-1]),
                    "mcu_dir": args.mcu_dir},
        trials=args.trials, seed=args.seed, storage=storage,
        study_name=args.study or (lambda config: _default_study_name(args, budget, config)),
        pick=args.pick, lrs=lrs, lr_extensions=args.lr_extensions, race_folds=args.race_folds,
        race_final=args.race_final,
        train_batch=args.train_batch, race_file=args.race_file,
        progress=not args.no_progress, flush_seconds=args.flush_seconds, log=_stderr)
    result = outcome.search
    name = result.study_name
    plan = outcome.plan
    plan = plan.with_(provenance={**plan.provenance, "command_seconds":
                                  time.perf_counter() - started})
    plan.save(out)
    if args.front_dir:
        _write_front(Path(args.front_dir), result.trials, result.objective_names,
                     budget.memory_bytes, result.baselines, result.trial, name)
    print(summary_table(result) if outcome.race is None else race_table(outcome))
    print(f"latency model: {cost_model.latency_model}")
    if args.target == "tte":
        print("target tte: the search kept to plans MIT's Tiny Training Engine can express"
              + ("" if outcome.race is None else " and so did the race's candidates")
              + f"; export with `budgetsearch export --plan {out} --format tte`")
    print(f"wrote {out} (study {name!r} in {result.storage}; "
          f"{time.perf_counter() - started:.1f} s)")
    if outcome.race is not None:
        rates = ", ".join(f"{x:g}" for x in outcome.race.winner_lrs())
        same = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in (
            ("model", args.model), ("weights", args.weights), ("mcu_dir", args.mcu_dir),
            ("num_classes", args.num_classes), ("data", args.data),
            ("input_size", args.input_size)) if v is not None)
        print(f"train it once at each rate its race tried it at ({rates}) and keep the run "
              f"that validates best: budgetsearch train --plan {shlex.quote(str(out))} {same} "
              "--lrs --out DIR")
    if not args.front_dir:
        print(f"front (CSV + PNG): budgetsearch front --study {name} --storage "
              f"{result.storage} --out DIR (or --front-dir DIR here)")
    return 0


def _final_count(text: str) -> int:
    """``--race-final``: 0 (no final) or 2 to :data:`MAX_FINAL` candidates."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not final_count_ok(value):
        raise argparse.ArgumentTypeError(f"must be 0 (no final) or an integer from 2 to "
                                         f"{MAX_FINAL}; got {text!r}")
    return value


def _pick_rule(text: str) -> str:
    """``--pick``: a rule :func:`~budgetsearch.search.parse_pick` knows, checked before any
    work."""
    from ..search import parse_pick

    try:
        parse_pick(text)
    except SearchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _default_study_name(args: argparse.Namespace, budget: Budget,
                        config: dict[str, Any]) -> str:
    """A study name from the arguments and where the scores and the contribution table come
    from (the study's configuration): the same arguments continue the same study."""
    memory = budget.memory_bytes
    table = (config.get("objective") or {}).get("table_source")
    key = json.dumps([args.model, args.num_classes, args.input_size, args.device,
                      args.accounting or "device", args.batch_size, args.optimizer, memory,
                      budget.latency_ms,
                      budget.measure, args.third, args.granularity, args.last_n,
                      args.no_filters, args.alpha, args.bias_credit, config["scores_source"],
                      args.scores and str(Path(args.scores).resolve()), args.weights]
                     + ([str(Path(table).resolve()), args.decay, args.loss_weight]
                        if table else [])
                     + (["target", args.target] if args.target not in (None, "pytorch")
                        else []))
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{args.model}-{args.device}-{format_bytes(memory).replace(' ', '')}-{digest}"


def _shared_database(args: argparse.Namespace) -> str | None:
    """``--storage`` when it names a database (SQLite, PostgreSQL, MySQL): the contribution
    table and the race then live there too, so that `plan` processes on other machines with
    the same arguments share them; None otherwise (the files of the user cache)."""
    url = args.storage
    if not url or "://" not in url:
        return None
    return url if url.split("://")[0].split("+")[0] in ("sqlite", "postgresql", "mysql") \
        else None


def _parse_lrs(text: str | None) -> tuple[float, ...] | None:
    """``--lrs``: comma-separated learning rates in (0, MAX_LR]."""
    import math

    from ..recipe import MAX_LR

    if text is None:
        return None
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or any(not (math.isfinite(v) and 0 < v <= MAX_LR) for v in values) or len(
            {f"{v:g}" for v in values}) != len(values):
        raise SearchError(f"--lrs {text}: give distinct learning rates in (0, {MAX_LR:g}] "
                          "(distinct within 6 significant digits), comma-separated (e.g. "
                          "0.005,0.02)")
    return values


def summary_table(result: Any) -> str:
    """The chosen plan against every baseline: the objective, memory, latency, MACs.

    With the Fisher proxy the objective column is called a proxy and compared by difference
    only: it ranks plans by captured Fisher potential, not by accuracy, and a ratio of proxies
    reads like an accuracy gain it is not. With a measured objective it is the predicted
    validation accuracy, compared in points.
    """
    p = result.plan.predicted
    measured = "predicted_accuracy" in p
    value = p["predicted_accuracy"] if measured else p["proxy"]
    measure = result.plan.provenance["memory_measure"]
    rows = [("search (chosen)", value, result.plan.provenance["memory_bytes"],
             p["latency_ms"], p["backward_macs"], True, "")]
    for name, entry in sorted(result.baselines.items()):
        m = (entry or {}).get("metrics")
        if m is None:
            rows.append((name, None, None, None, None, False, "no plan: " + _short(entry)))
            continue
        rows.append((name, m["proxy"], m["memory_bytes"], m["latency_ms"], m["backward_macs"],
                     m["feasible"], ""))
    head = "pred acc" if measured else "proxy"
    lines = [f"{'plan':<18}{head:>9}{'chosen -':>10}{measure + ' mem':>14}"
             f"{'latency':>11}{'bwd MACs':>11}"]
    for name, v, mem, lat, macs, ok, note in rows:
        if v is None:
            lines.append(f"{name:<18}{note}")
            continue
        gain = "" if name.startswith("search") else (
            f"{(value - v) * 100:+.1f} pt" if measured else f"{value - v:+.4f}")
        lines.append(f"{name:<18}{v:>9.4f}{gain:>10}{format_bytes(mem):>14}"
                     f"{lat:>9.1f}ms{macs / 1e6:>10.2f}M" + ("" if ok else "  (over budget)"))
    if measured:
        lines.append("pred acc: validation accuracy predicted from the contribution table "
                     "(a prediction: train the plan to know)")
    else:
        lines.append("proxy: captured Fisher potential, not an accuracy (in the committed "
                     "studies it was rank-correlated negatively with trained accuracy); "
                     "--contrib TABLE for a measured objective")
    st = result.stats
    lines.append(
        f"study {result.study_name!r}: {len(result.trials)} trials (+{st['new_trials']} now, "
        f"{st['trials_per_minute']:.0f}/min, sampler {st['sampler_share'] * 100:.0f}% of the "
        f"search time), front {len(result.front)} points, hypervolume {result.hypervolume:.4f}, "
        f"chosen trial #{result.trial.number}")
    return "\n".join(lines)


def race_table(outcome: Any) -> str:
    """The race's candidates by how far they got and their validation accuracy there, beside
    predicted memory, latency and backward MACs (the search's objective as an extra column),
    then which baseline the plan beat and by how much, or that a baseline won."""
    rr, plan = outcome.race, outcome.plan
    measure = plan.provenance["memory_measure"]
    best = rr.best()
    objective = "pred acc" if "predicted_accuracy" in plan.predicted else "proxy"
    lines = [f"{'candidate':<24}{'val acc':>8}{'epochs':>7}{'lr':>9}{measure + ' mem':>15}"
             f"{'latency':>11}{'bwd MACs':>10}{objective:>9}"]
    order = sorted(rr.candidates.values(), key=lambda c: (-best[c.name]["rung"],
                                                         -best[c.name]["val_accuracy"]))
    for c in order:
        b = best[c.name]
        name = c.name + (" (chosen)" if c.name == rr.winner.name else "")
        if c.aliases:
            name += " = " + ", ".join(c.aliases)
        lines.append(f"{name[:23]:<24}{b['val_accuracy']:>8.4f}{b['epochs']:>7}{b['lr']:>9.3g}"
                     f"{format_bytes(c.memory_bytes):>15}{c.latency_ms:>9.1f}ms"
                     f"{c.backward_macs / 1e6:>9.2f}M{c.predicted or 0.0:>9.4f}")
    margin = outcome.margin()
    if margin is None:
        lines.append("no baseline raced (see 'not raced' below): only the search's plans "
                     "raced")
    elif rr.winner.source == "baseline":
        lines.append(f"a baseline won the race: the plan is {rr.winner.name} (validation "
                     f"accuracy {margin['winner_accuracy']:.4f} after {margin['epochs']} "
                     "epoch(s)); the search's own plans trained worse on this data")
    else:
        lines.append(f"the plan ({rr.winner.name}) beat the best baseline, {margin['baseline']}, "
                     f"by {margin['points']:+.1f} points of validation accuracy after "
                     f"{margin['epochs']} epoch(s) ({margin['winner_accuracy']:.4f} against "
                     f"{margin['baseline_accuracy']:.4f})")
    final = rr.final()
    if final is not None:
        lines.append(
            f"the final cross-validated the {len(final['arms'])} best candidates of the last "
            f"rung (each at its best rate there) on {final['folds']} folds of all "
            f"{final['val_images']} training and validation images, and {rr.winner.name} won "
            f"it; their val acc is the final's (--race-final 0: no final)")
    if rr.folds > 1:
        lines.append(f"the race cross-validated every arm on {rr.folds} folds: each trained on "
                     f"the other folds and validated on its own, so the validation accuracies "
                     f"are over all {rr.stats.get('val_images')} training and validation images "
                     "(--race-folds 1: the validation split alone)")
    sep = outcome.separation()
    if sep is not None and not sep["clear"]:
        lines.append(
            f"the race could not separate {rr.winner.name} from {sep['runner_up']}: a lead of "
            f"{sep['lead_images']:g} of {sep['val_images']} validation images "
            f"({sep['lead_points']:+.1f} points) is less than one standard error of an accuracy "
            f"on {sep['val_images']} images ({sep['standard_error_points']:.1f} points); they "
            "train alike as far as this split can tell (more data would decide"
            + (")" if rr.folds > 1 or final is not None
               else ", or a larger --val-fraction, or --race-folds)"))
    for name, why in sorted(outcome.skipped.items()):
        lines.append(f"not raced: {name}: {_short({'error': why})}")
    added = rr.lr_extension.get("added") or []
    if added:
        grid = ", ".join(f"{x:g}" for x in rr.lr_extension["grid"])
        lines.append(f"beyond the rate grid ({grid}; at most {rr.lr_extension['max_steps']} "
                     "step(s) each side): " + "; ".join(
                         f"{a['candidate']} at {a['lr']:g} (best at its {a['edge']} edge "
                         f"{a['after']:g})" for a in added))
    r = plan.recipe
    st = outcome.search.stats
    lines.append(
        f"recipe: {r.optimizer} lr {r.lr:g}, {r.epochs} epochs at batch "
        f"{r.batch_size} (validation accuracy on {rr.stats.get('val_images', 'the')} "
        + ("held-out images" if rr.folds == 1 else f"images, {rr.folds}-fold cross-validated")
        + ("" if final is None else f"; the final's on {final['val_images']} images, "
           f"{final['folds']}-fold cross-validated")
        + "; val acc of a candidate is at the last rung it reached)")
    lines.append(
        f"race: {sum(len(x['arms']) * len(x['seeds']) for x in rr.rungs if x is not final)} "
        "arms" + ("" if rr.folds == 1 else f" x {rr.folds} folds") + " over "
        f"{len(rr.rungs) - (final is not None)} rungs"
        + ("" if final is None else f" and a final of {len(final['arms'])} x {final['folds']} "
           "folds" + ("" if len(final["seeds"]) == 1 else f" x {len(final['seeds'])} seeds"))
        + f" ({rr.stats['arms_trained']} trained now, "
        f"{rr.stats['seconds']:.0f} s{_threads(rr.threads(), kernels=rr.kernels())}); "
        f"study {outcome.search.study_name!r}: "
        f"{len(outcome.search.trials)} trials (+{st['new_trials']} now)")
    return "\n".join(lines)


def _threads(counts: list[int], *, kernels: list[str]) -> str:
    """The race's thread counts and CPU kernels for its summary line ("" for what none of its
    arms recorded)."""
    text = "" if not counts else (", " + " and ".join(map(str, counts))
                                  + f" thread{'s' * (counts != [1])}")
    return text + "".join(f", {k}" for k in kernels)


def _short(entry: Any) -> str:
    text = str((entry or {}).get("error") or "")
    return text if len(text) < 90 else text[:87] + "..."


def _write_front(directory: Path, trials: Any, names: Any, budget: int | None,
                 baselines: Any, chosen: Any, title: str) -> None:
    from ..search import front_csv, plot_front, trials_csv

    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "front.csv", front_csv(trials, names))
    write_text(directory / "trials.csv", trials_csv(trials, names))
    plot_front(directory / "front.png", trials, names=names, budget_bytes=budget,
               baselines=baselines, chosen=chosen, title=title)


def run_front(args: argparse.Namespace) -> int:
    """Write the front of a stored study."""
    import optuna

    from ..search import load_study, open_storage, pareto_front, pick, read_config, redact

    check_out_path(args.out, "--out", directory=True)
    study = load_study(open_storage(args.storage, existing=True), args.study, args.storage)
    config, _scores, baselines = read_config(study, with_scores=False)
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = study.metric_names or ["proxy", "memory_bytes", "latency_ms"]
    chosen = pick(trials, args.pick) if trials else None
    out = Path(args.out)
    _write_front(out, trials, names, config.get("budget_bytes"), baselines, chosen, args.study)
    print(f"{len(trials)} trials, {len(pareto_front(trials))} on the front of study "
          f"{args.study!r} ({redact(args.storage)}); wrote {out / 'front.csv'}, "
          f"{out / 'trials.csv'}, {out / 'front.png'}")
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Join a study and add trials until it reaches its target (or ``--trials`` are done)."""
    import os
    import socket

    from ..search import Search, load_study, open_storage, read_config

    _graceful_sigterm()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    open_storage(args.storage, existing=True)  # a mistyped file: refused, not created
    search = Search.from_study(storage=args.storage, study_name=args.study, seed=seed)
    config, _, _ = read_config(load_study(open_storage(args.storage), args.study, args.storage),
                               with_scores=False)
    target = int(config.get("n_trials") or 0)
    if args.trials is None and target < 1:
        raise SearchError(f"study {args.study!r} has no target trial count; pass --trials")
    result = search.run(
        n_trials=target if args.trials is None else 1 << 62, max_new=args.trials,
        storage=args.storage, study_name=args.study, create=False, warm_start=False,
        progress=not args.no_progress, flush_seconds=args.flush_seconds,
        tag=f"{socket.gethostname()}:{os.getpid()}")
    st = result.stats
    print(f"worker (seed {seed}) added {st['written']} trials to study {args.study!r}, which "
          f"now holds {len(result.trials)}; best feasible proxy "
          f"{result.trial.values[0]:.4f} (trial #{result.trial.number})")
    return 0
