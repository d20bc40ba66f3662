"""Does the race rank plans as the test split does? Raced study cells' arms against the test.

A study's ``search`` cell hands out the plan that won its race
(``plans/<data>__<model>__<device>__<budget>__search__p0/race.json``, or ``race-<k>fold.json``
when it was cross-validated), and the study then trains every method, baselines included, at
each learning rate of its grid with every seed, keeping per seed the rate that scores best on
validation. So the study's ``tuning.json`` files hold, for every method and seed, the test
accuracy at *each* rate of the grid. Nothing is trained here and nothing is chosen on the
test split; the test figures are read to judge the race after the fact.

Per cell (over the search's seeds, and the methods that finished all of them) it prints:

- ρ, the Spearman correlation between the race's first-rung scores (2 epochs; every arm trains
  there) and the test means of the arms a study method trained with the same plan for every
  seed (by the race's candidate digest, :func:`budgetsearch.planner.updates_digest`): the
  seed-independent baselines among the race's candidates (TinyTL, last-k, the classifier, the
  published MIT scheme) and the winner (the ``search`` method's plan), one point per
  (candidate, rate). The race's other front points were never trained by the study, so ρ is
  over baselines and the winner only;
- the race's winner (marked when it is a baseline's plan), its score at the last rung, its
  test mean at the race's rate (when that rate is in the study's grid) and at the rate of the
  grid where its test mean is best;
- the baseline (role ``published`` or ``baseline``, any method, the hand placements of
  gradient filtering included) and rate with the best test mean;
- Δ as the study reports it (``search`` minus the best baseline, each seed at the rate its
  validation chose), and Δ with each side at its best rate on test: what separates the plans
  when no rate is chosen badly. Both oracle columns choose on test and are there to take the
  rate out of the comparison, not to be quoted as results; the baseline's side is the best of
  every baseline at every rate, so it is biased upwards more than the winner's.

The races of ``benchmarks/head_to_head.py`` are not read (its cells keep the chosen rate's
results only).

    .venv/bin/python benchmarks/race_vs_test.py studies/results \\
        [--studies mcu_budgets_tuned gradient_filtering_tuned] \\
        [--out studies/results/race_vs_test.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SKIP = ("search-quick",)  # a plan of its own, never raced


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's ρ with average ranks for ties; None for fewer than 3 pairs or no spread."""
    from budgetsearch.studies.report import average_ranks

    ra, rb = average_ranks(a), average_ranks(b)
    if len(a) < 3 or len(set(ra)) < 2 or len(set(rb)) < 2:
        return None
    return statistics.correlation(ra, rb)


Cells = dict[str, dict[str, dict[int, tuple[Path, dict]]]]


def study_groups(root: Path, study: str) -> Cells:
    """The study's finished cells by (data, model, device, budget) prefix, then method, then
    seed: each cell's directory (holding ``tuning.json``) and its record."""
    groups: Cells = defaultdict(lambda: defaultdict(dict))
    for rec in sorted((root / study / "cells").glob("*.json")):
        prefix, method, seed = rec.stem.rsplit("__", 2)
        home = rec.parent / rec.stem  # cell ids hold dots: no with_suffix
        doc = json.loads(rec.read_text())
        if (home / "tuning.json").exists() and doc.get("status") == "done":
            groups[prefix][method][int(seed[1:])] = (home, doc)
    return groups


