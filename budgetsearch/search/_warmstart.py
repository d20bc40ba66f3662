"""Warm start: the published selectors' plans at the same budget, as points of the search space.

Each baseline (:data:`BASELINES`) is run through :func:`budgetsearch.selectors.select` with the
study's cost model, budgets, scores and memory measure. Its plan is measured exactly (proxy,
memory, latency, MACs: the figures the final report compares against) and converted to the nearest
points of the space (:meth:`SearchSpace.encode`) with the channel fraction of each layer rounded
to the nearest ratio, up and down; the distinct points are enqueued as the study's first trials.
The search decodes them with its own channel choice (top channels by score), which captures at
least as much as the baseline's channels at the same count.

A baseline whose rounded points all lose to it (channel counts between two ratios) also gets a
``polished`` point: greedy single steps from its rounded-up point, first back within the budget,
then up while they fit (:func:`polish`). Block granularity cannot express the baselines'
per-layer choices, so there the front may stay below a baseline.

The best of all these points, grown by the same greedy steps while it fits, is added too
(``rounding: grown``).

Until the first generation is full, seeded random points from a sparse prior follow
(:func:`sparse_points`): a random suffix of the units, each updated with a random probability.
Uniform random points update most layers and almost never fit a small budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cost import CostModel
from ..criteria import Scores
from ..errors import BudgetSearchError
from ..plan import LayerUpdate
from ._objectives import Evaluator
from ._space import RATIOS, SearchSpace

__all__ = ["BASELINES", "Baseline", "baseline_plans", "sparse_points", "warm_points"]

#: (name, selector method, options) of the warm-start baselines.
BASELINES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("tinytrain", "tinytrain", {}),
    ("neq", "neq", {}),
    ("mit", "mit", {}),
    ("tinytl", "tinytl", {}),
    ("last-k", "last-k", {}),
    ("last-k-filtered", "last-k", {"blocks": True, "patch_size": 4}),
)


@dataclass
class Baseline:
    """One baseline's plan at the study's budget and its exact figures.

    Attributes:
        name: Baseline name.
        updates: Its per-layer updates (None if the method found no plan).
        metrics: proxy, memory_bytes, latency_ms, backward_macs, feasible (None without a plan).
        error: Why there is no plan (the method's message), else None.
        outside: Layers it updates that the space does not cover.
    """

    name: str
    updates: dict[str, LayerUpdate] | None
    metrics: dict[str, Any] | None
    error: str | None = None
    outside: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the updates)."""
        return {"metrics": self.metrics, "error": self.error, "outside": list(self.outside)}


def baseline_plans(
    *,
    evaluator: Evaluator,
    cost_model: CostModel,
    scores: Scores,
    seed: int = 0,
    names: tuple[str, ...] | None = None,
) -> list[Baseline]:
    """Run the baseline selectors at the evaluator's budgets and measure their plans.

    Args:
        evaluator: The study's evaluator (budgets, memory measure, proxy).
        cost_model: The cost model.
        scores: The study's scores.
        seed: Seed for the selectors.
        names: Restrict to these baselines (default all of :data:`BASELINES`).
    """
    from ..selectors import select

    out = []
    for name, method, options in BASELINES:
        if names is not None and name not in names:
            continue
        try:
            plan = select(method, cost_model=cost_model, scores=scores, seed=seed,
                          **evaluator.budget.kwargs(), **options)
        except BudgetSearchError as exc:
            out.append(Baseline(name, None, None, error=str(exc)))
            continue
        updates = dict(plan.updates)
        ev = evaluator.measure(updates)
        metrics = {"proxy": ev.proxy, "memory_bytes": ev.memory_bytes,
                   "latency_ms": ev.summary.latency_ms,
                   "backward_macs": ev.summary.backward_macs, "feasible": ev.feasible,
                   "layers": len(updates)}
        out.append(Baseline(name, updates, metrics,
                            outside=tuple(evaluator.space.outside(updates))))
    return out


def warm_points(evaluator: Evaluator, baselines: list[Baseline]) -> list[tuple[dict, dict]]:
    """The space points of the baselines, distinct per baseline: (params, user attributes).

    Each baseline gives its nearest point and its points rounded up and down; when none of these
    is feasible with at least the baseline's proxy (fine-grained channel counts, as NEq picks,
    fall between the ratios), also the ``polished`` point (:func:`polish`) grown from them.
    """
    space = evaluator.space
    points = []
    for b in baselines:
        if b.updates is None:
            continue
        seen: set[tuple] = set()  # per baseline: two baselines on one point keep a trial each
        good = False
        for rounding in ("nearest", "up", "down"):
            params = space.encode(b.updates, rounding=rounding)
            key = space.key(params)
            if key in seen:
                continue
            seen.add(key)
            points.append((params, {"baseline": b.name, "rounding": rounding}))
            ev = evaluator.evaluate(params)
            good |= ev.feasible and ev.proxy >= (b.metrics or {}).get("proxy", 0.0)
        if not good and b.metrics is not None and b.metrics["feasible"]:
            params = polish(evaluator, space.encode(b.updates, rounding="up"))
            if space.key(params) not in seen:
                points.append((params, {"baseline": b.name, "rounding": "polished"}))
    # the best point so far, grown greedily while it fits
    scored = [(evaluator.evaluate(p), p, a) for p, a in points]
    feasible = [(ev.proxy, -ev.memory_bytes, i) for i, (ev, _p, _a) in enumerate(scored)
                if ev.feasible]
    if feasible:
        _ev, params, attrs = scored[max(feasible)[2]]
        grown = polish(evaluator, params)
        if all(space.key(grown) != space.key(p) for p, _a in points):
            points.append((grown, {"baseline": attrs["baseline"], "rounding": "grown"}))
    return points


def polish(evaluator: Evaluator, params: Mapping[str, Any], *, max_steps: int = 64) -> dict:
    """A feasible point near ``params`` with as much proxy as greedy single steps give.

    Repair: while over budget, take the step (one unit's ratio down, or its patch size up) that
    saves the most memory per unit of proxy lost. Fill: then, while some step (one unit's ratio
    up, the bias depth up) stays feasible and raises the proxy, take the one that raises it most.
    Each step is one cost evaluation per candidate (cached).
    """
    space = evaluator.space
    cur = dict(params)
    now = evaluator.evaluate(cur)
    for _ in range(max_steps):
        if now.feasible:
            break
        best, best_score = None, -1.0
        for move in _moves(space, cur, down=True):
            ev = evaluator.evaluate(move)
            saved = now.memory_bytes - ev.memory_bytes
            if saved <= 0:
                continue
            score = saved / max(now.proxy - ev.proxy, 1e-12)
            if score > best_score:
                best, best_score = (move, ev), score
        if best is None:
            break
        cur, now = best
    for _ in range(max_steps):
        if not now.feasible:
            break
        best = None
        for move in _moves(space, cur, down=False):
            ev = evaluator.evaluate(move)
            if ev.feasible and ev.proxy > now.proxy and (
                    best is None or (ev.proxy, -ev.memory_bytes) > (best[1].proxy,
                                                                    -best[1].memory_bytes)):
                best = (move, ev)
        if best is None:
            break
        cur, now = best
    return cur


def _moves(space: SearchSpace, params: Mapping[str, Any], *, down: bool) -> list[dict]:
    out = []
    top = len(RATIOS) - 1
    for unit in space.units:
        r = int(params[f"r:{unit.name}"])
        if down and r > 0:
            out.append({**params, f"r:{unit.name}": unit.step(r, -1)})
            p = int(params.get(f"p:{unit.name}", 0))
            if p + 1 < len(unit.patches):
                out.append({**params, f"p:{unit.name}": p + 1})
        if not down and r < top:
            out.append({**params, f"r:{unit.name}": unit.step(r, 1)})
    depth = int(params["bias_depth"])
    if down and depth > 0:
        out.append({**params, "bias_depth": depth - 1})
    if not down and depth < len(space.bias_layers):
        out.append({**params, "bias_depth": depth + 1})
    return out


def sparse_points(space: SearchSpace, count: int, *, seed: int) -> list[dict]:
    """Seeded random points from the sparse prior (see the module docstring)."""
    rng = np.random.default_rng(seed)
    units = space.units
    out = []
    for _ in range(max(0, count)):
        suffix = int(rng.integers(1, len(units) + 1))
        p_on = float(rng.uniform(0.05, 0.5))
        params: dict[str, Any] = {}
        for i, unit in enumerate(units):
            on = i >= len(units) - suffix and rng.random() < p_on
            params[f"r:{unit.name}"] = unit.ratio(int(rng.integers(1, len(RATIOS)))) if on else 0
            params[f"a:{unit.name}"] = unit.axes[int(rng.integers(0, 2)) % len(unit.axes)]
            if len(unit.patches) > 1:
                params[f"p:{unit.name}"] = int(rng.integers(0, len(unit.patches)))
        params["bias_depth"] = int(rng.integers(0, len(space.bias_layers) + 1))
        out.append({p: params[p] for p in space.param_names})
    return out


def baseline_table(baselines: list[Baseline]) -> Mapping[str, dict[str, Any]]:
    """The baselines as a JSON-ready mapping (stored in the study, used by reports)."""
    return {b.name: b.to_dict() for b in baselines}
