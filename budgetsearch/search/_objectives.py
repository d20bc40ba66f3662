"""The accuracy proxy, the objectives and the budget constraints of the search.

**Proxy: captured potential.** For a trainable layer l let ``d`` be its output-channel scores raised
to the study's exponent α (Fisher potential Δ_o by default, so ``d_o = Δ_o^α``; α = 1 unless set),
``e`` its input-channel scores (``Δ`` of the tensor feeding it, docs/criteria.md, 'Input-channel
potential'), ``P_l = Σ_o d_o`` and β the bias credit (default 0.25). A plan captures, per layer:

- frozen: 0;
- bias only: ``β · P_l``;
- weight on output channels U (all when U is None): ``Σ_{o∈U} d_o + β · Σ_{o∉U} d_o``;
- weight on input channels C: ``P_l · (φ + β (1 − φ))`` with ``φ = Σ_{c∈C} e_c / Σ_c e_c`` (the
  share of the input's potential kept; ``|C| / C_in`` where ``e`` is undefined, i.e. the first
  layer); a depthwise conv's input channel c is its output channel c, so there it is as for U = C.

The proxy is the captured total divided by ``Σ_l P_l``: 0 for no update, 1 for full fine-tuning.

**Gradient filters.** A filtered weight update (patch size r) follows an approximate gradient, so
it captures less. Where the scores carry the channel potential under the filter (``d^(r)_o``,
the Fisher pass's ``LayerScores.filtered``, clipped to ``[0, Δ_o]``), a filtered update captures
``Σ_{o∈U} max(d^(r)_o, β·d_o) + β · Σ_{o∉U} d_o`` (its bias gradient is exact, so never less
than the bias credit), and an input-channel update ``P_l · (φ·ρ + β (1 − φ))`` with ``ρ`` the
layer's all-channel filtered share. Scores without filtered potentials (magnitude, random, NEq,
version-1 files) give a filtered update the credit of an unfiltered one, as before.

Why these credits: Δ_o is the Fisher information of a multiplicative gate on channel o
(docs/criteria.md, 'Fisher potential'). Scaling row o of the weight moves the output along that
gate, so updating the row captures at least Δ_o. A bias-only update moves the channel along an
additive direction whose Fisher the pass does not measure; β is that direction's assumed share of
Δ_o (TinyTL and the MIT contribution analysis show bias updates recover a large part, but not all,
of the gain): an assumption, recorded in every plan, settable per study. Column (input-channel)
updates touch every row partially; φ, the kept share of the input's own potential, is the
corresponding share.

The exponent α is a property of the objective, fixed for a study, not a searched parameter: within
a layer the proxy-optimal channels for a given count are the top ones by ``d`` whatever α, and an
exponent that varied per trial would make the proxy values of two trials incomparable.

**Objectives**: maximise the proxy; minimise memory (``peak``, or ``training`` = peak minus the
inference peak); minimise latency (ms) or backward MACs. **Constraints** (Optuna's
``trial.set_constraint``, feasible when ≤ 0): ``memory = (memory − budget) / budget`` and, with a
latency budget, ``latency = (latency − budget) / budget``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ..budget import Budget, HasBudget
from ..choices import MEMORY_MEASURES, THIRD_OBJECTIVES, MemoryMeasure, ThirdObjective
from ..cost import CostModel, CostSummary
from ..criteria import Scores
from ..errors import PlanError, ScoresError, SearchError
from ..graph import LayerGraph
from ..plan import LayerUpdate
from ._space import RATIOS, SearchSpace

__all__ = [
    "DIRECTIONS",
    "MEMORY_MEASURES",
    "THIRD_OBJECTIVES",
    "AccuracyModel",
    "Evaluation",
    "Evaluator",
    "ProxyModel",
    "channel_count",
]

DIRECTIONS = ("maximize", "minimize", "minimize")
_BIAS = LayerUpdate("bias")


def channel_count(ratio: float, n: int) -> int:
    """Channels kept at a ratio of n: ``round(ratio · n)``, at least 1."""
    return max(1, math.floor(ratio * n + 0.5))


class AccuracyModel:
    """What the search maximises: a number per plan that should rank plans as training does.

    Contract: :meth:`channels` decides which channels a ratio keeps (the same for every model
    of one study, so a parameter set always decodes to the same plan); :meth:`__call__` scores
    any set of layer updates and :meth:`score_choices` the decoded choices of a trial, with the
    same value for the same plan; :meth:`describe` is JSON-ready and goes into the study's
    configuration and the plan's provenance; ``name`` is how tables and plots call the value
    (``proxy`` for a proxy, ``predicted_accuracy`` for a prediction of accuracy).
    """

    name: str = "proxy"

    def channels(self, name: str, ratio_index: int, axis: str) -> tuple[int, ...] | None:
        """The channels a ratio keeps along an axis (None for all)."""
        raise NotImplementedError

    def __call__(self, updates: Mapping[str, LayerUpdate]) -> float:
        """The value of any set of updates."""
        raise NotImplementedError

    @cached_property
    def _decoded(self) -> dict[tuple[str, int, str, int], LayerUpdate]:
        return {}

    def decode(self, choices: Mapping[str, tuple[int, str, int, bool]]
               ) -> dict[str, LayerUpdate]:
        """The plan updates of a trial's choices, ``{layer: (ratio index, axis, patch, bias)}``
        (:meth:`~._space.SearchSpace.choices`): the kept channels by :meth:`channels`, all of
        them (None) as an update along ``out``; cached per layer choice."""
        out: dict[str, LayerUpdate] = {}
        for layer, (ri, axis, patch, bias) in choices.items():
            if ri > 0:
                key = (layer, ri, axis, patch)
                hit = self._decoded.get(key)
                if hit is None:
                    chans = self.channels(layer, ri, axis)
                    hit = self._decoded[key] = LayerUpdate(
                        "weight", channels=chans, axis=axis if chans is not None else "out",
                        patch_size=patch)
                out[layer] = hit
            elif bias:  # choices() marks only layers that have a bias
                out[layer] = _BIAS
        return out

    def score_choices(self, choices: Mapping[str, tuple[int, str, int, bool]]) -> float:
        """The value of a trial's choices; by default :meth:`__call__` of :meth:`decode`."""
        return self(self.decode(choices))

    def describe(self) -> dict[str, Any]:
        """JSON-ready definition."""
        raise NotImplementedError


