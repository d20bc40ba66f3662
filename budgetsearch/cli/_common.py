"""Arguments and helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..cost import ACCOUNTINGS, CostModel
from ..errors import BudgetSearchError, PlanError
from ..graph import LayerGraph
from ..plan import Plan
from ..profiles import DeviceProfile, load_profile
from ..units import parse_bytes, parse_ms

__all__ = [
    "add_budget_args",
    "add_device_args",
    "add_model_args",
    "build_cost_model",
    "build_model",
    "parse_update",
    "write_json",
    "write_text",
]


def add_model_args(parser: argparse.ArgumentParser, *, weights_default: str | None = None) -> None:
    """--model, --weights, --num-classes, --input-size, --mcu-dir."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="registered model name (see `budgetsearch models`)")
    g.add_argument("--weights", default=weights_default,
                   help="imagenet, random, or a .pth/.safetensors state dict (default: the "
                        "model's own default: random for torchvision, pretrained for MCU models)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="replace the classifier with one of this many classes")
    g.add_argument("--input-size", type=int, default=None,
                   help="input height and width in pixels (default: the model's, 128 for MCU "
                        "models and 128 otherwise)")
    g.add_argument("--mcu-dir", default=None,
                   help="directory of the MCU models' JSON+NPZ files "
                        "(default ../shared/models/mcu)")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device, --batch-size, --accounting, --optimizer, --bn-train, --strict."""
    g = parser.add_argument_group("device")
    g.add_argument("--device", required=True,
                   help="device profile name (see `budgetsearch devices`) or a profile .yaml path")
    g.add_argument("--batch-size", type=int, default=None,
                   help="batch size (default: the profile's)")
    g.add_argument("--accounting", choices=ACCOUNTINGS, default="device",
                   help="device: the profile's minimal engine; pytorch: stock autograd, fp32")
    g.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=None,
                   help="optimizer (default: the profile's)")
    g.add_argument("--bn-train", action="store_true",
                   help="batch norm on batch statistics (default: frozen)")
    g.add_argument("--strict", action="store_true",
                   help="fail on operators without a cost rule instead of warning")


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    """--budget and --latency-budget."""
    parser.add_argument("--budget", default=None,
                        help="memory budget, e.g. 256KB or 1MB (default: the profile's training "
                             "memory)")
    parser.add_argument("--latency-budget", default=None,
                        help="latency budget per training step, e.g. 500ms or 2s")


def budgets(args: argparse.Namespace, profile: DeviceProfile) -> tuple[int, float | None]:
    """The memory budget in bytes and the latency budget in ms from the arguments."""
    memory = (parse_bytes(args.budget, what="--budget") if args.budget is not None
              else profile.memory_bytes)
    latency = (parse_ms(args.latency_budget, what="--latency-budget")
               if getattr(args, "latency_budget", None) is not None else None)
    return memory, latency


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
    return CostModel(graph, profile, accounting=args.accounting, batch_size=args.batch_size,
                     optimizer=args.optimizer, bn_train=args.bn_train, strict=args.strict)


def parse_update(text: str, graph: LayerGraph, **kwargs: Any) -> Plan:
    """A simple plan from ``full``, ``bias-only``, ``last:K``, ``blocks:K`` (optionally
    ``:rR`` for a gradient filter of patch size R, e.g. ``blocks:2:r4``) or ``none``."""
    parts = text.split(":")
    kind = parts[0]
    try:
        r = int(parts[2][1:]) if len(parts) > 2 and parts[2].startswith("r") else 1
        if kind == "full":
            return Plan.full(graph, **kwargs)
        if kind in ("bias-only", "bias"):
            return Plan.bias_only(graph, **kwargs)
        if kind == "none":
            return Plan.from_layers(graph, {}, **kwargs)
        if kind in ("last", "blocks") and len(parts) >= 2:
            k = int(parts[1])
            if kind == "last":
                return Plan.last_k_layers(graph, k, patch_size=r, **kwargs)
            return Plan.last_k_blocks(graph, k, patch_size=r, **kwargs)
    except ValueError:
        pass
    raise PlanError(
        f"--update {text!r}: expected full, bias-only, none, last:K or blocks:K, optionally "
        "followed by :rR for a gradient filter (e.g. last:4, blocks:2:r4)"
    )


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
