"""Predicted against measured training-step time, per plan, with a profile of this machine.

For MobileNetV2 and MCUNet-5fps at 128 px, at batch 32 and batch 1, the benchmark builds the
plans users run (full fine-tuning; TinyTL bias-only; the last 3 and the last 8 layers;
channel-sparse ``neq`` plans at two memory budgets; the last 2 blocks gradient-filtered with
r = 2 and the last 3 with r = 4; the ``tinytrain`` selector; the search's quick plan), times each
whole training step exactly as the trainer runs it (``apply_plan``, forward, cross-entropy,
backward, SGD with momentum; every plan of every model and batch size visited in turn, each
visit one untimed step and two timed ones, as the profile measures; the median of ``--reps``
timed steps, their first half against their second showing the noise floor of a step time
here) and prints measured / predicted for the measured latency model of the profile
(``budgetsearch profile-device``) and, beside it, for the analytic roofline of the same
profile's compute figures.

The calibration plans of ``profile-device`` are other plans (random channels, other depths, a
random mix; see ``budgetsearch.latency``): none of the plans here was timed to fit the model.

    .venv/bin/python -m budgetsearch profile-device --out here.yaml
    .venv/bin/python benchmarks/latency_model.py --profile here.yaml \
        [--out studies/results/latency_model]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from budgetsearch import CostModel, LayerGraph, Plan, load_model, load_profile, select
from budgetsearch.budget import Budget
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import BudgetSearchError
from budgetsearch.latency import TimingGroup, time_plan_groups
from budgetsearch.trainer import tune_host_allocator

TOLERANCE = 0.15
GOAL = 0.9


def build_plans(model, graph: LayerGraph, device: str, batch: int) -> dict[str, Plan]:
    """The benchmark's plans for one model and batch size (see the module docstring)."""
    from budgetsearch import plan_for

    profile = load_profile(device)
    cm = CostModel(graph, profile, batch_size=batch, optimizer="momentum")
    full = Plan.full(graph)
    full_mem = cm.summarize(full).training_memory_bytes
    scores = magnitude_scores(model)
    plans: dict[str, Plan] = {"full": full, "bias-only": Plan.bias_only(graph),
                              "last 3 layers": Plan.last_k_layers(graph, 3),
                              "last 8 layers": Plan.last_k_layers(graph, 8)}
    for frac in (0.05, 0.25):
        plans[f"neq @{frac:.0%}"] = select("neq", cost_model=cm, budget_bytes=int(full_mem * frac),
                                           scores=scores, memory_measure="training")
    plans["last 2 blocks r=2"] = Plan.last_k_blocks(graph, 2, patch_size=2)
    plans["last 3 blocks r=4"] = Plan.last_k_blocks(graph, 3, patch_size=4)
    plans["tinytrain @10%"] = select("tinytrain", cost_model=cm,
                                     budget_bytes=int(full_mem * 0.1), scores=scores,
                                     memory_measure="training")
    try:
        outcome = plan_for(model=model, cost_model=cm,
                           budget=Budget(memory_bytes=int(full_mem * 0.1), measure="training"),
                           effort="quick", objective="fisher", scores=scores,
                           scores_source="weight magnitude", trials=60, progress=False)
        plans["search (quick) @10%"] = outcome.plan
    except BudgetSearchError as exc:
        print(f"  (no search plan: {exc})", file=sys.stderr)
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True,
                        help="a profile of this machine made by budgetsearch profile-device")
    parser.add_argument("--models", default="mobilenet_v2,mcunet-5fps")
    parser.add_argument("--batches", default="32,1")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10, help="timed steps per plan")
    parser.add_argument("--device", default="rpi4", help="profile whose budgets the plans use")
    parser.add_argument("--out", default=None, help="directory for latency_model.md/.json/.png")
    args = parser.parse_args(argv)
    tune_host_allocator()
    warnings.simplefilter("ignore")
    profile = load_profile(args.profile)  # warns (shown) if fitted under another torch/threads
    if profile.latency is None:
        parser.error(f"{args.profile} has no measured latency model: make it with "
                     "budgetsearch profile-device")
    analytic = dataclasses.replace(profile, latency=None)
    groups = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = load_model(name, num_classes=10)
        graph = LayerGraph.from_model(model, input_size=args.size, model_name=name)
        for batch in (int(b) for b in args.batches.split(",")):
            groups.append((name, model, graph, batch,
                           build_plans(model, graph, args.device, batch)))
    # every plan of every group visited in turn, the visits spread over minutes: the first
    # half of a plan's timed steps against the second is the noise floor
    print(f"{sum(len(g[4]) for g in groups)} plans x {args.reps} timed steps", file=sys.stderr)
    timed = time_plan_groups([TimingGroup(model=model, graph=graph, plans=plans,
                                          batch_size=batch, input_size=args.size)
                              for _name, model, graph, batch, plans in groups],
                             repeats=args.reps)
    half = args.reps // 2
    rows = []
    for (name, _model, graph, batch, plans), times in zip(groups, timed, strict=True):
        measured_cm = CostModel(graph, profile, accounting="ops", batch_size=batch,
                                optimizer="momentum")
        analytic_cm = CostModel(graph, analytic, accounting="ops", batch_size=batch,
                                optimizer="momentum")
        for plan_name, plan in plans.items():
            first, second = times[plan_name][:half], times[plan_name][half:]
            rows.append({"model": name, "batch": batch, "plan": plan_name,
                         "measured_ms": statistics.median(first + second),
                         "fastest_ms": min(first + second),
                         "first_half_ms": statistics.median(first),
                         "second_half_ms": statistics.median(second),
                         "predicted_ms": measured_cm.summarize(plan).latency_ms,
                         "analytic_ms": analytic_cm.summarize(plan).latency_ms,
                         "times_ms": first + second,
                         "features": measured_cm.latency_features(plan)})
    within = [abs(r["measured_ms"] / r["predicted_ms"] - 1) <= TOLERANCE for r in rows]
    ratios = [r["measured_ms"] / r["predicted_ms"] for r in rows]
    roof = [r["measured_ms"] / r["analytic_ms"] for r in rows]
    roof_within = sum(abs(x - 1) <= TOLERANCE for x in roof)
    repeat = [r["second_half_ms"] / r["first_half_ms"] for r in rows]
    repeat_within = sum(abs(x - 1) <= TOLERANCE for x in repeat)
    lines = [
        f"# Measured against predicted training-step time ({len(rows)} plans)",
        "",
        f"Profile `{profile.name}`: {profile.latency.describe()}.",
        f"Command: `.venv/bin/python benchmarks/latency_model.py --profile {args.profile} "
        f"--models {args.models} --batches {args.batches} --size {args.size} --reps {args.reps}`",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; step = apply_plan, "
        f"forward, cross-entropy, backward, SGD with momentum; {args.reps} timed steps per plan, "
        "every plan of every model and batch size visited in turn, each visit one untimed "
        "step and two timed ones (the profile measures the same way); measured = the median "
        "step, the fastest beside it.",
        "",
        "| model | batch | plan | measured ms | (fastest) | predicted ms | measured/predicted | "
        "analytic ms | measured/analytic |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['plan']} | {r['measured_ms']:.1f} | "
            f"{r['fastest_ms']:.1f} | {r['predicted_ms']:.1f} | "
            f"{r['measured_ms'] / r['predicted_ms']:.2f} | "
            f"{r['analytic_ms']:.1f} | {r['measured_ms'] / r['analytic_ms']:.2f} |")
    verdict = "met" if sum(within) >= GOAL * len(rows) else "NOT met"
    lines += [
        "",
        f"Measured latency model: {sum(within)} of {len(rows)} plans within ±{TOLERANCE:.0%} "
        f"({sum(within) / len(rows):.0%}; goal {GOAL:.0%}: {verdict}); measured/predicted "
        f"{min(ratios):.2f} to {max(ratios):.2f}, median {statistics.median(ratios):.2f}.",
        f"Analytic roofline: {roof_within} of {len(rows)} within ±{TOLERANCE:.0%}; "
        f"measured/analytic {min(roof):.2f} to {max(roof):.2f}.",
        f"The measurement against itself (the median of the second half of a plan's timed "
        f"steps over that of the first half, timed in the first and the second half of the "
        f"run): {repeat_within} of {len(rows)} within "
        f"±{TOLERANCE:.0%}, "
        f"{min(repeat):.2f} to {max(repeat):.2f}, median |deviation| "
        f"{statistics.median(abs(x - 1) for x in repeat):.1%}: the noise floor of a step time "
        "on this machine.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from budgetsearch._io import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "latency_model.md", text + "\n")
        atomic_write_text(out / "latency_model.json", json.dumps(rows, indent=1) + "\n")
        plot(rows, out / "latency_model.png")
        print(f"wrote {out}/latency_model.md, .json, .png", file=sys.stderr)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Measured against predicted step time, log-log, with the ±15 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    lo = min(min(r["measured_ms"], r["predicted_ms"], r["analytic_ms"]) for r in rows) * 0.7
    hi = max(max(r["measured_ms"], r["predicted_ms"], r["analytic_ms"]) for r in rows) * 1.4
    xs = [lo, hi]
    ax.plot(xs, xs, color="black", lw=1)
    ax.fill_between(xs, [x * (1 - TOLERANCE) for x in xs], [x * (1 + TOLERANCE) for x in xs],
                    color="0.85", label=f"±{TOLERANCE:.0%}")
    markers = {1: "o", 32: "s"}
    for model, colour in zip(sorted({r["model"] for r in rows}), ("tab:blue", "tab:orange"),
                             strict=False):
        for batch in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["model"] == model and r["batch"] == batch]
            if not sel:
                continue
            ax.scatter([r["predicted_ms"] for r in sel], [r["measured_ms"] for r in sel],
                       color=colour, marker=markers.get(batch, "^"),
                       label=f"{model}, batch {batch}: measured model")
            ax.scatter([r["analytic_ms"] for r in sel], [r["measured_ms"] for r in sel],
                       facecolors="none", edgecolors=colour, marker=markers.get(batch, "^"),
                       alpha=0.6, label=f"{model}, batch {batch}: analytic roofline")
    ax.set(xscale="log", yscale="log", xlim=xs, ylim=xs, xlabel="predicted step time (ms)",
           ylabel="measured step time (ms)",
           title="Training-step time: measured against predicted")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
