"""The Pareto front of a study: selection rules, hypervolume, CSV and PNG output.

Objectives are (proxy ↑, memory ↓, latency or MACs ↓). The front is the set of feasible trials
no other feasible trial dominates. The hypervolume is measured in normalised coordinates
``(1 − proxy, memory / memory_ref, third / third_ref)`` against the reference point (1, 1, 1), so
it lies in [0, 1]; ``memory_ref`` is the memory budget (or, without one, the memory of full
fine-tuning) and ``third_ref`` the latency budget (or the latency / MACs of full fine-tuning).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial

from .._io import atomic_open
from ..errors import SearchError

__all__ = [
    "FrontTracker",
    "feasible",
    "front_csv",
    "hypervolume",
    "pareto_front",
    "parse_pick",
    "pick",
    "plot_front",
    "trials_csv",
]

_PICK = re.compile(r"^min-(memory|latency|macs)(?:-within[\s=:]*([0-9]*\.?[0-9]+)\s*%)?$")


def feasible(trial: FrozenTrial) -> bool:
    """Whether a finished trial satisfies all its constraints."""
    return trial.values is not None and all(v <= 0 for v in trial.constraints.values())


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b: proxy (index 0) maximised, the others minimised."""
    better = (a[0] >= b[0]) and all(x <= y for x, y in zip(a[1:], b[1:], strict=True))
    return better and tuple(a) != tuple(b)


def pareto_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The feasible non-dominated trials, by decreasing proxy (ties: lower memory, number).

    Trials with identical values are all kept (they are the same point).
    """
    pool = sorted((t for t in trials if feasible(t)),
                  key=lambda t: (-t.values[0], t.values[1], t.values[2], t.number))
    front: list[FrozenTrial] = []
    for t in pool:
        if not any(_dominates(f.values, t.values) for f in front):
            front.append(t)
    return front


def hypervolume(points: np.ndarray) -> float:
    """Hypervolume of points in [0, 1]^3 (all minimised) against the reference (1, 1, 1).

    Args:
        points: An (n, 3) array; points outside the unit box are clipped to it.
    """
    p = np.clip(np.asarray(points, dtype=np.float64).reshape(-1, 3), 0.0, 1.0)
    if len(p) == 0:
        return 0.0
    p = p[np.argsort(p[:, 0], kind="stable")]
    zs = np.unique(p[:, 2])
    total = 0.0
    for i, z in enumerate(zs):
        top = zs[i + 1] if i + 1 < len(zs) else 1.0
        sub = p[p[:, 2] <= z]
        ymin = np.minimum.accumulate(sub[:, 1])
        xs = np.append(sub[:, 0], 1.0)
        area = float(np.sum(np.diff(xs) * (1.0 - ymin)))
        total += area * (top - z)
    return total


class FrontTracker:
    """Incremental front of normalised feasible points, for progress reports.

    Args:
        memory_ref: Memory normalisation (the budget).
        third_ref: Latency / MACs normalisation.
    """

    def __init__(self, *, memory_ref: float, third_ref: float) -> None:
        self.memory_ref, self.third_ref = float(memory_ref), float(third_ref)
        self.points: list[tuple[float, float, float]] = []
        self.best_proxy = -math.inf
        self._hv: float | None = 0.0

    def add(self, values: Sequence[float], is_feasible: bool) -> None:
        """Record one trial's values."""
        if not is_feasible:
            return
        self.best_proxy = max(self.best_proxy, float(values[0]))
        q = (1.0 - values[0], values[1] / self.memory_ref, values[2] / self.third_ref)
        if any(all(a <= b for a, b in zip(f, q, strict=True)) for f in self.points):
            return
        self.points = [f for f in self.points
                       if not all(a <= b for a, b in zip(q, f, strict=True))] + [q]
        self._hv = None

    @property
    def hypervolume(self) -> float:
        """Hypervolume of the points so far (cached)."""
        if self._hv is None:
            self._hv = hypervolume(np.array(self.points))
        return self._hv


def parse_pick(rule: str) -> tuple[str, str | None, float]:
    """Parse a selection rule: ``best``, or ``min-memory`` / ``min-latency`` / ``min-macs``
    optionally followed by ``-within X%`` (e.g. ``min-memory-within 1%``).

    Returns:
        (kind, objective, tolerance): ``("best", None, 0)`` or ``("min", "memory", 0.01)``.

    Raises:
        SearchError: For an unknown rule.
    """
    text = " ".join(str(rule).strip().lower().split())
    if text in ("best", "best-proxy", "max-proxy"):
        return "best", None, 0.0
    m = _PICK.match(text.replace(" ", "")) or _PICK.match(text)
    if not m:
        raise SearchError(
            f"unknown pick rule {rule!r}: use best, or min-memory / min-latency / min-macs with "
            "an optional -within X% (e.g. 'min-memory-within 1%')"
        )
    return "min", m.group(1), float(m.group(2) or 0) / 100.0


