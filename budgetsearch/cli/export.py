"""``budgetsearch export``: a plan written for another training runtime."""

from __future__ import annotations

import argparse
import sys

from ._common import float_range, int_range, write_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` command."""
    from ..export import FORMATS

    p = sub.add_parser(
        "export", help="write a plan for another training runtime",
        description="Write a plan for another training runtime. tte: the sparse-update "
                    "configuration of MIT's Tiny Training Engine (MCU models, batch 1), with the "
                    "input-channel permutation that puts the plan's channels first; a plan the "
                    "engine cannot express is refused with the layer named. executorch: the "
                    "planned model's training step (forward, loss, backward; the runtime's SGD "
                    "updates the trained tensors) as ExecuTorch programs in --out, with a "
                    "manifest.json; needs pip install 'budgetsearch[executorch]'.")
    p.add_argument("--plan", required=True, help="the plan file (budgetsearch plan / select)")
    p.add_argument("--format", required=True, choices=FORMATS, help="the target runtime")
    p.add_argument("--mcu-dir", help="folder of the MCU model files (default: the shipped ones)")
    p.add_argument("--out", help="tte: output JSON file (default: stdout); executorch: the "
                                 "output folder (required)")
    g = p.add_argument_group("executorch")
    g.add_argument("--model", default=None,
                   help="registered model name (default: the plan's)")
    g.add_argument("--weights", default=None,
                   help="imagenet, random, or a .pth/.safetensors state dict to start from "
                        "(default: the model's own default)")
    g.add_argument("--num-classes", type=int_range(1, 100_000), default=None,
                   help="classifier size (default: the plan's)")
    g.add_argument("--seed", type=int_range(0, 2**31 - 1), default=0,
                   help="seed of a new classifier's initialisation (default 0)")
    g.add_argument("--prefix", choices=("xnnpack", "none"), default="xnnpack",
                   help="xnnpack (default): the frozen layers in front of the first trained "
                        "one as their own XNNPACK inference program; none: all in the "
                        "training program (portable kernels)")
    g.add_argument("--optimizer", choices=("sgd", "momentum"), default=None,
                   help="the runtime's SGD, with or without momentum (default: the plan's)")
    g.add_argument("--lr", type=float_range(0, 10, low_open=True), default=None,
                   help="learning rate (default: the plan's recipe's, else 0.01)")
    g.add_argument("--momentum", type=float_range(0, 1, high_open=True), default=None,
                   help="momentum of --optimizer momentum (default: the recipe's, else 0.9)")
    g.add_argument("--weight-decay", type=float_range(0, 1), default=None,
                   help="weight decay (default: the recipe's, else 0)")
    g.add_argument("--filter-mode", choices=("normalized", "paper", "corrected"), default=None,
                   help="gradient-filter variant (default: the plan's)")
    g.add_argument("--no-dropout", action="store_true",
                   help="turn the model's dropout off in the training step (deterministic)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Run ``budgetsearch export``."""
    from ..plan import load_plan

    plan = load_plan(args.plan)
    if args.format == "executorch":
        return _run_executorch(args, plan)
    from ..export import to_tte

    write_json(to_tte(plan, mcu_dir=args.mcu_dir), args.out)
    return 0


def _run_executorch(args: argparse.Namespace, plan: object) -> int:
    import torch

    from ..errors import ExportError
    from ..export.executorch import _require_executorch, to_executorch
    from ..graph import LayerGraph
    from ..models import load_model
    from ..models.zoo import get_model_spec

    _require_executorch()  # before the model is built
    if not args.out:
        raise ExportError("--format executorch writes a folder: pass --out DIR")
    name = args.model or plan.model  # type: ignore[attr-defined]
    if not name:
        raise ExportError(f"{args.plan}: the plan names no model (field 'model'); pass --model")
    classes = args.num_classes
    head = get_model_spec(name).head
    shape = plan.layer_shapes.get(head) if head else None  # type: ignore[attr-defined]
    torch.manual_seed(args.seed)
    model = load_model(name, weights=args.weights, num_classes=classes, mcu_dir=args.mcu_dir)
    if classes is None and shape is not None:
        own = model.get_submodule(head)
        if getattr(own, "weight", None) is not None and own.weight.shape[0] != shape[0]:
            torch.manual_seed(args.seed)  # the plan's classifier size: a new head
            model = load_model(name, weights=args.weights, num_classes=int(shape[0]),
                               mcu_dir=args.mcu_dir)
    height, width = plan.input_size  # type: ignore[attr-defined]
    graph = LayerGraph.from_model(model, input_size=(height, width), model_name=name)
    result = to_executorch(
        plan, model=model, out_dir=args.out, graph=graph,  # type: ignore[arg-type]
        prefix=args.prefix, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, filter_mode=args.filter_mode,
        dropout=not args.no_dropout)
    m = result.manifest
    programs = m["programs"]
    out = sys.stdout
    if result.prefix is not None:
        out.write(f"wrote {result.prefix} ({programs['prefix']['bytes']:,} bytes): the frozen "
                  "prefix, XNNPACK\n")
    out.write(f"wrote {result.training} ({programs['training']['bytes']:,} bytes): the training "
              f"step, {len(programs['training']['parameters'])} trained tensors, batch "
              f"{m['batch_size']} at {m['input_size'][0]}x{m['input_size'][1]}, "
              f"SGD lr {m['optimizer']['lr']:g}\n")
    out.write(f"wrote {result.out_dir / 'manifest.json'}\n")
    return 0