class ProxyModel(AccuracyModel):
    """Captured-potential proxy of plans under one set of scores (see the module docstring).

    Args:
        graph: The traced model.
        scores: Per-channel scores of every trainable layer (Fisher potential by default).
        alpha: Exponent applied to every channel score.
        bias_credit: β, the share of a channel's score a bias-only update captures.

    Raises:
        ScoresError: Scores for another model, non-finite values, or no positive score at all.
    """

    def __init__(
        self, graph: LayerGraph, scores: Scores, *, alpha: float = 1.0, bias_credit: float = 0.25
    ) -> None:
        if scores.fingerprint != graph.fingerprint:
            raise ScoresError(
                f"these {scores.criterion} scores were made for another model (fingerprint "
                f"{scores.fingerprint}, the model's is {graph.fingerprint})"
            )
        if not alpha > 0:
            raise SearchError(f"alpha must be positive; got {alpha}")
        if not 0 <= bias_credit <= 1:
            raise SearchError(f"bias_credit must lie in [0, 1]; got {bias_credit}")
        self.graph, self.scores = graph, scores
        self.alpha, self.bias_credit = float(alpha), float(bias_credit)
        self.d: dict[str, np.ndarray] = {}
        self.e: dict[str, np.ndarray | None] = {}
        self.order: dict[tuple[str, str], np.ndarray] = {}
        self.potential: dict[str, float] = {}
        for name, layer in graph.layers.items():
            ls = scores[name]
            d = self._prepare(ls.out_channel, name)
            depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
            e = None if depthwise or ls.in_channel is None else self._prepare(ls.in_channel, name)
            self.d[name] = d
            self.e[name] = None if e is None or e.sum() <= 0 else e
            self.potential[name] = float(d.sum())
            self.order[(name, "out")] = _ranking(d)
            if depthwise:
                self.order[(name, "in")] = self.order[(name, "out")]
            elif self.e[name] is not None:
                self.order[(name, "in")] = _ranking(self.e[name])
            else:
                self.order[(name, "in")] = np.arange(layer.in_channels)
        self.df: dict[tuple[str, int], np.ndarray] = {}  # d under a filter, max(d^(r), β d)
        for name in graph.layers:
            for r, values in scores[name].filtered.items():
                floor = self.bias_credit * self.d[name]
                self.df[(name, r)] = np.maximum(self._prepare(values, name), floor)
        self.total = float(sum(self.potential.values()))
        if not self.total > 0:
            raise ScoresError(f"the {scores.criterion} scores are zero everywhere: no proxy")
        self._depthwise = {
            name: layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
            for name, layer in graph.layers.items()
        }
        # credit of (layer, ratio index, axis, patch) for ratio > 0, filled on first use
        self._credit: dict[tuple[str, int, str, int], float] = {}

    def _prepare(self, values: np.ndarray, name: str) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        if not np.isfinite(v).all():
            raise ScoresError(f"{name}: the {self.scores.criterion} scores are not all finite")
        return np.maximum(v, 0.0) ** self.alpha

    def channels(self, name: str, ratio_index: int, axis: str) -> tuple[int, ...] | None:
        """The channels a ratio keeps along an axis: the top ones by score (None for all)."""
        layer = self.graph.layers[name]
        n = layer.out_channels if axis == "out" else layer.in_channels
        k = channel_count(RATIOS[ratio_index], n)
        if k >= n:
            return None
        return tuple(sorted(int(c) for c in self.order[(name, axis)][:k]))

    def weight_credit(self, name: str, channels: tuple[int, ...] | None, axis: str,
                      patch_size: int = 1) -> float:
        """What a weight update of a layer on some channels, filtered with ``patch_size``
        (1: no filter), captures (unnormalised)."""
        d, beta, total = self.d[name], self.bias_credit, self.potential[name]
        kept_d = self.df.get((name, patch_size), d) if patch_size > 1 else d
        if channels is None:
            return float(kept_d.sum()) if kept_d is not d else total
        idx = np.asarray(channels, dtype=np.int64)
        if axis == "out" or self._depthwise[name]:
            return float(kept_d[idx].sum()) + beta * (total - float(d[idx].sum()))
        e = self.e[name]
        n_in = self.graph.layers[name].in_channels
        phi = len(idx) / n_in if e is None else float(e[idx].sum() / e.sum())
        rho = float(kept_d.sum()) / total if total > 0 else 1.0
        return total * (phi * rho + beta * (1.0 - phi))

    def table_credit(self, name: str, ratio_index: int, axis: str, bias: bool,
                     patch_size: int = 1) -> float:
        """Credit of a layer's choice in the search space (unnormalised)."""
        if ratio_index > 0:
            key = (name, ratio_index, axis, patch_size)
            hit = self._credit.get(key)
            if hit is None:
                hit = self._credit[key] = self.weight_credit(
                    name, self.channels(name, ratio_index, axis), axis, patch_size)
            return hit
        return self.bias_credit * self.potential[name] if bias else 0.0

    def score_choices(self, choices: Mapping[str, tuple[int, str, int, bool]]) -> float:
        """The proxy of a trial's choices, from the per-layer credit cache."""
        return sum(self.table_credit(n, ri, axis, bias, patch)
                   for n, (ri, axis, patch, bias) in choices.items()) / self.total

    def __call__(self, updates: Mapping[str, LayerUpdate]) -> float:
        """The proxy of any set of updates, in [0, 1]."""
        captured = 0.0
        for name, update in updates.items():
            if name not in self.potential:
                raise SearchError(f"the model has no trainable layer {name!r}")
            if update.mode == "weight":
                captured += self.weight_credit(name, update.channels, update.axis,
                                               update.patch_size)
            elif self.graph.layers[name].bias_param is not None:
                captured += self.bias_credit * self.potential[name]
        return captured / self.total

    def describe(self) -> dict[str, Any]:
        """JSON-ready definition of the proxy."""
        return {"criterion": self.scores.criterion, "alpha": self.alpha,
                "bias_credit": self.bias_credit, "normalised_by": self.total,
                "filtered_potential": sorted({r for _, r in self.df})}


