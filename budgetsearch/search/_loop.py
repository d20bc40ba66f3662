"""The trial loop: ask, evaluate, tell on the in-memory study; batched writes; merging.

Trials run on a working in-memory study. Every ``flush_seconds`` (and when the target is reached,
and on the way out, Ctrl-C included) the trials finished since the last write are written to the
persistent study in one batch (:func:`.storage.write_trials`); then any trial other processes
wrote meanwhile is merged into the working study, so this process's sampler learns from them.
The loop stops when the persistent study holds the target number of finished trials, or after
``max_new`` trials of this process.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._front import FrontTracker, feasible
from ._local import LocalSearch
from ._objectives import Evaluator
from ._storage import complete_numbers, fetch_trials, write_trials

__all__ = ["TrialLoop", "quiet"]

DONE = (TrialState.COMPLETE,)


class TrialLoop:
    """Runs trials for one search run (see the module docstring).

    Args:
        study: The persistent study.
        work: The working study (the persistent one itself for in-memory storage).
        evaluator: Parameters -> objective values and constraints.
        tracker: Front tracker for the progress display.
        existing: The persistent study's finished trials at the start (already in ``work``).
        memory_only: Whether ``work`` is the persistent study (nothing to write).
        flush_seconds: Interval between batched writes.
        on_trial: Called with this process's trial count after each trial.
        tag: Recorded as every new trial's ``worker`` user attribute (who made it).
        local: Local search enqueuing neighbours of the elite (see :mod:`._local`), or None.
    """

    def __init__(self, *, study: optuna.Study, work: optuna.Study, evaluator: Evaluator,
                 tracker: FrontTracker, existing: list[FrozenTrial], memory_only: bool,
                 flush_seconds: float, on_trial: Callable[[int], None] | None = None,
                 tag: str | None = None, local: LocalSearch | None = None) -> None:
        self.study, self.work, self.evaluator, self.tracker = study, work, evaluator, tracker
        self.memory_only, self.flush_seconds, self.on_trial = memory_only, flush_seconds, on_trial
        self.tag, self.local = tag, local
        for t in existing:
            tracker.add(t.values, feasible(t))
            if local is not None:
                local.observe(t.params, t.values, feasible(t))
        self.known = {t.number for t in existing}
        self.to_persistent = {k: t.number for k, t in enumerate(existing)}
        self.persisted = len(existing)
        self.pending: list[int] = []
        self.frozen: dict[int, FrozenTrial] = {}
        self.made = self.flushed = self.pulled = 0
        self.t_ask = self.t_eval = self.t_tell = self.t_flush = 0.0
        self.bar: Any = None
        self.follow_others = True

    # --------------------------------------------------------------------------------- loop
    def run(self, *, n_trials: int, max_new: int | None, progress: bool) -> None:
        """Run until the study holds ``n_trials`` finished trials or ``max_new`` are made."""
        self.follow_others = max_new is None
        self.bar = (_bar(progress, n_trials, self.persisted) if max_new is None
                    else _bar(progress, max_new, 0))
        distributions = self.evaluator.space.distributions
        last_flush = last_post = time.perf_counter()
        try:
            while max_new is None or self.made < max_new:
                if self.persisted + len(self.pending) >= n_trials:
                    self.flush()
                    if self.persisted >= n_trials:
                        break
                t0 = time.perf_counter()
                trial = self.work.ask(distributions)
                if self.tag is not None:
                    trial.set_user_attr("worker", self.tag)
                t1 = time.perf_counter()
                ev = self.evaluator.evaluate(trial.params)
                t2 = time.perf_counter()
                for key, value in ev.constraints.items():
                    trial.set_constraint(key, value)
                frozen = self.work.tell(trial, list(ev.values))
                t3 = time.perf_counter()
                self.t_ask += t1 - t0
                self.t_eval += t2 - t1
                self.t_tell += t3 - t2
                self.made += 1
                if self.memory_only:
                    self.persisted += 1
                else:
                    self.frozen[frozen.number] = frozen
                    self.pending.append(frozen.number)
                self.tracker.add(ev.values, ev.feasible)
                if self.local is not None:
                    self.local.observe(frozen.params, ev.values, ev.feasible)
                    if self.local.due(self.made):
                        for params in self.local.propose():
                            self.work.enqueue_trial(params, skip_if_exists=False)
                if self.on_trial is not None:
                    self.on_trial(self.made)
                if self.bar is not None:
                    self.bar.update(1)
                    if t3 - last_post > 0.25:
                        self.bar.set_postfix_str(_postfix(self.tracker), refresh=False)
                        last_post = t3
                if t3 - last_flush >= self.flush_seconds:
                    self.flush()
                    last_flush = time.perf_counter()
        finally:
            try:
                if self.pending:
                    self.flush()
            finally:
                if self.bar is not None:
                    self.bar.set_postfix_str(_postfix(self.tracker), refresh=False)
                    self.bar.close()

    def flush(self) -> None:
        """Write the pending trials; merge the trials other processes wrote."""
        t0 = time.perf_counter()
        if self.memory_only:
            self.persisted = len(self.work.get_trials(deepcopy=False, states=DONE))
            return
        # a trial leaves ``frozen`` and ``pending`` only once stored: a write that fails
        # (Ctrl-C included) leaves the rest pending for the final write of ``run``, and what a
        # journal file stored of it before the stop is not written twice
        batch = [self.frozen[n] for n in self.pending]
        stored: dict[int, int] = {}
        try:
            write_trials(self.study, batch, on_written=stored.__setitem__)
        finally:
            for i, number in stored.items():
                del self.frozen[self.pending[i]]
                self.to_persistent[self.pending[i]] = number
            self.known.update(stored.values())
            self.flushed += len(stored)
            self.pending = [n for i, n in enumerate(self.pending) if i not in stored]
        ids = complete_numbers(self.study)
        others = fetch_trials(self.study, [i for n, i in ids.items() if n not in self.known])
        if others:
            start = len(self.work.get_trials(deepcopy=False))
            self.work.add_trials(others)
            for k, t in enumerate(others):
                self.to_persistent[start + k] = t.number
                self.known.add(t.number)
                self.tracker.add(t.values, feasible(t))
                if self.local is not None:
                    self.local.observe(t.params, t.values, feasible(t))
            self.pulled += len(others)
            if self.bar is not None and self.follow_others:
                self.bar.update(len(others))
        self.persisted = len(ids)
        self.t_flush += time.perf_counter() - t0

    # ------------------------------------------------------------------------------ results
    def trials(self) -> list[FrozenTrial]:
        """The finished trials, numbered as in the persistent study."""
        trials = self.work.get_trials(deepcopy=False, states=DONE)
        if self.memory_only:
            return list(trials)
        out = []
        for t in trials:
            if t.number in self.to_persistent:
                c = copy.copy(t)
                c.number = self.to_persistent[t.number]
                out.append(c)
        return sorted(out, key=lambda t: t.number)

    def stats(self, sampler_seconds: float) -> dict[str, Any]:
        """Counts and time shares of this run."""
        total = max(self.t_ask + self.t_eval + self.t_tell + self.t_flush, 1e-9)
        return {
            "new_trials": self.made, "written": self.flushed, "merged_from_others": self.pulled,
            "cache_hits": self.evaluator.hits, "search_seconds": total,
            "trials_per_minute": 60.0 * self.made / total,
            "sampler_share": sampler_seconds / total,
            "optuna_share": (self.t_ask + self.t_tell - sampler_seconds) / total,
            "evaluation_share": self.t_eval / total,
            "storage_share": self.t_flush / total,
        }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Optuna's informational log lines off (study creation)."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc="search", unit="trial",
                dynamic_ncols=True, leave=True)


def _postfix(tracker: FrontTracker) -> str:
    if tracker.best_proxy == -math.inf:
        return "no feasible trial yet"
    return f"best={tracker.best_proxy:.4f} hv={tracker.hypervolume:.4f}"
