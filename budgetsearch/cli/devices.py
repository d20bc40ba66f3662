"""``budgetsearch devices`` and ``budgetsearch models``: what can be planned for."""

from __future__ import annotations

import argparse

from ..profiles import format_profile_table, profile_summary_rows
from ._common import write_json


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``devices`` and ``models`` commands."""
    p = sub.add_parser("devices", help="list the device profiles with their key numbers")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=run_devices)
    m = sub.add_parser("models", help="list the registered models")
    m.set_defaults(func=run_models)


def run_devices(args: argparse.Namespace) -> int:
    """Run ``budgetsearch devices``."""
    rows = profile_summary_rows()
    if args.json:
        write_json(rows, None)
    else:
        print(format_profile_table(rows))
    return 0


def run_models(args: argparse.Namespace) -> int:
    """Run ``budgetsearch models``."""
    from ..models import list_models

    for name in list_models():
        print(name)
    return 0
