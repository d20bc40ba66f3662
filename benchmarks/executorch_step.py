"""The training step exported for ExecuTorch (``budgetsearch export --format executorch``)
beside the same step in eager PyTorch (``apply_plan``), on this CPU.

For each plan: the export (its time, the programs' sizes and memory-planned bytes, with the
frozen prefix as its own XNNPACK program and without), then, each in a fresh process so that
peak RSS is the engine's own, ``--reps`` training steps on the same random batches (dropout off,
SGD): ExecuTorch's Python runtime (portable kernels for the training program) and eager PyTorch.
Reported per engine: the median step time, the peak RSS of the process and its growth over the
step loop, and the largest loss difference from eager over the steps. The machine's load is
printed beside the numbers: this is a shared 2-core machine, and timings taken while other jobs
run are slower than on an idle one (run it with ``nice``, as below, when others share it).

Plans: the last 2 blocks trained whole (``Plan.last_k_blocks``) and a mixed plan (a
gradient-filtered channel subset, a bias, input-channel and output-channel subsets on the last
four layers, as in ``tests/export/test_executorch.py``).

    nice .venv/bin/python benchmarks/executorch_step.py [--model mcunet-5fps] [--size 128]
        [--batch 8] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from budgetsearch import LayerGraph, LayerUpdate, Plan, apply_plan, load_model, load_plan

warnings.filterwarnings("ignore")


def plans(graph: LayerGraph, *, size: int, batch: int, name: str) -> dict[str, Plan]:
    n = list(graph.layers)
    kw = {"batch_size": batch, "input_size": (size, size), "model": name}
    mixed = {n[-4]: LayerUpdate("weight", channels=(0, 2, 5), patch_size=2),
             n[-3]: LayerUpdate("bias"),
             n[-2]: LayerUpdate("weight", channels=(1, 3, 4), axis="in"),
             n[-1]: LayerUpdate("weight", channels=(0, 1), axis="out")}
    return {"last 2 blocks": Plan.last_k_blocks(graph, 2).with_(**kw),
            "mixed": Plan.from_layers(graph, mixed, **kw)}


def batches(plan: Plan, reps: int, classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    h, w = plan.input_size
    return [(torch.randn(plan.batch_size, 3, h, w, generator=gen),
             torch.randint(0, classes, (plan.batch_size,), generator=gen))
            for _ in range(reps + 1)]  # the first step is a warm-up


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One engine's steps in this process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    folder = Path(args.worker_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    plan = load_plan(folder / "plan.json")
    data = batches(plan, args.reps, manifest["num_classes"])
    lr = manifest["optimizer"]["lr"]
    if args.worker == "eager":
        torch.manual_seed(0)
        model = load_model(args.model, num_classes=args.classes)
        handle = apply_plan(model, plan)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        opt = torch.optim.SGD(handle.param_groups(), lr=lr)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.item()
    else:
        from budgetsearch.export import ExecuTorchTrainer

        trainer = ExecuTorchTrainer(folder)
        step = trainer.step
    before = rss_mb()
    losses, times = [], []
    for x, y in data:
        t0 = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"losses": losses, "ms": statistics.median(times[1:]) * 1e3,
                      "peak_rss_mb": peak, "rss_before_mb": before}))


def run_worker(engine: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--worker-dir", str(folder),
           "--model", args.model, "--classes", str(args.classes), "--reps", str(args.reps),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mcunet-5fps")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=("eager", "executorch"), help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from budgetsearch.export import to_executorch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model, num_classes=args.classes)
    graph = LayerGraph.from_model(model, input_size=args.size, model_name=args.model)
    load = os.getloadavg()[0]
    print(f"{args.model} at {args.size} px, batch {args.batch}, {args.reps} steps after a "
          f"warm-up, {args.threads} thread(s), SGD lr 0.01, dropout off; load average "
          f"{load:.1f} on {os.cpu_count()} cores at the start"
          f"{' (timings taken under load)' if load > 0.5 else ''}")
    print(f"{'plan':15s} {'engine':26s} {'export s':>8s} {'.pte KB':>8s} {'planned KB':>10s} "
          f"{'step ms':>8s} {'peak RSS MB':>11s} {'RSS +MB':>7s} {'max |dloss|':>11s}")
    for label, plan in plans(graph, size=args.size, batch=args.batch, name=args.model).items():
        with tempfile.TemporaryDirectory() as tmp:
            rows = []
            eager_dir = Path(tmp) / "eager"
            for prefix in ("xnnpack", "none"):
                folder = Path(tmp) / prefix
                t0 = time.perf_counter()
                result = to_executorch(plan, model=model, out_dir=folder, graph=graph,
                                       prefix=prefix, optimizer="sgd", lr=0.01, dropout=False)
                took = time.perf_counter() - t0
                plan.save(folder / "plan.json")
                programs = [v for v in result.manifest["programs"].values() if v is not None]
                size_kb = sum(v["bytes"] for v in programs) / 1024
                planned_kb = sum(v["planned_memory_bytes"] for v in programs) / 1024
                engine = "XNNPACK prefix" if prefix == "xnnpack" else "portable"
                rows.append((f"executorch, {engine}", took, size_kb, planned_kb,
                             run_worker("executorch", folder, args)))
                eager_dir = folder
            eager = run_worker("eager", eager_dir, args)
            rows.append(("eager PyTorch", None, None, None, eager))
            for engine, took, size_kb, planned_kb, r in rows:
                dloss = max(abs(a - b) for a, b in zip(r["losses"], eager["losses"], strict=True))
                print(f"{label:15s} {engine:26s} "
                      f"{'' if took is None else f'{took:8.1f}':>8s} "
                      f"{'' if size_kb is None else f'{size_kb:8.0f}':>8s} "
                      f"{'' if planned_kb is None else f'{planned_kb:10.0f}':>10s} "
                      f"{r['ms']:8.1f} {r['peak_rss_mb']:11.0f} "
                      f"{r['peak_rss_mb'] - r['rss_before_mb']:7.0f} {dloss:11.2e}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end. planned KB: ExecuTorch's "
          "memory-planned buffers (activations and gradients; XNNPACK's own workspace not "
          "counted); RSS +MB: growth of the process's resident memory over the steps.")


if __name__ == "__main__":
    main()
