"""The ``budgetsearch`` command line: a thin layer over the public functions.

Every module of this package that defines ``register(subparsers)`` adds its commands; the order of
the help listing follows ``_ORDER`` and then the module names. A command's function takes the parsed
arguments and returns an exit code. User errors (:class:`BudgetSearchError`) print one line and exit
with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import BudgetSearchError

__all__ = ["build_parser", "main"]

_ORDER = ("plan", "cost", "select", "score", "search", "train", "study", "devices", "models",
          "profile_device", "profile_host")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="budgetsearch",
        description="Plan sparse, gradient-filtered on-device training that fits a device budget.",
    )
    parser.add_argument("--version", action="version", version=f"budgetsearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


#: Options whose value may be given negative by mistake: argparse takes ``-5MB`` for an option
#: and says "expected one argument"; joined as ``--budget=-5MB``, the value's own check names
#: the allowed range.
_SIGNED = ("--budget", "--latency-budget")


def _joined_signed_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        following = words[i + 1] if i + 1 < len(words) else ""
        if word in _SIGNED and following[:1] == "-" and following[1:2].isdigit():
            out.append(f"{word}={following}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_joined_signed_values(sys.argv[1:] if argv is None else argv))
    # the words as given, for commands that start more workers of themselves
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BudgetSearchError as exc:
        print(f"budgetsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named: a fault to show in full
            raise
        # a rename's target (filename2) is the file the user named, its source a temporary one
        name = exc.filename2 if getattr(exc, "filename2", None) is not None else exc.filename
        print(f"budgetsearch {args.command}: error: {name}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"budgetsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
