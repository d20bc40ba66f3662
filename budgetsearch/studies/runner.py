"""Running a study: every pending cell, once, resumably, in one or several processes.

:func:`run_study` classifies the cells against the store's records:

- **done**: a record with status ``done`` made with the cell's current configuration (same
  :meth:`~budgetsearch.studies.spec.Cell.config_hash`): skipped;
- **failed**: a record with status ``failed``; skipped when the failure is *permanent* (a user
  error such as :class:`~budgetsearch.errors.BudgetError`, an infeasible budget: any
  :class:`~budgetsearch.errors.BudgetSearchError` not marked ``transient``), re-run when it
  is not (a crash: any other exception; a storage that could not be opened) or with
  ``retry_failed``;
- **outdated**: a record made with another configuration (the spec changed): re-run;
- **pending**: no record: run.

Each cell is claimed in the store before it runs (see :mod:`~budgetsearch.store`), so concurrent
runs of the same study (``--workers N``, or several machines sharing the store) never run a cell
twice. A cell that raises is recorded as failed with the error's type and message, and the study
goes on; an interrupt (Ctrl-C, a kill) loses only the running cell, which the next run does again.
With ``workers`` > 1, a worker process that dies (killed for memory, a crash in native code)
does not stop the study: the cells it left unfinished run again, each in a process of its own,
and only a cell that kills that process too is recorded as failed (``WorkerDied``, not
permanent). With ``training.lrs``, a rate whose loss diverges is left out of the cell's choice
(:func:`~budgetsearch.studies.adapters.run_cell`); the cell fails only if every rate did.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

from .._io import locked
from .._version import __version__
from ..errors import BudgetSearchError
from ..store import heartbeat_while, open_store, worker_id, write_json_atomic
from .adapters import PlanFn, TrainFn, run_cell
from .spec import Cell, StudySpec

__all__ = ["RECORD_SCHEMA", "RunSummary", "cell_status", "run_study"]

RECORD_SCHEMA = 1
CellFn = Callable[..., dict[str, Any]]


@dataclass
class RunSummary:
    """What a run did, by cell id lists."""

    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    claimed_elsewhere: list[str] = field(default_factory=list)
    seconds: float = 0.0


def cell_status(cell: Cell, record: dict[str, Any] | None, *, retry_failed: bool = False) -> str:
    """``done``, ``failed`` (final), ``outdated``, ``retry`` or ``pending`` (see the module
    docstring); the last three are run."""
    if record is None:
        return "pending"
    if record.get("config_hash") != cell.config_hash():
        return "outdated"
    if record.get("status") == "done":
        return "done"
    if record.get("error", {}).get("permanent") and not retry_failed:
        return "failed"
    return "retry"


def run_study(
    spec: StudySpec,
    *,
    workers: int = 1,
    dry_run: bool = False,
    storage: str | None = None,
    retry_failed: bool = False,
    plan_fn: PlanFn | None = None,
    train_fn: TrainFn | None = None,
    progress: bool = True,
    out: TextIO | None = None,
    command: str | None = None,
    stale_after: float = 600.0,
    heartbeat_s: float = 30.0,
) -> RunSummary:
    """Run every pending cell of a study.

    Args:
        spec: The study.
        workers: Number of worker processes (1: run in this process).
        dry_run: Only print the cells with their status and a time estimate.
        storage: A database URL shared by several machines (see :mod:`~budgetsearch.store`), or
            None for the results directory.
        retry_failed: Re-run cells whose failure was recorded as permanent too.
        plan_fn: ``plan_fn(cell, ctx) -> Plan`` replacing the default adapter (tests).
        train_fn: ``train_fn(cell, plan, ctx) -> metrics`` replacing the default adapter.
        progress: Show a progress bar (tqdm, on stderr).
        out: Where the summary lines go (default stdout).
        command: The command line, recorded in the study's ``runs.json``.
        stale_after: Seconds after which a claim without heartbeat is taken over.
        heartbeat_s: Seconds between heartbeats of a running cell's claim.

    Returns:
        What ran, failed, was skipped or was running elsewhere.
    """
    out = out or sys.stdout
    started = time.perf_counter()
    store = open_store(spec.cells_dir, storage=storage, study=spec.name, stale_after=stale_after)
    cells = spec.cells()
    records = store.records()
    status = {c.id: cell_status(c, records.get(c.id), retry_failed=retry_failed) for c in cells}
    todo = [c for c in cells if status[c.id] not in ("done", "failed")]
    summary = RunSummary(skipped=[c.id for c in cells if status[c.id] in ("done", "failed")])
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    out.write(f"study {spec.name}: {len(cells)} cells ("
              + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"); results in "
              f"{spec.results_dir}\n")
    if dry_run:
        from .estimate import estimate_seconds, format_duration

        per_cell = estimate_seconds(spec, todo, records)
        for c in cells:
            eta = per_cell.get(c.id)
            out.write(f"  {status[c.id]:<8} {c.id}" + (f"  ~{format_duration(eta)}" if eta
                                                        else "") + "\n")
        total = sum(per_cell.values())
        out.write(f"estimate: {len(todo)} cells to run, ~{format_duration(total)} with 1 worker"
                  + (f", ~{format_duration(total / workers)} with {workers}" if workers > 1
                     else "") + " (rough: see budgetsearch.studies.estimate)\n")
        return summary
    _note_run(spec, command, workers, storage)
    job = dict(storage=storage, plan_fn=plan_fn, train_fn=train_fn, stale_after=stale_after,
               heartbeat_s=heartbeat_s, retry_failed=retry_failed,
               progress=progress and workers <= 1)
    bar = _bar(len(cells), len(cells) - len(todo), progress)
    try:
        if workers <= 1:
            if todo and plan_fn is None and train_fn is None:
                _tune_allocator()
            for cell in todo:
                bar.set_postfix_str(cell.id, refresh=True)
                _collect(summary, cell.id, _run_one(cell, **job), bar)
        else:
            _run_pool(todo, workers, job, summary, bar)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - started
    out.write(f"study {spec.name}: ran {len(summary.ran)}, failed {len(summary.failed)}, "
              f"skipped {len(summary.skipped)} (done before), running elsewhere "
              f"{len(summary.claimed_elsewhere)}, in {summary.seconds:.1f} s\n")
    for cid in summary.failed:
        rec = store.record(cid) or {}
        err = rec.get("error", {})
        out.write(f"  failed {cid}: {err.get('type')}: {err.get('message')}\n")
    return summary


def _bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="cell", desc="cells", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def _collect(summary: RunSummary, cell_id: str, outcome: str, bar: Any) -> None:
    {"done": summary.ran, "failed": summary.failed, "skipped": summary.skipped,
     "claimed": summary.claimed_elsewhere}[outcome].append(cell_id)
    bar.update(1)


def _run_pool(todo: list[Cell], workers: int, job: dict[str, Any], summary: RunSummary,
              bar: Any) -> None:
    """Run the cells in ``workers`` processes. A worker process that dies (killed for memory,
    a crash in native code) breaks the pool and takes the cells it had not finished with it:
    those run again, each in a process of its own, so that only the cell that kills its
    process is recorded as failed (not permanently: a later run tries it again)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    broken = _pool_pass(todo, workers, threads, job, summary, bar)
    if not broken:
        return
    sys.stderr.write(f"a worker process died: running the {len(broken)} cell(s) it left "
                     "unfinished again, each in a process of its own\n")
    # a cell the broken pool had taken that is now recorded was finished by the pool's worker
    # before the pool broke (its result was lost with the pool): it ran in this run
    with cf.ThreadPoolExecutor(max_workers=workers) as alone:
        futures = {alone.submit(_pool_pass, [cell], 1, threads, job, summary, bar,
                                skipped_as="done"): cell
                   for cell in broken}
        for fut in cf.as_completed(futures):
            if fut.result():  # it killed a process of its own too
                cell = futures[fut]
                _record_death(cell, job)
                _collect(summary, cell.id, "failed", bar)


