"""A study re-read with every method's learning rate chosen by cross-validation, not per seed.

A tuned study (``training.lrs``) trains every method at each rate of its grid with every seed
and keeps, per seed, the rate whose run scores best on the validation split. In the scarce-data
variant that split is 50 images: one image is 2 points, and a rate chosen on it is close to a
draw (``studies/results/race_vs_test.md``: MobileNetV2-w0.35 at 49 KB, the search's plan tests
42.7 % at the race's rate and 39.6 % as the study's choices left it). The race of the search
cell is cross-validated on the 250 pooled images; the methods it is compared with are not.

This applies the race's rule to every method (the planner's other variants, every method of
kind ``search`` but ``search`` itself, e.g. ``search-quick`` and ``search-thorough``, left
out), the search's plan included: per cell (data,
model, device, budget) and method, seed 0's plan (``cells/<cell>__s0/plan.json``, what the
study trained) is trained at each rate of the grid on ``--folds`` stratified folds of the pooled
training and validation images (:meth:`budgetsearch.contrib.PlanRunner.folds`, dealt with seed
0; fold j trains with seed ``j *`` :data:`budgetsearch.planner.race.FOLD_SEED_STRIDE`, seed 0's
model and head), for the study's epochs, and the rate with the best accuracy over all pooled
images (then the lower loss, then the lower rate) is the method's rate for every seed. (A
method whose plan depends on the seed, TinyTrain's and NEq's selections, gets the rate of seed
0's plan for every seed's plan; the search's plan is the same for every seed.) The
training is a one-rung :func:`budgetsearch.planner.race` per cell and filter mode, its file
under ``--work`` (default ``<results>/<study>/cv_rates/``): a killed run resumes, and two
processes given the same arguments share the work (a file lock; no arm is trained twice).

Nothing new is trained on the test split: each method's test accuracy at the chosen rate is
read from the study's ``tuning.json`` of every seed (the study trained every rate). The tables
put Δ (``search`` minus the best baseline, in points; the baseline with the best mean over
seeds) under the study's per-seed choice and under the cross-validated rate side by side.

    BUDGETSEARCH_DATA=../shared/datasets .venv/bin/python benchmarks/cv_rates.py \\
        studies/mcu_budgets_tuned.yaml studies/results --data c10-250 \\
        [--folds 5] [--out studies/results/cv_rates.md]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROLES = ("published", "baseline")  # the record roles a search is compared against
# the planner's other efforts and variants (every method of kind search but the one named
# ``search``, the standard effort) are not compared here
PLANNER = "search"


def cell_groups(spec: Any, data: set[str] | None
                ) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """The study's seed-0 cells by (data, model, device, budget) prefix, then method; and each
    prefix's seeds (of its ``search`` cells: a study may exclude seeds per data variant)."""
    groups: dict[str, dict[str, Any]] = defaultdict(dict)
    seeds: dict[str, list[int]] = defaultdict(list)
    for cell in spec.cells():
        other_variant = cell.method.method == PLANNER and cell.method.name != PLANNER
        if other_variant or (data is not None and cell.data.name not in data):
            continue
        prefix = cell.id.rsplit("__", 2)[0]
        if cell.seed == 0:
            groups[prefix][cell.method.name] = cell
        if cell.method.name == "search":
            seeds[prefix].append(cell.seed)
    return groups, seeds


def finished(root: Path, prefix: str, method: str, seeds: list[int]) -> list[dict] | None:
    """Each seed's ``tuning.json`` and record of a method, or None if a seed is unfinished."""
    out = []
    for s in seeds:
        rec = root / f"{prefix}__{method}__s{s}.json"
        tuning = root / f"{prefix}__{method}__s{s}" / "tuning.json"
        if not (rec.exists() and tuning.exists()):
            return None
        doc = json.loads(rec.read_text())
        if doc.get("status") != "done":
            return None
        out.append({"record": doc, "tuning": json.loads(tuning.read_text())})
    return out


