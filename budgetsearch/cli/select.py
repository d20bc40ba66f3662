"""``budgetsearch select``: choose what to train under a budget and write the plan."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..budget import Budget
from ..choices import HEAD_MODES, MEMORY_MEASURES
from ..errors import PlanError
from ..units import format_bytes
from ._common import (
    MAX_COUNT,
    MAX_INPUT_SIZE,
    MAX_PARAMS,
    MAX_SEED,
    add_budget_args,
    add_device_args,
    add_model_args,
    budget_from_args,
    build_cost_model,
    check_out_path,
    int_range,
)

__all__ = ["register", "run"]

# CLI flag (argparse dest) -> selector option name
_OPTION_FLAGS = {
    "k": "k", "blocks": "blocks", "patch_size": "patch_size", "label": "label",
    "budget_params": "budget_params", "head": "head", "n_bias": "n_bias",
}


def register(subparsers: Any) -> None:
    """Add the ``select`` command."""
    from ..selectors import list_methods

    p = subparsers.add_parser(
        "select",
        help="choose layers and channels to train within a budget; write the plan",
        description="Run a selection method and write a plan that fits the memory (and latency) "
                    "budget as measured by the cost model. Methods: " + ", ".join(list_methods()),
    )
    p.add_argument("--method", required=True,
                   help="selection method: " + ", ".join(list_methods()))
    add_model_args(p)
    add_device_args(p)
    add_budget_args(p)
    p.add_argument("--memory-measure", choices=MEMORY_MEASURES, default="peak",
                   help="what the budget limits: the step's peak memory (default) or the "
                        "training memory over inference")
    p.add_argument("--scores", default=None,
                   help="scores file from `budgetsearch score` (tinytrain: fisher; neq: neq or "
                        "any; mit / mit-scheme: magnitude, computed from the model if absent)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0,
                   help="seed of random choices (method random)")
    p.add_argument("--k", type=int_range(0, MAX_COUNT), default=None,
                   help="last-k: number of layers (or blocks); default the largest that fits")
    p.add_argument("--blocks", action="store_true", default=None,
                   help="last-k: count blocks instead of layers")
    p.add_argument("--patch-size", type=int_range(1, MAX_INPUT_SIZE), default=None,
                   help="last-k: gradient-filter patch size of the updated convs")
    p.add_argument("--label", default=None, help="mit-scheme: the scheme's label, e.g. 49KB")
    p.add_argument("--budget-params", type=int_range(0, MAX_PARAMS), default=None,
                   help="neq / random: maximum updated weight parameters (classifier excluded)")
    p.add_argument("--n-bias", type=int_range(0, MAX_COUNT), default=None,
                   help="tinytl: number of biases updated before the classifier")
    p.add_argument("--head", choices=HEAD_MODES, default=None,
                   help="how the classifier is updated (default: the method's)")
    p.add_argument("--out", required=True, help="plan file to write (JSON)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Select and write the plan; print a one-screen summary."""
    from ..criteria import Scores, magnitude_scores
    from ..profiles import load_profile
    from ..selectors import get_method, select
    from ._common import build_model

    check_out_path(args.out, "--out")
    spec = get_method(args.method)  # unknown method: error listing the methods, exit 2
    accepted = spec.defaults()
    options: dict[str, Any] = {}
    for dest, name in _OPTION_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if name not in accepted:
            flag = "--" + dest.replace("_", "-")
            raise PlanError(f"method {spec.name} does not take {flag}; its options: "
                            f"{', '.join(accepted) or 'none'}")
        options[name] = value
    if "mcu_dir" in accepted and args.mcu_dir:
        options["mcu_dir"] = args.mcu_dir
    model, graph = build_model(args)
    profile = load_profile(args.device)
    budget = budget_from_args(args, profile)
    cost_model = build_cost_model(args, graph)
    scores = None
    if args.scores is not None:
        scores = Scores.load(args.scores, model=model)
    elif spec.name in ("mit", "mit-scheme"):
        scores = magnitude_scores(model)
    elif spec.needs_scores:
        raise PlanError(
            f"method {spec.name} needs --scores ({spec.summary}); make them with "
            f"`budgetsearch score --model {args.model} --criterion "
            f"{'fisher' if spec.name == 'tinytrain' else 'neq'} ...`"
            + ("; at epoch 0 (no velocities yet) use --method random" if spec.name == "neq"
               else "")
        )
    plan = select(spec.name, cost_model=cost_model, scores=scores, seed=args.seed,
                  **budget.kwargs(), **options)
    plan.save(args.out)
    _summary(plan, budget, args, sys.stdout)
    return 0


def _summary(plan: Any, budget: Budget, args: argparse.Namespace, out: Any) -> None:
    pred, prov = plan.predicted, plan.provenance
    used = budget.memory(pred)
    updates = plan.updates
    weights = [n for n, u in updates.items() if u.mode == "weight"]
    partial = [n for n in weights if updates[n].channels is not None]
    fits = "fits" if prov.get("fits") else "DOES NOT FIT"
    lines = [
        f"method        {prov['method']}  (seed {prov['seed']})",
        f"model         {plan.model}  on {plan.device}, batch {plan.batch_size}, "
        f"{plan.optimizer}",
        f"layers        {len(updates)} updated: {len(weights)} weights "
        f"({len(partial)} on a channel subset), {len(updates) - len(weights)} bias only",
        f"memory        {format_bytes(used)} {budget.measure} of "
        f"{format_bytes(budget.memory_bytes or 0)} "
        f"budget: {fits}  (peak {format_bytes(pred['peak_memory_bytes'])}, training "
        f"{format_bytes(pred['training_memory_bytes'])})",
        f"backward      {pred['backward_macs'] / 1e6:.2f} M MACs, "
        f"{pred['trainable_params']} trainable parameters",
        f"latency       {pred['latency_ms']:.1f} ms per step"
        + (f" (budget {budget.latency_ms:.1f} ms)" if budget.latency_ms is not None else ""),
    ]
    shown = list(updates.items())
    for name, u in shown[-12:] if len(shown) > 12 else shown:
        what = u.mode if u.channels is None else f"weight, {len(u.channels)} {u.axis}put ch."
        lines.append(f"  {name:<32} {what}")
    if len(shown) > 12:
        lines.insert(len(lines) - 12, f"  ... {len(shown) - 12} earlier layers")
    lines.append(f"wrote {args.out}")
    out.write("\n".join(lines) + "\n")
