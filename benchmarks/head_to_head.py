"""Benchmark: the planner's plan against every baseline, trained with the same tuning.

For each model (MCUNet-5fps and MobileNetV2-w0.35 by default, ImageNet weights, a new 10-class
head) on CIFAR-10 at 128 px, device accounting on the STM32F746 profile, training memory, at three
MIT budgets:

1. data: 1,000 training images (class-balanced draw, seed 0) of which a stratified 20 % is the
   validation split every choice is made on; 1,000 test images (class-balanced draw of the test
   split), only ever reported;
2. methods, each a plan at the budget:
   - ``search``: ``budgetsearch plan --effort standard`` through the library entry point
     (:func:`budgetsearch.planner.make_plan`): contributions measured on the split, the search
     on the measured objective, the race of its best front points and every baseline on the
     validation split, and the race's cross-validated final among its 4 best candidates
     (5 folds of the pooled training and validation images);
   - ``search-split``: the plan that race would hand out without its final (the last rung's
     leader on the validation split), to read what the final changes;
   - ``search-quick``: the search on the Fisher proxy alone (``--effort quick``), no race;
   - every baseline the race sees: TinyTrain, NEq (both on Fisher potential, 64 images), MIT
     selection, TinyTL, last-k, last-k filtered (r = 4), the published MIT scheme at or below the
     budget, the classifier alone;
3. the same tuning for every method: SGD, batch 32, 4 epochs (the standard race's last rung),
   every rate of the standard grid {0.00667, 0.02, 0.06} with each of 3 seeds, and per seed the
   run that validates best (as ``budgetsearch train --lrs`` and the studies' ``training.lrs``);
   seeds change the batch order, the new head's initialisation is the model's, seed 0, for
   every method; test accuracy mean ± std over the seeds. Also reported: every seed at the rate
   seed 0 chose, the benchmark's first protocol;
4. per cell the best baseline (highest mean test accuracy: the strictest comparison), and whether
   ``search`` is within 1 point of it or ahead by at least 1 point.

``runs-<model>.json`` is written after every training run (a killed benchmark resumes; a plan
shared by two methods or budgets is trained once); ``cells.json`` after every cell (merged with
what other processes wrote, so one process per model may run at once); ``report.md`` and
``head_to_head.png`` at the end. Run: ``.venv/bin/python benchmarks/head_to_head.py`` (about two
hours in one process on the 2-core machine; ``--models mcunet-5fps --budgets 99KB`` for one
cell). ``--retune`` trains the finished cells' plans again under the tuning, reusing the race
and runs files. The committed run: one process per model at once (``--models mcunet-5fps``,
``--models mbv2-w0.35``), each with one torch thread (``OMP_NUM_THREADS=1``, as ``--threads 1``
now): 35 and 42 min of planning and first tuning (seed 0's rate), then 20 min of ``--retune``
for the per-seed tuning. The thread count and the CPU kernels
(``budgetsearch._threads.cpu_kernels``) are recorded per cell, and ``--retune`` refuses a cell
recorded with another count or other kernels (the committed cells predate the kernels' record;
they ran on this host's AVX-512 kernels, FINDINGS section 0c).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch._io import atomic_write_text, locked
from budgetsearch._threads import KERNEL_ENV, cpu_kernels, same_kernels
from budgetsearch.contrib import PlanRunner, load_tensors, split_tensors
from budgetsearch.criteria import fisher_potential, magnitude_scores
from budgetsearch.data import default_normalization, load_dataset
from budgetsearch.plan import LayerUpdate
from budgetsearch.planner import (
    EFFORTS,
    Candidate,
    RaceResult,
    contribution_table,
    make_plan,
    race_candidates,
    race_data_key,
)
from budgetsearch.recipe import Recipe
from budgetsearch.search import Search
from budgetsearch.trainer.metrics import validation_key
from budgetsearch.units import parse_bytes

SEEDS = (0, 1, 2)


def digest(updates: dict[str, LayerUpdate]) -> str:
    text = json.dumps({k: v.to_dict() for k, v in sorted(updates.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Runs:
    """Training runs of one model, cached in a JSON file written after each run."""

    def __init__(self, path: Path, runner: PlanRunner) -> None:
        self.path, self.runner = path, runner
        self.done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, updates: dict[str, LayerUpdate], recipe: Recipe) -> dict[str, Any]:
        key = f"{digest(updates)}|lr{recipe.lr:g}|e{recipe.epochs}|s{recipe.seed}"
        if key not in self.done:
            result = self.runner.run(updates, recipe)
            self.done[key] = {k: v for k, v in result.items() if k != "cut"}
            atomic_write_text(self.path, json.dumps(self.done, indent=0, sort_keys=True))
        return self.done[key]


def tune(runs: Runs, updates: dict[str, LayerUpdate], base: Recipe,
         lrs: tuple[float, ...]) -> dict[str, Any]:
    """Every seed trained at every rate; per seed the run that validates best (``lrs``, and
    the test accuracies; ``val_mean`` is the mean of those best validation scores), ranked as
    ``budgetsearch train --lrs`` and the studies' ``training.lrs`` rank runs
    (:func:`~budgetsearch.trainer.metrics.validation_key`: accuracy, then the lower loss);
    ``val_by_lr`` is seed 0's validation accuracy at each rate; and under ``seed0`` the
    benchmark's first protocol, seed 0's rate (``lr``) for every seed."""
    grid = {(lr, s): runs.get(updates, base.with_(lr=lr, seed=s)) for lr in lrs for s in SEEDS}

    def rank(lr: float, seed: int) -> tuple[float, float]:
        run = grid[(lr, seed)]
        return validation_key({"best_accuracy": run["val_accuracy"],
                               "val_loss": run["val_loss"]})

    chosen = [max(lrs, key=lambda x, s=s: rank(x, s)) for s in SEEDS]
    picked = [grid[(lr, s)] for lr, s in zip(chosen, SEEDS, strict=True)]
    at_seed0 = [grid[(chosen[0], s)] for s in SEEDS]
    return {"lrs": chosen, **_summary(picked), "lr": chosen[0],
            "val_by_lr": {f"{x:g}": grid[(x, SEEDS[0])]["val_accuracy"] for x in lrs},
            "seed0": _summary(at_seed0)}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean validation, mean and std of test accuracy over the seeds' runs."""
    tests = [r["test_accuracy"] for r in runs]
    return {"val_mean": float(np.mean([r["val_accuracy"] for r in runs])),
            "test_mean": float(np.mean(tests)), "test_std": float(np.std(tests)),
            "test_by_seed": tests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mcunet-5fps", "mbv2-w0.35"])
    parser.add_argument("--budgets", nargs="+", default=["49KB", "99KB", "148KB"])
    parser.add_argument("--device", default="stm32f746")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--out", default="studies/results/head_to_head")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the report from the finished cells")
    parser.add_argument("--retune", action="store_true",
                        help="train the finished cells' plans again under the tuning (the "
                             "races and runs files are reused; the planning's times kept)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); recorded per cell, since a "
                             "plan of several layers trains differently at another count")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels = cpu_kernels()  # fixed when torch was imported
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / "cells.json"
    cells: dict[str, Any] = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    if args.report_only:
        report(cells, out, args)
        return
    effort = EFFORTS["standard"]
    started = time.perf_counter()
    for name in args.models:
        torch.manual_seed(0)  # the new head, as `budgetsearch plan --seed 0`
        model = load_model(name, weights="imagenet", num_classes=10)
        graph = LayerGraph.from_model(model, input_size=128, model_name=name)
        norm = default_normalization(name)
        train, val = split_tensors("cifar10", graph=graph, normalization=norm,
                                   samples=args.samples, val_fraction=0.2, seed=0)
        test = load_tensors(load_dataset("cifar10", split="test", image_size=128,
                                         normalization=norm, limit=args.test_samples, seed=0))
        magnitude = magnitude_scores(model)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            train[0][:64], train[1][:64]), batch_size=16)
        fisher = fisher_potential(model, loader, samples=64)  # the first 64 training images
        # the contribution table exactly as `budgetsearch plan` measures it (shared cache)
        t0 = time.perf_counter()
        table = contribution_table(model, graph=graph, train=train, val=val, seed=0,
                                   candidates=effort.candidates)
        contrib_s = time.perf_counter() - t0
        runner = PlanRunner(model, graph=graph, train=train, val=val, extra={"test": test})
        runs = Runs(out / f"runs-{name}.json", runner)
        cm = CostModel(graph, load_profile(args.device), accounting="device", optimizer="sgd")
        base = Recipe(optimizer="sgd", epochs=effort.rungs[-1], batch_size=32, seed=0)
        lrs = effort.settings("sgd").lrs
        data_key = race_data_key(graph=graph, model=model, train=train, val=val)
        for label in args.budgets:
            cell_key = f"{name} {label}"
            old = cells.get(cell_key)
            if old is not None and not args.retune:
                continue
            # before anything trains: the runs file would cache runs of another configuration
            if old is not None and old.get("threads", torch.get_num_threads()) != (
                    torch.get_num_threads()):
                raise SystemExit(f"{cell_key}: planned and trained with {old['threads']} "
                                 f"thread(s); --retune it with --threads {old['threads']}")
            if old is not None and not same_kernels(old.get("kernels", kernels), kernels):
                raise SystemExit(f"{cell_key}: planned and trained on kernels {old['kernels']}, "
                                 f"this process computes with {kernels}; --retune it "
                                 f"with the environment variables {', '.join(KERNEL_ENV)} set "
                                 "as they were (see budgetsearch._threads)")
            budget = parse_bytes(label)
            common = dict(cost_model=cm, budget_bytes=budget, memory_measure="training",
                          seed=0)
            t1 = time.perf_counter()
            search = Search(scores=magnitude, contributions=table.results, **common)
            outcome = make_plan(search, effort=effort, n_trials=args.trials, runner=runner,
                                recipe=base.with_(epochs=1), data_key=data_key, model=model,
                                race_path=out / "races" / f"{name}-{label}.json",
                                baseline_scores=fisher, progress=True)
            plan_s = time.perf_counter() - t1
            quick = Search(scores=fisher, **common)
            quick_plan = make_plan(quick, effort=EFFORTS["quick"], n_trials=args.trials,
                                   progress=False).plan
            baselines, skipped = race_candidates(search, outcome.search, front=0, model=model,
                                                 seed=0, baseline_scores=fisher)
            race = outcome.race
            plans = {"search": dict(outcome.plan.updates),
                     "search-split": dict(split_pick(race).updates if race
                                          else outcome.plan.updates),
                     "search-quick": dict(quick_plan.updates)}
            plans.update({c.name: dict(c.updates) for c in baselines})
            rows = {}
            for method, updates in plans.items():
                row = tune(runs, updates, base, lrs)
                row["memory_bytes"] = cm.summarize(updates).training_memory_bytes
                row["layers"] = len(updates)
                rows[method] = row
                print(f"  {cell_key} {method:<18} lrs {','.join(f'{x:g}' for x in row['lrs'])} "
                      "test "
                      f"{row['test_mean']:.3f}±{row['test_std']:.3f} mem "
                      f"{row['memory_bytes'] / 1024:.1f} KB "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            final = race.final() if race else None
            cell = {
                "budget_bytes": budget, "rows": rows, "skipped": skipped,
                "race_winner": race.winner.name if race else None,
                "race_split_winner": split_pick(race).name if race else None,
                "race_finalists": [a["candidate"] for a in final["arms"]] if final else [],
                "race_final_folds": final["folds"] if final else None,
                "race_margin": outcome.margin(), "race_lr": race.recipe.lr if race else None,
                "plan_seconds": plan_s, "contrib_seconds": contrib_s,
                "threads": torch.get_num_threads(), "kernels": kernels,
                "race_arms": race.stats["arms_trained"] if race else 0}
            if old is not None:  # a re-tuned cell keeps what its planning measured
                cell.update({k: old[k] for k in ("plan_seconds", "contrib_seconds",
                                                 "race_arms", "threads", "kernels")
                             if k in old})
                if "kernels" not in old:  # planned before kernels were recorded
                    del cell["kernels"]
                cell["retune_kernels"] = kernels  # what the test runs trained on
            # other processes (one per model) write their cells to the same file
            with locked(cells_path):
                cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
                cells[cell_key] = cell
                atomic_write_text(cells_path, json.dumps(cells, indent=1, sort_keys=True))
    cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    report(cells, out, args)


def _gap(rows: dict[str, dict[str, Any]], method: str, best: str) -> str:
    """``method``'s mean test accuracy minus ``best``'s, in points ("–" for a cell run before
    the method was)."""
    if method not in rows:
        return "–"
    return f"{100 * (rows[method]['test_mean'] - rows[best]['test_mean']):+.1f}"


def split_pick(race: RaceResult) -> Candidate:
    """The candidate the race led with on the validation split: its winner without a final,
    else the leader of the last rung before the final."""
    if race.final() is None:
        return race.winner
    return race.candidates[race.rungs[-2]["arms"][0]["candidate"]]


def report(cells: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    head = ["# Head-to-head: the planner's plan against every baseline, same tuning", "",
            "Command: `.venv/bin/python benchmarks/head_to_head.py` (see its docstring for the "
            "protocol). Test accuracy, mean ± std over 3 seeds (batch orders); each method "
            "trained at every rate of the grid with every seed, and per seed the run that "
            "validates best kept (as `budgetsearch train --lrs` and the studies do); in the "
            "last column, every seed at the rate seed 0 chose (the benchmark's first "
            "protocol). val acc: the mean of each seed's best validation accuracy (the "
            "one it was chosen on). Training memory (device accounting, STM32F746) beside it. "
            "`search` is `budgetsearch plan --effort "
            "standard` (measured objective, race on the validation split, cross-validated "
            "final); `search-split` the plan the race led with on the split before its final; "
            "`search-quick` the search on the Fisher proxy without a race.", ""]
    within = ahead = within0 = ahead0 = 0
    summary = []
    body: list[str] = []
    def order(key: str) -> tuple[str, int]:
        model, _, budget = key.partition(" ")
        return model, int("".join(c for c in budget if c.isdigit()) or 0)

    for cell_key, cell in sorted(cells.items(), key=lambda kv: order(kv[0])):
        rows = cell["rows"]
        base = {m: r for m, r in rows.items() if not m.startswith("search")}
        best = max(base, key=lambda m: base[m]["test_mean"])
        s = rows["search"]
        diff = 100 * (s["test_mean"] - base[best]["test_mean"])
        within += diff >= -1
        ahead += diff >= 1
        if "seed0" in s:  # the same with seed 0's rate for every seed
            base0 = {m: r["seed0"] for m, r in base.items()}
            best0 = max(base0, key=lambda m: base0[m]["test_mean"])
            diff0 = 100 * (s["seed0"]["test_mean"] - base0[best0]["test_mean"])
            within0 += diff0 >= -1
            ahead0 += diff0 >= 1
        summary.append((cell_key, best, diff, cell))
        finalists = cell.get("race_finalists") or []
        final = (f" Its final ({cell['race_final_folds']} folds of the pooled images) among "
                 f"{', '.join(finalists)}; on the split it led with "
                 f"{cell['race_split_winner']}." if finalists else "")
        body += [f"## {cell_key}", "",
                 f"Race winner: {cell['race_winner']} at lr {cell['race_lr']:g} "
                 f"({cell['race_arms']} arms trained; plan {cell['plan_seconds']:.0f} s, "
                 f"the model's contributions {cell['contrib_seconds']:.0f} s once"
                 + (f"; {cell['threads']} torch thread(s)" if "threads" in cell else "")
                 + (f", kernels {cell['kernels']}" if "kernels" in cell else "")
                 + f").{final}", "",
                 "| method | test acc | val acc | lr per seed | training mem | layers | "
                 "test acc, seed 0's lr |",
                 "|---|---|---|---|---|---|---|"]
        for m, r in sorted(rows.items(), key=lambda kv: -kv[1]["test_mean"]):
            lrs = ", ".join(f"{x:g}" for x in r.get("lrs", [r["lr"]]))
            s0 = r.get("seed0")
            body.append(f"| {m}{' (best baseline)' if m == best else ''} | "
                        f"{r['test_mean']:.3f} ± {r['test_std']:.3f} | {r['val_mean']:.3f} | "
                        f"{lrs} | {r['memory_bytes'] / 1024:.1f} KB | {r['layers']} | "
                        + (f"{s0['test_mean']:.3f} ± {s0['test_std']:.3f} (lr {r['lr']:g})"
                           if s0 else "–") + " |")
        for m, why in sorted(cell["skipped"].items()):
            body += ["", f"Not a candidate: {m}: {why[:160]}"]
        body.append("")
    n = len(cells)
    lines = [*head, "## Summary", "",
             f"`search` within 1 point of the best baseline (or better) in {within} of {n} "
             f"cells, ahead by at least 1 point in {ahead} of {n} (targets: 80 % and a third)"
             + (f"; with seed 0's rate for every seed: {within0} and {ahead0}." if all(
                 "seed0" in c["rows"]["search"] for c in cells.values()) else "."),
             "", "| cell | best baseline | search − best (points) | search-split − best "
             "| search-quick − best | search memory / best's |",
             "|---|---|---|---|---|---|"]
    for cell_key, best, diff, cell in summary:
        rows = cell["rows"]
        mem = rows["search"]["memory_bytes"] / rows[best]["memory_bytes"]
        lines.append(f"| {cell_key} | {best} | {diff:+.1f} | {_gap(rows, 'search-split', best)} "
                     f"| {_gap(rows, 'search-quick', best)} | {mem:.2f} |")
    lines += ["", "![test accuracy per cell](head_to_head.png)", "", *body]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    plot(summary, out / "head_to_head.png")
    print("\n".join(lines[:len(head) + 6 + len(summary)]))


def plot(summary: list[tuple[str, str, float, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(summary)) + 1.5, 4))
    xs = np.arange(len(summary))
    series = [("search", "C0"), ("search-quick", "C1"), ("best baseline", "C2"),
              ("classifier", "C7")]
    for j, (label, color) in enumerate(series):
        means, stds = [], []
        for _key, best, _d, cell in summary:
            r = cell["rows"].get(best if label == "best baseline" else label) or {}
            means.append(r.get("test_mean", 0.0))  # a classifier equal to last-k: not shown
            stds.append(r.get("test_std", 0.0))
        ax.bar(xs + (j - 1.5) * 0.2, means, 0.2, yerr=stds, color=color, label=label)
    ax.set_xticks(xs, [k for k, *_ in summary], rotation=20, ha="right")
    ax.set_ylabel("test accuracy (3 seeds)")
    lo = min(cell["rows"]["search-quick"]["test_mean"] for *_r, cell in summary)
    ax.set_ylim(max(0.0, lo - 0.1), None)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("planner (standard effort) vs baselines, same learning-rate tuning")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
