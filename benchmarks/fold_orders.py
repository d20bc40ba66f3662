"""How much a plan's test accuracy moves with the training seed alone, and with a study's seed.

Why it matters: a cross-validated race trained every fold of an arm with the same seed, so the
same batch-order draw judged the arm in all folds. This trains study cells' plans on the planner's
:class:`~budgetsearch.contrib.PlanRunner` (the study's data, recipe and test split, 4 epochs,
SGD, batch 32) and prints their test accuracy

- with seed 0's model (its new head) and training seeds 0..n-1, which set the batch order and
  dropout (``order``): what varies between the folds of a race now
  (:data:`budgetsearch.planner.race.FOLD_SEED_STRIDE`; the race's fold seeds are 0, 1000, ...,
  comparable draws);
- with seed s's model and batch order s for s = 0..n-1 (``seed``): what varies between a
  study's seeds.

Nothing is chosen on the test split; it is only reported.

    BUDGETSEARCH_DATA=../shared/datasets .venv/bin/python benchmarks/fold_orders.py \\
        studies/mcu_budgets_tuned.yaml \\
        c10-250__proxyless-w0.3__stm32f746__49KB__mit-scheme__s0 \\
        c10-250__mcunet-5fps__stm32f746__49KB__mit-scheme__s0 [--orders 5] [--lrs 0.00667 0.02]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("cells", nargs="+", help="cell ids of the study (any seed)")
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.00667, 0.02])
    args = parser.parse_args(argv)

    from budgetsearch.contrib import PlanRunner, load_tensors
    from budgetsearch.recipe import Recipe
    from budgetsearch.studies import cell_plan
    from budgetsearch.studies.context import CellContext
    from budgetsearch.studies.validate import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(args.study, results_dir=tmp)
        cells = {c.id: c for c in spec.cells()}
        unknown = [c for c in args.cells if c not in cells]
        if unknown:
            parser.error(f"no cell {', '.join(unknown)} in {args.study}")
        t = spec.training
        print("| cell | lr | draws | test accuracy % (mean ± std) | per draw |")
        print("|---|---|---|---|---|")
        for cid in args.cells:
            cell = cells[cid]
            ctx = CellContext(cell, out_dir=Path(tmp) / cid)
            plan = cell_plan(cell, ctx)
            data = {"train": load_tensors(ctx.train_data), "val": load_tensors(ctx.val_data),
                    "extra": {"test": load_tensors(ctx.test_data)}}
            runners = {s: PlanRunner(ctx.model_for_seed(s), graph=ctx.graph, **data)
                       for s in range(args.orders)}
            for lr in args.lrs:
                base = Recipe(optimizer=t["optimizer"], lr=lr, epochs=int(t["epochs"]),
                              batch_size=int(t["batch_size"]), filter_mode=plan.filter_mode)
                runs = {
                    "order": [runners[0].run(dict(plan.updates), base.with_(seed=s))
                              for s in range(args.orders)],
                    "seed": [runners[s].run(dict(plan.updates), base.with_(seed=s))
                             for s in range(args.orders)]}
                for what, rs in runs.items():
                    acc = [100 * r["test_accuracy"] for r in rs]
                    print(f"| {cid.rsplit('__', 1)[0]} | {lr:g} | {what} 0..{args.orders - 1} | "
                          f"{statistics.fmean(acc):.1f} ± {statistics.stdev(acc):.1f} | "
                          f"{', '.join(f'{a:.1f}' for a in acc)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
