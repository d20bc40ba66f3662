"""``budgetsearch cost``: what one training step of a plan costs on a device."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..budget import Budget
from ..plan import load_plan
from ._common import (
    add_device_args,
    add_model_args,
    build_cost_model,
    build_model,
    check_update,
    parse_update,
    write_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``cost`` command."""
    p = sub.add_parser(
        "cost",
        help="per-layer memory, MACs and latency of one training step of a plan on a device",
        description="Print the per-layer cost table and totals of one training step.",
    )
    add_model_args(p)
    add_device_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--plan", help="a plan file (JSON); costed at its input size, batch "
                       "size and optimizer unless --input-size, --batch-size, --optimizer say")
    which.add_argument("--update", default=None,
                       help="a simple plan: full, bias-only, none, last:K, blocks:K, optionally "
                            "with :rR for a gradient filter (e.g. blocks:2:r4); default full")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--all-layers", action="store_true",
                   help="list frozen layers without backward too")
    p.add_argument("--plot", default=None, help="write a per-layer memory and MACs plot (PNG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``budgetsearch cost``."""
    if args.update is not None:
        check_update(args.update)  # a malformed --update is refused before the model is traced
    plan = None
    if args.plan:  # the plan's input size, batch size and optimizer unless the flags say others
        plan = load_plan(args.plan)
        args.input_size = args.input_size or tuple(plan.input_size)
        args.batch_size = args.batch_size or plan.batch_size
        args.optimizer = args.optimizer or plan.optimizer
        # and the accounting and batch-norm mode it was costed with (plans record them)
        args.accounting = args.accounting or plan.provenance.get("accounting")
        args.bn_train = args.bn_train or bool(plan.provenance.get("bn_train", False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _model, graph = build_model(args)
        cost_model = build_cost_model(args, graph)
    from ..latency import LatencyModelWarning

    for w in caught:  # the model's own tracing chatter stays quiet; these are the user's
        if "cost rule" in str(w.message) or issubclass(w.category, LatencyModelWarning):
            print(f"warning: {w.message}", file=sys.stderr)  # stdout may be --json
    if plan is not None:
        plan.validate(graph)
    else:
        plan = parse_update(args.update or "full", graph)
    cost = cost_model.evaluate(plan)
    if args.plot:
        from ..plots import plot_layer_costs

        plot_layer_costs(cost, args.plot, title=f"{args.model} on {cost.device}")
    # the plan's own budget, as it was made (its memory measure): what `plan` and `select`
    # said fits; the device's memory bounds the step's whole peak whatever the plan's budget
    made_for = Budget.from_plan(plan) if args.plan and (
        plan.memory_budget_bytes is not None or plan.latency_budget_ms is not None) else None
    if args.json:
        doc = cost.to_dict()
        doc.update(model=args.model, input_size=list(graph.input_shape[1:]),
                   memory_budget_bytes=cost_model.profile.memory_bytes)
        if made_for is not None:
            doc["plan_budget"] = {"memory_bytes": made_for.memory_bytes,
                                  "memory_measure": made_for.measure,
                                  "latency_ms": made_for.latency_ms,
                                  "fits": made_for.fits(cost)}
        write_json(doc, None)
        return 0
    print(f"{args.model} ({len(graph.layers)} trainable layers, input "
          f"{graph.input_shape[1]}x{graph.input_shape[2]}) on {cost_model.profile.display_name}")
    print(cost.format_table(all_layers=args.all_layers))
    device = cost_model.profile.memory_bytes
    verdict = "fits" if cost.peak_memory_bytes <= device else "does NOT fit"
    print(f"memory of the device: {device / 1024:.0f} KB for the step's peak of "
          f"{cost.peak_memory_bytes / 1024:.1f} KB -> the step {verdict}")
    if made_for is not None:
        why = made_for.why_not(cost)
        print(f"the plan's budget ({made_for.describe()}): "
              + ("fits" if why is None else f"does NOT fit: {why}"))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
