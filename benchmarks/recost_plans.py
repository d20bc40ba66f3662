"""Re-cost every committed study plan with the cost model as it is now.

A study records each plan's predicted cost when its cell ran. When the cost model changes, this
prints, per study and model, how far the recorded memory (the study's memory measure) moved and
whether any plan's verdict against its budget changed, so that a report's memory column can be
read against the current model without re-training anything.

Usage::

    .venv/bin/python benchmarks/recost_plans.py studies/results --out studies/results/recost.md

Plans with the same model, device, input size, batch size, optimizer, updates and memory budget
are counted once. Only the cost model runs (no weights, no data): 12 s for every committed study
on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import yaml

from budgetsearch import CostModel, LayerGraph, load_profile
from budgetsearch.models import load_model
from budgetsearch.plan import load_plan


def _study_cost(study_file: Path) -> dict:
    if not study_file.is_file():
        return {}
    return dict(yaml.safe_load(study_file.read_text()).get("cost") or {})


def recost(results: Path, studies: Path) -> list[dict]:
    """One row per (study, model, device, memory measure): the plans and how they moved."""
    cost_models: dict[tuple, CostModel] = {}
    groups: dict[tuple, list[tuple[int, int, int | None]]] = defaultdict(list)
    seen: set[tuple] = set()
    for study_dir in sorted(p for p in results.iterdir() if (p / "cells").is_dir()):
        cost = _study_cost(studies / f"{study_dir.name}.yaml")
        for path in sorted((study_dir / "cells").glob("*/plan.json")):
            doc = json.loads(path.read_text())
            model, device = doc["model"]["name"], doc["device"]
            size, batch, opt = tuple(doc["input_size"]), doc["batch_size"], doc["optimizer"]
            measure = doc["provenance"].get("memory_measure") or cost.get("memory_measure",
                                                                          "peak")
            accounting = cost.get("accounting", "device")
            key = (study_dir.name, model, device, size, batch, opt, measure,
                   json.dumps(doc["updates"], sort_keys=True), doc["budget"].get("memory_bytes"))
            if key in seen:
                continue
            seen.add(key)
            ck = (model, device, size, batch, opt, accounting)
            if ck not in cost_models:
                net = load_model(model, weights="random", num_classes=10)
                graph = LayerGraph.from_model(net, input_size=size, model_name=model)
                cost_models[ck] = CostModel(graph, load_profile(device), accounting=accounting,
                                            batch_size=batch, optimizer=opt)
            now = cost_models[ck].summarize(load_plan(path))
            field = "training_memory_bytes" if measure == "training" else "peak_memory_bytes"
            groups[(study_dir.name, model, device, measure)].append(
                (int(doc["predicted"][field]), int(getattr(now, field)),
                 doc["budget"].get("memory_bytes")))
    rows = []
    for (study, model, device, measure), plans in sorted(groups.items()):
        ratios = [now / then for then, now, _ in plans if then]
        rows.append({
            "study": study, "model": model, "device": device, "measure": measure,
            "plans": len(plans),
            "changed": sum(then != now for then, now, _ in plans),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "over_then": sum(b is not None and then > b for then, _, b in plans),
            "over_now": sum(b is not None and now > b for _, now, b in plans),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the studies' results folder")
    parser.add_argument("--studies", type=Path, default=None,
                        help="the study files' folder (default: the results folder's parent)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # unknown-op and latency-model warnings: not the point here
    rows = recost(args.results, args.studies or args.results.parent)
    lines = [
        "# Committed plans re-costed with the cost model as it is now",
        "",
        f"Command: `.venv/bin/python benchmarks/recost_plans.py {args.results}"
        + (f" --out {args.out}`" if args.out else "`"),
        "",
        "Memory is the study's measure (peak or training memory) as recorded when the cell ran "
        "(then) and as the cost model gives it now; ratio = now / then over the distinct plans; "
        "over budget = plans above their cell's memory budget.",
        "",
        "| study | model | device | measure | plans | changed | ratio now/then | "
        "over budget then | now |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = (f"{r['ratio_min']:.3f}" if r["ratio_min"] == r["ratio_max"]
                 else f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f}")
        lines.append(f"| {r['study']} | {r['model']} | {r['device']} | {r['measure']} | "
                     f"{r['plans']} | {r['changed']} | {ratio} | {r['over_then']} | "
                     f"{r['over_now']} |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
