"""How right and how fast the cost model is, for every registered model.

For each model: on N random plans (seeded), how many plans' predicted saved-activation bytes
(``pytorch`` accounting) equal the bytes autograd saves (counted with saved_tensors_hooks), the
largest relative difference; the same for backward MACs against FlopCounterMode (corrected for its
grouped-conv grad-weight overcount) and forward MACs against fvcore; then the speed of one cost
evaluation after the graph is built (device accounting on stm32h743, MobileNetV2 at 128 px is the
search's case: target >= 1,000 evaluations per second).

    .venv/bin/python benchmarks/cost_model.py [--plans 30] [--models mobilenet_v2 resnet18 ...]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budgetsearch import CostModel, LayerGraph, Plan, list_models, load_model, load_profile
from budgetsearch.cost.measure import count_macs, measure_saved_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cost"))
from test_agreement import random_plan


def fvcore_forward(model, graph) -> dict[str, int] | None:
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, torch.randn(1, *graph.input_shape))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return dict(analysis.by_module())


def agreement(name: str, plans: int, size: int) -> dict:
    torch.manual_seed(0)
    model = load_model(name, weights="random", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=size, model_name=name)
    cm = CostModel(graph, load_profile("rpi4"), accounting="pytorch", batch_size=2)
    rng = random.Random(name)
    exact_bytes = exact_macs = 0
    worst_bytes = worst_macs = 0.0
    for _ in range(plans):
        plan = random_plan(graph, rng)
        cost = cm.evaluate(plan)
        measured = measure_saved_bytes(model, graph, plan, batch_size=2)
        counted = count_macs(model, graph, plan, batch_size=2)
        ours_macs = cost.grad_input_macs + cost.grad_weight_macs
        exact_bytes += measured == cost.saved_activation_bytes
        exact_macs += counted.backward_macs == ours_macs
        miss = abs(measured - cost.saved_activation_bytes)
        worst_bytes = max(worst_bytes, miss / max(measured, 1))
        worst_macs = max(worst_macs, abs(counted.backward_macs - ours_macs) / max(ours_macs, 1))
    fv = fvcore_forward(model, graph)
    one = CostModel(graph, load_profile("rpi4"), accounting="pytorch", batch_size=1)
    rows = {r.module: r.forward_macs for r in one.evaluate(Plan.full(graph)).ops
            if r.kind in ("conv2d", "linear")}
    fv_exact = sum(fv.get(m) == v for m, v in rows.items()) if fv is not None else None
    return dict(model=name, plans=plans, exact_bytes=exact_bytes, worst_bytes=worst_bytes,
                exact_macs=exact_macs, worst_macs=worst_macs, fv_exact=fv_exact,
                fv_total=len(rows))


def speed(name: str, device: str, size: int, seconds: float = 3.0) -> tuple[float, float, int]:
    model = load_model(name, weights="random", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=size, model_name=name)
    cm = CostModel(graph, load_profile(device))
    rng = random.Random(0)
    plans = [random_plan(graph, rng) for _ in range(200)]
    rates = []
    for measure in (cm.summarize, cm.evaluate):
        for p in plans[:20]:  # warm the per-op memo as a search does
            measure(p)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            measure(plans[count % len(plans)])
            count += 1
        rates.append(count / (time.perf_counter() - start))
    return rates[0], rates[1], len(graph.nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--input-size", type=int, default=32,
                        help="input size for the agreement runs (saved tensors do not depend on "
                             "it; MCU models use twice this)")
    args = parser.parse_args()
    names = args.models or list_models()
    print(f"agreement of the pytorch accounting on {args.plans} random plans per model, batch 2, "
          f"torch {torch.__version__}")
    print(f"{'model':<22} {'saved bytes exact':>18} {'worst':>8} {'bwd MACs exact':>15} "
          f"{'worst':>8} {'fwd MACs = fvcore':>18}")
    for name in names:
        size = args.input_size * (2 if name in ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")
                                  else 1)
        r = agreement(name, args.plans, size)
        fv = "n/a" if r["fv_exact"] is None else f"{r['fv_exact']}/{r['fv_total']} layers"
        print(f"{name:<22} {r['exact_bytes']:>10}/{r['plans']:<7} {r['worst_bytes']:>8.2%} "
              f"{r['exact_macs']:>8}/{r['plans']:<6} {r['worst_macs']:>8.2%} {fv:>18}",
              flush=True)
    print("\nspeed of one evaluation after the graph is built (device accounting, 128 px)")
    print(f"{'model':<22} {'device':<10} {'ops':>5} {'summary/s':>10} {'detailed/s':>11}")
    for name, device in (("mobilenet_v2", "stm32h743"), ("mcunet-5fps", "stm32f746"),
                         ("resnet18", "rpi4")):
        fast, slow, ops = speed(name, device, 128)
        print(f"{name:<22} {device:<10} {ops:>5} {fast:>10.0f} {slow:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