def _ranking(values: np.ndarray) -> np.ndarray:
    """Indices by decreasing value, ties by index."""
    return np.lexsort((np.arange(len(values)), -values))


@dataclass(frozen=True)
class Evaluation:
    """One evaluated point: the objective values, constraints and costs."""

    proxy: float
    memory_bytes: int
    third: float
    summary: CostSummary
    constraints: dict[str, float]

    @property
    def values(self) -> tuple[float, float, float]:
        """(proxy, memory, latency or MACs), in the order of :data:`DIRECTIONS`."""
        return (self.proxy, float(self.memory_bytes), float(self.third))

    @property
    def feasible(self) -> bool:
        """Whether every constraint is satisfied."""
        return all(v <= 0 for v in self.constraints.values())


class Evaluator(HasBudget):
    """Parameters -> plan updates -> objective values and constraints, with a cache.

    Args:
        space: The search space.
        proxy: What is maximised: the Fisher proxy or a measured accuracy model.
        cost_model: The cost model plans are measured with.
        budget_bytes: Memory budget under ``memory_measure`` (None: unconstrained).
        latency_budget_ms: Latency budget per step (None: unconstrained).
        memory_measure: ``peak`` or ``training``.
        third: ``latency`` (ms) or ``macs`` (backward MACs) as the third objective.

    Attributes:
        budget: The :class:`~budgetsearch.budget.Budget` the three budget arguments make
            (read back as ``budget_bytes``, ``latency_budget_ms`` and ``memory_measure``:
            :class:`~budgetsearch.budget.HasBudget`).

    Raises:
        SearchError: For an unknown memory measure or third objective, or a budget that is not
            positive.
    """

    def __init__(
        self,
        *,
        space: SearchSpace,
        proxy: AccuracyModel,
        cost_model: CostModel,
        budget_bytes: int | None,
        latency_budget_ms: float | None = None,
        memory_measure: MemoryMeasure = "peak",
        third: ThirdObjective = "latency",
    ) -> None:
        if third not in THIRD_OBJECTIVES:
            raise SearchError(f"the third objective must be one of "
                              f"{', '.join(THIRD_OBJECTIVES)}; got {third!r}")
        for what, value in (("budget_bytes", budget_bytes), ("latency_budget_ms",
                                                              latency_budget_ms)):
            if value is not None and not value > 0:
                raise SearchError(f"{what} must be positive; got {value}")
        try:
            self.budget = Budget(memory_bytes=budget_bytes, measure=memory_measure,
                                 latency_ms=latency_budget_ms)
        except PlanError as exc:  # the search's own error class for its arguments
            raise SearchError(str(exc)) from exc
        self.space, self.proxy, self.cost_model = space, proxy, cost_model
        self.third = third
        self.cache: dict[tuple, Evaluation] = {}
        self.hits = 0

    @property
    def objective_names(self) -> tuple[str, str, str]:
        """Names of the three objectives."""
        return ("proxy", f"{self.memory_measure}_memory_bytes",
                "latency_ms" if self.third == "latency" else "backward_macs")

    def updates(self, params: Mapping[str, Any]) -> dict[str, LayerUpdate]:
        """The plan updates a parameter set decodes to (channels chosen by score)."""
        return self.proxy.decode(self.space.choices(params))

    def memory(self, summary: CostSummary) -> int:
        """The memory figure the budget applies to."""
        return self.budget.memory(summary)

    def measure(self, updates: Mapping[str, LayerUpdate], proxy: float | None = None) -> Evaluation:
        """Objective values and constraints of any set of updates (not cached)."""
        summary = self.cost_model.summarize(dict(updates))
        memory = self.memory(summary)
        third = summary.latency_ms if self.third == "latency" else summary.backward_macs
        constraints = self.budget.excess(summary)
        value = self.proxy(updates) if proxy is None else proxy
        return Evaluation(value, memory, float(third), summary, constraints)

    def evaluate(self, params: Mapping[str, Any]) -> Evaluation:
        """Objective values and constraints of a parameter set (cached by parameter values)."""
        key = self.space.key(params)
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        choices = self.space.choices(params)
        proxy = self.proxy.score_choices(choices)
        result = self.cache[key] = self.measure(self.proxy.decode(choices), proxy)
        return result

    def minimum(self) -> tuple[int, float]:
        """The least memory and the least latency of any non-empty plan of the space.

        Adding an update never lowers a cost, so the minimum is reached by a single-layer plan:
        one bias, or one weight at the smallest ratio, unfiltered or with the coarsest filter
        (the filter's saving grows with the patch size). Under target ``tte`` by the last conv's
        bias or the whole classifier (every other plan of that space contains one of them).
        """
        best_mem, best_lat = math.inf, math.inf
        atoms: list[dict[str, LayerUpdate]] = []
        if self.space.tte:
            # the engine's smallest plans: the last conv's bias (a run of one, which any run
            # or weight update of a conv contains), or the classifier updated whole
            if self.space.bias_layers:
                atoms.append({self.space.bias_layers[-1]: _BIAS})
            atoms += [self.proxy.decode({name: (unit.ratios[-1], unit.axes[0], 1, False)})
                      for unit in self.space.units for name in unit.layers
                      if name not in self.space.bias_layers]
        else:
            for unit in self.space.units:
                for name in unit.layers:
                    if name in self.space.bias_layers:
                        atoms.append({name: _BIAS})
                    patches = unit.layer_patches[name]
                    for axis in ("out", "in"):  # no filter, and the coarsest one
                        for patch in {patches[0], patches[-1]}:
                            atoms.append(self.proxy.decode({name: (1, axis, patch, False)}))
        for atom in atoms:
            s = self.cost_model.summarize(atom)
            best_mem = min(best_mem, self.memory(s))
            best_lat = min(best_lat, s.latency_ms)
        return int(best_mem), float(best_lat)

    def check_budgets(self) -> None:
        """Refuse budgets no non-empty plan of the space can meet.

        Raises:
            BudgetError: Naming the minimum feasible budget (``minimum_bytes`` set).
        """
        mem, lat = self.minimum()
        if not self.budget.fits({self.budget.field: mem, "latency_ms": lat}):
            raise self.budget.too_small(need_bytes=mem, need_ms=lat, who="the search space")