def cv_scores(cells: dict[str, Any], *, folds: int, work: Path, prefix: str,
              progress: bool) -> dict[str, dict[float, tuple[float, float]]]:
    """Per method: each rate's (accuracy, loss) over the pooled images of ``folds`` folds."""
    from budgetsearch.contrib import load_tensors
    from budgetsearch.plan import load_plan
    from budgetsearch.planner import Candidate, race, race_data_key, race_key
    from budgetsearch.planner.race import RaceSettings, arm_scores
    from budgetsearch.recipe import Recipe
    from budgetsearch.studies.context import CellContext

    any_cell = next(iter(cells.values()))
    ctx = CellContext(any_cell, out_dir=work / "scratch")
    t = any_cell.study.training
    options = dict(t.get("options") or {})
    forced = options.pop("filter_mode", None)
    plans = {m: load_plan(any_cell.study.cells_dir / c.id / "plan.json")
             for m, c in cells.items()}
    by_mode: dict[str, list[str]] = defaultdict(list)
    for m, plan in plans.items():
        by_mode[forced or plan.filter_mode].append(m)
    train, val = load_tensors(ctx.train_data), load_tensors(ctx.val_data)
    data_key = race_data_key(graph=ctx.graph, model=ctx.model, train=train, val=val)
    settings = RaceSettings(rungs=(int(any_cell.data.epochs_or(t["epochs"])),),
                            lrs=tuple(float(x) for x in t["lrs"]), folds=folds)
    out: dict[str, dict[float, tuple[float, float]]] = {}
    for mode, methods in sorted(by_mode.items()):
        recipe = Recipe(optimizer=t["optimizer"], batch_size=int(t["batch_size"]), seed=0,
                        filter_mode=mode, **options)
        cands = [Candidate(name=m, source="baseline", updates=dict(plans[m].updates),
                           memory_bytes=0, latency_ms=0.0, backward_macs=0.0) for m in methods]
        key = race_key(data_key=data_key, recipe=recipe, settings=settings, candidates=cands)
        rr = race(ctx.runner, cands, recipe=recipe, settings=settings, key=key,
                  path=work / f"{prefix}__{mode}.json", progress=progress)
        names = {a: c.name for c in rr.candidates.values() for a in (c.name, *c.aliases)}
        acc, loss = arm_scores(rr.results), arm_scores(rr.results, metric="val_loss")
        for m in methods:
            out[m] = {lr: (a, loss.get((rung, name, lr), math.inf))
                      for (rung, name, lr), a in acc.items() if name == names[m]}
    return out


def analyse(spec: Any, *, data: set[str] | None, folds: int, work: Path,
            progress: bool) -> list[dict]:
    """One row per cell group: each method's test mean under both rate choices, and Δ."""
    groups, prefix_seeds = cell_groups(spec, data)
    rows = []
    for prefix, cells in sorted(groups.items()):
        seeds = sorted(prefix_seeds[prefix])
        runs = {m: finished(spec.cells_dir, prefix, m, seeds) for m in cells}
        runs = {m: r for m, r in runs.items() if r is not None}
        if "search" not in runs:
            print(f"{prefix}: search unfinished, left out", file=sys.stderr)
            continue
        cells = {m: c for m, c in cells.items() if m in runs}
        print(f"{prefix}: {len(cells)} methods x {len(spec.training['lrs'])} rates x "
              f"{folds} folds", file=sys.stderr, flush=True)
        scores = cv_scores(cells, folds=folds, work=work, prefix=prefix, progress=progress)
        per: dict[str, dict[str, Any]] = {}
        for m, rs in runs.items():
            lr = min(scores[m], key=lambda x: (-scores[m][x][0], scores[m][x][1], x))
            per[m] = {
                "role": rs[0]["record"].get("role"), "cv_lr": lr,
                "cv_score": 100 * scores[m][lr][0],
                "reported": 100 * statistics.fmean(
                    float(r["record"]["metrics"]["test_accuracy"]) for r in rs),
                "cv": 100 * statistics.fmean(
                    float(r["tuning"][f"{lr:g}"]["test_accuracy"]) for r in rs),
                "seed_lrs": [float(r["record"]["lr"]) for r in rs],
                # read after the fact: the rate whose test mean is best (an oracle)
                "oracle": max(100 * statistics.fmean(
                    float(r["tuning"][f"{x:g}"]["test_accuracy"]) for r in rs)
                    for x in scores[m])}
        base = {m: p for m, p in per.items() if p["role"] in ROLES}
        rows.append({"cell": prefix, "methods": per, "seeds": len(seeds), **{
            f"best_{how}": max(base, key=lambda m, h=how: base[m][h])
            for how in ("reported", "cv")}})
    return rows


