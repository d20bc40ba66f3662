"""``budgetsearch contrib``: measure what updating each part of a model adds on your data.

Draws a class-balanced subset of the training split, carves a stratified validation split out of
it (the test split is never read), and measures units (classifier only, bias depths, one layer's
weight at a channel ratio and gradient filter: see :mod:`budgetsearch.contrib`) into a keyed,
resumable table. ``--workers N`` runs N processes on the same table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from ..errors import DataError
from ._common import (
    MAX_BATCH_SIZE,
    MAX_COUNT,
    MAX_EPOCHS,
    MAX_SEED,
    MAX_THREADS,
    add_model_args,
    check_out_path,
    float_range,
    int_range,
)

__all__ = ["register", "run"]

#: Images drawn from the training split by default (before the validation carve-out).
DEFAULT_SAMPLES = 1000
#: Layers measured by default: the top ones by relative gradient norm.
DEFAULT_CANDIDATES = "top:6"


def register(subparsers: Any) -> None:
    """Add the ``contrib`` command."""
    p = subparsers.add_parser(
        "contrib", help="measure each unit's gain in validation accuracy over classifier-only "
                        "training (resumable table; several workers)",
        description="Train the classifier plus one unit at a time (bias of the last K layers, "
                    "one layer's weight at a channel ratio, axis and gradient filter) for a "
                    "short fixed recipe, from the same start, on a validation split carved out "
                    "of the training data; write the gains to a table (JSON). Re-run the same "
                    "command to resume; --workers N shares the work among N processes.")
    add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="cifar10, an image folder, a .tar.gz, ...")
    g.add_argument("--split", default="train", help="the training split (default train)")
    g.add_argument("--samples", type=int_range(2, 10_000_000), default=DEFAULT_SAMPLES,
                   help=f"images drawn (class-balanced) from the split ({DEFAULT_SAMPLES})")
    g.add_argument("--val-fraction", type=float_range(0, 1, low_open=True, high_open=True),
                   default=0.2, help="share of them held out for validation (0.2)")
    g.add_argument("--val-data", default=None,
                   help="validation data instead of the carve-out (its --split is read)")
    g.add_argument("--normalization", choices=("imagenet", "mcu"), default=None,
                   help="input normalisation (default: the model's)")
    r = p.add_argument_group("recipe (every unit is trained with it)")
    r.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="momentum")
    r.add_argument("--lr", type=float_range(0, 10, low_open=True), default=0.01,
                   help="learning rate (0.01)")
    r.add_argument("--epochs", type=int_range(1, MAX_EPOCHS), default=2, help="epochs (2)")
    r.add_argument("--batch-size", type=int_range(1, MAX_BATCH_SIZE), default=32,
                   help="batch size (32)")
    r.add_argument("--seed", type=int_range(0, MAX_SEED), default=0,
                   help="seed of the subset, the split, the head and the batch order (0)")
    r.add_argument("--filter-mode", choices=("normalized", "paper", "corrected"),
                   default="normalized", help="gradient-filter variant (normalized)")
    u = p.add_argument_group("units")
    u.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help="layers whose weight units are measured: all, last:K (the last K "
                        "before the classifier), top:K (of the second half of the network, "
                        "the K of largest relative gradient norm |g|/|w| on the training "
                        "data), or a comma-separated list of layer names "
                        f"({DEFAULT_CANDIDATES})")
    u.add_argument("--ratios", default="0.125,0.25,0.5,1",
                   help="channel ratios (0.125,0.25,0.5,1)")
    u.add_argument("--axes", default="out,in", help="channel axes (out,in)")
    u.add_argument("--no-filters", action="store_true",
                   help="do not measure gradient-filtered units")
    u.add_argument("--bias-depths", default=None,
                   help="bias depths, comma-separated (default 1, 2, 4, ... and all)")
    u.add_argument("--units", default=None,
                   help="measure exactly these units (comma-separated keys, e.g. "
                        "head,bias:4,weight:LAYER:out:0.25:r2) instead of the grid")
    u.add_argument("--scores", default=None,
                   help="scores .npz choosing the kept channels (default: weight magnitude)")
    p.add_argument("--workers", type=int_range(1, 64), default=1,
                   help="processes measuring into the same table (1)")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=None,
                   help="torch threads per worker (default: cores / workers)")
    p.add_argument("--max-units", type=int_range(1, MAX_COUNT), default=None,
                   help="stop after this many units (per worker)")
    p.add_argument("--top", type=int_range(1, MAX_COUNT), default=25,
                   help="rows of the printed table (25)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--storage", default=None,
                   help="keep the table in this database (sqlite:///FILE.db, "
                        "postgresql://...; e.g. the search's storage) so that workers on other "
                        "machines running the same command share it; --out receives a copy")
    p.add_argument("--out", required=True, help="the contribution table (JSON)")
    p.set_defaults(func=run)


def _csv(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise DataError(f"{option}: give at least one value")
    return items


def _numbers(text: str, option: str, kind: type) -> list[Any]:
    out = []
    for item in _csv(text, option):
        try:
            out.append(kind(item))
        except ValueError:
            raise DataError(f"{option}: {item!r} is not a number") from None
    return out


def run(args: argparse.Namespace) -> int:
    """Measure the contributions at ``--threads`` (default cores / workers) torch threads.

    The caller's thread count is put back after the work, also on an error.
    """
    from .._threads import torch_threads

    check_out_path(args.out, "--out")
    workers = args.workers
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    with torch_threads(threads):
        return _measure(args, workers=workers, threads=threads)


def _measure(args: argparse.Namespace, *, workers: int, threads: int) -> int:
    """Load, split, pick units, measure (in ``workers`` processes), print the table."""
    import torch

    from ..contrib import analyse, parse_unit, split_tensors
    from ..criteria import Scores
    from ..data import default_normalization
    from ..errors import PlanError
    from ..recipe import Recipe
    from ._common import build_model

    axes = _csv(args.axes, "--axes")
    bad_axes = set(axes) - {"out", "in"}
    if bad_axes:  # refused before the model and the data are loaded
        raise DataError(f"--axes: {', '.join(sorted(bad_axes))} unknown; use out and/or in")
    recipe = Recipe(optimizer=args.optimizer, lr=args.lr, epochs=args.epochs,
                    batch_size=args.batch_size, seed=args.seed, filter_mode=args.filter_mode)
    torch.manual_seed(args.seed)  # the new head
    model, graph = build_model(args)
    train, val = split_tensors(
        args.data, graph=graph, normalization=args.normalization
        or default_normalization(args.model), samples=args.samples,
        val_fraction=args.val_fraction, seed=args.seed, split=args.split,
        val_data=args.val_data)
    scores = Scores.load(args.scores, model=model) if args.scores else None
    units = ([parse_unit(k, graph) for k in _csv(args.units, "--units")] if args.units
             else None)
    depths = (None if args.bias_depths is None
              else _numbers(args.bias_depths, "--bias-depths", int))
    print(f"{args.model} at {graph.input_shape[-1]}px: {len(train[1])} training and "
          f"{len(val[1])} validation images "
          f"({'carved from ' + args.data if args.val_data is None else args.val_data}), "
          f"{workers} worker(s) x {threads} thread(s); recipe {recipe.optimizer} lr "
          f"{recipe.lr:g}, {recipe.epochs} epochs, batch {recipe.batch_size}", file=sys.stderr)
    others = [_spawn(args.argv, threads) for _ in range(workers - 1)]
    try:
        table = analyse(model, graph=graph, train=train, val=val, recipe=recipe,
                        scores=scores, candidates=args.candidates, units=units,
                        ratios=_numbers(args.ratios, "--ratios", float),
                        axes=axes, filters=not args.no_filters,
                        bias_depths=depths, path=None if args.storage else args.out,
                        storage=args.storage, max_units=args.max_units,
                        progress=not args.no_progress)
    except PlanError as exc:  # name the option where the library names the argument
        text = str(exc)
        raise DataError("--" + text if text.startswith("candidates ") else text) from None
    finally:
        codes = [w.wait() for w in others]
    if any(codes):
        print(f"warning: {sum(1 for c in codes if c)} worker(s) failed (exit codes {codes})",
              file=sys.stderr)
    stats = table.stats
    if args.storage:  # everything the workers of every machine measured, copied to --out
        from ..contrib import StoreTable

        table = StoreTable(args.storage, table.key).table()
        table.save(args.out)
    elif others:  # what the other workers measured after this one ran out of units
        from ..contrib import ContributionTable

        table = ContributionTable.load(args.out)
    print(table.format_table(top=args.top))
    print(f"{len(table.results)} units in {args.out}; this process measured "
          f"{stats['measured']}: caching {stats['cache_seconds']:.1f} s, training "
          f"{stats['train_seconds']:.1f} s, evaluation {stats['eval_seconds']:.1f} s")
    return 1 if any(codes) else 0


def _spawn(argv: list[str], threads: int) -> subprocess.Popen:
    """Another worker: this command again, one worker, no progress bar."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--workers", "--threads"):
            skip = i + 1 < len(argv)
            continue
        if a.startswith(("--workers=", "--threads=")):
            continue
        out.append(a)
    cmd = [sys.executable, "-m", "budgetsearch", *out, "--workers", "1", "--threads",
           str(threads), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
