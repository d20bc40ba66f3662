"""Benchmark: how long the README's main command takes at each effort level.

Runs ``budgetsearch plan`` for MCUNet-5fps (ImageNet weights, 10 classes) on CIFAR-10 at 128 px,
STM32F746, training memory, as the README's first command does, in one run:

1. ``--effort standard`` at 99 KB with an empty cache (contributions measured, search, race);
2. ``--effort standard`` at 148 KB with the contribution table of run 1 (search and race only);
3. ``--effort quick`` at 99 KB (Fisher proxy, no race).

Each in a fresh process, with its own study file, and the CIFAR-10 archive decoded into the
user cache before the first timing. Prints wall time per run and the stage times the command
reports (contributions, race). Run: ``.venv/bin/python benchmarks/plan_effort.py`` (about 20
minutes here). ``--model mbv2-w0.35`` for the other MCU model; for MobileNetV2 on a Raspberry Pi
4 (the issue's 30-minute target): ``--model mobilenet_v2 --input-size 128 --device rpi4
--memory-measure peak --budgets 60MB 60MB --latencies 391.7ms 410.1ms`` (the gradient-filtering
study's k = 2 and k = 4 budgets).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(argv: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mcunet-5fps")
    parser.add_argument("--device", default="stm32f746")
    parser.add_argument("--input-size", default=None, help="default: the model's")
    parser.add_argument("--weights", default="imagenet",
                        help="the model's starting weights (torchvision models default to random "
                             "in the CLI, which nothing learns from here)")
    parser.add_argument("--memory-measure", default="training")
    parser.add_argument("--budgets", nargs=2, default=["99KB", "148KB"],
                        help="memory budgets of the cold run (and quick) and the cached run")
    parser.add_argument("--latencies", nargs=2, default=None,
                        help="latency budgets of the same two runs (default none)")
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("budgetsearch"))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BUDGETSEARCH_CACHE": str(Path(tmp) / "cache")}
        # decode CIFAR-10 once into the user cache (not timed: it is a one-time step)
        subprocess.run([sys.executable, "-c", "from budgetsearch.data import load_dataset; "
                        "load_dataset('cifar10', split='train', limit=10)"], check=True)
        base = [exe, "plan", "--model", args.model, "--weights", args.weights,
                "--num-classes", "10", "--data", "cifar10",
                "--device", args.device, "--memory-measure", args.memory_measure,
                "--no-progress"] + (["--input-size", args.input_size] if args.input_size else [])
        first, second = args.budgets
        lat = args.latencies or [None, None]
        rows = []
        outputs: list[tuple[str, str, str]] = []
        for label, budget, latency, extra in (
                ("standard, cold cache", first, lat[0], ["--effort", "standard"]),
                ("standard, table cached", second, lat[1], ["--effort", "standard"]),
                ("quick", first, lat[0], ["--effort", "quick"])):
            out = Path(tmp) / f"{label.split(',')[0]}-{budget}-{latency}.json"
            budget_args = ["--budget", budget] + (["--latency-budget", latency] if latency else [])
            seconds, stdout, stderr = run([*base, *budget_args, *extra, "--out", str(out)], env)
            if latency:
                budget = f"{budget} + {latency}"
            contrib = re.search(r"units measured into .* \((\d+) s;", stderr)
            race = re.search(r"race: (\d+) arms over (\d+) rungs(?: and a final of \d+ x \d+ "
                             r"folds)? \((\d+) trained now, (\d+) s\)", stdout)
            chosen = re.search(r"^(the plan .*|a baseline won the race.*)$", stdout, re.M)
            rows.append((label, budget, seconds, contrib.group(1) if contrib else "-",
                         race.group(4) if race else "-", race.group(1) if race else "-",
                         chosen.group(1) if chosen else "(no race)"))
            print(f"{label} {budget}: {seconds:.0f} s", file=sys.stderr, flush=True)
            outputs.append((label, budget, stdout))
    print(f"| run ({args.model}) | budget | wall s | contributions s | race s | arms | outcome |")
    print("|---|---|---|---|---|---|---|")
    for label, budget, seconds, contrib, race, arms, chosen in rows:
        print(f"| {label} | {budget} | {seconds:.0f} | {contrib} | {race} | {arms} | {chosen} |")
    for label, budget, stdout in outputs:
        print(f"\n### `plan` output, {label}, {budget}\n\n```\n{stdout.rstrip()}\n```")


if __name__ == "__main__":
    main()
