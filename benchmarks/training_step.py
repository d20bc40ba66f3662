"""Whole training steps of a model (MobileNetV2 by default) under plans at several budgets, against
full fine-tuning.

For each plan, in one run on this CPU: the bytes autograd saves for backward with the plan applied
by ``apply_plan`` (measured with saved-tensor hooks, one step), the same plan applied by stock
``requires_grad`` freezing, and the cost model's prediction (accounting ``ops`` if the cost model
has it, else ``pytorch``, which models stock autograd); backward and whole-step times (median of
``--reps`` steps after one warm-up), and the predicted backward-MAC ratio full/plan beside the
measured backward-time ratio full/plan.

Plans: the ``neq`` selector (channel-sparse, magnitude scores as channel scores) at five memory
budgets (fractions of full fine-tuning's training memory on ``--device`` at this batch size),
TinyTL-style bias-only, the last 5 layers, the last 2 blocks gradient-filtered with r = 2 and 4,
and full fine-tuning. The two filtered plans run a second time with ``apply_plan(fuse=False)``
(rows marked ``unfused``: batch norms and activations as separate autograd nodes) to show what
the fused epilogue saves; those rows are left out of the goal count.

    .venv/bin/python benchmarks/training_step.py [--model mobilenet_v2] [--size 128] [--batch 32]
        [--reps 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from budgetsearch import CostModel, LayerGraph, Plan, load_model, load_profile, select
from budgetsearch.cost.measure import measure_saved_bytes
from budgetsearch.criteria import magnitude_scores
from budgetsearch.errors import CostError
from budgetsearch.trainer import SavedTensorMeter, apply_plan, tune_host_allocator

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.4)


def build_plans(model, graph: LayerGraph, device_cm: CostModel) -> dict[str, Plan]:
    full = Plan.full(graph)
    train_mem = device_cm.summarize(dict(full.updates)).training_memory_bytes
    scores = magnitude_scores(model)
    plans: dict[str, Plan] = {}
    for frac in FRACTIONS:
        budget = int(train_mem * frac)
        plans[f"neq @{frac:.0%} budget"] = select(
            "neq", cost_model=device_cm, budget_bytes=budget, scores=scores,
            memory_measure="training")
    plans["bias-only (tinytl)"] = Plan.bias_only(graph)
    plans["last 5 layers"] = Plan.last_k_layers(graph, 5)
    for r in (2, 4):
        plans[f"last 2 blocks r={r}"] = Plan.last_k_blocks(graph, 2, patch_size=r)
    for r in (2, 4):
        plans[f"last 2 blocks r={r}{UNFUSED}"] = plans[f"last 2 blocks r={r}"]
    plans["full"] = full
    return plans


UNFUSED = " unfused"


def fused(name: str) -> bool:
    """Whether the row ``name`` applies its plan with fused epilogues (the default)."""
    return not name.endswith(UNFUSED)


def time_steps(models: dict[str, torch.nn.Module], plans: dict[str, Plan], graph: LayerGraph,
               x, y, reps: int) -> dict[str, dict[str, float]]:
    """Saved bytes of one step and median backward / step times of ``reps`` steps per plan.

    Every plan is applied to its own copy of the model, and the steps are interleaved (one step
    of each plan per round, after one warm-up round), so that a change in the machine's load
    affects all plans alike instead of the plans measured at that moment.
    """
    handles, opts = {}, {}
    times: dict[str, dict[str, list[float]]] = {n: {"backward": [], "step": []} for n in plans}
    saved: dict[str, int] = {}
    try:
        for name, plan in plans.items():
            handles[name] = apply_plan(models[name], plan, graph=graph, fuse=fused(name))
            opts[name] = torch.optim.SGD(handles[name].param_groups(), lr=0.0, momentum=0.9)
        for rep in range(reps + 1):
            for name in plans:
                model, opt = models[name], opts[name]
                opt.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                with SavedTensorMeter.for_model(model) as meter:
                    loss = F.cross_entropy(model(x), y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                saved[name] = meter.bytes
                del loss
                if rep:  # the first round warms up
                    times[name]["backward"].append(t2 - t1)
                    times[name]["step"].append(t3 - t0)
    finally:
        for name, handle in handles.items():
            opts[name].zero_grad(set_to_none=True)
            handle.remove()
    return {name: {"saved": saved[name],
                   "backward_ms": 1e3 * statistics.median(times[name]["backward"]),
                   "step_ms": 1e3 * statistics.median(times[name]["step"]),
                   "params": handles[name].trainable_params} for name in plans}


def profile_backward(model, plans: dict[str, Plan], name: str, graph: LayerGraph, x, y) -> int:
    """Print the operators one plan's backward spends its time in (after two warm-up steps),
    split into the convolution and matrix products the MAC count covers and the rest."""
    from torch.profiler import profile

    if name not in plans:
        print(f"no plan {name!r}; plans: {', '.join(plans)}", file=sys.stderr)
        return 2
    with apply_plan(model, plans[name], graph=graph, fuse=fused(name)):
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
        loss = F.cross_entropy(model(x), y)
        with profile() as prof:
            loss.backward()
    table = prof.key_averages()
    macs = ("convolution", "conv_transpose", "mm", "bmm", "addmm", "einsum")
    leaf = [e for e in table if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in leaf)
    covered = sum(e.self_cpu_time_total for e in leaf if any(m in e.key for m in macs))
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"{name}: aten operators {total / 1e3:.2f} ms of self time, of which convolutions and "
          f"matrix products (what the MAC count measures) {covered / 1e3:.2f} ms "
          f"({covered / max(total, 1):.0%}); the rest is elementwise work, reductions and copies")
    return 0


def compare_host_latency(rows: list[dict], plans: dict[str, Plan], graph: LayerGraph, host,
                         batch: int, accounting: str) -> None:
    """Print the host profile's predicted backward time of each plan beside the measured one,
    and how well the prediction ranks and scales across plans (Spearman and Pearson r of the
    logarithms)."""
    cm = CostModel(graph, host, accounting=accounting, batch_size=batch, optimizer="momentum")
    print(f"\nbackward time predicted by the cost model on host profile {host.name!r} "
          f"(accounting '{accounting}') against measured:")
    print(f"{'plan':<27}{'measured ms':>13}{'predicted ms':>14}{'measured/predicted':>20}")
    measured, predicted = [], []
    for r in rows:
        pred = cm.summarize(dict(plans[r["plan"]].updates)).backward_ms
        r["host_predicted_backward_ms"] = pred
        measured.append(r["backward_ms"])
        predicted.append(pred)
        print(f"{r['plan']:<27}{r['backward_ms']:>13.1f}{pred:>14.1f}"
              f"{r['backward_ms'] / pred:>20.2f}")
    logs = torch.tensor([measured, predicted], dtype=torch.float64).log()
    pearson = float(torch.corrcoef(logs)[0, 1])
    ranks = logs.argsort(dim=1).argsort(dim=1).to(torch.float64)
    spearman = float(torch.corrcoef(ranks)[0, 1])
    print(f"across the {len(rows)} rows: Spearman {spearman:.2f}, Pearson r of log times "
          f"{pearson:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2",
                        help="a registered model with pretrained weights (ImageNet, or the MCU "
                             "models' own)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="rpi4", help="profile whose budgets the plans use")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--host-profile", default=None, metavar="YAML",
                        help="a profile of this machine (budgetsearch profile-host --out F): "
                             "also print the cost model's predicted backward time per plan "
                             "beside the measured one")
    parser.add_argument("--profile", default=None, metavar="PLAN",
                        help="instead of the table: where one plan's backward spends its time "
                             "(torch.profiler, top operators), e.g. 'last 2 blocks r=4'")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave malloc as it is (default: tune_host_allocator, as the "
                             "trainer does)")
    args = parser.parse_args(argv)
    tuned = False if args.system_allocator else tune_host_allocator()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = load_model(args.model, weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=args.size, model_name=args.model)
    profile = load_profile(args.device)
    device_cm = CostModel(graph, profile, batch_size=args.batch, optimizer="momentum")
    try:
        pred_cm, accounting = CostModel(graph, profile, accounting="ops", batch_size=args.batch,
                                        optimizer="momentum"), "ops"
    except CostError:
        pred_cm, accounting = CostModel(graph, profile, accounting="pytorch",
                                        batch_size=args.batch, optimizer="momentum"), "pytorch"
    plans = build_plans(model, graph, device_cm)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    if args.profile:
        return profile_backward(model, plans, args.profile, graph, x, y)
    print(f"{args.model} (pretrained weights, 10 classes), {args.size}px, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} steps; budgets: fractions of "
          f"full fine-tuning's training memory on {args.device}; predicted bytes: cost model "
          f"accounting '{accounting}'; host allocator "
          f"{'tuned (tune_host_allocator)' if tuned else 'as the system has it'}", flush=True)
    order = list(reversed(plans))  # full first: the reference
    models = {name: copy.deepcopy(model) for name in order}
    timings = time_steps(models, {n: plans[n] for n in order}, graph, x, y, args.reps)
    rows = []
    for name in order:
        plan = plans[name]
        stock = measure_saved_bytes(model, graph, plan, batch_size=args.batch)
        pred = pred_cm.summarize(dict(plan.updates))
        rows.append({"plan": name, "layers": len(plan.updates), **timings[name],
                     "stock_saved": stock, "predicted_saved": pred.saved_activation_bytes,
                     "predicted_backward_macs": pred.backward_macs,
                     "predicted_latency_ms": pred.latency_ms})
    full = rows[0]
    header = (f"{'plan':<27}{'layers':>7}{'params':>10}{'saved MB':>10}{'stock MB':>10}"
              f"{'pred MB':>10}{'bwd ms':>9}{'step ms':>9}{'MAC x':>8}{'bwd x':>8}{'step x':>8}"
              f"{'goal':>6}")
    print(header)
    print("-" * len(header))
    for r in reversed(rows):
        mac_x = full["predicted_backward_macs"] / max(1, r["predicted_backward_macs"])
        r["predicted_mac_ratio"] = mac_x
        r["backward_speedup"] = full["backward_ms"] / r["backward_ms"]
        r["step_speedup"] = full["step_ms"] / r["step_ms"]
        r["goal_met"] = r["backward_speedup"] >= mac_x / 2 if fused(r["plan"]) else None
        r["saved_as_predicted"] = r["saved"] == r["predicted_saved"]
        print(f"{r['plan']:<27}{r['layers']:>7}{r['params']:>10}{r['saved'] / 2**20:>10.2f}"
              f"{r['stock_saved'] / 2**20:>10.2f}{r['predicted_saved'] / 2**20:>10.2f}"
              f"{r['backward_ms']:>9.1f}{r['step_ms']:>9.0f}{mac_x:>8.2f}"
              f"{r['backward_speedup']:>8.2f}{r['step_speedup']:>8.2f}"
              f"{'-' if r['goal_met'] is None else 'yes' if r['goal_met'] else 'NO':>6}")
    print("saved MB: apply_plan, measured; stock MB: the same plan by requires_grad freezing, "
          "measured; pred MB: cost model. MAC x: predicted backward MACs full/plan; bwd x, "
          "step x: measured time full/plan; goal: bwd x >= MAC x / 2.")
    if args.host_profile:
        compare_host_latency(rows, plans, graph, load_profile(args.host_profile), args.batch,
                             accounting)
    exact = sum(r["saved_as_predicted"] for r in rows)
    goals = [r["goal_met"] for r in rows if r["goal_met"] is not None]
    print(f"saved bytes equal to the prediction on {exact} of {len(rows)} rows; backward "
          f"speed-up at least half the MAC ratio on {sum(goals)} of {len(goals)} plans")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"accounting": accounting, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