def analyse(root: Path, study: str) -> list[dict]:
    """One row per raced ``search`` cell group of the study (see the module docstring)."""
    from budgetsearch.plan import load_plan
    from budgetsearch.planner import updates_digest
    from budgetsearch.planner.race import arm_scores

    rows = []
    for prefix, methods in sorted(study_groups(root, study).items()):
        methods = {m: v for m, v in methods.items() if m not in SKIP}
        if "search" not in methods:
            continue
        # the search's seeds, and the methods that finished all of them (a reference run
        # once, such as full fine-tuning, is left out rather than cutting the seeds to one)
        seeds = sorted(methods["search"])
        methods = {m: v for m, v in methods.items() if set(seeds) <= set(v)}
        homes = {m: [v[s][0] for s in seeds] for m, v in methods.items()}
        docs = {m: [v[s][1] for s in seeds] for m, v in methods.items()}
        race = docs["search"][0].get("race") or {}
        winner, win_lr = race.get("winner"), race.get("lr")
        folds = int(race.get("folds") or 1)
        path = (root / study / "plans" / f"{prefix}__search__p0"
                / ("race.json" if folds == 1 else f"race-{folds}fold.json"))
        if winner is None or win_lr is None or not path.exists():
            continue
        doc = json.loads(path.read_text())
        scores, digests = arm_scores(doc["results"]), dict(doc["key"]["candidates"])
        roles = {m: d[0]["role"] for m, d in docs.items()}
        plans = {m: {updates_digest(load_plan(h / "plan.json").updates) for h in hs}
                 for m, hs in homes.items()}
        if plans["search"] != {digests.get(winner)}:
            raise SystemExit(f"{path}: the race's winner {winner} is not the plan the study's "
                             f"search cells of {prefix} trained")
        # every method's mean test accuracy over the seeds at each rate of the grid
        tunings = {m: [json.loads((h / "tuning.json").read_text()) for h in hs]
                   for m, hs in homes.items()}
        tests = {m: {lr: 100 * statistics.fmean(float(t[lr]["test_accuracy"]) for t in ts)
                     for lr in ts[0]} for m, ts in tunings.items()}
        # the race's arms whose plan a study method trained with every seed: one point per
        # (candidate, rate), the test mean of the methods that trained it
        same_plan = defaultdict(list)
        for m, ds in plans.items():
            if len(ds) == 1:
                same_plan[next(iter(ds))].append(m)
        points = []  # (rung, candidate, rate, race score %, test %)
        for (rung, name, lr), score in scores.items():
            ts = [tests[m][f"{lr:g}"] for m in same_plan.get(digests.get(name, ""), [])
                  if f"{lr:g}" in tests[m]]
            if ts:
                points.append((rung, name, lr, 100 * score, statistics.fmean(ts)))
        first = [p for p in points if p[0] == 0]
        last = max(r for r, *_ in scores)
        win_score = scores.get((last, winner, float(win_lr)))
        mine = tests["search"]
        win_best = max(mine.items(), key=lambda kv: kv[1])
        base = [(lr, t, m) for m, by_lr in tests.items()
                if roles[m] in ("published", "baseline") for lr, t in by_lr.items()]
        best_base = max(base, key=lambda b: b[1])
        reported = {m: 100 * statistics.fmean(float(d["metrics"]["test_accuracy"]) for d in ds)
                    for m, ds in docs.items()}
        base_reported = max(v for m, v in reported.items()
                            if roles[m] in ("published", "baseline"))
        rows.append({
            "full": full_schedule_rate(scores, tunings["search"][0], winner, win_lr, folds)
            if seeds[0] == 0 else None,
            "cell": f"{study} · {prefix.replace('__', ' · ')}", "folds": folds,
            "seeds": len(seeds), "rho": spearman([p[3] for p in first], [p[4] for p in first]),
            "arms": len(first), "winner": winner, "winner_lr": float(win_lr),
            "winner_is_baseline": not winner.startswith("search#"),  # front points' names
            "winner_score": None if win_score is None else 100 * win_score,
            "winner_test": mine.get(f"{float(win_lr):g}"), "winner_best": win_best,
            "best_base": best_base, "delta_reported": reported["search"] - base_reported,
            "delta_plan": win_best[1] - best_base[1]})
    return rows


