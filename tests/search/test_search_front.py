"""Pareto front, hypervolume, pick rules, CSV and PNG output."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import create_trial

from budgetsearch.errors import SearchError
from budgetsearch.search import (
    FrontTracker,
    front_csv,
    hypervolume,
    pareto_front,
    pick,
    plot_front,
    trials_csv,
)
from budgetsearch.search._front import parse_pick

NAMES = ("proxy", "peak_memory_bytes", "latency_ms")


def _trial(number: int, proxy: float, memory: float, latency: float, ok: bool = True,
           baseline: str | None = None):
    t = create_trial(values=[proxy, memory, latency], params={"x": number % 5},
                     distributions={"x": IntDistribution(0, 4)},
                     system_attrs={"constraints:memory": -0.1 if ok else 0.2},
                     user_attrs={"baseline": baseline} if baseline else {})
    t.number = number
    return t


def _monte_carlo(points: np.ndarray, n: int = 200_000) -> float:
    rng = np.random.default_rng(0)
    samples = rng.random((n, 3))
    dominated = np.zeros(n, dtype=bool)
    for p in points:
        dominated |= np.all(samples >= p, axis=1)
    return float(dominated.mean())


def test_hypervolume_matches_monte_carlo() -> None:
    rng = np.random.default_rng(1)
    for k in (1, 3, 12):
        pts = rng.random((k, 3))
        assert hypervolume(pts) == pytest.approx(_monte_carlo(pts), abs=4e-3)
    assert hypervolume(np.zeros((0, 3))) == 0.0
    assert hypervolume(np.array([[0.0, 0.0, 0.0]])) == pytest.approx(1.0)
    assert hypervolume(np.array([[0.5, 0.5, 0.5]])) == pytest.approx(0.125)


def test_tracker_matches_batch_hypervolume() -> None:
    rng = np.random.default_rng(2)
    tr = FrontTracker(memory_ref=100.0, third_ref=10.0)
    pts = []
    for _ in range(60):
        v = (rng.random(), rng.random() * 100, rng.random() * 10)
        tr.add(v, True)
        pts.append((1 - v[0], v[1] / 100, v[2] / 10))
    tr.add((0.99, 1.0, 0.1), False)  # infeasible: ignored
    assert tr.hypervolume == pytest.approx(hypervolume(np.array(pts)))
    assert tr.best_proxy < 0.99 or tr.best_proxy == pytest.approx(max(1 - p[0] for p in pts))


def test_front_excludes_dominated_and_infeasible() -> None:
    trials = [_trial(0, 0.5, 100, 10), _trial(1, 0.4, 120, 12),  # 1 dominated by 0
              _trial(2, 0.6, 150, 10), _trial(3, 0.9, 50, 5, ok=False),
              _trial(4, 0.3, 40, 20)]
    assert [t.number for t in pareto_front(trials)] == [2, 0, 4]


def test_pick_rules() -> None:
    trials = [_trial(0, 0.500, 100, 10), _trial(1, 0.497, 60, 12), _trial(2, 0.490, 40, 8),
              _trial(3, 0.9, 10, 1, ok=False)]
    assert pick(trials).number == 0
    assert pick(trials, "min-memory-within 1%").number == 1
    assert pick(trials, "min-memory-within 2.5%").number == 2
    assert pick(trials, "min-latency-within 3%").number == 2
    assert parse_pick("min-memory") == ("min", "memory", 0.0)
    assert parse_pick("MIN-MEMORY-WITHIN 1 %") == ("min", "memory", 0.01)
    with pytest.raises(SearchError, match="unknown pick rule"):
        pick(trials, "max-fun")
    with pytest.raises(SearchError, match="no feasible trial"):
        pick([trials[3]])


def test_csv_and_png(tmp_path) -> None:
    trials = [_trial(i, 0.1 * (i % 7), 1000 * (i % 5 + 1), 3.0 + i, ok=i % 4 != 0,
                     baseline="mit" if i == 1 else None) for i in range(20)]
    front = list(csv.DictReader(io.StringIO(front_csv(trials, NAMES))))
    assert {int(r["number"]) for r in front} == {t.number for t in pareto_front(trials)}
    assert all(r["feasible"] == "1" and r["pareto"] == "1" for r in front)
    assert "x" in front[0]
    rows = list(csv.DictReader(io.StringIO(trials_csv(trials, NAMES))))
    assert len(rows) == 20 and rows[1]["baseline"] == "mit"
    assert {"constraint_memory", "peak_memory_bytes"} <= set(rows[0])
    png = plot_front(tmp_path / "f" / "front.png", trials, names=NAMES, budget_bytes=4000,
                     baselines={"mit": {"metrics": {"proxy": 0.3, "memory_bytes": 3000}},
                                "neq": {"metrics": None, "error": "no plan"}},
                     chosen=pick(trials), title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob(".*"))  # no temporary file left behind
