"""``budgetsearch train``: fine-tune a model under a plan; metrics and resumable checkpoints."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from ..data import REGISTERED_SETS, registry_key
from ..errors import BudgetSearchError, DataError, PlanError, TrainingError
from ..recipe import MAX_LR

__all__ = ["Splits", "load_splits", "register", "run"]

_VAL_SPLITS = ("test", "val", "validation", "valid")
def register(subparsers: Any) -> None:
    """Add the ``train`` command."""
    from ._common import (
        MAX_BATCH_SIZE,
        MAX_EPOCHS,
        MAX_SAMPLES,
        MAX_SEED,
        MAX_THREADS,
        MAX_TRIALS,
        add_model_args,
        float_range,
        int_range,
        memory_budget,
    )

    p = subparsers.add_parser(
        "train",
        help="train a model under a plan (sparse, gradient-filtered); metrics and checkpoints",
        description="Fine-tune a model under a plan: only the plan's layers and channels are "
                    "trained, with the plan's operators (nothing the plan does not need is "
                    "computed or stored). Writes metrics.json/.csv, checkpoints (resumable with "
                    "--resume), plan.json and model.safetensors to --out.",
    )
    add_model_args(p)
    p.add_argument("--plan", required=True, help="plan file (from `budgetsearch select`)")
    p.add_argument("--data", required=True,
                   help="cifar10, fashion-mnist, mnist, an image-folder directory (class "
                        "folders, optionally under train/ and test/ or val/) or a .tar.gz")
    p.add_argument("--val-data", default=None,
                   help="validation data (default: a stratified, seeded --val-fraction of the "
                        "training data; the test/val split of --data is only reported as test)")
    p.add_argument("--val-fraction", type=float_range(0, 1, low_open=True, high_open=True),
                   default=0.2, help="share of the training data held out for validation (0.2)")
    p.add_argument("--epochs", type=int_range(1, MAX_EPOCHS), default=None,
                   help=f"epochs, 1 to {MAX_EPOCHS:,} (default: the plan's recipe; needed "
                        "when the plan has none)")
    p.add_argument("--batch-size", type=int_range(1, MAX_BATCH_SIZE), default=None,
                   help=f"1 to {MAX_BATCH_SIZE} (default: the plan's recipe, else the plan's)")
    p.add_argument("--lr", type=float_range(0, MAX_LR, low_open=True), default=None,
                   help=f"learning rate in (0, {MAX_LR:g}] (default: the plan's recipe, else "
                        "0.01, 0.001 with adam)")
    p.add_argument("--lrs", type=float_range(0, MAX_LR, low_open=True), nargs="*",
                   default=None,
                   metavar="LR",
                   help="train once per learning rate (each run in --out/lr-<rate>) and keep "
                        "the run with the best validation accuracy, then the lower validation "
                        "loss, leaving out rates that diverge; written to --out/lrs.json "
                        "(instead of --lr). Without rates: the rates the plan's race tried "
                        "its winner at, best first")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=None,
                   help="default: the plan's recipe, else the plan's optimizer")
    p.add_argument("--momentum", type=float_range(0, 1, high_open=True), default=None,
                   help="momentum of the momentum optimizer, in [0, 1) (the recipe's, else 0.9)")
    p.add_argument("--weight-decay", type=float_range(0, 1), default=None,
                   help="weight decay, in [0, 1] (the recipe's, else 0)")
    p.add_argument("--bn", choices=("frozen", "train"), default=None,
                   help="batch norm frozen on running statistics or trained (the recipe's, "
                        "else frozen)")
    p.add_argument("--filter-mode", choices=("normalized", "paper", "corrected"), default=None,
                   help="gradient-filter variant (default: the plan's recipe, else the plan's)")
    p.add_argument("--dynamic", choices=("neq", "fisher"), default=None,
                   help="re-select channels every --every epochs under the plan's budget")
    p.add_argument("--every", type=int_range(1, MAX_EPOCHS), default=1,
                   help="epochs between re-selections (1)")
    p.add_argument("--replan", choices=("auto", "search", "selector"), default="auto",
                   help="who re-selects: the budget search (when installed; auto) or the "
                        "neq / tinytrain selector")
    p.add_argument("--search-trials", type=int_range(1, MAX_TRIALS), default=100,
                   help="trials of each search re-plan")
    p.add_argument("--budget", type=memory_budget, default=None,
                   help="memory budget of re-selections, e.g. 256KB, at most 1 TB (default: the "
                        "plan's)")
    p.add_argument("--train-samples", type=int_range(1, MAX_SAMPLES), default=None,
                   help="train on a seeded random subset of this many images")
    p.add_argument("--test-samples", type=int_range(1, MAX_SAMPLES), default=None,
                   help="report test accuracy on a seeded class-balanced subset of this many "
                        "test images (default all)")
    p.add_argument("--val-samples", type=int_range(1, MAX_SAMPLES), default=None,
                   help="validation images held out of the training data (default: "
                        "--val-fraction); with --val-data, a class-balanced subset of it")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=None,
                   help="seed of the splits, the head and the batch order (the recipe's, else 0)")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=None,
                   help=f"torch threads during training, 1 to {MAX_THREADS}")
    p.add_argument("--ignore-budget", action="store_true",
                   help="train even if this batch / input size exceeds the plan's budget")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out")
    p.add_argument("--system-allocator", action="store_true",
                   help="leave the C library's malloc as it is (by default freed memory stays in "
                        "the heap for the next step: see budgetsearch.trainer.allocator)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="run directory")
    p.set_defaults(func=run)


class Splits(NamedTuple):
    """The data of a run: training, validation (every choice: the best epoch) and test (only
    reported; None where the source has no test split)."""

    train: Any
    val: Any
    test: Any | None


def load_splits(
    spec: str, val_spec: str | None, *, image_size: int, normalization: str,
    train_samples: int | None, val_samples: int | None, seed: int,
    val_fraction: float = 0.2, test_samples: int | None = None,
) -> Splits:
    """Training, validation and test data of ``spec`` (see the ``--data``/``--val-data`` help).

    Without ``val_spec`` the validation split is carved (stratified, seeded) out of the training
    data: ``val_samples`` images, or ``val_fraction`` of the training split (of the
    ``train_samples`` + validation images drawn, class-balanced, when ``train_samples`` is
    given). The source's test (or val) split, where it has one, becomes the test data: only
    reported, never used to choose anything.

    Raises:
        DataError: If a data set cannot be loaded or is too small for the subsets asked.
    """
    from ..data import balanced_draw, load_dataset, same_images, split_validation

    kw = {"image_size": image_size, "normalization": normalization, "seed": seed}
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1); got {val_fraction}")
    held_out = None if _is_flat(spec) else _held_out_split(spec)
    test = None if held_out is None else load_dataset(spec, split=held_out, limit=test_samples,
                                                      **kw)
    if val_spec is not None:
        train = load_dataset(spec, split="train", limit=train_samples, **kw)
        split = "train" if _is_flat(val_spec) else _held_out_split(val_spec)
        if split is None:
            raise DataError(f"{val_spec}: no validation split ({', '.join(_VAL_SPLITS)})")
        if _same_source(spec, val_spec) and split in ("train", held_out):
            raise DataError(
                f"--val-data {val_spec}: its {split!r} split is the "
                + ("training data" if split == "train" else "test data, only reported,")
                + f" of --data {spec}; give another --val-data, or leave it out to carve the "
                "validation split out of the training data")
        val = load_dataset(val_spec, split=split, limit=val_samples, **kw)
        for other, what in ((train, "training data"), (test, "test data, only reported,")):
            if other is not None and same_images(val, other):  # e.g. --val-data DATA/train
                raise DataError(
                    f"--val-data {val_spec}: its images ({val.source}) are the {what} of --data "
                    f"{spec} ({other.source}); give another --val-data, or leave it out to carve "
                    "the validation split out of the training data")
        return Splits(train, val, test)
    pool = load_dataset(spec, split="train", **kw)
    if train_samples is not None:
        n_val = val_samples or max(1, round(train_samples * val_fraction / (1 - val_fraction)))
        if train_samples + n_val > len(pool):
            raise DataError(f"{spec}: --train-samples {train_samples} plus {n_val} validation "
                            f"images, but the training split has only {len(pool)}")
        pool = pool.subset(balanced_draw(pool.targets, train_samples + n_val, seed=seed))
        val_samples = n_val
    train, val = split_validation(pool, fraction=val_fraction, size=val_samples, seed=seed)
    return Splits(train, val, test)


def _same_source(a: str, b: str) -> bool:
    """Whether two --data specs name one data set (a registry name, or one path)."""
    def norm(spec: str) -> str:
        key = registry_key(spec)
        return key if key in REGISTERED_SETS else os.path.realpath(os.path.expanduser(spec))

    return norm(a) == norm(b)


def _is_flat(spec: str) -> bool:
    """A folder of class folders without split folders (and not IDX files)."""
    path = Path(spec).expanduser()
    return (path.is_dir() and spec.lower() not in REGISTERED_SETS
            and not any((path / s).is_dir() for s in ("train", *_VAL_SPLITS))
            and not any(path.glob("*-images-idx3-ubyte*")))


def _held_out_split(spec: str) -> str | None:
    """The first of the source's test / validation splits, or None."""
    if registry_key(spec) not in REGISTERED_SETS and spec.endswith((".tar.gz", ".tgz")):
        from ..data import archive_splits

        splits = archive_splits(Path(spec).expanduser())  # the archive's own list, read once
        return next((split for split in _VAL_SPLITS if split in splits), None)
    return next((split for split in _VAL_SPLITS if _has_split(spec, split)), None)


