"""Local search around the best feasible trials, interleaved with the sampler's trials.

NSGA-II's uniform crossover and rare random mutations explore well but refine slowly: a plan one
step away from the best one (a layer one ratio up, a gradient filter one size coarser, one layer
down and another up) is seldom proposed. Every ``period`` trials the loop therefore enqueues
``count`` neighbours of the current elite (the best feasible trials by proxy, and one random point
of the feasible front), each one to two random single steps away. They are ordinary trials of the
study: evaluated, stored, and parents of later NSGA-II generations when they are good. The random
draws are seeded, so a run stays reproducible.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._space import AXES, RATIOS, SearchSpace

__all__ = ["LocalSearch", "neighbour"]

_TOP = len(RATIOS) - 1


class LocalSearch:
    """Keeps the elite and proposes neighbours of it.

    Args:
        space: The search space.
        seed: Seed of the random steps.
        period: Propose after every ``period`` trials.
        count: Neighbours per proposal.
        elites: How many best trials (by proxy) to keep.
    """

    def __init__(self, space: SearchSpace, *, seed: int, period: int, count: int,
                 elites: int = 3) -> None:
        self.space, self.period, self.count, self.size = space, max(1, period), count, elites
        self.rng = np.random.default_rng([seed, 7919])
        self._heap: list[tuple[float, float, int, dict]] = []  # (proxy, -memory, n, params)
        self._front: list[dict] = []
        self._n = 0

    def observe(self, params: Mapping[str, Any], values: tuple[float, ...] | list[float],
                feasible: bool) -> None:
        """Record a finished trial."""
        self._n += 1
        if not feasible:
            return
        item = (float(values[0]), -float(values[1]), self._n, dict(params))
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, item)
        elif item[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, item)
        self._front.append(item[3])
        if len(self._front) > 64:
            self._front = self._front[-64:]

    def due(self, made: int) -> bool:
        """Whether a proposal is due after ``made`` trials of this process."""
        return made % self.period == 0 and bool(self._heap)

    def propose(self) -> list[dict]:
        """Neighbours of the elite (the best first)."""
        elite = [p for *_rest, p in sorted(self._heap, reverse=True)]
        if self._front:
            elite.append(self._front[int(self.rng.integers(len(self._front)))])
        out = []
        for i in range(self.count):
            base = elite[0] if i < self.count // 2 else elite[i % len(elite)]
            steps = 1 + int(self.rng.random() < 0.4)
            out.append(neighbour(self.space, base, self.rng, steps=steps))
        return out


def neighbour(space: SearchSpace, params: Mapping[str, Any], rng: np.random.Generator, *,
              steps: int = 1) -> dict:
    """``params`` changed by ``steps`` random single steps."""
    p = dict(params)
    units = space.units
    for _ in range(steps):
        active = [u for u in units if int(p[f"r:{u.name}"]) > 0]
        kind = rng.random()
        if kind < 0.35 or not active:  # one unit's ratio up
            u = units[int(rng.integers(len(units)))]
            p[f"r:{u.name}"] = min(_TOP, u.step(int(p[f"r:{u.name}"]), 1))
        elif kind < 0.5:  # one unit's ratio down
            u = active[int(rng.integers(len(active)))]
            p[f"r:{u.name}"] = u.step(int(p[f"r:{u.name}"]), -1)
        elif kind < 0.7:  # swap: one down, another up
            u = active[int(rng.integers(len(active)))]
            p[f"r:{u.name}"] = u.step(int(p[f"r:{u.name}"]), -1)
            v = units[int(rng.integers(len(units)))]
            p[f"r:{v.name}"] = min(_TOP, v.step(int(p[f"r:{v.name}"]), 1))
        elif kind < 0.85:  # a gradient filter one size finer or coarser
            options = [u for u in active if len(u.patches) > 1]
            if options:
                u = options[int(rng.integers(len(options)))]
                key = f"p:{u.name}"
                p[key] = int(np.clip(int(p[key]) + (1 if rng.random() < 0.5 else -1), 0,
                                     len(u.patches) - 1))
        elif kind < 0.95:  # the other channel axis (where the unit has two)
            u = active[int(rng.integers(len(active)))]
            if len(u.axes) > 1:
                p[f"a:{u.name}"] = AXES[1 - AXES.index(p[f"a:{u.name}"])]
        else:  # bias depth
            step = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
            p["bias_depth"] = int(np.clip(int(p["bias_depth"]) + step, 0,
                                          len(space.bias_layers)))
    return p