def _pool_pass(todo: list[Cell], workers: int, threads: int, job: dict[str, Any],
               summary: RunSummary, bar: Any, *, skipped_as: str = "skipped") -> list[Cell]:
    """Run ``todo`` in a pool of ``workers`` processes; the cells left unfinished when a worker
    process died (the pool is then broken). A cell found recorded already is collected as
    ``skipped_as``."""
    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    broken: list[Cell] = []
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(threads,)) as pool:
        futures = {pool.submit(_run_one, cell, **job): cell for cell in todo}
        running = set(futures)
        try:
            for fut in cf.as_completed(futures):
                running.discard(fut)
                bar.set_postfix_str(f"{len(running)} queued/running; last {futures[fut].id}")
                try:
                    outcome = fut.result()
                except BrokenProcessPool:
                    broken.append(futures[fut])
                    continue
                _collect(summary, futures[fut].id,
                         skipped_as if outcome == "skipped" else outcome, bar)
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
    return sorted(broken, key=todo.index)


def _record_death(cell: Cell, job: dict[str, Any]) -> None:
    """Record a cell whose process died as failed (transient: a later run tries it again)."""
    spec = cell.study
    store = open_store(spec.cells_dir, storage=job["storage"], study=spec.name,
                       stale_after=job["stale_after"])
    me = worker_id()
    if not store.claim(cell.id, me):  # the dead process's claim is taken over
        return
    try:
        record = {
            **_record_head(cell, me), "status": "failed",
            "error": {"type": "WorkerDied", "permanent": False, "minimum_bytes": None,
                      "traceback": None,
                      "message": "the worker process running this cell died (killed by the "
                                 "system, e.g. out of memory, or crashed in native code), in a "
                                 "pool and again in a process of its own"},
            "warnings": [], "seconds": None, "finished": _now()}
        store.write(cell.id, record)
    finally:
        store.release(cell.id, me)


