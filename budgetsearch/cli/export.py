"""``budgetsearch export``: a plan written for another training runtime."""

from __future__ import annotations

import argparse

from ._common import write_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` command."""
    from ..export import FORMATS

    p = sub.add_parser(
        "export", help="write a plan for another training runtime",
        description="Write a plan for another training runtime. tte: the sparse-update "
                    "configuration of MIT's Tiny Training Engine (MCU models, batch 1), with the "
                    "input-channel permutation that puts the plan's channels first; a plan the "
                    "engine cannot express is refused with the layer named.")
    p.add_argument("--plan", required=True, help="the plan file (budgetsearch plan / select)")
    p.add_argument("--format", required=True, choices=FORMATS, help="the target runtime")
    p.add_argument("--mcu-dir", help="folder of the MCU model files (default: the shipped ones)")
    p.add_argument("--out", help="output JSON file (default: stdout)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Run ``budgetsearch export``."""
    from ..export import to_tte
    from ..plan import load_plan

    plan = load_plan(args.plan)
    write_json(to_tte(plan, mcu_dir=args.mcu_dir), args.out)
    return 0
