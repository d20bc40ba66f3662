"""How close the gradient-filtered gradients are to the exact ones, per mode, on real data.

MobileNetV2 (ImageNet weights, a 10-class head) at ``--size`` px on a batch of ``--batch``
CIFAR-10 training images: for the plans "last k blocks, patch size r" (k in ``--blocks``, r in
``--patches``), one backward with the plan's filtered operators in each mode (``paper``,
``normalized``, ``corrected``) and one with the same layers unfiltered (the exact gradients of
the same update set; dropout drawn identically). Printed per plan and mode: over the plan's
trained tensors, the median and smallest cosine between filtered and exact gradient and the
median and largest norm ratio |filtered| / |exact|; with ``--layers``, the per-tensor figures of
each plan. A ratio above 1 that grows towards the input side is the compounding border effect
``corrected`` removes (see budgetsearch.ops.filtered).

Run: ``.venv/bin/python benchmarks/filter_fidelity.py [--layers]`` (about a minute).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F

from budgetsearch import LayerGraph, Plan, load_model
from budgetsearch.data import load_dataset
from budgetsearch.plan import LayerUpdate
from budgetsearch.trainer import apply_plan

MODES = ("paper", "normalized", "corrected")


def gradients(model, plan: Plan, graph: LayerGraph, x, y, mode: str) -> dict[str, torch.Tensor]:
    """The trained tensors' gradients of one step under ``plan`` (filters in ``mode``)."""
    m = copy.deepcopy(model)
    with apply_plan(m, plan, graph=graph, filter_mode=mode) as handle:
        torch.manual_seed(1)  # the same dropout mask for every run
        F.cross_entropy(m(x), y).backward()
        return {n: p.grad.detach().clone() for n, p in handle.named_parameters()
                if p.grad is not None}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--patches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", action="store_true", help="per-tensor figures too")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = load_model("mobilenet_v2", weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=args.size, model_name="mobilenet_v2")
    data = load_dataset("cifar10", split="train", image_size=args.size, limit=args.batch, seed=0)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    print(f"MobileNetV2 (ImageNet weights), {args.size} px, {len(data)} CIFAR-10 images: "
          "filtered against exact gradients of the same update set")
    print(f"{'plan':<18}{'mode':<12}{'cos median':>11}{'cos min':>9}{'|ratio| median':>16}"
          f"{'|ratio| max':>13}")
    for k in args.blocks:
        for r in args.patches:
            plan = Plan.last_k_blocks(graph, k, patch_size=r)
            exact = gradients(model, plan.with_(updates={
                n: LayerUpdate(u.mode, channels=u.channels, axis=u.axis)
                for n, u in plan.updates.items()}), graph, x, y, "normalized")
            rows = {}
            for mode in MODES:
                got = gradients(model, plan, graph, x, y, mode)
                rows[mode] = {n: (float(F.cosine_similarity(got[n].flatten(), e.flatten(), 0)),
                                  float(got[n].norm() / e.norm())) for n, e in exact.items()
                              if e.norm() > 0}
                cos = [c for c, _ in rows[mode].values()]
                ratio = [q for _, q in rows[mode].values()]
                print(f"{f'last {k} blocks r={r}':<18}{mode:<12}{statistics.median(cos):>11.3f}"
                      f"{min(cos):>9.3f}{statistics.median(ratio):>16.3f}{max(ratio):>13.3f}")
            if args.layers:
                print(f"  {'tensor':<30}" + "".join(f"{m + ' cos/ratio':>24}" for m in MODES))
                for n in rows[MODES[0]]:
                    print(f"  {n:<30}" + "".join(
                        f"{rows[m][n][0]:>12.3f}{rows[m][n][1]:>12.3f}" for m in MODES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
