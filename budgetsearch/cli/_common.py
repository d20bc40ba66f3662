"""Arguments and helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..budget import Budget
from ..cost import ACCOUNTINGS, CostModel
from ..errors import BudgetError, BudgetSearchError, PlanError
from ..graph import LayerGraph
from ..plan import Plan
from ..profiles import DeviceProfile, load_profile
from ..recipe import MAX_SEED as RECIPE_MAX_SEED
from ..units import format_bytes, parse_bytes, parse_ms

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_BUDGET_BYTES",
    "MAX_CLASSES",
    "MAX_COUNT",
    "MAX_EPOCHS",
    "MAX_INPUT_SIZE",
    "MAX_LATENCY_MS",
    "MAX_PARAMS",
    "MAX_SAMPLES",
    "MAX_SEED",
    "MAX_THREADS",
    "MAX_TRIALS",
    "add_budget_args",
    "add_device_args",
    "add_model_args",
    "build_cost_model",
    "build_model",
    "check_out_path",
    "check_update",
    "float_range",
    "int_range",
    "latency_budget",
    "memory_budget",
    "parse_update",
    "write_json",
    "write_text",
]

# Upper bounds of the numeric options: far beyond any sensible use, low enough that a typo (an
# extra zero or three) is refused before a model is traced or a tensor allocated.
#: Input height and width in pixels; also the largest gradient-filter patch size.
MAX_INPUT_SIZE = 4096
#: Batch and micro-batch sizes.
MAX_BATCH_SIZE = 65536
#: Classes of a replaced classifier (ImageNet-21k has 21,841).
MAX_CLASSES = 100_000
#: Samples drawn from a data set (ImageNet-1k has 1.28 M training images).
MAX_SAMPLES = 10_000_000
#: Trials of a search study or of one worker.
MAX_TRIALS = 1_000_000
#: Epochs of a training run (and epochs between re-selections).
MAX_EPOCHS = 100_000
#: Counts of layers or blocks (last-k, last-n, biases).
MAX_COUNT = 100_000
#: Weight parameters.
MAX_PARAMS = 10**12
#: Seeds: NumPy's generators (the Optuna samplers') take 0 to 2**32 - 1.
MAX_SEED = RECIPE_MAX_SEED
#: Memory budgets: 1 TB.
MAX_BUDGET_BYTES = 1 << 40
#: Latency budgets per training step: one hour.
MAX_LATENCY_MS = 3_600_000.0
#: Torch intra-op threads (``--threads``).
MAX_THREADS = 1024


def _shown(text: str) -> str:
    """The offending text as typed, quoted only when it would not read well bare."""
    return text if text and text == text.strip() and len(text) <= 40 else repr(text[:40])


def int_range(low: int, high: int, *, unit: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high`` inclusive.

    Args:
        low: The smallest value accepted.
        high: The largest value accepted.
        unit: What the number counts, shown in the message (e.g. ``"pixels"``).

    Returns:
        A function turning the option's text into the integer, raising
        :class:`argparse.ArgumentTypeError` with the accepted range otherwise (argparse then
        prints ``argument --x: must be ..., got -5`` and exits with status 2).
    """
    kind = ("a positive integer" if low == 1 else "a non-negative integer" if low == 0
            else "an integer")
    span = f"from {low:,} to {high:,}" + (f" {unit}" if unit else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not an integer, or more digits than int() reads
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {kind} {span}, got {_shown(text)}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                unit: str = "") -> Callable[[str], float]:
    """An argparse ``type``: a finite number in an interval.

    Args:
        low: The lower end of the interval.
        high: The upper end of the interval.
        low_open: Exclude ``low`` itself (e.g. a positive learning rate).
        high_open: Exclude ``high`` itself (e.g. a momentum below 1).
        unit: The number's unit, shown in the message (e.g. ``"s"``).

    Returns:
        A function turning the option's text into the float; NaN, infinities and numbers
        outside the interval raise :class:`argparse.ArgumentTypeError` naming the interval.
    """
    interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                + (f" {unit}" if unit else ""))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = ((value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in {interval}, got {_shown(text)}")
        return value

    parse.__name__ = "number"
    return parse


def memory_budget(text: str) -> int:
    """An argparse ``type``: a memory budget such as ``256KB``, from 1 byte to 1 TB, in bytes."""
    try:
        value = parse_bytes(text, positive=True)
    except BudgetSearchError:
        value = 0
    if not 1 <= value <= MAX_BUDGET_BYTES:
        raise argparse.ArgumentTypeError(
            "must be a memory size from 1 B to 1 TB such as 256KB or 1MB (units B, KB, MB, GB, "
            f"KiB, MiB, GiB; no unit = bytes), got {_shown(text)}")
    return value


def latency_budget(text: str) -> float:
    """An argparse ``type``: a latency budget such as ``500ms`` or ``2s``, above 0 and at most
    one hour, in milliseconds."""
    try:
        value = parse_ms(text, positive=True)
    except BudgetSearchError:
        value = 0.0
    if not 0 < value <= MAX_LATENCY_MS:
        raise argparse.ArgumentTypeError(
            "must be a duration in (0 ms, 1 hour] such as 500ms or 2s (units us, ms, s; no "
            f"unit = ms), got {_shown(text)}")
    return value


def add_model_args(parser: argparse.ArgumentParser, *, weights_default: str | None = None) -> None:
    """--model, --weights, --num-classes, --input-size, --mcu-dir."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="registered model name (see `budgetsearch models`)")
    g.add_argument("--weights", default=weights_default,
                   help="imagenet, random, or a .pth/.safetensors state dict (default: the "
                        "model's own default: random for torchvision, pretrained for MCU models)")
    g.add_argument("--num-classes", type=int_range(1, MAX_CLASSES), default=None,
                   help="replace the classifier with one of this many classes "
                        f"(1 to {MAX_CLASSES:,})")
    g.add_argument("--input-size", type=int_range(1, MAX_INPUT_SIZE, unit="pixels"),
                   default=None,
                   help="input height and width in pixels, 1 to "
                        f"{MAX_INPUT_SIZE} (default: the model's, 128 for MCU models and 128 "
                        "otherwise)")
    g.add_argument("--mcu-dir", default=None,
                   help="directory of other MCU models' JSON+NPZ files (default: the three "
                        "published ones shipped with budgetsearch)")


def check_out_path(path: str | os.PathLike[str] | None, flag: str, *,
                   directory: bool = False) -> None:
    """Refuse, before any work, an output path the command could not write at its end.

    Args:
        path: The path given (None: nothing to check).
        flag: The option, for the message (``--out``).
        directory: The path names a directory to write into, not a file.

    Raises:
        BudgetSearchError: The file is an existing directory (or the directory an existing
            file), or a parent of it is a file.
    """
    if path is None:
        return
    target = Path(path)
    if directory and target.exists() and not target.is_dir():
        raise BudgetSearchError(f"{flag} {path}: exists and is not a directory")
    if not directory and target.is_dir():
        raise BudgetSearchError(f"{flag} {path}: is a directory; give a file name")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BudgetSearchError(f"{flag} {path}: {parent} is not a directory")
            break


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device, --batch-size, --accounting, --optimizer, --bn-train, --strict."""
    g = parser.add_argument_group("device")
    g.add_argument("--device", required=True,
                   help="device profile name (see `budgetsearch devices`) or a profile .yaml path")
    g.add_argument("--batch-size", type=int_range(1, MAX_BATCH_SIZE), default=None,
                   help=f"batch size, 1 to {MAX_BATCH_SIZE} (default: the profile's)")
    g.add_argument("--accounting", choices=ACCOUNTINGS, default=None,
                   help="device (the default; cost --plan: the plan's): the profile's minimal "
                        "engine; ops: budgetsearch's operators in PyTorch, fp32; pytorch: stock "
                        "autograd, fp32")
    g.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=None,
                   help="optimizer (default: the profile's)")
    g.add_argument("--bn-train", action="store_true",
                   help="batch norm on batch statistics (default: frozen)")
    g.add_argument("--strict", action="store_true",
                   help="fail on operators without a cost rule instead of warning")


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    """--budget and --latency-budget."""
    parser.add_argument("--budget", type=memory_budget, default=None,
                        help="memory budget, e.g. 256KB or 1MB, at most 1 TB (default, under "
                             "--memory-measure peak only: the profile's memory)")
    parser.add_argument("--latency-budget", type=latency_budget, default=None,
                        help="latency budget per training step, e.g. 500ms or 2s, at most 1 h")


def budgets(args: argparse.Namespace, profile: DeviceProfile) -> tuple[int, float | None]:
    """The memory budget in bytes and the latency budget in ms from the arguments.

    Raises:
        BudgetError: ``--memory-measure training`` without ``--budget``: the profile's memory
            bounds a whole step's peak, not the memory a step needs beyond inference.
    """
    if args.budget is None and getattr(args, "memory_measure", "peak") == "training":
        raise BudgetError(f"--memory-measure training needs --budget: the profile's memory "
                          f"({format_bytes(profile.memory_bytes)} on {profile.name}) bounds a "
                          "step's whole peak, not the memory training needs beyond inference "
                          "(without --budget, --memory-measure peak checks the peak against it)")
    memory = (parse_bytes(args.budget, what="--budget", positive=True)
              if args.budget is not None else profile.memory_bytes)
    latency = (parse_ms(args.latency_budget, what="--latency-budget", positive=True)
               if getattr(args, "latency_budget", None) is not None else None)
    return memory, latency


def budget_from_args(args: argparse.Namespace, profile: DeviceProfile) -> Budget:
    """The :class:`~budgetsearch.budget.Budget` of the arguments: ``--budget`` (the profile's
    memory when absent), ``--memory-measure`` (``peak`` when the command has none) and
    ``--latency-budget``."""
    memory, latency = budgets(args, profile)
    return Budget(memory_bytes=memory, measure=getattr(args, "memory_measure", "peak"),
                  latency_ms=latency)


def build_model(args: argparse.Namespace) -> tuple[Any, LayerGraph]:
    """The model and its layer graph from the model arguments."""
    from ..models import input_spec, load_model

    weights = args.weights
    model = load_model(args.model, weights=weights, num_classes=args.num_classes,
                       mcu_dir=args.mcu_dir)
    size = args.input_size or _default_size(args.model, input_spec)
    graph = LayerGraph.from_model(model, input_size=size, model_name=args.model)
    return model, graph


def _default_size(name: str, input_spec: Any) -> int:
    try:
        return int(min(input_spec(name).size, 128))
    except BudgetSearchError:
        return 128


def build_cost_model(args: argparse.Namespace, graph: LayerGraph) -> CostModel:
    """A cost model from the device arguments."""
    profile = load_profile(args.device)
    return CostModel(graph, profile, accounting=args.accounting or "device",
                     batch_size=args.batch_size,
                     optimizer=args.optimizer, bn_train=args.bn_train, strict=args.strict)


_UPDATE_FORMS = ("expected full, bias-only, none, last:K or blocks:K, optionally followed by :rR "
                 "for a gradient filter (e.g. last:4, blocks:2:r4)")


def check_update(text: str) -> tuple[str, int | None, int]:
    """Check the syntax and numbers of an ``--update`` value, before any model is loaded.

    Returns:
        ``(kind, K, R)``: the plan kind (``full``, ``bias-only``, ``none``, ``last`` or
        ``blocks``), its count (None for the first three) and the patch size (1 = no filter).

    Raises:
        PlanError: Naming ``--update``, the value and the accepted forms or range.
    """
    parts = text.strip().split(":")
    kind = "bias-only" if parts[0] == "bias" else parts[0]
    if kind in ("full", "bias-only", "none") and len(parts) == 1:
        return kind, None, 1
    if kind not in ("last", "blocks") or len(parts) not in (2, 3) or (
            len(parts) == 3 and not parts[2].startswith("r")):
        raise PlanError(f"--update {text!r}: {_UPDATE_FORMS}")
    low = 1 if kind == "last" else 0
    k = _int_or_none(parts[1])
    if k is None or not low <= k <= MAX_COUNT:
        raise PlanError(f"--update {text!r}: K of {kind}:K must be an integer from {low} to "
                        f"{MAX_COUNT:,}; {_UPDATE_FORMS}")
    r = _int_or_none(parts[2][1:]) if len(parts) == 3 else 1
    if r is None or not 1 <= r <= MAX_INPUT_SIZE:
        raise PlanError(f"--update {text!r}: the patch size R of :rR must be an integer from 1 "
                        f"to {MAX_INPUT_SIZE:,}; {_UPDATE_FORMS}")
    return kind, k, r


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def parse_update(text: str, graph: LayerGraph, **kwargs: Any) -> Plan:
    """A simple plan from ``full``, ``bias-only``, ``last:K``, ``blocks:K`` (optionally
    ``:rR`` for a gradient filter of patch size R, e.g. ``blocks:2:r4``) or ``none``.

    Raises:
        PlanError: Naming ``--update`` if the text is malformed, or K or R out of range (for
            this model: K at most its number of layers or blocks).
    """
    kind, k, r = check_update(text)
    if kind == "full":
        return Plan.full(graph, **kwargs)
    if kind == "bias-only":
        return Plan.bias_only(graph, **kwargs)
    if kind == "none":
        return Plan.from_layers(graph, {}, **kwargs)
    make = Plan.last_k_layers if kind == "last" else Plan.last_k_blocks
    try:
        return make(graph, int(k or 0), patch_size=r, **kwargs)
    except PlanError as exc:
        raise PlanError(f"--update {text!r}: {exc}") from None


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a file atomically (temporary file, then rename)."""
    return atomic_write_text(path, text)


def write_json(data: Any, path: str | None) -> None:
    """Print JSON to stdout, or write it atomically to ``path``."""
    text = json.dumps(data, indent=1, default=_jsonable)
    if path in (None, "-"):
        sys.stdout.write(text + "\n")
    else:
        write_text(path, text + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
