"""The race: successive halving among candidate plans, each with a few learning rates, judged
by validation accuracy after real training.

A predicted objective ranks plans; only training says which one trains best. The race takes the
candidates (the search's best front points and every baseline's plan at the same budget), pairs
each with every learning rate of a small grid (an *arm*), trains every arm for the first rung's
epochs on the training split and scores it on the validation split; the best ``keep`` share of the
arms (at least one) go on to the next rung, which trains them from the start again for more
epochs, and so on. The last rung may train each arm with several seeds (its score is the mean).
Ties are broken by predicted memory (less first), then validation loss.

**Cross-validated rungs.** With ``folds`` > 1, the training and validation data are pooled and
dealt into that many stratified folds (:meth:`~budgetsearch.contrib.PlanRunner.folds`, seeded by
the recipe's seed, so every worker deals the same folds); an arm is trained once per fold, on the
other folds, and scored on its fold, and its score is the accuracy over all pooled images (each
validated on once per seed). A small validation split is the race's weak point: on 50 images one
standard error of an accuracy near 50 % is 7 points, more than most leads; five folds of the same
250 images validate on all 250 for five times the training. Fold j trains with the arm's seed plus
``j *`` :data:`FOLD_SEED_STRIDE` (fold 0 with the arm's seed itself), so the folds' training
draws (batch order, dropout) are independent and the score averages over them as well as over the
images: with one seed for every fold, a plan that the seed's draw happens to suit, or not, is
favoured, or not, in every fold at once. (On ProxylessNAS-w0.3 with 200 training images, one
published MIT scheme at lr 0.02 tested at 28.2 % with training seed 0 and 28.1–48.1 % with seeds
0–4, the same model; ``benchmarks/fold_orders.py``.)

**The cross-validated final.** With ``final_candidates`` > 0 and a race on the validation split
(``folds`` 1), the last rung does not decide alone: the best arm of each of its best
``final_candidates`` candidates (distinct plans, in the rung's order) is trained again at the
last rung's epochs and seeds on ``final_folds`` folds of the pooled training and validation
images, as a cross-validated race would, and the best of them by its score over all the pooled
images wins (ties as above). Why: on 200 validation images the race's leads are mostly under one
standard error, and in the 12 study cells raced both ways the arm a race cross-validated from
its first rung chose was always among the arms the first rung on the split kept, its plan among
the 4 finalists in 11 (``benchmarks/race_final.py``, ``studies/results/race_final.md``): the
final spends the folds' cost on a few arms instead of all.
The final is recorded as one more rung (``final``: true, with its ``folds`` and ``val_images``);
its arm keys carry the fold count (``:f<j>of<k>``), and the final's settings are not part of the
race's key, so a race file made without a final is continued by one.

**Beyond the grid's edges.** With ``lr_extensions`` > 0, the first rung does not stop at the grid:
a candidate with an arm among the arms the rung keeps whose best rate is the lowest (highest)
rate it was tried at is also tried at the next rate below (above): the grid's edge rate divided
(multiplied) by the ratio of its two lowest (highest) rates, once per step, rounded to 3
significant digits; at the rung's epochs. This repeats until no kept candidate's best rate lies
on its edge, or each has gone ``lr_extensions`` steps beyond the grid on that side. The added
arms compete with the others for the same number of places in the next rung. What was added,
and why, is recorded in the first rung (``extended``) and in :attr:`RaceResult.lr_extension`.
The extension is decided from the recorded results alone, so a resumed race and every worker
make the same decisions.

Every arm's result is written atomically into a keyed file the moment it is known
(:class:`~budgetsearch.contrib.SharedTable`): a race killed mid-rung resumes without retraining
finished arms, and several processes racing the same candidates share one file and never train
the same arm twice (an arm is claimed under a file lock or in the database, and its claim's
heartbeat is refreshed while it trains; the claim of a worker that died is taken over: on its
host as soon as its process is gone, anywhere after ten minutes without a heartbeat).
Arms are trained by :class:`~budgetsearch.contrib.PlanRunner`, so the frozen prefix below each
candidate's earliest updated layer is computed once and a late-layer plan trains at the speed of
the layers it touches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..plan import LayerUpdate
from ..recipe import MAX_LR, Recipe

__all__ = ["FINAL_ARM_KEY", "FOLD_SEED_STRIDE", "MAX_FINAL", "Candidate", "RaceResult",
           "RaceSettings", "arm_scores", "best_arm_each", "default_race_path", "final_count_ok",
           "fold_seed", "pooled_mean", "race", "race_key", "rungs_ok", "updates_digest"]

#: Version of the race file's layout (part of its key).
RACE_VERSION = 1
#: The most rates beyond each edge of the grid :attr:`RaceSettings.lr_extensions` allows.
MAX_LR_EXTENSIONS = 8
#: The most folds :attr:`RaceSettings.folds` allows.
MAX_FOLDS = 20
#: The most candidates :attr:`RaceSettings.final_candidates` allows.
MAX_FINAL = 20
#: The tail of a cross-validated final's arm keys (``:f<fold>of<folds>``; see :func:`_arm_key`).
FINAL_ARM_KEY = re.compile(r":f\d+of\d+$")
#: Fold j of a cross-validated arm trains with the arm's seed plus j times this (far above any
#: seed count of a last rung, so no two (seed, fold) pairs share a batch order).
FOLD_SEED_STRIDE = 1000


@dataclass(frozen=True)
class Candidate:
    """A plan in the race, with its predicted figures.

    Attributes:
        name: Unique name, e.g. ``search#41`` or ``tinytl``.
        source: ``search`` (a front point) or ``baseline``.
        updates: The plan's layer updates.
        memory_bytes: Predicted memory under the budget's measure.
        latency_ms: Predicted step latency.
        backward_macs: Predicted backward MACs.
        predicted: The search's objective value (predicted accuracy or proxy), if known.
        trial: The study's trial number of a front point.
        aliases: Other candidates with the same updates (raced once, under this name).
    """

    name: str
    source: str
    updates: Mapping[str, LayerUpdate]
    memory_bytes: int
    latency_ms: float
    backward_macs: float
    predicted: float | None = None
    trial: int | None = None
    aliases: tuple[str, ...] = ()

    def digest(self) -> str:
        """A digest of the updates (two candidates with the same digest train identically):
        :func:`updates_digest`."""
        return updates_digest(self.updates)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (without the updates)."""
        return {"name": self.name, "source": self.source, "memory_bytes": self.memory_bytes,
                "latency_ms": self.latency_ms, "backward_macs": self.backward_macs,
                "predicted": self.predicted, "trial": self.trial, "layers": len(self.updates),
                "aliases": list(self.aliases), "digest": self.digest()}


