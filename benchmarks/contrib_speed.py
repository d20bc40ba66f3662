"""Benchmark: the contribution analysis (``budgetsearch contrib``): time, its split, and scale-out.

For each model, the whole command on CIFAR-10 at 128 px (``--samples`` images drawn from the
training split, 20 % of them carved out for validation; default recipe; default candidates, the
top layers by relative gradient norm) is run into a fresh table twice, in one benchmark run:

1. with one worker (2 threads), printing the wall time and the split the command reports
   (caching the frozen prefix, training, evaluation);
2. with ``--workers 2`` (1 thread each), on the same units.

It prints units per minute of each and the ratio. Run:
``cd /work/main && .venv/bin/python benchmarks/contrib_speed.py --model mcunet-5fps`` (minutes;
run it on a quiet machine: the load average is printed next to every timing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(model: str, samples: int, workers: int, extra: list[str], table: Path) -> dict:
    cmd = [sys.executable, "-m", "budgetsearch", "contrib", "--model", model, "--weights",
           "imagenet", "--num-classes", "10", "--data", "cifar10", "--samples", str(samples),
           "--workers", str(workers), "--threads", str(max(1, 2 // workers)), "--no-progress",
           "--out", str(table), *extra]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    units = len(json.loads(table.read_text())["results"])
    split = re.search(r"caching ([\d.]+) s, training ([\d.]+) s, evaluation ([\d.]+) s",
                      proc.stdout)
    return {"seconds": seconds, "units": units, "load": load,
            "split": tuple(float(x) for x in split.groups()) if split else None,
            "table": proc.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mcunet-5fps")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--skip-two", action="store_true", help="only the one-worker run")
    parser.add_argument("extra", nargs="*", help="more `budgetsearch contrib` options (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.model, args.samples, 1, args.extra, Path(tmp) / "one.json")
        print(one["table"])
        c, t, e = one["split"]
        print(f"{args.model}, {args.samples} images, 1 worker: {one['units']} units in "
              f"{one['seconds']:.0f} s ({one['units'] / one['seconds'] * 60:.1f} units/min; "
              f"caching {c:.0f} s, training {t:.0f} s, evaluation {e:.0f} s, the rest loading "
              f"data and model and ranking layers; load {one['load']:.2f})")
        if args.skip_two:
            return
        two = run(args.model, args.samples, 2, args.extra, Path(tmp) / "two.json")
        print(f"{args.model}, 2 workers: {two['units']} units in {two['seconds']:.0f} s "
              f"({two['units'] / two['seconds'] * 60:.1f} units/min; load {two['load']:.2f}); "
              f"speed-up {one['seconds'] / two['seconds']:.2f}x")


if __name__ == "__main__":
    main()
