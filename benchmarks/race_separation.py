"""How clearly each recorded race chose its winner: the lead over the runner-up against the
validation split's standard error.

Reads every race file under the given results directories (the studies' ``plans/*/race.json``
and the head-to-head's ``races/*.json``), rebuilds each race's rungs from its arm keys, and
prints, per race, the winner's best validation accuracy at the furthest rung another candidate
reached, the runner-up's, the lead in images, and one standard error of an accuracy like the
winner's on that many images (the same figures as ``PlanOutcome.separation``, which new plans
record in their provenance). A lead below that error means the split could not tell the two
apart. Nothing is trained.

    .venv/bin/python benchmarks/race_separation.py studies/results/mcu_budgets_tuned \\
        studies/results/gradient_filtering_tuned studies/results/head_to_head \\
        [--out studies/results/race_separation.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ARM = re.compile(r"^r(\d+):e(\d+):s(\d+):(.+)@lr([0-9.eE+-]+)$")
IMAGES = re.compile(r"\((\d+) images\)")


def separation(results: dict[str, dict], val_images: int) -> dict | None:
    """The winner against the runner-up, from a race file's arm results (seeds averaged)."""
    rungs: dict[int, dict[tuple[str, float], list[float]]] = {}
    for key, row in results.items():
        m = ARM.match(key)
        if m is None or row.get("val_accuracy") is None:
            continue
        rungs.setdefault(int(m[1]), {}).setdefault((m[4], float(m[5])), []).append(
            float(row["val_accuracy"]))
    if not rungs:
        return None
    last = max(rungs)
    arms = {k: sum(v) / len(v) for k, v in rungs[last].items()}
    # ties at the top are broken by predicted memory, which race files do not keep: a tied
    # winner is named with the candidates it tied with (the lead is 0 either way)
    winner = max(arms, key=arms.get)[0]
    tied = sorted({name for (name, _lr), a in arms.items()
                   if name != winner and a == arms[max(arms, key=arms.get)]})
    for i in sorted(rungs, reverse=True):
        arms = {k: sum(v) / len(v) for k, v in rungs[i].items()}
        mine = [a for (name, _lr), a in arms.items() if name == winner]
        others: dict[str, float] = {}
        for (name, _lr), a in arms.items():
            if name != winner:
                others[name] = max(a, others.get(name, a))
        if mine and others:
            p = max(mine)
            runner_up = max(others, key=others.get)
            q = others[runner_up]
            smoothed = (p * val_images + 1) / (val_images + 2)
            se = 100 * math.sqrt(smoothed * (1 - smoothed) / val_images)
            label = " / ".join(sorted([winner, *tied])) + " (tied)" if tied else winner
            return {"winner": label, "runner_up": runner_up, "rung": i,
                    "winner_accuracy": p, "runner_up_accuracy": q,
                    "lead_images": round((p - q) * val_images, 1),
                    "lead_points": 100 * (p - q), "standard_error_points": se,
                    "clear": p > q and 100 * (p - q) >= se}
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="results directories holding race files")
    parser.add_argument("--out", default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    rows = []
    for d in args.dirs:
        for path in sorted(Path(d).rglob("*.json")):
            if path.name != "race.json" and path.parent.name != "races":
                continue
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or "results" not in data or "key" not in data:
                continue
            m = IMAGES.search(str(data["key"].get("val_data", "")))
            if m is None:
                print(f"{path}: no validation size in its key; skipped", file=sys.stderr)
                continue
            sep = separation(data["results"], int(m[1]))
            if sep is None:
                continue
            cell = path.parent.name if path.name == "race.json" else path.stem
            rows.append({"race": f"{Path(d).name}/{cell}", "val_images": int(m[1]), **sep})
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
        "like the winner's on the validation split (100·sqrt(p(1 − p)/n), p = (k + 1)/(n + 2)).",
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
    text = "\n".join(lines)
    print(text)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from budgetsearch._io import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
