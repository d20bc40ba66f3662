"""``budgetsearch profile-device``: time training steps here and write a device profile whose
step times come from a latency model fitted on them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import int_range

_MAX_REPEATS = 1_000
_MAX_BATCH = 4096


def _batch_sizes(text: str) -> list[int]:
    parse = int_range(1, _MAX_BATCH)
    return [parse(part) for part in text.split(",") if part.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``profile-device`` command."""
    from ..latency import DEFAULT_BATCH_SIZES, DEFAULT_MODELS

    p = sub.add_parser(
        "profile-device",
        help="time training steps of designed plans on this device and fit its latency model",
        description="Run on the target itself (this machine, a Raspberry Pi, a Jetson): times "
                    "training steps of designed plans of the calibration models, fits the "
                    "per-kind latency model and writes a profile whose step times come from it "
                    "(plus the analytic figures of profile-host as the fallback). MCU profiles "
                    "keep the analytic model.")
    p.add_argument("--out", required=True,
                   help="profile file to write (.yaml); its stem is the profile name")
    p.add_argument("--models", default=None,
                   help=f"comma-separated registered models to time (default "
                        f"{','.join(DEFAULT_MODELS)}; mcunet-5fps with --quick)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help=f"comma-separated batch sizes (default "
                        f"{','.join(map(str, DEFAULT_BATCH_SIZES))}; 1,4 with --quick)")
    p.add_argument("--input-size", type=int_range(8, 1024, unit="pixels"), default=None,
                   help="input height and width in pixels (default 128; 64 with --quick)")
    p.add_argument("--repeats", type=int_range(1, _MAX_REPEATS), default=None,
                   help="timed steps per plan (default 10; 2 with --quick); each visit to a plan "
                        "steps it once untimed first")
    p.add_argument("--quick", action="store_true",
                   help="four plans, 2 timed steps each, and the quick defaults of --models, "
                        "--batch-sizes and --input-size (well under a minute; rough "
                        "coefficients): a smoke run. Those given are kept")
    p.add_argument("--steps-json", default=None, metavar="FILE",
                   help="also write every timed step (features and milliseconds) to FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``budgetsearch profile-device``."""
    from .._io import atomic_write_text
    from ..latency import profile_device
    from ..profiles import save_profile

    out = Path(args.out)
    models = (None if args.models is None
              else tuple(m.strip() for m in args.models.split(",") if m.strip()))
    profile, steps = profile_device(name=out.stem, models=models, batch_sizes=args.batch_sizes,
                                    input_size=args.input_size, repeats=args.repeats,
                                    quick=args.quick, progress=True)
    save_profile(profile, out)
    if args.steps_json:
        atomic_write_text(args.steps_json, json.dumps(
            [{"model": s.model, "batch_size": s.batch_size, "plan": s.plan,
              "measured_ms": s.measured_ms, "times_ms": list(s.times_ms),
              "features": s.features} for s in steps], indent=1))
    lat = profile.latency
    print(f"wrote {out}: {lat.describe()}")
    print(f"{'model':<16}{'batch':>6}  {'plan':<13}{'measured ms':>12}")
    for s in steps:
        print(f"{s.model:<16}{s.batch_size:>6}  {s.plan:<13}{s.measured_ms:>12.2f}")
    return 0