@dataclass(frozen=True)
class RaceSettings:
    """How the race runs.

    Attributes:
        rungs: Epochs trained at each rung (increasing; the last is the plan's schedule).
        lrs: The learning-rate grid every candidate is tried with.
        keep: Share of the arms kept after each rung but the last, in (0, 1) (at least one).
        final_seeds: Seeds each arm of the last rung is trained with (its score is the mean).
        lr_extensions: Rates beyond each edge of the grid a candidate may be tried at in the
            first rung when its best rate there lies on the edge (0: the grid only; see the
            module docstring). Needs at least two rates in the grid.
        folds: 1: train on the training split, score on the validation split; k > 1: score
            every arm by k-fold cross-validation over both (see the module docstring).
        final_candidates: Candidates of the last rung (each at its best rate there) raced
            again in a cross-validated final when ``folds`` is 1 (0: no final; otherwise at
            least 2; see the module docstring).
        final_folds: Folds of the final, 2 to :data:`MAX_FOLDS`.
    """

    rungs: tuple[int, ...] = (2, 4)
    lrs: tuple[float, ...] = (0.00667, 0.02, 0.06)
    keep: float = 1 / 3
    final_seeds: int = 1
    lr_extensions: int = 0
    folds: int = 1
    final_candidates: int = 0
    final_folds: int = 5

    def __post_init__(self) -> None:
        rungs, lrs = tuple(self.rungs), tuple(self.lrs)
        if not rungs_ok(rungs):
            raise PlanError(f"race rungs must be increasing positive epoch counts; got {rungs}")
        if not lrs or any(not (isinstance(x, (int, float)) and not isinstance(x, bool)
                               and math.isfinite(x) and 0 < x <= MAX_LR)
                          for x in lrs) or len(set(lrs)) != len(lrs):
            raise PlanError(f"race learning rates must be distinct numbers in (0, {MAX_LR:g}]; "
                            f"got {lrs}")
        if len({f"{x:g}" for x in lrs}) != len(lrs):  # an arm is keyed by its rate's {lr:g}
            raise PlanError(f"race learning rates must differ within 6 significant digits (an "
                            f"arm is keyed by its rate so written); got {lrs}")
        if not 0 < self.keep < 1:
            raise PlanError(f"race keep share must be in (0, 1); got {self.keep}")
        if not isinstance(self.final_seeds, int) or self.final_seeds < 1:
            raise PlanError(f"race final_seeds must be an integer >= 1; got {self.final_seeds}")
        if not _integer_in(self.lr_extensions, range(MAX_LR_EXTENSIONS + 1)):
            raise PlanError(f"race lr_extensions must be an integer from 0 (the grid only) to "
                            f"{MAX_LR_EXTENSIONS}; got {self.lr_extensions!r}")
        if not _integer_in(self.folds, range(1, MAX_FOLDS + 1)):
            raise PlanError(f"race folds must be an integer from 1 (the validation split) to "
                            f"{MAX_FOLDS}; got {self.folds!r}")
        if not final_count_ok(self.final_candidates):
            raise PlanError(f"race final_candidates must be 0 (no final) or an integer from 2 "
                            f"to {MAX_FINAL}; got {self.final_candidates!r}")
        if not _integer_in(self.final_folds, range(2, MAX_FOLDS + 1)):
            raise PlanError(f"race final_folds must be an integer from 2 to {MAX_FOLDS}; got "
                            f"{self.final_folds!r}")
        if ((self.folds > 1 or self.has_final)
                and self.final_seeds > FOLD_SEED_STRIDE):  # fold seeds would collide
            raise PlanError(f"a cross-validated race (or final) takes at most "
                            f"{FOLD_SEED_STRIDE} final_seeds; got {self.final_seeds}")
        object.__setattr__(self, "rungs", rungs)
        object.__setattr__(self, "lrs", tuple(float(x) for x in lrs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"rungs": list(self.rungs), "lrs": list(self.lrs), "keep": self.keep,
                "final_seeds": self.final_seeds, "lr_extensions": self.lr_extensions,
                "folds": self.folds, "final_candidates": self.final_candidates,
                "final_folds": self.final_folds}

    @property
    def has_final(self) -> bool:
        """Whether the race ends with a cross-validated final (a race on the validation split
        with ``final_candidates`` > 0)."""
        return self.folds == 1 and self.final_candidates > 0

    def factors(self) -> tuple[float, float] | None:
        """The geometric steps beyond the grid's low and high edges (the ratios of its two
        lowest and two highest rates), or None for a grid of one rate."""
        grid = sorted(self.lrs)
        if len(grid) < 2:
            return None
        return grid[1] / grid[0], grid[-1] / grid[-2]

    def epochs_total(self, arms: int) -> int:
        """Epochs the whole race trains for ``arms`` arms at the first rung (every fold's
        training counted)."""
        total, alive, entering = 0, arms, arms
        for i, epochs in enumerate(self.rungs):
            last = i == len(self.rungs) - 1
            total += alive * epochs * (self.final_seeds if last else 1) * self.folds
            entering, alive = alive, max(1, math.ceil(alive * self.keep))
        if self.has_final:  # at most this many finalists (one arm per candidate)
            total += (min(self.final_candidates, entering) * self.rungs[-1] * self.final_seeds
                      * self.final_folds)
        return total


@dataclass
class RaceResult:
    """What the race found.

    Attributes:
        winner: The candidate that trained best.
        recipe: The recipe it won with (learning rate, the last rung's epochs).
        rungs: Per rung: ``epochs``, ``seeds`` and its arms' ``candidate``, ``lr``,
            ``val_accuracy``, ``val_loss`` and ``kept`` (went on / won).
        candidates: The candidates raced, by name.
        stats: ``arms_trained`` (by this process), ``seconds``, ``path``.
        results: Every arm's result by arm key (``r<rung>:e<epochs>:s<seed>:<name>@lr<lr>``,
            with ``:f<fold>`` appended in a cross-validated race and ``:f<fold>of<folds>`` in
            the final's): the runner's ``*_accuracy`` and ``*_loss`` (with any data it only
            reports, e.g. ``test_accuracy``), ``seconds``, ``val_images``, ``threads`` and
            ``kernels`` where it gave them; its other keys are not kept.
        lr_extension: The rates tried beyond the grid's edges: ``grid`` (the grid),
            ``max_steps`` (:attr:`RaceSettings.lr_extensions`), ``factors`` (the low and high
            geometric steps) and ``added`` (per added arm: ``candidate``, ``lr``, ``edge``
            ``low`` or ``high``, ``step`` beyond the grid, ``after`` (the candidate's best rate
            then) and ``why``).
    """

    winner: Candidate
    recipe: Recipe
    rungs: list[dict[str, Any]]
    candidates: dict[str, Candidate]
    stats: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr_extension: dict[str, Any] = field(default_factory=dict)
    folds: int = 1

    def final_arms(self) -> dict[str, dict[str, Any]]:
        """The winner's results in the last rung, by seed key (``s<seed>``, with ``:f<fold>``
        in a cross-validated race)."""
        last = len(self.rungs) - 1
        rung = self.rungs[-1]
        k = rung.get("folds", self.folds)
        folds = [None] if k == 1 else list(range(k))
        of = k if rung.get("final") else None
        return {f"s{seed}" + ("" if f is None else f":f{f}"): self.results[
                    _arm_key(last, rung["epochs"], seed, self.winner.name, self.recipe.lr, f,
                             of=of)]
                for seed in rung["seeds"] for f in folds}

    def final(self) -> dict[str, Any] | None:
        """The cross-validated final's rung (the last, marked ``final``), or None when the
        race had none."""
        return self.rungs[-1] if self.rungs and self.rungs[-1].get("final") else None

    def best(self) -> dict[str, dict[str, Any]]:
        """Per candidate: its best arm at the furthest rung it reached (``rung``, ``lr``,
        ``val_accuracy``, ``val_loss``, ``epochs``)."""
        out: dict[str, dict[str, Any]] = {}
        for i, rung in enumerate(self.rungs):
            for arm in rung["arms"]:
                prev = out.get(arm["candidate"])
                row = {"rung": i, "epochs": rung["epochs"], "lr": arm["lr"],
                       "val_accuracy": arm["val_accuracy"], "val_loss": arm["val_loss"]}
                if prev is None or prev["rung"] < i or (
                        prev["rung"] == i and arm["val_accuracy"] > prev["val_accuracy"]):
                    out[arm["candidate"]] = row
        return out

    def winner_lrs(self) -> list[float]:
        """The learning rates the winner was raced at, best first: the rate it won with, then
        the others in the order of the first rung's ranking (where every candidate meets every
        rate of the grid, and those it was tried at beyond it). These are the rates
        ``budgetsearch train --lrs`` without values trains the plan at, keeping the best run on
        validation (in ``studies/results/cv_rates.md``, over 81 plans trained on 200 images,
        each seed's run chosen among three rates on validation tested 1.07 points above every
        seed trained at the one rate 5-fold cross-validation chose)."""
        first = [arm["lr"] for arm in self.rungs[0]["arms"]
                 if arm["candidate"] == self.winner.name]
        return [self.recipe.lr, *(lr for lr in first if lr != self.recipe.lr)]

    def threads(self) -> list[int]:
        """The torch thread counts the race's arms trained with, as their results recorded
        them (by any worker; arms recorded before the count was kept say nothing). Near-equal
        arms can swap places at another count: training a plan of several layers is not
        bit-for-bit the same across counts."""
        return sorted({int(r["threads"]) for r in self.results.values()
                       if isinstance(r.get("threads"), int)})

    def kernels(self) -> list[str]:
        """The CPU kernels the race's arms trained with (as ``cpu_kernels`` of
        ``budgetsearch._threads`` names them), as their results recorded them; like
        :meth:`threads`, arms recorded before they were kept say nothing. Another instruction
        set rounds sums otherwise, so near-equal arms can swap places on another host."""
        return sorted({r["kernels"] for r in self.results.values()
                       if isinstance(r.get("kernels"), str)})

    def provenance(self) -> dict[str, Any]:
        """The race as recorded in the chosen plan's provenance."""
        return {"winner": self.winner.name, "lr": self.recipe.lr, "epochs": self.recipe.epochs,
                "winner_lrs": self.winner_lrs(),
                "candidates": [c.describe() for c in self.candidates.values()],
                "rungs": self.rungs, "lr_extension": self.lr_extension,
                "folds": self.folds, "val_images": self.stats.get("val_images"),
                "arms_trained": self.stats.get("arms_trained"),
                "seconds": self.stats.get("seconds"), "threads": self.threads(),
                "kernels": self.kernels()}


def race_key(
    *, data_key: Mapping[str, Any], recipe: Recipe, settings: RaceSettings,
    candidates: Sequence[Candidate],
) -> dict[str, Any]:
    """What a race's results depend on: the model and data (``data_key``, e.g. a contribution
    analysis key), the base recipe, the settings and the candidates' updates.

    ``lr_extensions`` is not part of it: an arm's result is keyed by its rung, epochs, seed,
    candidate and rate, so it is the same with or without the extension, and a race file made
    before the extension existed (or with another bound) is continued, not refused. Nor are
    the final's settings: its arms' keys carry their fold count. ``folds``
    is part of it only above 1, so a race file made before folds existed is continued by a
    race on the validation split; with it comes ``fold_seed_stride``
    (:data:`FOLD_SEED_STRIDE`)."""
    shown = {k: v for k, v in settings.to_dict().items()
             if k not in ("lr_extensions", "final_candidates", "final_folds")
             and (k != "folds" or v != 1)}
    if settings.folds > 1:  # a race whose folds all trained with the arm's seed is not continued
        shown["fold_seed_stride"] = FOLD_SEED_STRIDE
    return {"race_version": RACE_VERSION, **dict(data_key), "recipe": recipe.to_dict(),
            "settings": shown, "candidates": {c.name: c.digest() for c in candidates}}


def default_race_path(key: Mapping[str, Any]) -> Path:
    """``$BUDGETSEARCH_CACHE`` (else ``~/.cache/budgetsearch``) ``/race/<model>-<digest>.json``:
    a re-run of the same plan command finds its race there and resumes it."""
    root = Path(os.environ.get("BUDGETSEARCH_CACHE") or Path.home() / ".cache" / "budgetsearch")
    text = json.dumps(dict(key), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return root / "race" / f"{key.get('model') or 'model'}-{digest}.json"


def _arm_key(rung: int, epochs: int, seed: int, name: str, lr: float,
             fold: int | None = None, *, of: int | None = None) -> str:
    """An arm's key; ``of``: the fold count, in the keys of the cross-validated final (whose
    folds are not part of the race's key)."""
    tail = "" if fold is None else f":f{fold}" + ("" if of is None else f"of{of}")
    return f"r{rung}:e{epochs}:s{seed}:{name}@lr{lr:g}" + tail


#: :func:`_arm_key`'s form: rung, epochs, seed, candidate, rate, and the fold if any (with the
#: fold count in the final's keys).
_ARM_KEY = re.compile(r"^r(\d+):e(\d+):s(\d+):(.+)@lr([0-9.eE+-]+?)(?::f(\d+)(?:of\d+)?)?$")


def arm_scores(results: Mapping[str, Mapping[str, Any]], *, metric: str = "val_accuracy",
               exact: bool = True) -> dict[tuple[int, str, float], float]:
    """Every arm's score from a race file's ``results``, by (rung, candidate, rate) (a file
    whose final ran with different fold counts has them pooled in one score): its
    ``metric`` (validation accuracy; or e.g. ``val_loss``) over all its runs (seeds, folds),
    pooled as the race pools them (:func:`pooled_mean`). Entries that are not arms are
    skipped; for ``val_loss``, an arm with a run that recorded none scores infinity, as in the
    race's tie-break; for another metric, runs without it are skipped. ``exact`` False pools
    an accuracy as the race did before it pooled images right over images (the runs' fractions
    weighted by their images; ``benchmarks/race_ties.py`` compares the two)."""
    runs: dict[tuple[int, str, float], list[tuple[float, int | None]]] = {}
    for key, row in results.items():
        m = _ARM_KEY.match(key)
        if m is None or (row.get(metric) is None and metric != "val_loss"):
            continue
        value = math.inf if row.get(metric) is None else float(row[metric])
        runs.setdefault((int(m[1]), m[4], float(m[5])), []).append(
            (value, row.get("val_images")))
    out = {}
    for arm, r in runs.items():
        values, images = [a for a, _n in r], [n for _a, n in r]
        out[arm] = math.inf if math.inf in values else pooled_mean(
            values, images, counts=exact and metric == "val_accuracy")
    return out


def race(
    runner: Any,
    candidates: Sequence[Candidate],
    *,
    recipe: Recipe,
    settings: RaceSettings | None = None,
    path: str | os.PathLike[str] | None = None,
    key: Mapping[str, Any] | None = None,
    storage: str | None = None,
    progress: bool = True,
    poll_seconds: float = 2.0,
    max_arms: int | None = None,
    on_arm: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> RaceResult:
    """Race the candidates (see the module docstring).

    Args:
        runner: Trains a plan: ``runner.run(updates, recipe) -> {"val_accuracy", "val_loss",
            ...}`` (a :class:`~budgetsearch.contrib.PlanRunner`; optionally ``val_images``,
            ``threads``, the torch thread count it trained with, and ``kernels``, the CPU
            kernels); for ``settings.folds`` > 1 also ``runner.folds(k, seed=...)`` -> k such
            runners, one per fold.
        candidates: The plans, with distinct names; candidates with the same updates are raced
            once (the first keeps its name, the others become its aliases).
        recipe: The base recipe: every arm trains with it, at the arm's learning rate, the
            rung's epochs and seed ``recipe.seed + i`` for the i-th seed of the last rung (on
            fold j, that plus ``j *`` :data:`FOLD_SEED_STRIDE`: :func:`fold_seed`).
        settings: Rungs, learning rates, keep share, seeds of the last rung, rate extensions,
            folds, the cross-validated final.
        path: The race file (None: in memory, not resumable). Needs ``key``.
        key: What the results depend on (:func:`race_key`); a file made with another key is
            refused, naming the fields.
        storage: A database URL (``sqlite:///...``, ``postgresql://...``) to keep the results in
            instead of ``path``: workers on every machine that reaches it share the race.
        progress: Show a progress bar in epochs trained (rate and ETA).
        poll_seconds: How often to look whether arms other processes claimed are done.
        max_arms: Stop after this many trainings in this call (one per fold of a
            cross-validated arm, so a stop may fall between an arm's folds; then
            :class:`~budgetsearch.errors.PlanError` says the race is unfinished).
        on_arm: Called with each arm key and result this process trains.

    Raises:
        PlanError: No candidates, duplicate names, a cross-validated race or final with a
            runner that cannot deal folds, or the race stopped by ``max_arms``.
        TableError: ``path`` holds a race with another key.
    """
    from ..contrib.table import keep_claim, open_shared

    settings = settings or RaceSettings()
    if key is None and (path is not None or storage is not None):
        raise PlanError("a race kept in a file or a database needs its key (race_key(...)): "
                        "without one, a race on another model or data would take its results")
    pool = _distinct(candidates)
    if settings.has_final and not callable(getattr(runner, "folds", None)):
        raise PlanError(f"a cross-validated final needs a runner that deals folds (a "
                        f"PlanRunner); {type(runner).__name__} has no folds() (final_candidates "
                        "0: no final)")
    views, val_images = _views(runner, settings.folds, seed=recipe.seed)
    folds: list[int | None] = [None] if settings.folds == 1 else list(range(settings.folds))
    shared = open_shared(dict(key or {}), path=path, storage=storage, kind="race")
    memory: dict[str, dict[str, Any]] = {}
    arms = [(c.name, lr) for c in pool.values() for lr in settings.lrs]
    started = time.perf_counter()
    bar = _bar(settings.epochs_total(len(arms)), progress)
    trained = 0
    rungs: list[dict[str, Any]] = []
    added: list[dict[str, Any]] = []

    def train(jobs: Mapping[str, tuple[str, float, int, int | None]], epochs: int,
              on: Sequence[Any] | None = None) -> None:
        """Train (or wait for other workers to train) every job not yet recorded (a job's
        fold j on ``on[j]``, by default the race's views)."""
        nonlocal trained
        on = views if on is None else on
        while True:
            if shared is not None:
                job = shared.claim(list(jobs))
            else:
                job = next((k for k in jobs if k not in memory), None)
            if job is None:
                if shared is None or set(jobs) <= shared.done():
                    return
                time.sleep(poll_seconds)  # other workers are training the rest
                continue
            if max_arms is not None and trained >= max_arms:
                if shared is not None:
                    shared.release(job)
                raise PlanError(f"race stopped after {trained} arms (max_arms); run it "
                                "again to finish")
            name, lr, seed, fold = jobs[job]
            try:
                with keep_claim(shared, job):
                    result = on[fold or 0].run(pool[name].updates, recipe.with_(
                        lr=lr, epochs=epochs, seed=fold_seed(seed, fold)))
            except BaseException:
                if shared is not None:
                    shared.release(job)
                raise
            trained += 1
            # the scores (validation, and any data only reported, e.g. test) and the time
            result = {k: v for k, v in result.items()
                      if k.endswith(("_accuracy", "_loss"))
                      or k in ("seconds", "val_images", "threads", "kernels")}
            if shared is not None:
                shared.record(job, result)
            else:
                memory[job] = result
            if on_arm is not None:
                on_arm(job, result)
            if bar is not None:
                bar.update(epochs)
                bar.set_postfix_str(f"{name[:24]} lr {lr:g}: {result['val_accuracy']:.3f}")

    def score(jobs: Mapping[str, tuple[str, float, int, int | None]]
              ) -> list[tuple[float, int, float, str, float]]:
        """The arms ranked: (-accuracy, memory, loss, name, lr), best first. An arm's accuracy
        and loss are over all its runs (seeds, folds), each weighted by its validation images."""
        done = shared.table().results if shared is not None else memory
        scored = []
        for name, lr in arms:
            rows = [done[k] for k, (n, x, _s, _f) in jobs.items() if n == name and x == lr]
            images = [r.get("val_images") for r in rows]
            acc = pooled_mean([float(r["val_accuracy"]) for r in rows], images, counts=True)
            losses = [r.get("val_loss") for r in rows]
            loss = pooled_mean(losses, images) if None not in losses else math.inf
            scored.append((-acc, pool[name].memory_bytes, loss, name, lr))
        scored.sort()
        return scored

    def final(finalists: list[tuple[str, float]], last: Mapping[str, Any]) -> dict[str, Any]:
        """Train the finalists on the final's folds and rank them (the final's rung)."""
        nonlocal arms
        k, epochs, seeds = settings.final_folds, last["epochs"], last["seeds"]
        on, images = _views(runner, k, seed=recipe.seed)
        index = len(settings.rungs)
        jobs = {_arm_key(index, epochs, s, name, lr, f, of=k): (name, lr, s, f)
                for name, lr in finalists for s in seeds for f in range(k)}
        if bar is not None:  # the total now knows how many finalists there are
            bar.total = bar.n + epochs * len(jobs)
            bar.set_description(f"race final ({len(finalists)} arms x {epochs} ep x {k} folds)")
        train(jobs, epochs, on)
        if bar is not None:  # arms other workers trained count too
            bar.n = bar.total
            bar.refresh()
        arms = finalists
        scored = score(jobs)
        return {"epochs": epochs, "seeds": seeds, "final": True, "folds": k,
                "val_images": images, "arms": [
                    {"candidate": s[3], "lr": s[4], "val_accuracy": -s[0],
                     "val_loss": None if math.isinf(s[2]) else s[2], "kept": j == 0}
                    for j, s in enumerate(scored)]}

    try:
        for i, epochs in enumerate(settings.rungs):
            last = i == len(settings.rungs) - 1
            seeds = [recipe.seed + s for s in range(settings.final_seeds if last else 1)]
            # places in the next rung, from the arms that entered this one (an extension's
            # arms compete for them)
            n_keep = 1 if last else max(1, math.ceil(len(arms) * settings.keep))
            jobs = {_arm_key(i, epochs, s, name, lr, f): (name, lr, s, f)
                    for name, lr in arms for s in seeds for f in folds}
            if bar is not None:
                bar.set_description(f"race rung {i + 1}/{len(settings.rungs)} "
                                    f"({len(arms)} arms x {epochs} ep)")
            train(jobs, epochs)
            scored = score(jobs)
            while i == 0 and settings.lr_extensions > 0:
                new = _beyond_edges(scored, n_keep, arms, settings)
                if not new:
                    break
                added.extend(new)
                arms.extend((a["candidate"], a["lr"]) for a in new)
                fresh = {_arm_key(i, epochs, s, a["candidate"], a["lr"], f): (
                    a["candidate"], a["lr"], s, f) for a in new for s in seeds for f in folds}
                jobs.update(fresh)
                if bar is not None:
                    bar.total += epochs * len(fresh)
                    bar.set_description(f"race rung 1/{len(settings.rungs)}: {len(new)} "
                                        "rate(s) beyond the grid")
                train(fresh, epochs)
                scored = score(jobs)
            kept = [(s[3], s[4]) for s in scored[:n_keep]]
            if last and settings.has_final:  # the finalists: each candidate's best arm
                finalists = best_arm_each(((s[3], s[4]) for s in scored),
                                          settings.final_candidates)
                if len(finalists) > 1:
                    kept = finalists
            rung: dict[str, Any] = {"epochs": epochs, "seeds": seeds, "arms": [
                {"candidate": s[3], "lr": s[4], "val_accuracy": -s[0],
                 "val_loss": None if math.isinf(s[2]) else s[2], "kept": (s[3], s[4]) in kept}
                for s in scored]}
            if i == 0 and settings.lr_extensions > 0:
                rung["extended"] = added
            rungs.append(rung)
            if bar is not None:  # arms trained by others still count towards the total
                bar.n = min(bar.total, sum(r["epochs"] * len(r["arms"]) * len(r["seeds"])
                                           * len(folds) for r in rungs))
                bar.refresh()
            arms = kept
        if len(arms) > 1:  # the cross-validated final among the last rung's finalists
            rungs.append(final(arms, rungs[-1]))
            arms = [next((a["candidate"], a["lr"]) for a in rungs[-1]["arms"] if a["kept"])]
        if bar is not None:  # e.g. no final after all (one candidate in the last rung)
            bar.total = bar.n
            bar.refresh()
        results = dict(shared.table().results if shared is not None else memory)
    finally:
        if bar is not None:
            bar.close()
    name, lr = arms[0]
    factors = settings.factors()
    return RaceResult(
        winner=pool[name], recipe=recipe.with_(lr=lr, epochs=settings.rungs[-1]), rungs=rungs,
        candidates=dict(pool),
        stats={"arms_trained": trained, "seconds": time.perf_counter() - started,
               "path": str(path) if path is not None else storage,
               **({"val_images": val_images} if val_images is not None else {})},
        results=results, folds=settings.folds,
        lr_extension={"grid": sorted(settings.lrs), "max_steps": settings.lr_extensions,
                      "factors": list(factors) if factors else None, "added": added})


def updates_digest(updates: Mapping[str, LayerUpdate]) -> str:
    """The digest a race file names a candidate's plan by (its key's ``candidates``): 12 hex
    digits of the SHA-256 of the updates' JSON form, so that a plan file's updates
    (``load_plan(path).updates``) can be matched to a race's arms."""
    text = json.dumps({k: u.to_dict() for k, u in sorted(updates.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fold_seed(seed: int, fold: int | None) -> int:
    """The seed an arm of seed ``seed`` trains with on fold ``fold`` (None: no folds)."""
    return seed if fold is None else seed + fold * FOLD_SEED_STRIDE


def pooled_mean(values: Sequence[float], images: Sequence[int | None], *,
                counts: bool = False) -> float:
    """The mean of an arm's per-run scores (seeds, folds), each weighted by the images it was
    validated on: the score over all of them. When any run's count is unknown (recorded before
    counts were), every run counts equally.

    Args:
        values: The runs' scores.
        images: The images each run was validated on (None: unknown).
        counts: The scores are fractions of their images (accuracies): they are pooled as the
            images right over the images, so that two arms right on as many of the same
            images score the same to the bit (a weighted sum of fractions rounds differently
            by the order and spread of its terms, and the race breaks ties by memory).
    """
    if counts and all(images):
        sizes = [int(n or 0) for n in images]
        return sum(round(v * n) for v, n in zip(values, sizes, strict=True)) / sum(sizes)
    weights = [float(n) for n in images] if all(images) else [1.0] * len(values)
    return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


def _views(runner: Any, folds: int, *, seed: int) -> tuple[list[Any], int | None]:
    """The runners an arm is trained by (the runner itself, or one per fold) and the images
    an arm is validated on in all (None when the runner does not say).

    Raises:
        PlanError: ``folds`` > 1 and the runner cannot deal folds.
    """
    if folds == 1:
        data = getattr(runner, "data", None)
        n = len(data["val"][1]) if isinstance(data, Mapping) and "val" in data else None
        return [runner], n
    if not callable(getattr(runner, "folds", None)):
        raise PlanError(f"a race on {folds} folds needs a runner that deals folds (a "
                        f"PlanRunner); {type(runner).__name__} has no folds()")
    views = list(runner.folds(folds, seed=seed))
    if not all(hasattr(v, "val_rows") for v in views):
        return views, None
    return views, sum(len(v.val_rows) for v in views)


def _next_rate(edge_lr: float, factor: float, edge: str, step: int) -> float:
    """``step`` geometric steps beyond the grid's edge rate (down at the low edge), to 3
    significant digits."""
    lr = edge_lr / factor**step if edge == "low" else edge_lr * factor**step
    return float(f"{lr:.3g}")


def _beyond_edges(scored: Sequence[tuple[float, int, float, str, float]], n_keep: int,
                  arms: Sequence[tuple[str, float]], settings: RaceSettings
                  ) -> list[dict[str, Any]]:
    """The arms to add beyond the edges (see the module docstring): for each candidate with an
    arm among the ``n_keep`` best, in rank order, the next rate past the edge its best rate lies
    on, while it has gone fewer than ``lr_extensions`` steps past that edge of the grid."""
    factors = settings.factors()
    if factors is None:
        return []
    grid = sorted(settings.lrs)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for *_rank, name, _lr in scored[:n_keep]:
        if name in seen:
            continue
        seen.add(name)
        best = next(s for s in scored if s[3] == name)  # the candidate's best arm
        tried = sorted(lr for n, lr in arms if n == name)
        for edge, end, grid_end, factor, beyond in (
                ("low", tried[0], grid[0], factors[0], [x for x in tried if x < grid[0]]),
                ("high", tried[-1], grid[-1], factors[1], [x for x in tried if x > grid[-1]])):
            if best[4] != end or len(beyond) >= settings.lr_extensions:
                continue
            lr = _next_rate(grid_end, factor, edge, len(beyond) + 1)
            if not 0 < lr <= MAX_LR or lr in tried:
                continue
            out.append({"candidate": name, "lr": lr, "edge": edge, "step": len(beyond) + 1,
                        "after": end, "why": (
                            f"its best rate at rung 1 was {end:g} (validation accuracy "
                            f"{-best[0]:.4f}), the {'lowest' if edge == 'low' else 'highest'} "
                            "it was tried at")})
            break
    return out


def best_arm_each(ranked: Iterable[tuple[str, float]], count: int) -> list[tuple[str, float]]:
    """The final's finalists: from arms ``(candidate, lr)`` ranked best first, each
    candidate's first (its best) arm, for the ``count`` best candidates, best first."""
    best: dict[str, float] = {}
    for name, lr in ranked:
        best.setdefault(name, lr)
    return list(best.items())[:count]


def final_count_ok(value: Any) -> bool:
    """Whether ``value`` is an allowed :attr:`RaceSettings.final_candidates`: 0 (no final) or
    an integer from 2 to :data:`MAX_FINAL`."""
    return _integer_in(value, range(1)) or _integer_in(value, range(2, MAX_FINAL + 1))


def rungs_ok(value: Sequence[Any]) -> bool:
    """Whether ``value`` is an allowed :attr:`RaceSettings.rungs`: one or more increasing
    epoch counts, integers (not bools) from 1."""
    return bool(value) and all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in value) and all(
        b > a for a, b in itertools.pairwise(value))


def _integer_in(value: Any, allowed: range) -> bool:
    """Whether ``value`` is an integer (not a bool) in ``allowed``."""
    return isinstance(value, int) and not isinstance(value, bool) and value in allowed


def _distinct(candidates: Sequence[Candidate]) -> dict[str, Candidate]:
    if not candidates:
        raise PlanError("the race has no candidates (no plan fits the budget)")
    names = [c.name for c in candidates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PlanError(f"race candidates must have distinct names; repeated: {', '.join(dup)}")
    pool: dict[str, Candidate] = {}
    by_digest: dict[str, str] = {}
    for c in candidates:
        first = by_digest.get(c.digest())
        if first is None:
            by_digest[c.digest()] = c.name
            pool[c.name] = c
        else:
            from dataclasses import replace

            pool[first] = replace(pool[first], aliases=(*pool[first].aliases, c.name))
    return pool


def _bar(total: int, progress: bool) -> Any:
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="race", unit="epoch", file=sys.stderr)
