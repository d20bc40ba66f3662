"""Benchmark: speed and progress of the budget search on MobileNetV2 at 128 px on stm32h743.

1. The whole ``budgetsearch plan --objective fisher`` command at the default trial count (a
   subprocess, Fisher pass on CIFAR-10 included; ImageNet weights, a 10-class head), timed
   ``--repeat`` times, with the machine's load average.
2. One search to 3,000 trials on the same model, device and scores (SQLite storage, as the
   command uses): the chosen plan's proxy (best feasible proxy) and the front's hypervolume after
   100, 300, 1,000 and 3,000 trials, with the time taken to get there; the trials per minute of
   search alone; and where the time goes (sampler, Optuna's trial bookkeeping, plan evaluation,
   storage writes).

Run: ``cd /work/main && .venv/bin/python benchmarks/search_speed.py`` (a few minutes; the machine
is shared, so run it when it is quiet: the load average is printed next to every timing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.cli.plan import DEFAULT_TRIALS
from budgetsearch.criteria import fisher_potential
from budgetsearch.data import load_dataset
from budgetsearch.search import FrontTracker, Search, feasible

CHECKPOINTS = (100, 300, 1000, 3000)


def load() -> str:
    """The 1-minute load average and the core count."""
    return f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def whole_command(repeat: int) -> None:
    """Time the plan command as a user runs it."""
    print(f"== budgetsearch plan, default trial count ({DEFAULT_TRIALS}), Fisher pass included")
    exe = Path(sys.executable).with_name("budgetsearch")
    for i in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bs-bench-") as tmp:
            cmd = [str(exe), "plan", "--model", "mobilenet_v2", "--weights", "imagenet",
                   "--num-classes", "10", "--data", "cifar10", "--objective", "fisher",
                   "--device", "stm32h743", "--no-progress",
                   "--out", f"{tmp}/plan.json"]
            before = load()
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                print(done.stderr)
                raise SystemExit(done.returncode)
            tail = [ln for ln in done.stdout.splitlines() if ln.startswith("study ")]
            print(f"  run {i + 1}: {wall:5.1f} s wall ({before} before, {load()} after)")
            if i == 0:
                print("\n".join("    " + ln for ln in done.stdout.splitlines()))
            elif tail:
                print("    " + tail[0])


def growth(trials: int, seed: int) -> None:
    """Proxy and hypervolume against the number of trials; time shares."""
    torch.manual_seed(seed)
    model = load_model("mobilenet_v2", weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name="mobilenet_v2")
    cm = CostModel(graph, load_profile("stm32h743"))
    data = load_dataset("cifar10", image_size=128, limit=64, seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    scores = fisher_potential(model, loader, samples=64)
    search = Search(cost_model=cm, scores=scores, budget_bytes=cm.profile.memory_bytes,
                    seed=seed, model={"name": "mobilenet_v2"})
    print(f"\n== search to {trials} trials: {search.space}, budget "
          f"{cm.profile.memory_bytes // 1024} KB peak, NSGA-II population "
          f"{search.population_size}, SQLite storage ({load()})")
    stamps: dict[int, float] = {}
    start = time.perf_counter()

    def on_trial(n: int) -> None:
        if n in CHECKPOINTS:
            stamps[n] = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="bs-bench-") as tmp:
        result = search.run(n_trials=trials, storage=f"sqlite:///{tmp}/s.db", study_name="b",
                            on_trial=on_trial)
    st = result.stats
    print(f"  {'trials':>7} {'best proxy':>11} {'hypervolume':>12} {'front':>6} {'seconds':>8}")
    for n in CHECKPOINTS:
        if n > len(result.trials):
            break
        tr = FrontTracker(memory_ref=search.memory_ref, third_ref=search.third_ref)
        for t in result.trials[:n]:
            tr.add(t.values, feasible(t))
        print(f"  {n:>7} {tr.best_proxy:>11.4f} {tr.hypervolume:>12.4f} {len(tr.points):>6} "
              f"{stamps.get(n, float('nan')):>8.1f}")
    base = {name: e["metrics"]["proxy"] for name, e in result.baselines.items() if e["metrics"]}
    best_base = max(base, key=base.get)
    print(f"  best baseline: {best_base} {base[best_base]:.4f}; chosen plan (trial "
          f"#{result.trial.number}) {result.plan.predicted['proxy']:.4f} "
          f"({(result.plan.predicted['proxy'] / base[best_base] - 1) * 100:+.1f}%)")
    print(f"  search alone: {st['trials_per_minute']:.0f} trials/min over "
          f"{st['search_seconds']:.1f} s; time shares: sampler {st['sampler_share']:.0%}, "
          f"Optuna trial bookkeeping {st['optuna_share']:.0%}, plan evaluation "
          f"{st['evaluation_share']:.0%}, storage writes {st['storage_share']:.0%}; "
          f"{st['cache_hits']} repeated parameter sets answered from the cache")
    print(f"  ({load()} at the end)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="whole-command runs (2)")
    parser.add_argument("--trials", type=int, default=3000, help="search length (3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-command", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_command:
        whole_command(args.repeat)
    growth(args.trials, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