def _init_worker(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass
    _tune_allocator()


def _tune_allocator() -> None:
    """Keep freed memory in the heap while cells train (see budgetsearch.trainer.allocator)."""
    from ..trainer.allocator import tune_host_allocator

    tune_host_allocator()


def _run_one(cell: Cell, *, storage: str | None, plan_fn: PlanFn | None,
             train_fn: TrainFn | None, stale_after: float, heartbeat_s: float,
             retry_failed: bool, progress: bool = False) -> str:
    """Claim, run and record one cell: ``done``, ``failed``, ``skipped`` or ``claimed``."""
    spec = cell.study
    store = open_store(spec.cells_dir, storage=storage, study=spec.name, stale_after=stale_after)
    me = worker_id()
    if not store.claim(cell.id, me):
        return "claimed"
    try:
        # another worker may have finished it between our look at the records and our claim
        if cell_status(cell, store.record(cell.id), retry_failed=retry_failed) in ("done",
                                                                                   "failed"):
            return "skipped"
        with heartbeat_while(lambda: store.heartbeat(cell.id, me), every=heartbeat_s):
            record = _execute(cell, storage=storage, plan_fn=plan_fn, train_fn=train_fn,
                              worker=me, progress=progress)
            store.write(cell.id, record)
        return record["status"]
    finally:
        store.release(cell.id, me)


def _execute(cell: Cell, *, storage: str | None, plan_fn: PlanFn | None,
             train_fn: TrainFn | None, worker: str, progress: bool) -> dict[str, Any]:
    """The cell's record: its result, or its failure (interrupts propagate, nothing recorded)."""
    record = _record_head(cell, worker)
    t0 = time.perf_counter()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_cell(cell, out_dir=cell.study.cells_dir / cell.id, storage=storage,
                              plan_fn=plan_fn, train_fn=train_fn, progress=progress)
        record.update(status="done", **result)
    except Exception as exc:
        # a user's mistake stays failed until --retry-failed; an error that says trying later
        # may succeed (a search storage that could not be opened now) is run again
        permanent = (isinstance(exc, BudgetSearchError)
                     and not getattr(exc, "transient", False))
        record.update(status="failed", error={
            "type": type(exc).__name__, "message": str(exc), "permanent": permanent,
            "minimum_bytes": getattr(exc, "minimum_bytes", None),
            "traceback": None if permanent else traceback.format_exc(limit=8)})
    record["warnings"] = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"
                                            for w in caught))[:10]
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["finished"] = _now()
    return record


def _record_head(cell: Cell, worker: str) -> dict[str, Any]:
    """What every record of a cell says first: the cell, its configuration and who ran it."""
    return {"schema": RECORD_SCHEMA, "cell_id": cell.id, "key": cell.key(),
            "role": cell.method.role, "method_kind": cell.method.method,
            "config": cell.config(), "config_hash": cell.config_hash(),
            "budget_bytes": cell.budget.memory_bytes, "latency_budget_ms": cell.budget.latency_ms,
            "worker": worker, "budgetsearch_version": __version__, "started": _now()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _note_run(spec: StudySpec, command: str | None, workers: int, storage: str | None) -> None:
    """Append this run to ``runs.json`` (the report quotes the commands)."""
    import json

    path = spec.results_dir / "runs.json"
    with locked(path):  # runs started at once must not drop each other's entries
        try:
            runs = json.loads(path.read_text())
        except (OSError, ValueError):
            runs = []
        runs.append({"command": command, "workers": workers, "storage": storage is not None,
                     "started": _now(), "host": os.uname().nodename,
                     "budgetsearch_version": __version__})
        write_json_atomic(path, runs[-50:])
