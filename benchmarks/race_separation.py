"""How clearly each recorded race chose its winner: the lead over the runner-up against the
validation split's standard error.

Reads every race file under the given results directories (the studies' ``plans/*/race.json``,
their cross-validated ``plans/*/race-<k>fold.json`` and the head-to-head's ``races/*.json``),
rebuilds each race's rungs from its arm keys (a cross-validated arm's folds pooled: its accuracy
is over all the images it was validated on), and
prints, per race, the winner's best validation accuracy at the furthest rung another candidate
reached, the runner-up's, the lead in images, and one standard error of an accuracy like the
winner's on that many images (``budgetsearch.planner.separation_figures``, as
``PlanOutcome.separation``, which new plans record in their provenance). A lead below that error
means the split could not tell the two apart. Nothing is trained.

    .venv/bin/python benchmarks/race_separation.py studies/results/mcu_budgets_tuned \\
        studies/results/gradient_filtering_tuned studies/results/head_to_head \\
        [--out studies/results/race_separation.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from budgetsearch._io import atomic_write_text
from budgetsearch.planner import separation_figures
from budgetsearch.planner.race import FINAL_ARM_KEY, arm_scores

RACE_FILE = re.compile(r"^race(-\d+fold)?\.json$")
IMAGES = re.compile(r"\((\d+) images\)")


def separation(results: dict[str, dict], val_images: int,
               final_images: int | None = None) -> dict | None:
    """The winner against the runner-up, from a race file's arm results (seeds averaged, folds
    weighted by their validation images); the rung of a cross-validated final (arm keys
    ``:f<j>of<k>``) is validated on ``final_images``, the pooled images."""
    finals = {int(k.split(":", 1)[0][1:]) for k in results if FINAL_ARM_KEY.search(k)}
    scores = arm_scores(results)
    if not scores:
        return None
    # per rung, each candidate's best arm (over learning rates)
    best: dict[int, dict[str, float]] = {}
    for (i, name, _lr), acc in scores.items():
        row = best.setdefault(i, {})
        row[name] = max(acc, row.get(name, acc))
    top = best[max(best)]
    winner = max(top, key=top.get)
    # ties at the top are broken by predicted memory, which race files do not keep: a tied
    # winner is named with the candidates it tied with (the lead is 0 either way)
    tied = sorted(name for name, acc in top.items() if name != winner and acc == top[winner])
    label = " / ".join(sorted([winner, *tied])) + " (tied)" if tied else winner
    for i in sorted(best, reverse=True):
        others = {name: acc for name, acc in best[i].items() if name != winner}
        if winner in best[i] and others:
            if i in finals and not final_images:  # the pooled images' count is unknown
                return None
            runner_up = max(others, key=others.get)
            return {"winner": label, "runner_up": runner_up, "rung": i, "final": i in finals,
                    **separation_figures(winner_accuracy=best[i][winner],
                                         runner_up_accuracy=others[runner_up],
                                         val_images=final_images if i in finals
                                         else val_images)}
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="results directories holding race files")
    parser.add_argument("--out", default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    rows = []
    for d in args.dirs:
        for path in sorted(Path(d).rglob("*.json")):
            if not RACE_FILE.match(path.name) and path.parent.name != "races":
                continue
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or "results" not in data or "key" not in data:
                continue
            key = data["key"]
            folds = int((key.get("settings") or {}).get("folds", 1))
            # a cross-validated race validates on the training and validation images pooled
            parts = [IMAGES.search(str(key.get(k, "")))
                     for k in (("train_data", "val_data") if folds > 1 else ("val_data",))]
            if None in parts:
                print(f"{path}: no data sizes in its key; skipped", file=sys.stderr)
                continue
            n = sum(int(m[1]) for m in parts if m is not None)
            pooled = [IMAGES.search(str(key.get(k, ""))) for k in ("train_data", "val_data")]
            sep = separation(data["results"], n, None if None in pooled else sum(
                int(m[1]) for m in pooled if m is not None))
            if sep is None:
                continue
            cell = path.parent.name if path.parent.name != "races" else path.stem
            if folds > 1:
                cell += f" ({folds} folds)"
            if sep["final"]:
                cell += " (final cross-validated)"
            rows.append({"race": f"{Path(d).name}/{cell}", "val_images": sep["val_images"],
                         "folds": folds, **sep})
    if not rows:
        parser.error("no race files found")
    lines = [
        f"# How clearly the races chose ({len(rows)} races)",
        "",
        "Command: `.venv/bin/python benchmarks/race_separation.py "
        + " ".join(args.dirs) + "`",
        "",
        "Per race: at the furthest rung another candidate reached, the winner's best validation "
        "accuracy (seeds averaged) against the runner-up's; one standard error of an accuracy "
        "like the winner's on the validation split (100·sqrt(p(1 − p)/n), p = (k + 1)/(n + 2)). "
        "A cross-validated race (k folds) validates every arm on all its training and "
        "validation images, so n is their number.",
        "",
        "| race | validation images | winner | acc | runner-up | acc | lead (images) | "
        "standard error (points) | clear |",
        "|---|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['race']} | {r['val_images']} | {r['winner']} | {r['winner_accuracy']:.3f} | "
            f"{r['runner_up']} | {r['runner_up_accuracy']:.3f} | {r['lead_images']:g} | "
            f"{r['standard_error_points']:.1f} | {'yes' if r['clear'] else 'no'} |")
    clear = sum(r["clear"] for r in rows)
    lines += ["", f"The lead was at least one standard error in {clear} of {len(rows)} races."]
    for label, group in (
            ("on the validation split", [r for r in rows if r["folds"] == 1 and not r["final"]]),
            ("by the race's cross-validated final", [r for r in rows if r["final"]]),
            ("cross-validated from the first rung", [r for r in rows if r["folds"] > 1])):
        if group and len(group) < len(rows):
            lines.append(f"- {label}: {sum(r['clear'] for r in group)} of {len(group)}.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