def render(rows: list[dict], command: str, folds: int) -> str:
    out = ["# Every method's rate chosen by cross-validation", "",
           f"Command: `{command}` (see its docstring). Test accuracy in %, the mean over the "
           f"study's seeds; *per seed*: each seed at the rate its validation split chose (the "
           f"study's report); *{folds}-fold*: every seed at the rate {folds}-fold "
           "cross-validation on the pooled training and validation images chose for seed 0's "
           "plan. Δ is `search` minus the best baseline (best mean of the same column), in "
           "points.", "",
           "| cell | search per seed | best baseline per seed | Δ per seed | search "
           f"{folds}-fold (rate) | best baseline {folds}-fold (rate) | Δ {folds}-fold |",
           "|---|---|---|---|---|---|---|"]
    counts = {"reported": [0, 0], "cv": [0, 0]}
    for r in rows:
        me = r["methods"]["search"]
        br, bc = r["methods"][r["best_reported"]], r["methods"][r["best_cv"]]
        dr, dc = me["reported"] - br["reported"], me["cv"] - bc["cv"]
        for how, d in (("reported", dr), ("cv", dc)):
            counts[how][0] += d >= -1
            counts[how][1] += d >= 1
        out.append(f"| {r['cell'].replace('__', ' · ')} | {me['reported']:.1f} | "
                   f"{r['best_reported']} {br['reported']:.1f} | {dr:+.1f} | {me['cv']:.1f} "
                   f"({me['cv_lr']:g}) | {r['best_cv']} {bc['cv']:.1f} ({bc['cv_lr']:g}) | "
                   f"{dc:+.1f} |")
    n = len(rows)
    every = [p for r in rows for p in r["methods"].values()]
    gain = statistics.fmean(p["cv"] - p["reported"] for p in every)
    vs_fixed = {how: statistics.fmean(p[how] - p["oracle"] for p in every)
                for how in ("reported", "cv")}
    out += ["", f"- {n} cells. Per seed: `search` within 1 point of the best baseline in "
            f"{counts['reported'][0]} (Δ ≥ −1), ahead by ≥ 1 in {counts['reported'][1]}. "
            f"{folds}-fold rate: Δ ≥ −1 in {counts['cv'][0]}, ≥ +1 in {counts['cv'][1]}.",
            f"- Which rule chooses better rates, over all {len(every)} (cell, method) pairs: "
            f"the {folds}-fold rate tests {gain:+.2f} points against the per-seed choice on "
            f"average. Against the method's best fixed rate on test (an oracle read after the "
            f"fact), on average: per seed {vs_fixed['reported']:+.2f}, {folds}-fold "
            f"{vs_fixed['cv']:+.2f} points. The search's {folds}-fold score is not "
            "comparable with the others': its plan won a race on the same folds.", "",
            "## Every method", "",
            "| cell | method | per seed | rates per seed | "
            f"{folds}-fold rate (its score) | {folds}-fold |", "|---|---|---|---|---|---|"]
    for r in rows:
        for m, p in sorted(r["methods"].items(), key=lambda kv: -kv[1]["cv"]):
            rates = ", ".join(f"{x:g}" for x in p["seed_lrs"])
            out.append(f"| {r['cell'].replace('__', ' · ')} | {m} | {p['reported']:.1f} | "
                       f"{rates} | {p['cv_lr']:g} ({p['cv_score']:.1f}) | {p['cv']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study file")
    parser.add_argument("results", type=Path, help="the results root (studies/results)")
    parser.add_argument("--data", nargs="+", help="data variants (default: all)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--work", type=Path, help="race files (default <results>/<study>/"
                        "cv_rates)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from budgetsearch._io import atomic_write_text
    from budgetsearch.studies.validate import load_spec

    probe = load_spec(args.study)
    spec = load_spec(args.study, results_dir=args.results / probe.name)
    work = args.work or spec.results_dir / "cv_rates"
    work.mkdir(parents=True, exist_ok=True)
    rows = analyse(spec, data=set(args.data) if args.data else None,
                   folds=args.folds, work=work, progress=not args.no_progress)
    command = ".venv/bin/python benchmarks/cv_rates.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = render(rows, command, args.folds)
    if args.out:
        atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
