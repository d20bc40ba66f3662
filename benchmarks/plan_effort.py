"""Benchmark: how long the README's main command takes at each effort level.

Runs ``budgetsearch plan`` for MCUNet-5fps (ImageNet weights, 10 classes) on CIFAR-10 at 128 px,
STM32F746, training memory, as the README's first command does, in one run:

1. ``--effort standard`` at 99 KB with an empty cache (contributions measured, search, race);
2. ``--effort standard`` at 148 KB with the contribution table of run 1 (search and race only);
3. ``--effort quick`` at 99 KB (Fisher proxy, no race).

Each in a fresh process, with its own study file, and the CIFAR-10 archive decoded into the
user cache before the first timing. Prints wall time per run and the stage times the command
reports (contributions, race). Run: ``.venv/bin/python benchmarks/plan_effort.py`` (about 20
minutes here). ``--model mbv2-w0.35`` for the other MCU model.
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
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("budgetsearch"))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BUDGETSEARCH_CACHE": str(Path(tmp) / "cache")}
        # decode CIFAR-10 once into the user cache (not timed: it is a one-time step)
        subprocess.run([sys.executable, "-c", "from budgetsearch.data import load_dataset; "
                        "load_dataset('cifar10', split='train', limit=10)"], check=True)
        base = [exe, "plan", "--model", args.model, "--num-classes", "10", "--data", "cifar10",
                "--device", "stm32f746", "--memory-measure", "training", "--no-progress"]
        rows = []
        outputs: list[tuple[str, str, str]] = []
        for label, budget, extra in (("standard, cold cache", "99KB", ["--effort", "standard"]),
                                     ("standard, table cached", "148KB",
                                      ["--effort", "standard"]),
                                     ("quick", "99KB", ["--effort", "quick"])):
            out = Path(tmp) / f"{label.split(',')[0]}-{budget}.json"
            seconds, stdout, stderr = run([*base, "--budget", budget, *extra, "--out", str(out)],
                                          env)
            contrib = re.search(r"units measured into .* \((\d+) s;", stderr)
            race = re.search(r"race: (\d+) arms over (\d+) rungs \((\d+) trained now, (\d+) s\)",
                             stdout)
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
