"""``budgetsearch profile-host``: measure this machine and write a device profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import int_range

_MAX_REPEATS = 10_000


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``profile-host`` command."""
    p = sub.add_parser(
        "profile-host",
        help="(superseded by profile-device) time conv, depthwise conv and linear "
             "forward/backward here and write a profile with the analytic latency model",
    )
    p.add_argument("--out", required=True, help="profile file to write (.yaml); its stem is the "
                                                "profile name")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (~5 s)")
    p.add_argument("--repeats", type=int_range(1, _MAX_REPEATS), default=None,
                   help=f"timing repeats per op, 1 to {_MAX_REPEATS:,}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``budgetsearch profile-host``."""
    from ..hostprofile import measure_host
    from ..profiles import format_profile_table, profile_summary_rows, save_profile

    out = Path(args.out)
    print("note: profile-host writes the analytic latency model only; profile-device also "
          "times training steps and fits a measured one")
    profile = measure_host(name=out.stem, quick=args.quick, repeats=args.repeats, progress=True)
    save_profile(profile, out)
    print(f"wrote {out}")
    rows = [r for r in profile_summary_rows() if r.get("name") == profile.name]
    if rows:
        print(format_profile_table(rows))
    for op, rate in sorted(profile.measured.items()):
        print(f"  {op:<10} forward {rate.forward_macs_per_s / 1e9:6.2f} GMAC/s, backward "
              f"{rate.backward_macs_per_s / 1e9:6.2f} GMAC/s")
    return 0
