"""Predicted against measured training-step time, per plan, with a profile of this machine.

For MobileNetV2 and MCUNet-5fps at 128 px, at batch 32 and batch 1, the benchmark builds the
plans users run (full fine-tuning; TinyTL bias-only; the last 3 and the last 8 layers;
channel-sparse ``neq`` plans at two memory budgets; the last 2 blocks gradient-filtered with
r = 2 and the last 3 with r = 4; the ``tinytrain`` selector; the search's quick plan), times each
whole training step exactly as the trainer runs it (``apply_plan``, forward, cross-entropy,
backward, SGD with momentum; every plan of every model and batch size visited in turn, each
visit one untimed step and two timed ones, as the profile measures; the median of ``--reps``
timed steps) and prints measured / predicted for the measured latency model of the profile
(``budgetsearch profile-device``) and, beside it, for the analytic roofline of the same
profile's compute figures.

Two self-checks give the noise floor. The medians of a plan's even and of its odd visits are two
measurements of the same plan over the same minutes: how far apart they are is the noise of the
measurement itself. The median of the first half of its timed steps against the second half's
adds the drift of the machine's speed over the run. The speed varies over seconds and the two
steps of a visit move together, so a plan's median rests on its visits, not its steps: the
default of 20 timed steps is 10 visits. The speed also moves between minutes, which no profile
can know: ``--runs N`` times every plan N times back to back and prints each run's level (its
median measured/predicted) beside its count.

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
import math
import statistics
import sys
import time
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
BURST = 2  # timed steps per visit


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
    parser.add_argument("--reps", type=int, default=20,
                        help="timed steps per plan (two per visit)")
    parser.add_argument("--runs", type=int, default=1,
                        help="time every plan this many times, back to back, with the same "
                             "profile (the machine's speed drifts between runs)")
    parser.add_argument("--device", default="rpi4", help="profile whose budgets the plans use")
    parser.add_argument("--out", default=None, help="directory for latency_model.md/.json/.png")
    args = parser.parse_args(argv)
    tune_host_allocator()
    profile = load_profile(args.profile)  # warns (shown) if fitted under another torch/threads
    warnings.simplefilter("ignore")
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
    timing_groups = [TimingGroup(model=model, graph=graph, plans=plans, batch_size=batch,
                                 input_size=args.size)
                     for _name, model, graph, batch, plans in groups]
    # the predictions do not change between runs
    predictions = []
    for _name, _model, graph, batch, plans in groups:
        measured_cm = CostModel(graph, profile, accounting="ops", batch_size=batch,
                                optimizer="momentum")
        analytic_cm = CostModel(graph, analytic, accounting="ops", batch_size=batch,
                                optimizer="momentum")
        predictions.append({
            plan_name: {"predicted_ms": measured_cm.summarize(plan).latency_ms,
                        "analytic_ms": analytic_cm.summarize(plan).latency_ms,
                        "features": measured_cm.latency_features(plan)}
            for plan_name, plan in plans.items()})
    runs = []
    for run in range(args.runs):
        # every plan of every group visited in turn, the visits spread over minutes
        print(f"run {run + 1} of {args.runs}: {sum(len(g[4]) for g in groups)} plans x "
              f"{args.reps} timed steps", file=sys.stderr)
        started = time.strftime("%H:%M:%S")
        t0 = time.perf_counter()
        timed = time_plan_groups(timing_groups, repeats=args.reps, burst=BURST)
        rows = [plan_row(name, batch, plan_name, times[plan_name], **predicted[plan_name])
                for (name, _model, _graph, batch, plans), times, predicted
                in zip(groups, timed, predictions, strict=True)
                for plan_name in plans]
        runs.append({"started": started, "minutes": (time.perf_counter() - t0) / 60,
                     "summary": summarize(rows), "rows": rows})
    text = report(runs, profile, args)
    print(text)
    if args.out:
        from budgetsearch._io import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "latency_model.md", text + "\n")
        atomic_write_text(out / "latency_model.json", json.dumps(runs, indent=1) + "\n")
        plot(runs[0]["rows"], out / "latency_model.png")
        print(f"wrote {out}/latency_model.md, .json, .png", file=sys.stderr)
    return 0


def plan_row(model: str, batch: int, plan: str, steps: list[float], *, predicted_ms: float,
             analytic_ms: float, features: dict) -> dict:
    """One plan's measurement: the median step, the two self-checks' halves, the predictions."""
    half = len(steps) // 2
    even = [t for i, t in enumerate(steps) if (i // BURST) % 2 == 0]
    odd = [t for i, t in enumerate(steps) if (i // BURST) % 2 == 1]
    return {"model": model, "batch": batch, "plan": plan,
            "measured_ms": statistics.median(steps), "fastest_ms": min(steps),
            "first_half_ms": statistics.median(steps[:half]),
            "second_half_ms": statistics.median(steps[half:]),
            "even_visits_ms": statistics.median(even),
            "odd_visits_ms": statistics.median(odd) if odd else None,
            "predicted_ms": predicted_ms, "analytic_ms": analytic_ms, "times_ms": steps,
            "features": features}


def _band(ratios: list[float]) -> dict:
    return {"within": sum(abs(x - 1) <= TOLERANCE for x in ratios), "of": len(ratios),
            "min": min(ratios), "max": max(ratios), "median": statistics.median(ratios),
            "median_deviation": statistics.median(abs(x - 1) for x in ratios)}


def summarize(rows: list[dict]) -> dict:
    """The run's figures: measured/predicted (as is, and over the run's median ratio),
    measured/analytic, and the two self-checks."""
    ratios = [r["measured_ms"] / r["predicted_ms"] for r in rows]
    level = statistics.median(ratios)
    alt = [r["odd_visits_ms"] / r["even_visits_ms"] for r in rows if r["odd_visits_ms"]]
    predicted = _band(ratios)
    return {"predicted": predicted, "goal_met": predicted["within"] >= GOAL * predicted["of"],
            "predicted_over_level": _band([x / level for x in ratios]),
            "analytic": _band([r["measured_ms"] / r["analytic_ms"] for r in rows]),
            "alternate_visits": _band(alt) if alt else None,
            "halves": _band([r["second_half_ms"] / r["first_half_ms"] for r in rows])}


def report(runs: list[dict], profile, args: argparse.Namespace) -> str:
    """Markdown: the first run's table and verdict, then one line per run."""
    rows, s = runs[0]["rows"], runs[0]["summary"]
    lines = [
        f"# Measured against predicted training-step time ({len(rows)} plans)",
        "",
        f"Profile `{profile.name}`: {profile.latency.describe()}.",
        f"Command: `.venv/bin/python benchmarks/latency_model.py --profile {args.profile} "
        f"--models {args.models} --batches {args.batches} --size {args.size} --reps {args.reps}"
        f" --runs {args.runs}`",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; step = apply_plan, "
        f"forward, cross-entropy, backward, SGD with momentum; {args.reps} timed steps per plan, "
        "every plan of every model and batch size visited in turn, each visit one untimed "
        f"step and {BURST} timed ones (the profile measures the same way); measured = the median "
        "step, the fastest beside it. The table is the first run's.",
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

    def band(b: dict) -> str:
        return (f"{b['within']} of {b['of']} within ±{TOLERANCE:.0%}, {b['min']:.2f} to "
                f"{b['max']:.2f}, median {b['median']:.2f}")

    p = s["predicted"]
    verdict = "met" if s["goal_met"] else "NOT met"
    lines += [
        "",
        f"Measured latency model: {band(p)} ({p['within'] / p['of']:.0%}; goal {GOAL:.0%}: "
        f"{verdict}).",
        f"Analytic roofline: {band(s['analytic'])}.",
    ]
    if s["alternate_visits"]:
        lines.append(
            f"The measurement against itself, odd visits over even visits (two measurements of "
            f"each plan over the same minutes): {band(s['alternate_visits'])}, median "
            f"|deviation| {s['alternate_visits']['median_deviation']:.1%}: the noise of a "
            "median of half the visits.")
    lines.append(
        f"The second half of each plan's timed steps over the first half (the drift of this "
        f"machine's speed over the run added): {band(s['halves'])}, median |deviation| "
        f"{s['halves']['median_deviation']:.1%}.")
    lines += [
        "",
        f"## Every run ({len(runs)}, back to back, the same profile)",
        "",
        "The run's level is its median measured/predicted: how fast the machine ran in that "
        "run against the minutes of the profile. Over the level: each plan's measured/predicted "
        "divided by it, that is, the predictor's error with the machine's speed of the moment "
        "divided out (a diagnostic; the goal is on the ratio as measured).",
        "",
        f"| run | started | minutes | within ±{TOLERANCE:.0%} (goal {math.ceil(GOAL * len(rows))}"
        f" of {len(rows)}) | level | within ±{TOLERANCE:.0%} over the level | odd/even visits "
        f"within ±{TOLERANCE:.0%} |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for k, run in enumerate(runs, 1):
        s = run["summary"]
        alt = s["alternate_visits"]
        lines.append(
            f"| {k} | {run['started']} | {run['minutes']:.1f} | {s['predicted']['within']} of "
            f"{s['predicted']['of']} | {s['predicted']['median']:.2f} | "
            f"{s['predicted_over_level']['within']} of {s['predicted_over_level']['of']} | "
            f"{alt['within'] if alt else '-'} |")
    met = sum(r["summary"]["goal_met"] for r in runs)
    lines += ["", f"Goal met in {met} of {len(runs)} runs."]
    return "\n".join(lines)


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