def full_schedule_rate(scores: dict, tuning0: dict, winner: str, win_lr: float, folds: int
                       ) -> dict | None:
    """The rate the race's winner scores best at on validation after the full schedule with
    the race's seed: from the study's seed-0 ``search`` run at each rate (the same plan,
    split, recipe and seed as the race's last rung), ranked as the race and the study rank
    (:func:`budgetsearch.trainer.metrics.validation_key`: accuracy, then loss; then the lower
    rate). ``reproduced`` says whether that run scored what the race's last rung recorded for
    the winner at its rate (when not, the two trainings differ numerically and the comparison
    is weaker). None for a cross-validated race (its validation is not the study's)."""
    if folds != 1:
        return None
    from budgetsearch.trainer.metrics import validation_key

    runs = {float(k): v for k, v in tuning0.items()}
    best = max(runs, key=lambda lr: (*validation_key(runs[lr]), -lr))
    last = max(r for r, *_ in scores)
    recorded = scores.get((last, winner, float(win_lr)))
    mine = runs.get(float(win_lr), {}).get("best_accuracy")
    return {"lr": best, "val": 100 * float(runs[best]["best_accuracy"]),
            "val_at_race_lr": None if mine is None else 100 * float(mine),
            "reproduced": recorded is not None and mine is not None
            and abs(recorded - float(mine)) < 1e-9}


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _full(f: dict | None) -> str:
    if f is None:
        return "–"
    return (f"{_f(f['val_at_race_lr'])} / {f['val']:.1f} @ {f['lr']:g}"
            + ("" if f["reproduced"] else " †"))


def render(rows: list[dict], command: str) -> str:
    out = ["# The race against the test split", "",
           f"Command: `{command}` (see its docstring). Race scores and test accuracies in %, "
           "test accuracies the mean over the study's seeds at one learning rate; ρ over the "
           "arms matched at the first rung; Δ in points. Columns marked *oracle* choose a "
           "rate (and a baseline) on test, for comparison only.", "",
           "| cell | folds | seeds | ρ (arms) | race winner @ rate (score at the last rung) | "
           "its seed-0 validation after the full schedule: at the race's rate / best @ rate | "
           "its test | "
           "its best rate, *oracle* | best baseline @ rate, *oracle* | Δ reported | Δ, each "
           "at its best rate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, w = r["best_base"], r["winner_best"]
        out.append(
            f"| {r['cell']} | {r['folds']} | {r['seeds']} | {_f(r['rho'], '{:+.2f}')} "
            f"({r['arms']}) | {r['winner']}{' (a baseline)' if r['winner_is_baseline'] else ''}"
            f" @ {_f(r['winner_lr'], '{:g}')} "
            f"({_f(r['winner_score'])}) | {_full(r['full'])} | {_f(r['winner_test'])} | "
            + (f"{w[0]}: {w[1]:.1f}" if w else "–") + " | "
            + (f"{b[2]} @ {b[0]}: {b[1]:.1f}" if b else "–")
            + f" | {r['delta_reported']:+.1f} | {_f(r['delta_plan'], '{:+.1f}')} |")
    rhos = [r["rho"] for r in rows if r["rho"] is not None]
    own = [r for r in rows if not r["winner_is_baseline"]]
    same = [r for r in rows if r["winner_best"][0] == f"{r['winner_lr']:g}"]
    full = [r for r in rows if r["full"] is not None]
    kept = [r for r in full if r["full"]["lr"] == r["winner_lr"]]
    out += ["", f"- {len(rows)} cells; ρ median {statistics.median(rhos):+.2f}, from "
                f"{min(rhos):+.2f} to {max(rhos):+.2f}." if rhos else "",
            f"- The race's rate is the winner's best rate of the grid on test in {len(same)} of "
            f"{len(rows)} cells.",
            f"- Validation alone, after the full schedule (column *seed-0 validation*, "
            f"`full_schedule_rate`): in {len(kept)} of the {len(full)} races on the validation "
            "split, the winner's plan trained by the study with the race's seed for the full "
            "epochs scores best on validation at the race's rate (ties broken by loss, as the "
            "race does); the study's run reproduces the race's last-rung score in "
            f"{sum(r['full']['reproduced'] for r in full)} of them (the others are marked †: "
            "the same recipe, a numerically different training).",
            f"- In {len(rows) - len(own)} cells the winner is a baseline's plan (its Δ is that "
            f"baseline's against the best one). In the other {len(own)}, Δ with each side at "
            f"its best rate is ≥ −1 in {sum(r['delta_plan'] >= -1 for r in own)} and ≥ +1 in "
            f"{sum(r['delta_plan'] >= 1 for r in own)}; Δ as reported is ≥ −1 in "
            f"{sum(r['delta_reported'] >= -1 for r in own)} and ≥ +1 in "
            f"{sum(r['delta_reported'] >= 1 for r in own)}. No standard errors: 3 to 5 seeds "
            "(`target_noise.md` has Δ's paired errors).", ""]
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