def _has_split(spec: str, split: str) -> bool:
    """Whether a registered data set, an MNIST pickle or a folder has ``split``."""
    key = registry_key(spec)
    if key in REGISTERED_SETS or spec.endswith(".pkl.gz"):
        return split == "test" or (split == "val" and key == "mnist")
    path = Path(spec).expanduser()
    if not path.is_dir():
        return split == "test"
    has_splits = any((path / s).is_dir() for s in ("train", *_VAL_SPLITS))
    return (path / split).is_dir() if has_splits else split == "test"


def _apply_recipe(args: argparse.Namespace, plan: Any) -> None:
    """Fill the training options not given on the command line from the plan's recipe (then
    from the defaults).

    Raises:
        PlanError: Without ``--epochs`` for a plan that carries no recipe.
    """
    from ..recipe import Recipe

    recipe = plan.recipe
    fields = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "bn",
              "filter_mode", "seed")
    given = {f for f in fields if getattr(args, f) is not None}
    if recipe is not None:
        for f in fields:
            if f not in given:
                setattr(args, f, getattr(recipe, f))
    elif args.epochs is None:
        raise PlanError(f"{args.plan} carries no recipe: give --epochs (and --lr)")
    defaults = Recipe()  # the rest as a recipe's (lr, optimizer, batch size: see run)
    for f in ("momentum", "weight_decay", "bn", "seed"):
        if getattr(args, f) is None:
            setattr(args, f, getattr(defaults, f))
    args.recipe_used = sorted(set(fields) - given) if recipe is not None else []


