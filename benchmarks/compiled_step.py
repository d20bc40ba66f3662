"""A planned model's training step under ``torch.compile`` against the same step in eager mode.

budgetsearch's operators are custom ops (``torch.ops.budgetsearch.*``) with their own backward,
so ``torch.compile`` traces a planned model whole: the forward and the plan's backward are
compiled together (AOT autograd), the operators' own backward included. For each plan, in one
run on this CPU: two copies of the model with the plan applied by ``apply_plan``, one stepped
eagerly and one through ``torch.compile(backend=--backend)``; the first compiled step's time
(tracing and code generation), the loss and gradient differences between the two, and the
median forward+loss, backward and whole-step times (SGD with momentum, eager in both) of
``--reps`` steps after a warm-up, eager and compiled steps interleaved so that a change in the
machine's load affects both alike. Dropout is off in both (the compiled step draws its masks
differently, so the losses would not compare).

The first compiled step is much shorter when inductor's cache (``TORCHINDUCTOR_CACHE_DIR``)
already holds the graphs of an earlier run.

Plans: the ``neq`` selector at 10% of full fine-tuning's training memory on ``--device``
(channel-sparse), the last 2 blocks gradient-filtered with r = 4 (with the fused frozen batch
norm and activation), and full fine-tuning.

    .venv/bin/python benchmarks/compiled_step.py [--model mobilenet_v2] [--size 128]
        [--batch 32] [--reps 7] [--backend inductor]
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
from budgetsearch.criteria import magnitude_scores
from budgetsearch.trainer import apply_plan, tune_host_allocator


def build_plans(model, graph: LayerGraph, device_cm: CostModel) -> dict[str, Plan]:
    full = Plan.full(graph)
    budget = int(device_cm.summarize(dict(full.updates)).training_memory_bytes * 0.1)
    return {
        "neq @10% budget": select("neq", cost_model=device_cm, budget_bytes=budget,
                                  scores=magnitude_scores(model), memory_measure="training"),
        "last 2 blocks r=4": Plan.last_k_blocks(graph, 2, patch_size=4),
        "full": full,
    }


def _step(model, loss_fn, opt, x, y) -> tuple[float, float, float, float]:
    """(forward+loss s, backward s, step s, loss) of one training step."""
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = loss_fn(x, y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t0, float(loss.detach())


def compare(model, plan: Plan, graph: LayerGraph, x, y, *, reps: int, backend: str) -> dict:
    """Eager against compiled steps of one plan (see the module docstring)."""
    models = {"eager": copy.deepcopy(model), "compiled": copy.deepcopy(model)}
    handles = {k: apply_plan(m, plan, graph=graph) for k, m in models.items()}
    for m in models.values():  # dropout off: the two draw their masks differently
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
                mod.eval()
    opts = {k: torch.optim.SGD(h.param_groups(), lr=0.0, momentum=0.9)
            for k, h in handles.items()}
    eager_model, compiled_model = models["eager"], torch.compile(models["compiled"],
                                                                 backend=backend)
    fns = {"eager": lambda a, b: F.cross_entropy(eager_model(a), b),
           "compiled": lambda a, b: F.cross_entropy(compiled_model(a), b)}
    times: dict[str, dict[str, list[float]]] = {
        k: {"forward": [], "backward": [], "step": []} for k in models}
    try:
        first = {k: _step(models[k], fns[k], opts[k], x, y) for k in models}
        grads = {k: [p.grad.detach().clone() for p in handles[k].parameters()] for k in models}
        diff = max((float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30)
                    for a, b in zip(grads["eager"], grads["compiled"], strict=True)),
                   default=0.0)
        for rep in range(reps + 1):
            for k in models:
                fwd, bwd, step, _ = _step(models[k], fns[k], opts[k], x, y)
                if rep:  # the first round warms up
                    times[k]["forward"].append(fwd)
                    times[k]["backward"].append(bwd)
                    times[k]["step"].append(step)
    finally:
        for k, handle in handles.items():
            opts[k].zero_grad(set_to_none=True)
            handle.remove()
    med = {k: {part: 1e3 * statistics.median(v) for part, v in times[k].items()}
           for k in models}
    return {
        "first_compiled_step_s": first["compiled"][2],
        "loss_eager": first["eager"][3],
        "loss_compiled": first["compiled"][3],
        "max_rel_grad_diff": diff,
        **{f"{k}_{part}_ms": v for k in models for part, v in med[k].items()},
        "step_ratio": med["eager"]["step"] / med["compiled"]["step"],
        "backward_ratio": med["eager"]["backward"] / med["compiled"]["backward"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2",
                        help="a registered model with pretrained weights")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend (inductor, aot_eager, ...)")
    parser.add_argument("--device", default="rpi4", help="profile whose budget the neq plan uses")
    parser.add_argument("--plans", nargs="+", default=None, metavar="PLAN",
                        help="run only these plans (names as printed)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    tune_host_allocator()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = load_model(args.model, weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=args.size, model_name=args.model)
    device_cm = CostModel(graph, load_profile(args.device), batch_size=args.batch,
                          optimizer="momentum")
    plans = build_plans(model, graph, device_cm)
    if args.plans:
        unknown = set(args.plans) - set(plans)
        if unknown:
            print(f"unknown plans {sorted(unknown)}; plans: {', '.join(plans)}", file=sys.stderr)
            return 2
        plans = {n: p for n, p in plans.items() if n in args.plans}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    print(f"{args.model}, {args.size}px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, torch.compile backend {args.backend!r}, median of "
          f"{args.reps} steps (eager and compiled interleaved)", flush=True)
    header = (f"{'plan':<20}{'compile s':>10}{'loss diff':>11}{'grad diff':>11}"
              f"{'eager ms':>10}{'comp. ms':>10}{'step x':>8}{'e. bwd':>8}{'c. bwd':>8}"
              f"{'bwd x':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, plan in plans.items():
        r = {"plan": name, **compare(model, plan, graph, x, y, reps=args.reps,
                                     backend=args.backend)}
        rows.append(r)
        print(f"{name:<20}{r['first_compiled_step_s']:>10.1f}"
              f"{abs(r['loss_eager'] - r['loss_compiled']):>11.1e}{r['max_rel_grad_diff']:>11.1e}"
              f"{r['eager_step_ms']:>10.1f}{r['compiled_step_ms']:>10.1f}{r['step_ratio']:>8.2f}"
              f"{r['eager_backward_ms']:>8.1f}{r['compiled_backward_ms']:>8.1f}"
              f"{r['backward_ratio']:>7.2f}", flush=True)
    print("compile s: the first compiled step (tracing and code generation); loss diff: |eager - "
          "compiled| of the first step's loss; grad diff: largest |eager - compiled| gradient "
          "entry over that parameter's largest entry; step x, bwd x: eager time / compiled time "
          "(above 1: compiled is faster)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"backend": args.backend, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
