"""Does the race rank plans as the test split does? Each raced study cell's arms against the test.

A study's ``search`` cell hands out the plan that won its race (``plans/<cell>__p0/race*.json``),
and the study then trains every method, baselines included, at each learning rate of its grid,
with every seed, keeping per seed the rate that scores best on validation. So the study's
``tuning.json`` files hold, for every method and seed, the test accuracy at *each* rate of the
grid. Where a race arm (a candidate at one rate) trained the same plan as a study method (the
same updates, by the race's candidate digest, for every seed: the seed-independent baselines
such as TinyTL, last-k, the classifier, the published MIT scheme and the hand placements of
gradient filtering, and the race's winner, which is the ``search`` method's plan), this script
sets the arm's race score beside that method's mean test accuracy over the seeds at the arm's
rate. Nothing is trained and nothing is chosen on the test split; the test figures are read to
judge the race after the fact.

Per cell it prints:

- ρ, the Spearman correlation between the race's scores of the matched arms at the first rung
  (every arm trains there) and their test means: how well the race ranks plans and rates;
- the race's winner, its score at the last rung and its test mean at the race's rate (when
  that rate is in the study's grid), and at the rate of the grid where its test mean is best;
- the baseline (role ``published`` or ``baseline``, any plan) and rate with the best test
  mean;
- Δ as the study reports it (``search`` minus the best baseline, each seed at the rate its
  validation chose), and Δ with each side at its best rate on test: what separates the plans
  when no rate is chosen badly. Both oracle columns choose on test and are there to take the
  rate out of the comparison, not to be quoted as results; the baseline's side is the best of
  six to fifteen plans at three rates, so it is biased upwards more than the winner's.

Methods whose plan depends on the seed (TinyTrain, NEq and the MIT selection rank channels by
the seed's scores) are matched only where every seed's plan is the race's, and the races of
``benchmarks/head_to_head.py`` are not read (its cells keep the chosen rate's results only).

    .venv/bin/python benchmarks/race_vs_test.py studies/results \\
        [--studies mcu_budgets_tuned gradient_filtering_tuned] \\
        [--out studies/results/race_vs_test.md]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ARM = re.compile(r"r(\d+):e(\d+):s(\d+):(.+)@lr([0-9.eE+-]+)(?::f(\d+))?$")
SKIP = ("search-quick",)  # a plan of its own, never raced


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's ρ with average ranks for ties; None for fewer than 3 pairs or no spread."""
    if len(a) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