def _raced_lrs(plan: Any, *, source: str) -> list[float]:
    """The learning rates a plan's race tried its winner at, best first (``winner_lrs`` in the
    race's provenance), for ``--lrs`` without values.

    Raises:
        PlanError: The plan records no such rates (naming ``source``, why and what to give).
    """
    race = plan.provenance.get("race")
    rates = race.get("winner_lrs") if isinstance(race, dict) else None
    if rates is None:
        why = ("it was not raced" if race is None else
               "its race predates the record of the winner's rates")
        raise PlanError(f"{source}: --lrs without rates trains at the rates the plan's race "
                        f"tried its winner at, and this plan records none ({why}; plans of "
                        "`plan --effort standard|thorough` do): give the rates, e.g. --lrs "
                        "0.00667 0.02 0.06")
    if (not isinstance(rates, list) or not rates
            or any(isinstance(x, bool) or not isinstance(x, (int, float))
                   or not math.isfinite(x) or not 0 < x <= MAX_LR for x in rates)
            or len(set(rates)) != len(rates)):
        raise PlanError(f"{source}: provenance.race.winner_lrs must be a list of distinct "
                        f"learning rates in (0, {MAX_LR:g}]; got {rates!r}")
    return [float(x) for x in rates]


def _search_replan(method: str) -> Any:
    """The search's re-planning function for ``--replan auto|search`` (the trainer does not
    import the search; this command, above both, connects them)."""
    if method == "selector":
        return None
    from ..search import replan

    return replan


