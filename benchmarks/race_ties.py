"""Whether the race's exact pooling of accuracies changes any recorded race.

A race pools an arm's runs (folds, seeds) into one validation accuracy. It used to take the
weighted mean of the runs' fractions, which rounds two arms right on as many of the same pooled
images apart by an ulp, so the tie-break by memory never ran; it now pools images right over
images (``pooled_mean(counts=True)``). This reads every race file under the given results
directories, scores every arm both ways, and counts the pairs of arms of one rung whose order
or tie differs between the two. Nothing is trained.

    .venv/bin/python benchmarks/race_ties.py studies/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

from budgetsearch.planner.race import arm_scores

RACE_FILE = re.compile(r"^race(-\d+fold)?\.json$")


def differences(results: dict[str, dict]) -> tuple[int, list[str]]:
    """The pairs of arms of one rung compared, and those ordered or tied otherwise."""
    exact, old = arm_scores(results), arm_scores(results, exact=False)
    rungs: dict[int, list[tuple[int, str, float]]] = {}
    for arm in exact:
        rungs.setdefault(arm[0], []).append(arm)
    pairs, out = 0, []
    for arms in rungs.values():
        for a, b in itertools.combinations(sorted(arms), 2):
            pairs += 1
            if ((exact[a] > exact[b]) - (exact[a] < exact[b])
                    != (old[a] > old[b]) - (old[a] < old[b])):
                out.append(f"rung {a[0]}: {a[1]}@{a[2]:g} {old[a]!r} / {exact[a]!r} against "
                           f"{b[1]}@{b[2]:g} {old[b]!r} / {exact[b]!r}")
    return pairs, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", type=Path, help="results directories")
    args = parser.parse_args()
    files = sorted(p for root in args.roots for p in root.rglob("*.json")
                   if RACE_FILE.match(p.name) or p.parent.name == "races")
    total = changed = 0
    for path in files:
        pairs, diff = differences(json.loads(path.read_text()).get("results") or {})
        total, changed = total + pairs, changed + len(diff)
        for line in diff:
            print(f"{path}: {line}")
    print(f"{len(files)} race files, {total} pairs of arms of one rung: {changed} ordered or "
          "tied otherwise by the exact pooling")


if __name__ == "__main__":
    main()
