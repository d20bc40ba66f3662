"""``budgetsearch score``: score a model's layers and channels with a criterion; write ``.npz``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import DataError, ScoresError
from ._common import (
    MAX_BATCH_SIZE,
    MAX_SAMPLES,
    MAX_SEED,
    add_model_args,
    check_out_path,
    int_range,
)

__all__ = ["register", "run"]

_CRITERIA = ("fisher", "neq", "magnitude", "random")


def register(subparsers: Any) -> None:
    """Add the ``score`` command."""
    p = subparsers.add_parser(
        "score",
        help="score layers and channels (fisher, neq, magnitude, random); write a .npz",
        description="Compute per-layer and per-channel scores of a model and save them "
                    "(atomically) for `budgetsearch select --scores`.",
    )
    add_model_args(p)
    p.add_argument("--criterion", required=True, choices=_CRITERIA,
                   help="fisher: Fisher potential on data; neq: NEq velocities from weight "
                        "snapshots; magnitude: weight norms; random: seeded uniform")
    p.add_argument("--data", default=None,
                   help="data set: cifar10, fashion-mnist, mnist, an ImageFolder directory or a "
                        ".tar.gz (fisher and neq)")
    p.add_argument("--split", default="train", help="data split (default train)")
    p.add_argument("--samples", type=int_range(1, MAX_SAMPLES), default=128,
                   help="samples used (fisher) or probe samples (neq); default 128")
    p.add_argument("--micro-batch", type=int_range(1, MAX_BATCH_SIZE), default=16,
                   help="samples per forward/backward pass (bounds the pass's memory)")
    p.add_argument("--per-class", type=int_range(1, MAX_SAMPLES), default=None,
                   help="draw this many samples of every class (a balanced subset)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0,
                   help="seed of subset draws and of random")
    p.add_argument("--normalization", choices=("imagenet", "mcu"), default=None,
                   help="input normalisation (default: mcu for MCU models, imagenet otherwise)")
    p.add_argument("--snapshots", nargs="+", default=None, metavar="FILE",
                   help="neq: at least 3 weight snapshots (state dicts), one per epoch, in order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="scores file to write (.npz)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score the model and write the scores file."""
    from ..criteria import get_criterion
    from ._common import build_model

    check_out_path(args.out, "--out")
    if args.criterion == "neq" and not args.snapshots:
        raise ScoresError(
            "criterion neq needs weight snapshots from training: NEq velocities compare layer "
            "outputs across epochs; pass --snapshots A B C (at least 3 state-dict files, one "
            "per epoch, in order), or use NEqTracker during training"
        )
    if args.samples is not None and args.samples < 1:
        raise DataError(f"--samples must be at least 1, got {args.samples}")
    model, graph = build_model(args)
    started = time.perf_counter()
    size = int(graph.input_shape[-1])
    from ..data import default_normalization

    normalization = args.normalization or default_normalization(args.model)
    criterion, batches, dataset = _criterion_and_data(args, size, normalization, get_criterion)
    scores = criterion.score(model, batches)
    scores.metadata.update({
        "model": args.model, "weights": args.weights, "data": args.data, "split": args.split,
        "normalization": normalization if dataset is not None else None,
        "input_size": size, "per_class": args.per_class, "command_seconds":
            time.perf_counter() - started,
    })
    path = scores.save(args.out)
    top = sorted(scores.layer_scores().items(), key=lambda kv: -kv[1])[:3]
    print(f"{args.criterion} scores of {len(scores)} layers of {args.model}"
          + (f" on {scores.metadata.get('samples', 0)} samples of {dataset.source}"
             if dataset is not None else "")
          + f" in {time.perf_counter() - started:.1f} s")
    print("top layers: " + ", ".join(f"{n} ({v:.3g})" for n, v in top))
    print(f"wrote {path}")
    return 0


def _criterion_and_data(args: argparse.Namespace, size: int, normalization: str,
                        get_criterion: Any) -> tuple[Any, Any, Any]:
    """The criterion, its batches (or None) and the data set (or None)."""
    import torch

    from ..data import load_dataset

    if args.criterion == "magnitude":
        return get_criterion("magnitude"), None, None
    if args.criterion == "random":
        return get_criterion("random", seed=args.seed), None, None
    if args.data is None:
        raise DataError(f"criterion {args.criterion} needs --data (e.g. cifar10 or a folder)")
    dataset = load_dataset(args.data, split=args.split, image_size=size,
                           normalization=normalization, limit=args.samples,
                           per_class=args.per_class, seed=args.seed)
    n = len(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.micro_batch, shuffle=False)
    batches = _Progress(loader, total=len(loader), desc=f"{args.criterion} ({n} samples)",
                        disable=args.no_progress)
    if args.criterion == "fisher":
        return get_criterion("fisher", samples=n, micro_batch=args.micro_batch), batches, dataset
    from ..models import load_state_dict_file

    states = [load_state_dict_file(p) for p in args.snapshots]
    return get_criterion("neq", states=states, probe_samples=n), batches, dataset


class _Progress(Iterable):
    """Batches with a tqdm progress bar on stderr; re-iterable like the loader it wraps."""

    def __init__(self, loader: Any, *, total: int, desc: str, disable: bool) -> None:
        self.loader, self.total, self.desc, self.disable = loader, total, desc, disable
        self.dataset = loader.dataset

    def __iter__(self) -> Iterator[Any]:
        from tqdm import tqdm

        with tqdm(self.loader, total=self.total, desc=self.desc, unit="batch",
                  disable=self.disable, file=sys.stderr, leave=False) as bar:
            yield from bar