def run(args: argparse.Namespace) -> int:
    """Load plan, data and model; train; print a summary."""
    import torch

    from ..models import MCU_INPUT_MEAN, input_spec, load_model
    from ..plan import load_plan
    from ..trainer import Trainer, tune_host_allocator
    from ..units import format_bytes, parse_bytes

    if not args.system_allocator:
        tune_host_allocator()
    if args.lrs is not None:
        if args.lr is not None:
            raise PlanError("give --lr or --lrs, not both")
        if len(set(args.lrs)) != len(args.lrs):
            raise PlanError(f"--lrs: each rate once; got {' '.join(f'{x:g}' for x in args.lrs)}")
    plan = load_plan(args.plan)
    if args.lrs == []:
        args.lrs = _raced_lrs(plan, source=args.plan)
    _apply_recipe(args, plan)
    height, width = plan.input_size
    size = args.input_size or height
    if args.input_size is None and height != width:
        raise PlanError(f"the plan's input is {height}x{width}; training data is square: pass "
                        "--input-size")
    try:
        normalization = "mcu" if input_spec(args.model).mean == MCU_INPUT_MEAN else "imagenet"
    except BudgetSearchError:  # an unknown name: load_model below says so
        normalization = "imagenet"
    train, val, test = load_splits(args.data, args.val_data, image_size=size,
                                   normalization=normalization,
                                   train_samples=args.train_samples,
                                   val_samples=args.val_samples, seed=args.seed,
                                   val_fraction=args.val_fraction,
                                   test_samples=args.test_samples)
    from ..trainer.checks import dataset_classes

    classes = dataset_classes(train) or []
    optimizer = args.optimizer or plan.optimizer
    default_lr = args.lr if args.lr is not None else (1e-3 if optimizer == "adam" else 0.01)
    rates = list(args.lrs) if args.lrs is not None else [default_lr]
    if args.lrs is not None:
        args.recipe_used = [f for f in args.recipe_used if f != "lr"]
    out = sys.stdout
    docs: dict[float, dict[str, Any]] = {}
    failed: dict[float, str] = {}
    budget_bytes = parse_bytes(args.budget, what="--budget") if args.budget else None
    for i, lr in enumerate(rates):
        run_dir = Path(args.out) if args.lrs is None else Path(args.out) / f"lr-{lr:g}"
        torch.manual_seed(args.seed)  # the new head's initialisation, the same for every rate
        model = load_model(args.model, weights=args.weights,
                           num_classes=args.num_classes or len(classes) or None,
                           mcu_dir=args.mcu_dir)
        trainer = Trainer(
            model, plan, train_data=train, val_data=val, test_data=test, epochs=args.epochs,
            out_dir=run_dir,
            batch_size=args.batch_size, lr=lr, optimizer=optimizer, momentum=args.momentum,
            weight_decay=args.weight_decay, seed=args.seed, dynamic=args.dynamic,
            every=args.every,
            budget_bytes=budget_bytes,
            bn=args.bn, filter_mode=args.filter_mode, check_budget=not args.ignore_budget,
            progress=not args.no_progress, threads=args.threads, replan_method=args.replan,
            search_trials=args.search_trials, search_replan=_search_replan(args.replan))
        if i == 0:
            _describe(out, args, plan, trainer, train=train, val=val, test=test,
                      classes=classes, size=size, optimizer=optimizer, rates=rates)
        try:
            doc = docs[lr] = trainer.fit(resume=args.resume)
        except TrainingError as exc:  # a rate that diverged is left out, the others go on
            if args.lrs is None or exc.epoch is None:  # not a divergence: a directory in the way
                raise
            failed[lr] = str(exc)
            out.write(f"lr {lr:g}: not kept: {exc}\n")
            continue
        best, final = doc["best_val_accuracy"], doc["final_val_accuracy"]
        tested = ""
        if doc.get("final_test_accuracy") is not None:
            tested = (f"; test accuracy {doc['final_test_accuracy']:.4f} final, "
                      f"{doc['test_accuracy_at_best_epoch']:.4f} at the best validation epoch")
        out.write(
            ("" if args.lrs is None else f"lr {lr:g}: ")
            + f"done: final val accuracy {final:.4f}, best {best:.4f} (epoch "
            f"{doc['best_epoch']}){tested}; "
            f"{doc['images_per_s']:.1f} img/s; saved activations "
            f"{format_bytes(doc['saved_activation_bytes'])}/step; backward "
            f"{doc['backward_ms']:.0f} ms/step\nwrote {run_dir / 'metrics.json'}\n"
        )
    if args.lrs is not None:
        _keep_best(out, Path(args.out), docs, failed)
    return 0


