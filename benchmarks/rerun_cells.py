"""Benchmark: do a study's committed cells reproduce when trained again today?

A study cell records, per rate of its grid, the validation and test accuracy of its run
(``metrics_raw.tuning`` in ``cells/<id>.json``). This trains the same cells again in one
fresh process, at the thread count given: the plan is the cell's own
(:func:`budgetsearch.studies.cell_plan`: a selector's plan made again, a search's read back from
its stored search and race, which trains nothing when they are complete), the data, head and
recipe the study's; only the ``runner`` engine is supported. It prints, per cell and rate, the
recorded and the new validation and test accuracy and whether they are equal, the CPU kernels
the run was recorded with (records before they were kept say nothing), and per cell the rate the
cell chose and the one the new runs would choose. Point ``--results`` at a copy of the
results directory: a search cell's plan, made again, rewrites its ``front.csv`` and
``baselines.csv``.

    cp -r studies/results/mcu_budgets_tuned /tmp/copy
    BUDGETSEARCH_DATA=../shared/datasets .venv/bin/python benchmarks/rerun_cells.py \\
        studies/mcu_budgets_tuned.yaml CELL_ID [CELL_ID ...] --results /tmp/copy \\
        [--threads 1] [--out FILE]

To train on other kernels than this CPU's best, set ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` in the environment (both: ATen and oneDNN each pick their own; the
output's header names the kernels it ran on, :func:`budgetsearch._threads.cpu_kernels`).

Why: the thorough effort's plan on MCUNet-5fps at 49 KB with scarce data is the plan the
standard effort handed out (the same layers and channels), yet their committed cells test
apart (``studies/results/FINDINGS.md``, section 0b). The cause: runs recorded on a host
without AVX-512 repeat here only on AVX2 kernels (``studies/results/rerun_cells_avx2.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def rerun(spec_path: Path, cell_ids: list[str], *, results: Path,
          threads: int) -> list[dict[str, Any]]:
    """Each cell's recorded and new accuracy per rate."""
    import torch

    torch.set_num_threads(threads)
    from budgetsearch.studies import CellContext, cell_plan, load_spec, runner_recipe

    spec = load_spec(spec_path)
    cells = {c.id: c for c in spec.cells()}
    unknown = [c for c in cell_ids if c not in cells]
    if unknown:
        raise SystemExit(f"{spec_path}: no cell {', '.join(unknown)}")
    rows = []
    for cid in cell_ids:
        cell = cells[cid]
        record = json.loads((results / "cells" / f"{cid}.json").read_text())
        tuning = record["metrics_raw"]["tuning"]
        if cell.study.training.get("engine") != "runner":
            raise SystemExit(f"{cid}: engine {cell.study.training.get('engine')!r}; only runner")
        if not cell.study.training.get("lrs"):
            raise SystemExit(f"{spec_path}: training.lrs is not set; the study has no rate grid")
        ctx = CellContext(cell, out_dir=results / "cells" / cid)
        plan = cell_plan(cell, ctx)
        for lr in cell.study.training["lrs"]:
            recipe = runner_recipe(cell, plan, lr=lr)  # as the study's runner engine
            new = ctx.runner.run(dict(plan.updates), recipe)
            old = tuning[f"{lr:g}"]
            rows.append({"cell": cid, "method": cell.method.name, "lr": lr,
                         "old_val": old["val_accuracy"], "new_val": new["val_accuracy"],
                         "new_val_loss": new.get("val_loss"), "old_test": old["test_accuracy"],
                         "new_test": new["test_accuracy"], "chosen": record["lr"],
                         "old_kernels": old.get("kernels") or "-",
                         "chosen_test": record["metrics"]["test_accuracy"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="the study file")
    parser.add_argument("cells", nargs="+", help="cell ids (cells/<id>.json)")
    parser.add_argument("--results", type=Path, required=True,
                        help="a copy of the study's results directory (a search cell's plan, "
                             "made again, rewrites its front.csv and baselines.csv)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads: expected an integer >= 1")
    import numpy as np

    from budgetsearch.trainer.metrics import validation_key

    rows = rerun(args.spec, args.cells, results=args.results, threads=args.threads)
    lines = ["| cell | lr | val recorded | val now | test recorded | test now | equal "
             "| kernels recorded |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r["old_val"] == r["new_val"] and r["old_test"] == r["new_test"]
        lines.append(f"| {r['cell']} | {r['lr']:g} | {r['old_val']:.3f} | {r['new_val']:.3f} "
                     f"| {r['old_test']:.3f} | {r['new_test']:.3f} | {'yes' if same else 'no'} "
                     f"| {r['old_kernels']} |")
    lines += ["", "Per cell, the rate chosen on validation (the study's rule, "
              "`trainer.metrics.validation_key`) and its test accuracy, as recorded and now:", "",
              "| cell | lr recorded | test recorded | lr now | test now |", "|---|---|---|---|---|"]
    by_method: dict[str, list[tuple[float, float]]] = {}
    for cid in dict.fromkeys(r["cell"] for r in rows):
        mine = [r for r in rows if r["cell"] == cid]
        now = max(mine, key=lambda r: validation_key({"best_accuracy": r["new_val"],
                                                      "val_loss": r["new_val_loss"]}))
        lines.append(f"| {cid} | {mine[0]['chosen']:g} | {mine[0]['chosen_test']:.3f} | "
                     f"{now['lr']:g} | {now['new_test']:.3f} |")
        by_method.setdefault(mine[0]["method"], []).append((mine[0]["chosen_test"],
                                                            now["new_test"]))
    lines += ["", "Per method, the mean test accuracy (points) of the chosen runs over the cells "
              "given:", "", "| method | cells | recorded | now |", "|---|---|---|---|"]
    for method, pairs in by_method.items():
        lines.append(f"| {method} | {len(pairs)} | {100 * np.mean([a for a, _ in pairs]):.1f} | "
                     f"{100 * np.mean([b for _, b in pairs]):.1f} |")
    equal = sum(r["old_val"] == r["new_val"] and r["old_test"] == r["new_test"] for r in rows)
    from budgetsearch._threads import KERNEL_ENV, cpu_kernels

    # what lowered torch's kernels, named in the output's command
    caps = " ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if os.environ.get(k))
    text = "\n".join([
        "# Committed study cells trained again",
        "",
        f"Command: `{caps + ' ' if caps else ''}.venv/bin/python benchmarks/rerun_cells.py "
        f"{args.spec} {' '.join(args.cells)} --results COPY --threads {args.threads}` (COPY: a "
        f"copy of the study's results). Kernels: {cpu_kernels()}. {equal} of {len(rows)} runs "
        "equal the record.",
        "", *lines, ""])
    print(text)
    if args.out:
        from budgetsearch._io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
