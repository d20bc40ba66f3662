"""Would a race on the validation split find the arm a cross-validated race chooses, if only
its last rung's best candidates were cross-validated? The evidence behind the race's final
(``budgetsearch.planner.race``, ``final_candidates``).

For every study cell raced both ways (the studies' ``plans/<cell>__search__p0/race.json``, on
the validation split, and ``plans/<cell>__search-cv__p0/race-<k>fold.json``, every arm
cross-validated on k folds of the pooled training and validation images; the same candidates,
the same recipe), it prints:

- the cross-validated race's winning arm (candidate and rate; candidates are matched by the
  digest of their updates, so aliases count as one);
- whether the split race's first rung kept that arm, and whether its candidate is among the
  finalists the final would take (the best arm of each of the last rung's ``--finalists`` best
  candidates);
- the final's pick where it can be read off the cross-validated race: a finalist that race
  trained at its last rung was trained as the final trains it (the same folds, dealt by the
  recipe's seed, the same fold seeds and epochs; the committed finals reproduce 164 of the
  165 fold results they share with the cross-validated races exactly, the other within
  floating-point noise, 0.67 against 0.665), so
  the final's pick among those is the one with the best pooled score. ``exact`` when every
  finalist was trained there, else ``partial`` (finalists the cross-validated race had
  eliminated earlier are unknown).

Ties are broken by validation loss: race files do not keep the predicted memory the race breaks
them by first, so in a tie the finalists and the pick may differ from the race's.

Nothing is trained.

    .venv/bin/python benchmarks/race_final.py studies/results/gradient_filtering_tuned \\
        studies/results/mcu_budgets_tuned [--finalists 4] [--out studies/results/race_final.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from budgetsearch._io import atomic_write_text
from budgetsearch.planner.race import FINAL_ARM_KEY, arm_scores, best_arm_each

CV_FILE = re.compile(r"^race-(\d+)fold\.json$")


Score = tuple[float, float]  # (validation accuracy, minus validation loss): higher is better


def load(path: Path) -> tuple[dict[tuple[int, str, float], Score], dict[str, str]]:
    """A race file's pooled arm scores keyed by (rung, digest, rate), without the arms of a
    final it may hold (keys ``:f<j>of<k>``), and the names by digest (the name the race
    trained each plan under)."""
    doc = json.loads(path.read_text())
    digests = dict(doc["key"]["candidates"])
    results = {k: v for k, v in doc["results"].items() if not FINAL_ARM_KEY.search(k)}
    acc = arm_scores(results)
    loss = arm_scores(results, metric="val_loss")
    names = {digests[n]: n for _i, n, _lr in acc}
    return ({(i, digests[n], lr): (a, -loss[(i, n, lr)]) for (i, n, lr), a in acc.items()},
            names)


def finalists(scores: dict[tuple[int, str, float], Score], rung: int, count: int
              ) -> list[tuple[str, float]]:
    """The best arm of each of the ``count`` best candidates of ``rung``, best first (ranked
    by accuracy, then loss: race files do not keep the predicted memory the race breaks ties
    by first)."""
    ranked = sorted(((score, d, lr) for (i, d, lr), score in scores.items() if i == rung),
                    key=lambda t: t[0], reverse=True)
    return best_arm_each(((d, lr) for _score, d, lr in ranked), count)


def compare(split_path: Path, cv_path: Path, count: int) -> dict:
    """One cell's row (see the module docstring)."""
    split, names = load(split_path)
    cv, cv_names = load(cv_path)
    names = {**cv_names, **names}
    last_split, last_cv = max(i for i, _, _ in split), max(i for i, _, _ in cv)
    cv_last = {(d, lr): acc for (i, d, lr), acc in cv.items() if i == last_cv}
    winner = max(cv_last, key=cv_last.get)
    kept = {(d, lr) for (i, d, lr) in split if i == 1} if last_split >= 1 else set()
    final = finalists(split, last_split, count)
    known = [a for a in final if a in cv_last]
    pick = max(known, key=cv_last.get) if known else None
    return {"cell": cv_path.parent.name.split("__search")[0],
            "winner": f"{names[winner[0]]} @ {winner[1]:g}",
            "winner_kept": winner in kept,
            "winner_candidate_in_final": winner[0] in {d for d, _ in final},
            "finalists": [f"{names[d]} @ {lr:g}" for d, lr in final],
            "pick": None if pick is None else f"{names[pick[0]]} @ {pick[1]:g}",
            "pick_candidate_is_winners": pick is not None and pick[0] == winner[0],
            "exact": len(known) == len(final)}


def render(rows: list[dict], command: str, count: int) -> str:
    lines = [f"# `benchmarks/race_final.py`: the final's {count} finalists against a race "
             "cross-validated from its first rung", "", f"Command: `{command}`", "",
             "| cell | cross-validated winner | kept by the split's first rung | its plan "
             "among the finalists | finalists (split race, last rung) | the final's pick "
             "(read off the cross-validated race) | same plan | exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['winner']} | {'yes' if r['winner_kept'] else 'no'} "
                     f"| {'yes' if r['winner_candidate_in_final'] else 'no'} | "
                     f"{', '.join(r['finalists'])} | {r['pick'] or '-'} | "
                     f"{'yes' if r['pick_candidate_is_winners'] else 'no'} | "
                     f"{'exact' if r['exact'] else 'partial'} |")
    n = len(rows)
    lines += ["", f"- The split race's first rung kept the cross-validated winner's arm in "
              f"{sum(r['winner_kept'] for r in rows)} of {n} cells; its plan was among the "
              f"final's finalists in {sum(r['winner_candidate_in_final'] for r in rows)}.",
              f"- The final's pick is the cross-validated winner's plan in "
              f"{sum(r['pick_candidate_is_winners'] for r in rows)} of {n} cells "
              f"({sum(r['exact'] for r in rows)} read exactly, the others from the finalists "
              "the cross-validated race trained at its last rung)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="study results directories")
    ap.add_argument("--finalists", type=int, default=4, help="the final's candidates (4)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    rows = []
    for root in args.results:
        for cv_path in sorted(root.glob("plans/*__search-cv__p0/race-*fold.json")):
            split_path = cv_path.parent.parent / cv_path.parent.name.replace(
                "__search-cv__", "__search__") / "race.json"
            if CV_FILE.match(cv_path.name) and split_path.exists():
                rows.append(compare(split_path, cv_path, args.finalists))
    if not rows:
        print("no cell raced both ways under " + ", ".join(map(str, args.results)),
              file=sys.stderr)
        return 1
    command = "benchmarks/race_final.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(rows, command, args.finalists)
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