def _describe(out: Any, args: argparse.Namespace, plan: Any, trainer: Any, *, train: Any,
              val: Any, test: Any, classes: list[str], size: int, optimizer: str,
              rates: list[float]) -> None:
    """The run's header: data, batch, optimizer and rate(s), recipe fields used, budget."""
    from ..units import format_bytes

    out.write(f"training {args.model} ({len(plan.updates)} layers updated, "
              f"{plan.provenance.get('method', 'plan')}) on {len(train)} images of "
              f"{len(classes)} classes, validating on {len(val)}"
              f"{'' if args.val_data else ' (held out of the training data)'}"
              f"{f', testing on {len(test)} (only reported)' if test is not None else ''}; "
              f"{size}px, batch "
              f"{trainer.batch_size}, {optimizer} lr {', '.join(f'{x:g}' for x in rates)}\n")
    if args.recipe_used:
        out.write("from the plan's recipe: " + ", ".join(
            f"{f} {getattr(args, f)}" for f in args.recipe_used) + "\n")
    if trainer.budget:
        b = trainer.budget
        at = ("" if b["batch_size"] == trainer.batch_size else
              f" at the plan's batch size {b['batch_size']} (the device's; the recipe trains "
              f"at {trainer.batch_size} here)")
        out.write(f"budget on {plan.device}: {format_bytes(b['memory_bytes'])} of "
                  f"{format_bytes(b['budget_bytes'])} ({b['measure']} memory){at}\n")


def _keep_best(out: Any, root: Path, docs: dict[float, dict[str, Any]],
               failed: dict[float, str]) -> None:
    """Choose among the finished runs of ``--lrs`` on validation alone
    (:func:`~budgetsearch.trainer.metrics.validation_key`; equal runs: the lower rate), write
    ``lrs.json`` (with the rates that diverged, and why) and say which.

    Raises:
        TrainingError: Every rate diverged.
    """
    import json

    from .._io import atomic_write_text
    from ..trainer.metrics import validation_key

    if not docs:
        raise TrainingError("every rate of --lrs diverged (" + "; ".join(
            f"lr {lr:g}: {why}" for lr, why in failed.items()) + ")")
    chosen = max(docs, key=lambda lr: (*validation_key(docs[lr]), -lr))
    summary = {
        "chosen": {"lr": chosen, "dir": f"lr-{chosen:g}"},
        "rule": "best validation accuracy (at the run's best epoch), then the lower "
                "validation loss, then the lower rate; test data never enters the choice",
        "runs": {f"{lr:g}": {k: doc.get(k) for k in (
            "status", "best_val_accuracy", "best_epoch", "final_val_accuracy",
            "test_accuracy_at_best_epoch", "final_test_accuracy")}
            for lr, doc in docs.items()},
        "diverged": {f"{lr:g}": why for lr, why in failed.items()}}
    atomic_write_text(root / "lrs.json", json.dumps(summary, indent=2) + "\n")
    doc = docs[chosen]
    tested = ("" if doc.get("test_accuracy_at_best_epoch") is None else
              f", test accuracy {doc['test_accuracy_at_best_epoch']:.4f} at that epoch")
    out.write(f"kept lr {chosen:g} (validation accuracy {doc['best_val_accuracy']:.4f}, "
              f"epoch {doc['best_epoch']}{tested}): {root / f'lr-{chosen:g}'}\n"
              f"wrote {root / 'lrs.json'}\n")
