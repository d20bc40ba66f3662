"""Benchmark: does a plan train bit-for-bit alike at another torch thread count?

The race decides between plans whose validation accuracies differ by a few images
(``studies/results/race_separation.md``), so anything that moves a training run by a few images
can change the plan it hands out. This trains every selector baseline's plan (TinyTrain,
NEq, MIT selection, TinyTL, last-k, last-k filtered; the published MIT scheme aside) and the
classifier alone in one head-to-head cell
(MCUNet-5fps, ImageNet weights, a new 10-class head; 1,000 CIFAR-10 images at 128 px, 200 of
them the validation split; the STM32F746 at 99 KB of training memory, as
``benchmarks/head_to_head.py``) at each rate of the standard grid, 4 epochs, seed 0, with the
race's own :class:`~budgetsearch.contrib.PlanRunner`, three times, each in a fresh process:
twice with 1 thread, once with 2. It prints, per plan and rate, the validation accuracy of each
run and whether the runs are bit-identical (the same validation loss to the last bit), and per
run which (plan, rate) validates best, the arm a race's last rung would keep.

    BUDGETSEARCH_DATA=../shared/datasets .venv/bin/python benchmarks/thread_reproducibility.py \\
        [--out studies/results/thread_reproducibility.md]

About 10 minutes on the 2-core machine (run it on an idle one: the 2-thread run shares the
cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL, BUDGET, SAMPLES, EPOCHS, SEED = "mcunet-5fps", "99KB", 1000, 4, 0
RUNS = (("1 thread", 1), ("1 thread, again", 1), ("2 threads", 2))


def worker(threads: int, out: Path) -> None:
    """Train every baseline plan at every rate with ``threads`` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    from budgetsearch import CostModel, LayerGraph, load_model, load_profile
    from budgetsearch.contrib import PlanRunner, split_tensors
    from budgetsearch.criteria import fisher_potential, magnitude_scores
    from budgetsearch.data import default_normalization
    from budgetsearch.plan import LayerUpdate
    from budgetsearch.planner import EFFORTS
    from budgetsearch.recipe import Recipe
    from budgetsearch.search import Search, baseline_plans
    from budgetsearch.units import parse_bytes

    torch.manual_seed(SEED)  # the new head, as `budgetsearch plan --seed 0`
    model = load_model(MODEL, weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name=MODEL)
    train, val = split_tensors("cifar10", graph=graph, normalization=default_normalization(MODEL),
                               samples=SAMPLES, val_fraction=0.2, seed=SEED)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        train[0][:64], train[1][:64]), batch_size=16)
    fisher = fisher_potential(model, loader, samples=64)
    cm = CostModel(graph, load_profile("stm32f746"), accounting="device", optimizer="sgd")
    search = Search(scores=magnitude_scores(model), cost_model=cm,
                    budget_bytes=parse_bytes(BUDGET), memory_measure="training", seed=SEED)
    plans = {b.name: dict(b.updates) for b in baseline_plans(
        evaluator=search.evaluator, cost_model=cm, scores=fisher, seed=SEED) if b.updates}
    plans["classifier"] = {graph.layer_names[-1]: LayerUpdate("weight")}
    runner = PlanRunner(model, graph=graph, train=train, val=val)
    results: dict[str, Any] = {}
    for name, updates in sorted(plans.items()):
        for lr in EFFORTS["standard"].settings("sgd").lrs:
            r = runner.run(updates, Recipe(optimizer="sgd", epochs=EPOCHS, batch_size=32,
                                           seed=SEED, lr=lr))
            results[f"{name}@{lr:g}"] = {"val_accuracy": r["val_accuracy"],
                                         "val_loss": r["val_loss"], "layers": r["layers"],
                                         "threads": r["threads"]}
            print(f"  {threads} thread(s): {name} lr {lr:g}: {r['val_accuracy']:.3f}",
                  file=sys.stderr)
    out.write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.worker_out)
        return 0
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, threads) in enumerate(RUNS):
            path = Path(tmp) / f"run{i}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                   "MKL_NUM_THREADS": str(threads)}
            print(f"run {i + 1}/{len(RUNS)}: {label}", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--worker", str(threads),
                            "--worker-out", str(path)], env=env, check=True)
            runs.append(json.loads(path.read_text()))
    arms = list(runs[0])
    same = [sum(runs[0][a]["val_loss"] == runs[j][a]["val_loss"] for a in arms)
            for j in (1, 2)]
    shift = [abs(runs[0][a]["val_accuracy"] - runs[2][a]["val_accuracy"]) for a in arms]
    lines = [
        "# Thread count and training runs",
        "",
        "Command: `BUDGETSEARCH_DATA=../shared/datasets .venv/bin/python "
        "benchmarks/thread_reproducibility.py` (see its docstring). Every selector "
        f"baseline's plan and the classifier alone of {MODEL} at {BUDGET} (STM32F746, "
        f"training memory; the published MIT scheme aside), {EPOCHS} epochs, seed {SEED}, "
        "each rate of the standard grid, trained by the race's PlanRunner in three fresh "
        "processes; validation accuracy on the 200 validation images (one image is 0.5 "
        "points).",
        "",
        f"- Two runs with 1 thread: {same[0]} of {len(arms)} arms bit-identical.",
        f"- 1 thread against 2: {same[1]} of {len(arms)} arms bit-identical; validation "
        f"accuracy moved by up to {100 * max(shift):.1f} points (mean "
        f"{100 * sum(shift) / len(shift):.2f}).",
    ]
    for label, run in zip((r[0] for r in RUNS), runs, strict=True):
        best = max(arms, key=lambda a, run=run: (
            run[a]["val_accuracy"], -(run[a]["val_loss"] or math.inf)))
        lines.append(f"- best arm by validation, {label}: {best} "
                     f"({run[best]['val_accuracy']:.3f})")
    lines += ["", "| plan @ lr | layers | " + " | ".join(r[0] for r in RUNS)
              + " | identical to the first |", "|---|---|" + "---|" * (len(RUNS) + 1)]
    for a in arms:
        ident = ", ".join(RUNS[j][0] for j in (1, 2)
                          if runs[0][a]["val_loss"] == runs[j][a]["val_loss"]) or "neither"
        lines.append(f"| {a} | {runs[0][a]['layers']} | "
                     + " | ".join(f"{run[a]['val_accuracy']:.3f}" for run in runs)
                     + f" | {ident} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from budgetsearch._io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
