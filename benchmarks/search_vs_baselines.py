"""Benchmark: the search's chosen plan against every published selector at the MIT budgets.

For MobileNetV2 (ImageNet weights) and MCUNet-5fps at 128 px, device accounting on the
STM32H743 profile (int8 activations and weights, the MIT engine's rules), Fisher potential on
CIFAR-10 (``--samples`` images, seed 0, 10-class heads), at the MIT budgets of training memory
(49, 99, 148 KB: peak minus the inference peak, the figure closest to how the MIT labels count)
and at 256 KB training / 1 MB peak memory, one search of ``--trials`` trials per cell (in memory,
seed 0). Printed per cell, side by side: the chosen plan's proxy and memory, the best baseline's,
the gain, and two checks:

- ``chosen >= all``: the chosen plan's proxy is at least every feasible baseline's;
- ``front dominates``: every feasible baseline has a front point with at least its proxy at no
  more memory.

Run: ``.venv/bin/python benchmarks/search_vs_baselines.py [--trials 1000]`` (a few minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.criteria import fisher_potential
from budgetsearch.data import load_dataset
from budgetsearch.search import Search

KB = 1024
CELLS = ((49 * KB, "training", "49 KB"), (99 * KB, "training", "99 KB"),
         (148 * KB, "training", "148 KB"), (256 * KB, "training", "256 KB"),
         (1024 * KB, "peak", "1 MB peak"))
MODELS = (("mobilenet_v2", "imagenet"), ("mcunet-5fps", "mcu"))


def setup(name: str, normalization: str, samples: int) -> tuple[CostModel, object]:
    """The cost model and the Fisher scores of one model."""
    torch.manual_seed(0)
    model = load_model(name, weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name=name)
    cm = CostModel(graph, load_profile("stm32h743"))
    data = load_dataset("cifar10", image_size=128, limit=samples, seed=0,
                        normalization=normalization)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    return cm, fisher_potential(model, loader, samples=len(data))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=64, help="Fisher samples (64)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print(f"search ({args.trials} trials, seed 0) against the warm-start baselines; device "
          f"accounting on stm32h743, 128 px, Fisher on {args.samples} CIFAR-10 images")
    head = (f"{'model':<14}{'budget':<11}{'chosen':>8}{'chosen mem':>12}{'best baseline':>24}"
            f"{'its mem':>10}{'gain':>8}  {'chosen >= all':<14}{'front dominates':<16}{'s':>5}")
    print(head)
    print("-" * len(head))
    ok = True
    for name, norm in MODELS:
        cm, scores = setup(name, norm, args.samples)
        for budget, measure, label in CELLS:
            t0 = time.perf_counter()
            result = Search(cost_model=cm, scores=scores, budget_bytes=budget,
                            memory_measure=measure, seed=0,
                            model={"name": name}).run(n_trials=args.trials)
            chosen = result.plan.predicted["proxy"]
            mem = result.plan.provenance["memory_bytes"]
            feasible = {n: e["metrics"] for n, e in result.baselines.items()
                        if e["metrics"] is not None and e["metrics"]["feasible"]}
            best = max(feasible, key=lambda n: feasible[n]["proxy"]) if feasible else None
            beats = all(chosen >= m["proxy"] - 1e-12 for m in feasible.values())
            dominated = all(any(t.values[0] >= m["proxy"] - 1e-12 and t.values[1] <= m[
                "memory_bytes"] for t in result.front) for m in feasible.values())
            ok = ok and beats and dominated
            if best is None:
                base, base_mem, gain = "none feasible", "", ""
            else:
                b = feasible[best]
                base, base_mem = f"{best} {b['proxy']:.4f}", f"{b['memory_bytes'] / KB:.1f}K"
                gain = f"{(chosen / b['proxy'] - 1) * 100:+.1f}%" if b["proxy"] > 0 else "inf"
            print(f"{name:<14}{label:<11}{chosen:>8.4f}{mem / KB:>11.1f}K{base:>24}"
                  f"{base_mem:>10}{gain:>8}  {'yes' if beats else 'NO':<14}"
                  f"{'yes' if dominated else 'NO':<16}{time.perf_counter() - t0:>5.1f}")
    print("memory: the budgeted measure (training memory, or peak for the 1 MB cell); proxy: "
          "captured Fisher potential (1 = full fine-tuning)")
    print("all cells pass both checks" if ok else "some cell fails a check")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
