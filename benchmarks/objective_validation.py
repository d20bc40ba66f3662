"""Benchmark: does an accuracy objective rank plans as training does?

For each model (MCUNet-5fps and MobileNetV2-w0.35, ImageNet weights, a new 10-class head) on
CIFAR-10 at 128 px, device accounting on the STM32F746 profile, training memory, at three MIT
budgets:

1. data: 1,000 training images (class-balanced draw, seed 0), 20 % carved out (stratified) as the
   validation split every choice is made on; 1,000 test images, only ever reported;
2. a contribution table (``budgetsearch contrib`` defaults: the bias-depth grid and the top 6
   layers of the second half at every ratio, axis and filter) with the training recipe below;
3. per budget, at least 12 distinct feasible plans: the chosen plan and two more front points of
   the search under the Fisher proxy and under the measured objective (additive; each further
   weight layer's gain halved; decay 0.2 with loss weight 0.05, the calibration a first run of
   this benchmark found), random feasible trials of the Fisher search, and every
   baseline (TinyTrain, NEq, MIT selection, TinyTL, last-k, last-k filtered, the published MIT
   scheme at or below the budget);
4. every plan trained at two learning rates (SGD, batch 32, 3 epochs; 0.02 as the studies and
   0.005), the rate chosen on validation, and its test accuracy at that rate reported;
5. per (model, budget) cell the Spearman correlation with test accuracy of each objective: the
   Fisher proxy, the additive measured prediction (decay 1, loss weight 0) and the calibrated one
   (decay and loss weight chosen on a grid to maximise the median Spearman on the *other*
   model's cells, never on the cell it is scored on); the median over cells with a bootstrap
   interval (plans resampled within cells).

Results go to ``--out`` (``runs.json`` is written after every training run: a killed benchmark
resumes), with ``report.md`` and ``spearman.png``. Run:
``cd /work/main && .venv/bin/python benchmarks/objective_validation.py`` (about an hour on the
2-core machine; ``--models mcunet-5fps --budgets 99KB`` for a quick look).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch._io import atomic_write_text
from budgetsearch.contrib import (
    ContributionTable,
    PlanRunner,
    build_units,
    candidate_layers,
    load_tensors,
    measure_contributions,
)
from budgetsearch.criteria import fisher_potential, magnitude_scores
from budgetsearch.data import default_normalization, load_dataset, split_validation
from budgetsearch.errors import BudgetSearchError
from budgetsearch.plan import LayerUpdate
from budgetsearch.recipe import Recipe
from budgetsearch.search import (
    MeasuredModel,
    ProxyModel,
    Search,
    baseline_plans,
    feasible,
    scores_digest,
)
from budgetsearch.selectors import select
from budgetsearch.selectors.mit_scheme import MIT_SCHEMES
from budgetsearch.units import parse_bytes

LRS = (0.02, 0.005)
DECAYS = (1.0, 0.8, 0.6, 0.4, 0.2)
LOSS_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when a side is constant."""
    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        order = a.argsort(kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for value in np.unique(a):  # ties share their mean rank
            tie = a == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def key_of(updates: dict[str, LayerUpdate]) -> str:
    return json.dumps({k: v.to_dict() for k, v in sorted(updates.items())}, sort_keys=True)


def plans_for(model_name: str, model: Any, graph: LayerGraph, cm: CostModel, budget: int,
              fisher: Any, magnitude: Any, table: ContributionTable, trials: int,
              seed: int) -> dict[str, dict[str, LayerUpdate]]:
    """Distinct feasible plans of one budget, by a name saying where each came from."""
    out: dict[str, dict[str, LayerUpdate]] = {}
    seen: set[str] = set()

    def add(name: str, updates: dict[str, LayerUpdate]) -> None:
        k = key_of(updates)
        if k not in seen:
            seen.add(k)
            out[name] = dict(updates)

    rng = random.Random(seed)
    for objective, scores, contributions, decay, loss_weight in (
            ("fisher", fisher, None, 1.0, 0.0), ("measured", magnitude, table.results, 1.0, 0.0),
            ("measured-d0.5", magnitude, table.results, 0.5, 0.0),
            ("measured-d0.2", magnitude, table.results, 0.2, 0.05)):
        search = Search(cost_model=cm, scores=scores, budget_bytes=budget,
                        memory_measure="training", contributions=contributions, seed=seed,
                        decay=decay, loss_weight=loss_weight)
        result = search.run(n_trials=trials, progress=False)
        add(f"search-{objective}", result.plan.updates)
        front = [t for t in result.front if t.number != result.trial.number and feasible(t)]
        for i, t in enumerate(rng.sample(front, min(2, len(front)))):
            add(f"front-{objective}-{i}", search.evaluator.updates(t.params))
        if objective == "fisher":
            fits = [t for t in result.trials if feasible(t)]
            for i, t in enumerate(rng.sample(fits, min(4, len(fits)))):
                add(f"random-trial-{i}", search.evaluator.updates(t.params))
            for b in baseline_plans(evaluator=search.evaluator, cost_model=cm, scores=scores,
                                    seed=seed):
                if b.updates is not None and b.metrics and b.metrics["feasible"]:
                    add(b.name, b.updates)
    labels = [lab for lab in MIT_SCHEMES.get(model_name, {})
              if parse_bytes(lab) <= budget]
    if labels:
        label = max(labels, key=parse_bytes)
        try:
            plan = select("mit-scheme", cost_model=cm, budget_bytes=budget, scores=magnitude,
                          memory_measure="training", label=label)
            add(f"mit-scheme-{label}", plan.updates)
        except BudgetSearchError as exc:
            print(f"  mit-scheme {label}: {exc}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mcunet-5fps", "mbv2-w0.35"])
    parser.add_argument("--budgets", nargs="+", default=["49KB", "99KB", "148KB"])
    parser.add_argument("--device", default="stm32f746")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="studies/results/objective_validation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs_path = out / "runs.json"
    runs: dict[str, Any] = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    cells: dict[str, list[dict[str, Any]]] = {}
    models: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in args.models:
        torch.manual_seed(0)
        model = load_model(name, weights="imagenet", num_classes=10)
        graph = LayerGraph.from_model(model, input_size=128, model_name=name)
        norm = default_normalization(name)
        pool = load_dataset("cifar10", split="train", image_size=128, normalization=norm,
                            limit=args.samples, seed=0)
        train_set, val_set = split_validation(pool, fraction=0.2, seed=0)
        test_set = load_dataset("cifar10", split="test", image_size=128, normalization=norm,
                                limit=args.test_samples, seed=0)
        train, val, test = load_tensors(train_set), load_tensors(val_set), load_tensors(test_set)
        magnitude = magnitude_scores(model)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train),
                                             batch_size=16)
        fisher = fisher_potential(model, loader, samples=64)
        proxy_mag = ProxyModel(graph, magnitude)
        recipe = Recipe(optimizer="sgd", lr=LRS[0], epochs=args.epochs, batch_size=32)
        units = build_units(graph, candidates=candidate_layers("top:6", model=model, graph=graph,
                                                             train=train))
        t0 = time.perf_counter()
        table = measure_contributions(
            model, graph=graph, train=train, val=val, recipe=recipe, channels=proxy_mag.channels,
            scores_digest=scores_digest(magnitude), units=units,
            path=str(out / f"{name}.contrib.json"), progress=True)
        print(f"{name}: {len(table.results)} units ({time.perf_counter() - t0:.0f} s this run; "
              f"{table.stats})", file=sys.stderr)
        cm = CostModel(graph, load_profile(args.device), accounting="device", optimizer="sgd")
        models[name] = {"graph": graph, "fisher": ProxyModel(graph, fisher),
                        "table": table, "magnitude": proxy_mag}
        runner = PlanRunner(model, graph=graph, train=train, val=val, extra={"test": test})
        for label in args.budgets:
            budget = parse_bytes(label)
            plans = plans_for(name, model, graph, cm, budget, fisher, magnitude, table,
                              args.trials, seed=0)
            rows = []
            for plan_name, updates in plans.items():
                per_lr = {}
                for lr in LRS:
                    run_key = f"{name}|{label}|{key_of(updates)}|{lr}"
                    if run_key not in runs:
                        runs[run_key] = runner.run(updates, recipe.with_(lr=lr))
                        atomic_write_text(runs_path, json.dumps(runs, indent=0))
                    per_lr[lr] = runs[run_key]
                best = max(LRS, key=lambda lr: (per_lr[lr]["val_accuracy"],
                                                -(per_lr[lr]["val_loss"] or math.inf)))
                rows.append({"plan": plan_name, "updates": updates, "lr": best,
                             "val_accuracy": per_lr[best]["val_accuracy"],
                             "test_accuracy": per_lr[best]["test_accuracy"],
                             "memory_bytes": cm.summarize(updates)
                             .training_memory_bytes})
                print(f"  {name} {label} {plan_name:<22} lr {best:<6} val "
                      f"{rows[-1]['val_accuracy']:.3f} test {rows[-1]['test_accuracy']:.3f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            cells[f"{name} {label}"] = rows
    report(cells, models, out, args)


def predictions(rows: list[dict[str, Any]], m: dict[str, Any], decay: float,
                loss_weight: float) -> list[float]:
    model = MeasuredModel(m["graph"], m["magnitude"], m["table"].results, decay=decay,
                          loss_weight=loss_weight)
    return [model(r["updates"]) for r in rows]


def report(cells: dict[str, list[dict[str, Any]]], models: dict[str, dict[str, Any]],
           out: Path, args: argparse.Namespace) -> None:
    """Spearman per cell and objective, calibration on the other model, bootstrap, plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_of = {c: c.split(" ")[0] for c in cells}
    grid = list(itertools.product(DECAYS, LOSS_WEIGHTS))
    preds: dict[tuple[str, tuple[float, float]], list[float]] = {}
    for cell, rows in cells.items():
        for params in grid:
            preds[(cell, params)] = predictions(rows, models[model_of[cell]], *params)

    def rho(cell: str, values: list[float]) -> float:
        return spearman(values, [r["test_accuracy"] for r in cells[cell]])

    chosen: dict[str, tuple[float, float]] = {}
    for name in models:
        others = [c for c in cells if model_of[c] != name] or [c for c in cells
                                                               if model_of[c] == name]
        def fit(params: tuple[float, float], others: list[str] = others) -> float:
            vals = [rho(c, preds[(c, params)]) for c in others]
            return float(np.nanmedian(vals)) if not all(math.isnan(v) for v in vals) else -1
        chosen[name] = max(grid, key=lambda p: (fit(p), p[0] == 1.0, -p[1]))
    objectives = {
        "fisher proxy": lambda c, rows: [models[model_of[c]]["fisher"](r["updates"])
                                         for r in rows],
        "additive (measured)": lambda c, rows: preds[(c, (1.0, 0.0))],
        "calibrated (measured)": lambda c, rows: preds[(c, chosen[model_of[c]])],
    }
    def whole_head(cell: str) -> list[int]:
        head = models[model_of[cell]]["graph"].layer_names[-1]
        return [i for i, r in enumerate(cells[cell])
                if (u := r["updates"].get(head)) is not None and u.mode == "weight"
                and u.channels is None]

    subsets = {"all plans": {c: list(range(len(rows))) for c, rows in cells.items()},
               "plans that train the whole classifier": {c: whole_head(c) for c in cells}}
    lines = ["# Objective validation", "",
             f"`benchmarks/objective_validation.py` ({', '.join(args.models)}; budgets "
             f"{', '.join(args.budgets)} of training memory on {args.device}; CIFAR-10, "
             f"{args.samples} training images of which 20 % validation, {args.test_samples} test "
             f"images; SGD, batch 32, {args.epochs} epochs, lr {' or '.join(map(str, LRS))} "
             "chosen on validation). Spearman of each objective with test accuracy, per cell "
             "(the measured objective predicts chance for a plan that leaves the new classifier "
             "partly untrained: the second table leaves those plans out)."]
    rng = np.random.default_rng(0)
    table: dict[str, dict[str, float]] = {}
    for subset, keep in subsets.items():
        lines += ["", f"**{subset}** (plans per cell: "
                  + ", ".join(str(len(keep[c])) for c in cells) + ")", "",
                  "| objective | " + " | ".join(cells) + " | median [95 % bootstrap] |",
                  "|---|" + "---|" * (len(cells) + 1)]
        for o, f in objectives.items():
            values = {c: np.asarray(f(c, rows))[keep[c]] for c, rows in cells.items()}
            tests = {c: np.asarray([r["test_accuracy"] for r in rows])[keep[c]]
                     for c, rows in cells.items()}
            per_cell = {c: spearman(list(values[c]), list(tests[c])) for c in cells}
            if subset == "all plans":
                table[o] = per_cell
            medians = []
            for _ in range(1000):
                per = []
                for c in cells:
                    idx = rng.integers(0, len(tests[c]), len(tests[c]))
                    per.append(spearman(list(values[c][idx]), list(tests[c][idx])))
                medians.append(np.nanmedian(per) if not all(map(math.isnan, per)) else math.nan)
            lo, hi = (float(np.nanpercentile(medians, q)) for q in (2.5, 97.5))
            vals = list(per_cell.values())
            med = float(np.nanmedian(vals)) if not all(map(math.isnan, vals)) else math.nan
            lines.append(f"| {o} | " + " | ".join(f"{v:+.2f}" for v in vals)
                         + f" | {med:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    lines += ["", "Calibration (decay, loss weight) chosen on the other model's cells: "
              + ", ".join(f"{n}: {p}" for n, p in chosen.items()), "",
              "Plans per cell (test accuracy at the learning rate chosen on validation):", ""]
    for cell, rows in cells.items():
        lines.append(f"**{cell}**: " + ", ".join(
            f"{r['plan']} {r['test_accuracy']:.3f} ({r['memory_bytes'] / 1024:.0f} KB, lr "
            f"{r['lr']})" for r in sorted(rows, key=lambda r: -r["test_accuracy"])))
        lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 4))
    for ax, (o, f) in zip(np.atleast_1d(axes), objectives.items(), strict=True):
        for i, (c, rows) in enumerate(cells.items()):
            ax.scatter(f(c, rows), [r["test_accuracy"] for r in rows], s=14, color=f"C{i}",
                       label=f"{c} ({table[o][c]:+.2f})")
        ax.set_title(o)
        ax.set_xlabel("objective value")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "spearman.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