def pick(trials: Sequence[FrozenTrial], rule: str = "best") -> FrozenTrial:
    """Choose a trial: the best proxy among feasible trials, or the least memory / latency among
    feasible trials within a tolerance of the best proxy. Ties: higher proxy, lower memory, lower
    third objective, lower trial number.

    Raises:
        SearchError: If no trial is feasible, or the rule is unknown.
    """
    kind, objective, tol = parse_pick(rule)
    pool = [t for t in trials if feasible(t)]
    if not pool:
        raise SearchError("no feasible trial in the study: nothing to pick")
    best = max(t.values[0] for t in pool)
    order = lambda t: (-t.values[0], t.values[1], t.values[2], t.number)  # noqa: E731
    if kind == "best":
        return min(pool, key=order)
    floor = best - tol * abs(best)
    near = [t for t in pool if t.values[0] >= floor - 1e-15]
    col = 1 if objective == "memory" else 2
    return min(near, key=lambda t: (t.values[col], *order(t)))


def _rows(trials: Sequence[FrozenTrial], names: Sequence[str], with_params: bool) -> str:
    front = {t.number for t in pareto_front(trials)}
    params = sorted({p for t in trials for p in t.params}) if with_params else []
    cons = sorted({c for t in trials for c in t.constraints})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["number", *names, "feasible", "pareto", "baseline",
                *[f"constraint_{c}" for c in cons], *params])
    for t in sorted(trials, key=lambda t: t.number):
        if t.values is None:
            continue
        w.writerow([t.number, *(f"{v:.10g}" for v in t.values), int(feasible(t)),
                    int(t.number in front), t.user_attrs.get("baseline", ""),
                    *(f"{t.constraints.get(c, 0.0):.6g}" for c in cons),
                    *(t.params.get(p, "") for p in params)])
    return buf.getvalue()


def front_csv(trials: Sequence[FrozenTrial], names: Sequence[str]) -> str:
    """CSV of the front's trials: objective values, constraints and parameters."""
    return _rows(pareto_front(trials), names, with_params=True)


def trials_csv(trials: Sequence[FrozenTrial], names: Sequence[str]) -> str:
    """CSV of every finished trial: objective values, feasibility, front membership."""
    return _rows(list(trials), names, with_params=False)


def plot_front(
    path: str | Path,
    trials: Sequence[FrozenTrial],
    *,
    names: Sequence[str],
    budget_bytes: int | None = None,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    chosen: FrozenTrial | None = None,
    title: str | None = None,
) -> Path:
    """Memory vs proxy, front coloured by the third objective, budget line, baselines, chosen.

    Args:
        path: PNG file to write (atomically).
        trials: The study's finished trials.
        names: Objective names.
        budget_bytes: Memory budget (drawn as a vertical line).
        baselines: ``{name: {"metrics": {"proxy", "memory_bytes", ...}}}`` exact baseline plans.
        chosen: The chosen trial (a star).
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    done = [t for t in trials if t.values is not None]
    ok = [t for t in done if feasible(t)]
    bad = [t for t in done if not feasible(t)]
    kb = 1024.0
    # the axis spans the feasible region and the budget; far infeasible points are counted
    right = max([t.values[1] for t in ok] + [budget_bytes or 0]) * 1.25 / kb or None
    if bad:
        beyond = sum(t.values[1] / kb > right for t in bad) if right else 0
        label = f"infeasible ({len(bad)}" + (f", {beyond} beyond the axis)" if beyond else ")")
        ax.scatter([t.values[1] / kb for t in bad], [t.values[0] for t in bad], s=6,
                   marker="x", color="#d9a0a0", alpha=0.5, label=label, linewidths=0.6)
    if ok:
        ax.scatter([t.values[1] / kb for t in ok], [t.values[0] for t in ok], s=6,
                   color="#b0b0b0", alpha=0.6, label="feasible")
    front = pareto_front(done)
    third = "latency (ms)" if names[2].startswith("latency") else "backward MACs"
    if front:
        sc = ax.scatter([t.values[1] / kb for t in front], [t.values[0] for t in front],
                        c=[t.values[2] for t in front], cmap="viridis", s=28,
                        edgecolors="black", linewidths=0.4, label="Pareto front", zorder=3)
        fig.colorbar(sc, ax=ax, label=third)
    if budget_bytes:
        ax.axvline(budget_bytes / kb, color="crimson", linestyle="--", linewidth=1,
                   label=f"budget {budget_bytes / kb:.0f} KB")
    markers = "sD^vP<>hX"
    for i, (name, entry) in enumerate(sorted((baselines or {}).items())):
        m = (entry or {}).get("metrics")
        if not m:
            continue
        ax.scatter([m["memory_bytes"] / kb], [m["proxy"]], marker=markers[i % len(markers)],
                   s=60, facecolors="none", edgecolors=f"C{i % 10}", linewidths=1.5,
                   label=f"{name}", zorder=4)
    if chosen is not None and chosen.values is not None:
        ax.scatter([chosen.values[1] / kb], [chosen.values[0]], marker="*", s=220,
                   color="gold", edgecolors="black", zorder=5, label=f"chosen #{chosen.number}")
    ax.set_xlabel(f"{names[1].replace('_bytes', '').replace('_', ' ')} (KB)")
    ax.set_ylabel("proxy (captured potential)")
    ax.set_ylim(bottom=0)
    if right:
        left = min([t.values[1] for t in done] + [budget_bytes or math.inf]) / kb
        ax.set_xlim(left - 0.05 * (right - left), right)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return path