def race_scores(path: Path) -> tuple[dict[tuple[int, str, float], float], dict[str, str]]:
    """Every arm's score by (rung, candidate, rate): its accuracy over all its runs (seeds,
    folds), each weighted by its validation images; and the candidates' digests."""
    doc = json.loads(path.read_text())
    sums: dict[tuple[int, str, float], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key, res in doc["results"].items():
        m = ARM.match(key)
        if m is None or res.get("val_accuracy") is None:
            continue
        rung, _e, _s, name, lr, _f = m.groups()
        n = float(res.get("val_images") or 1)
        acc = sums[(int(rung), name, float(lr))]
        acc[0] += n * float(res["val_accuracy"])
        acc[1] += n
    cands = doc["key"]["candidates"]
    digests = ast.literal_eval(cands) if isinstance(cands, str) else dict(cands)
    return {k: s / n for k, (s, n) in sums.items()}, digests


def study_groups(root: Path, study: str) -> dict[str, dict[str, dict[int, Path]]]:
    """The study's cells by (data, model, device, budget) prefix, then method, then seed."""
    groups: dict[str, dict[str, dict[int, Path]]] = defaultdict(lambda: defaultdict(dict))
    for rec in sorted((root / study / "cells").glob("*.json")):
        prefix, method, seed = rec.stem.rsplit("__", 2)
        home = rec.parent / rec.stem
        if (home / "tuning.json").exists():
            groups[prefix][method][int(seed[1:])] = home
    return groups


def _record(home: Path) -> Path:
    """A cell's record beside its directory (cell ids hold dots: no ``with_suffix``)."""
    return home.parent / f"{home.name}.json"


def analyse(root: Path, study: str) -> list[dict]:
    """One row per raced ``search`` cell group of the study (see the module docstring)."""
    from budgetsearch.plan import load_plan
    from budgetsearch.planner import updates_digest

    rows = []
    for prefix, methods in sorted(study_groups(root, study).items()):
        if "search" not in methods:
            continue
        record = json.loads((_record(methods["search"][0])).read_text())
        race = record.get("race") or {}
        folds = int(race.get("folds") or 1)
        home = root / study / "plans" / f"{prefix}__search__p0"
        path = home / ("race.json" if folds == 1 else f"race-{folds}fold.json")
        if not path.exists():
            continue
        scores, digests = race_scores(path)
        roles = {m: json.loads(_record(next(iter(seeds.values()))).read_text())["role"]
                 for m, seeds in methods.items()}
        tests: dict[str, dict[str, float]] = {}  # method -> rate -> mean test accuracy
        method_digest: dict[str, str] = {}
        for method, seeds in methods.items():
            if method in SKIP:
                continue
            ds = {updates_digest(load_plan(d / "plan.json").updates) for d in seeds.values()}
            if len(ds) != 1:
                continue  # the plan depends on the seed
            method_digest[method] = ds.pop()
            runs = [json.loads((d / "tuning.json").read_text()) for d in seeds.values()]
            tests[method] = {lr: 100 * statistics.fmean(float(r[lr]["test_accuracy"])
                                                         for r in runs)
                             for lr in runs[0]}
        by_digest = defaultdict(list)
        for method, d in method_digest.items():
            by_digest[d].append(method)
        winner = race.get("winner")
        matched = []  # (rung, candidate, rate, race score %, method, test %)
        for (rung, name, lr), score in scores.items():
            for method in by_digest.get(digests.get(name, ""), []):
                if method == "search" and name != winner:
                    continue  # the winner's twin under another name trains the same plan
                t = tests[method].get(f"{lr:g}")
                if t is not None:
                    matched.append((rung, name, lr, 100 * score, method, t))
        first = [m for m in matched if m[0] == 0]
        last = max(r for r, *_ in scores)
        win_arm = [(s, lr) for (r, n, lr), s in scores.items() if r == last and n == winner]
        win_score, win_lr = max(win_arm) if win_arm else (None, race.get("lr"))
        mine = tests.get("search", {})
        win_test = mine.get(f"{win_lr:g}") if win_lr else None
        win_best = max(mine.items(), key=lambda kv: kv[1]) if mine else None
        base = [(lr, t, m) for m, by_lr in tests.items() if m != "search"
                and roles[m] in ("published", "baseline") for lr, t in by_lr.items()]
        best_base = max(base, key=lambda b: b[1]) if base else None
        reported = {m: statistics.fmean(
            float(json.loads(_record(d).read_text())["metrics"]["test_accuracy"])
            for d in seeds.values()) * 100 for m, seeds in methods.items()}
        base_reported = max(v for m, v in reported.items()
                            if roles[m] in ("published", "baseline"))
        rows.append({
            "cell": f"{study} · {prefix.replace('__', ' · ')}", "folds": folds,
            "seeds": len(methods["search"]),
            "rho": spearman([m[3] for m in first], [m[5] for m in first]), "arms": len(first),
            "winner": winner, "winner_lr": win_lr,
            "winner_score": None if win_score is None else 100 * win_score,
            "winner_test": win_test, "winner_best": win_best, "best_base": best_base,
            "delta_reported": reported["search"] - base_reported,
            "delta_plan": (None if win_best is None or best_base is None
                           else win_best[1] - best_base[1])})
    return rows


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(rows: list[dict], command: str) -> str:
    out = ["# The race against the test split", "",
           f"Command: `{command}` (see its docstring). Race scores and test accuracies in %, "
           "test accuracies the mean over the study's seeds at one learning rate; ρ over the "
           "arms matched at the first rung; Δ in points. Columns marked *oracle* choose a "
           "rate (and a baseline) on test, for comparison only.", "",
           "| cell | folds | seeds | ρ (arms) | race winner @ rate (score) | its test | "
           "its best rate, *oracle* | best baseline @ rate, *oracle* | Δ reported | Δ, each "
           "at its best rate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, w = r["best_base"], r["winner_best"]
        out.append(
            f"| {r['cell']} | {r['folds']} | {r['seeds']} | {_f(r['rho'], '{:+.2f}')} "
            f"({r['arms']}) | {r['winner']} @ {_f(r['winner_lr'], '{:g}')} "
            f"({_f(r['winner_score'])}) | {_f(r['winner_test'])} | "
            + (f"{w[0]}: {w[1]:.1f}" if w else "–") + " | "
            + (f"{b[2]} @ {b[0]}: {b[1]:.1f}" if b else "–")
            + f" | {r['delta_reported']:+.1f} | {_f(r['delta_plan'], '{:+.1f}')} |")
    rhos = [r["rho"] for r in rows if r["rho"] is not None]
    plan = [r["delta_plan"] for r in rows if r["delta_plan"] is not None]
    same = [r for r in rows if r["winner_best"] and r["winner_lr"] is not None
            and r["winner_best"][0] == f"{r['winner_lr']:g}"]
    out += ["", f"- {len(rows)} cells; ρ median {statistics.median(rhos):+.2f}, from "
                f"{min(rhos):+.2f} to {max(rhos):+.2f}." if rhos else "",
            f"- The race's rate is the winner's best rate on test in {len(same)} of "
            f"{len(rows)} cells.",
            f"- Δ, each at its best rate, ≥ −1 in {sum(d >= -1 for d in plan)} of {len(plan)} "
            f"cells and ≥ +1 in {sum(d >= 1 for d in plan)}; Δ reported ≥ −1 in "
            f"{sum(r['delta_reported'] >= -1 for r in rows)} and ≥ +1 in "
            f"{sum(r['delta_reported'] >= 1 for r in rows)}.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--studies", nargs="+",
                        default=["mcu_budgets_tuned", "gradient_filtering_tuned"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = [r for s in args.studies for r in analyse(args.results, s)]
    if not rows:
        raise SystemExit(f"{args.results}: no raced search cells in {', '.join(args.studies)}")
    command = ".venv/bin/python benchmarks/race_vs_test.py " + " ".join(
        str(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = render(rows, command)
    print(text)
    if args.out:
        from budgetsearch._io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
