"""``budgetsearch study run|report SPEC.yaml``: run a study's cells resumably; write its report."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ._common import float_range, int_range

__all__ = ["register"]

_MAX_WORKERS = 256
_MAX_STALE_SECONDS = 7 * 86400

_STORAGE_HELP = (
    "share the study between machines: a SQLAlchemy database URL (e.g. the search's PostgreSQL "
    "URL postgresql://user@host/db, or sqlite:///study.db) holding claims and records, or a "
    "directory (file://PATH) on a shared file system holding the cell records; default: "
    "the study's results directory (workers on one machine, or machines sharing that directory)"
)


def register(subparsers: Any) -> None:
    """Add the ``study`` command with its ``run`` and ``report`` subcommands."""
    p = subparsers.add_parser(
        "study",
        help="run a study's (data, model, device, budget, method, seed) cells; report them",
        description="A study is a YAML file (see budgetsearch.studies.spec). `run` makes, trains "
                    "and records every cell not done yet (resumable: rerun after a kill); "
                    "`report` writes results.csv, report.md and the plots.",
    )
    sub = p.add_subparsers(dest="study_command", metavar="{run,report}")
    run = sub.add_parser("run", help="run the study's pending cells",
                         description="Run every pending cell; cells done are skipped, a failing "
                                     "cell is recorded as failed and the study goes on.")
    run.add_argument("spec", help="the study file (YAML)")
    run.add_argument("--workers", type=int_range(1, _MAX_WORKERS), default=1,
                     help=f"worker processes running cells in parallel, 1 to {_MAX_WORKERS} "
                          "(default 1)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the cells, their status and a time estimate; run nothing")
    run.add_argument("--storage", default=None, help=_STORAGE_HELP)
    run.add_argument("--results", default=None,
                     help="results directory (default <spec dir>/results/<name>)")
    run.add_argument("--retry-failed", action="store_true",
                     help="also re-run cells that failed with a permanent error (e.g. an "
                          "infeasible budget); other failures are always retried")
    run.add_argument("--stale-after", type=float_range(0, _MAX_STALE_SECONDS, low_open=True,
                                                       unit="s"), default=600.0,
                     help="seconds without heartbeat after which another machine's claim on a "
                          "cell is taken over (default 600)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)
    rep = sub.add_parser("report", help="write results.csv, report.md and the plots",
                         description="Write the study's results.csv, report.md and PNG plots "
                                     "from the cell records (pending cells are listed as such).")
    rep.add_argument("spec", help="the study file (YAML)")
    rep.add_argument("--storage", default=None, help=_STORAGE_HELP)
    rep.add_argument("--results", default=None,
                     help="results directory (default <spec dir>/results/<name>)")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    rep.set_defaults(func=_report)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _command(args: argparse.Namespace) -> str:
    """The command line, rebuilt from the parsed arguments (what the report quotes)."""
    words = ["budgetsearch", "study", args.study_command, args.spec]
    for flag in ("workers", "storage", "results", "stale_after"):
        value = getattr(args, flag, None)
        if value is not None and not (flag == "workers" and value == 1) and not (
                flag == "stale_after" and value == 600.0):
            words += [f"--{flag.replace('_', '-')}", "URL" if flag == "storage" else str(value)]
    for flag in ("dry_run", "retry_failed", "no_plots"):
        if getattr(args, flag, False):
            words.append(f"--{flag.replace('_', '-')}")
    return " ".join(shlex.quote(w) for w in words)


def _run(args: argparse.Namespace) -> int:
    from ..studies import StudyError, load_spec, run_study

    if args.workers < 1:
        raise StudyError(f"--workers must be at least 1, got {args.workers}")
    spec = load_spec(args.spec, results_dir=args.results)
    summary = run_study(spec, workers=args.workers, dry_run=args.dry_run, storage=args.storage,
                        retry_failed=args.retry_failed, progress=not args.no_progress,
                        command=_command(args), stale_after=args.stale_after)
    if args.dry_run:
        return 0
    from ..studies import open_store

    store = open_store(spec.cells_dir, storage=args.storage, study=spec.name)
    retried = [c for c in summary.failed
               if not ((store.record(c) or {}).get("error") or {}).get("permanent")]
    if retried:
        print(f"{len(retried)} cell(s) failed with an error that is not the study's (a missing "
              "integration or a crash); they run again on the next `study run`")
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..studies import load_spec, write_report

    spec = load_spec(args.spec, results_dir=args.results)
    files = write_report(spec, storage=args.storage, command=_command(args),
                         plots=not args.no_plots)
    for path in dict.fromkeys(files.values()):
        print(f"wrote {path}")
    return 0
