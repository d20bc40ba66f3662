"""The selector registry, the selection context every method works in, and shared helpers.

A selection method is a function ``method(ctx, **options) -> Selection`` registered under a name
by :func:`register_method`, a decorator on the function (a name is registered once unless
``replace=True``). :func:`select` builds a :class:`SelectionContext` (cost model,
budgets, scores, seed, memory measure), calls the method, checks that the plan it returns fits
(measured with the cost model, not counted in parameters) and returns a :class:`~budgetsearch.plan.
Plan` carrying the device, budgets, batch size, optimizer, the predicted costs and its provenance.

Conventions shared by the methods:

- **The classifier** (the model's last trainable layer, the "head") is always updated by the
  budgeted methods. The ``head`` option says how: ``"weight"`` (weight and bias), ``"bias"``, or
  ``"auto"`` (the default: the weight if the head's weight alone fits, else its bias alone).
- **Infeasible budgets**: when not even the cheapest non-empty plan of a method fits, the method
  raises :class:`~budgetsearch.errors.BudgetError` stating that plan's memory in bytes and KB
  (``minimum_bytes`` set), and its latency when the latency budget is what fails.
- **Determinism**: methods are pure functions of the cost model, scores, budgets and options;
  ties are broken by layer order and channel index; only ``random`` draws, from ``seed``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._registry import Registry
from .._version import __version__
from ..budget import Budget, HasBudget
from ..choices import HEAD_MODES, MEMORY_MEASURES, HeadMode, MemoryMeasure
from ..cost import CostModel, CostSummary
from ..criteria import Scores
from ..errors import BudgetError, PlanError, ScoresError
from ..fingerprint import diff_layer_shapes
from ..graph import Layer, LayerGraph
from ..plan import LayerUpdate, Plan
from ..units import format_kb

__all__ = [
    "HEAD_MODES",
    "MEMORY_MEASURES",
    "MethodSpec",
    "Selection",
    "SelectionContext",
    "Updates",
    "channel_params",
    "format_kb",
    "get_method",
    "layer_macs",
    "list_methods",
    "register_method",
    "select",
]

#: Per-layer updates of a plan under construction, by layer name.
Updates = dict[str, LayerUpdate]


@dataclass
class Selection:
    """What a method returns: the updates and facts about how they were chosen.

    Attributes:
        updates: The per-layer updates.
        details: JSON-ready facts recorded in ``provenance["details"]`` (chosen depth, ratios...).
    """

    updates: Updates
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: Registry name.
        fn: ``fn(ctx, **options) -> Selection``.
        needs_scores: Whether the method refuses to run without scores.
        enforces_budget: Whether its plan must fit (``full`` only records whether it does).
        summary: One line for listings.
    """

    name: str
    fn: Callable[..., Selection]
    needs_scores: bool
    enforces_budget: bool
    summary: str

    def defaults(self) -> dict[str, Any]:
        """The method's options and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


#: The selection methods by name (case-insensitive).
_METHODS: Registry[MethodSpec] = Registry(
    "selection method", error=PlanError, normalize=lambda name: name.strip().lower())


def register_method(
    name: str,
    *,
    needs_scores: bool = False,
    enforces_budget: bool = True,
    summary: str = "",
    replace: bool = False,
) -> Callable[[Callable[..., Selection]], Callable[..., Selection]]:
    """Decorator registering ``fn(ctx, *, option=default, ...) -> Selection`` under ``name``.

    Args:
        name: The method's name (case-insensitive).
        needs_scores: Whether the method refuses to run without scores.
        enforces_budget: Whether its plan must fit (``full`` only records whether it does).
        summary: One line for listings.
        replace: Replace a method registered under the name.

    Raises:
        PlanError: If the name is taken and ``replace`` is false.
    """

    def decorate(fn: Callable[..., Selection]) -> Callable[..., Selection]:
        key = name.strip().lower()
        _METHODS.add(key, MethodSpec(key, fn, needs_scores, enforces_budget, summary),
                     replace=replace)
        return fn

    return decorate


def list_methods() -> list[str]:
    """Names of the registered selection methods, sorted."""
    return _METHODS.names()


def get_method(name: str) -> MethodSpec:
    """The registration of a method.

    Raises:
        PlanError: For an unknown name, listing the known ones.
    """
    return _METHODS[name]


def channel_params(layer: Layer) -> int:
    """Weight parameters of one output channel: ``C_in/G · K_h · K_w`` (``K²`` for a depthwise
    conv, ``C_in`` for a linear layer); the bias is not counted."""
    return int(np.prod(layer.weight_shape[1:]))


def layer_macs(graph: LayerGraph, layer: Layer) -> int:
    """Forward MACs of a layer for one sample: output positions times weight elements (a
    linear layer's positions are the dimensions between the batch and its features)."""
    node = graph.nodes[layer.node]
    shape = node.shape
    if node.kind == "linear":
        positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
    else:
        positions = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return positions * layer.weight_numel


class SelectionContext(HasBudget):
    """What a method works with: the cost model, the budget, the scores, the seed.

    Args:
        method: Name of the method (for messages).
        cost_model: The cost model plans are measured with.
        budget_bytes: Memory budget under ``memory_measure``, or None for no memory limit.
        latency_budget_ms: Latency budget per training step, or None.
        scores: Channel and layer scores of the model, or None.
        seed: Seed of any random draw.
        memory_measure: ``peak`` (peak memory of a step) or ``training`` (peak minus the
            inference peak: the extra memory training needs).

    Attributes:
        budget: The :class:`~budgetsearch.budget.Budget` the three budget arguments make
            (read back as ``budget_bytes``, ``latency_budget_ms`` and ``memory_measure``:
            :class:`~budgetsearch.budget.HasBudget`).

    Raises:
        PlanError: For an unknown memory measure or a negative budget.
        ScoresError: For scores made for another model.
    """

    def __init__(
        self,
        *,
        method: str,
        cost_model: CostModel,
        budget_bytes: int | None,
        latency_budget_ms: float | None,
        scores: Scores | None,
        seed: int,
        memory_measure: MemoryMeasure,
    ) -> None:
        self.budget = Budget(memory_bytes=budget_bytes, measure=memory_measure,
                             latency_ms=latency_budget_ms)
        self.method = method
        self.cost_model = cost_model
        self.graph: LayerGraph = cost_model.graph
        self.scores = scores
        self.seed = int(seed)
        names = list(self.graph.layers)
        if not names:
            raise PlanError("the model has no trainable layer")
        self.head = names[-1]
        self.body = names[:-1]
        self.evaluations = 0
        self._cache: dict[tuple, CostSummary] = {}
        if scores is not None and scores.fingerprint != self.graph.fingerprint:
            diff = diff_layer_shapes(dict(scores.shapes), dict(self.graph.layer_shapes))
            raise ScoresError(
                f"these {scores.criterion} scores were made for another model (fingerprint "
                f"{scores.fingerprint}, the model's is {self.graph.fingerprint}): "
                + "; ".join(diff)
            )

    # ----------------------------------------------------------------------------- measuring
    def cost(self, updates: Mapping[str, LayerUpdate]) -> CostSummary:
        """The cost model's summary of a set of updates (memoised)."""
        key = tuple(sorted(updates.items()))
        hit = self._cache.get(key)
        if hit is None:
            self.evaluations += 1
            hit = self._cache[key] = self.cost_model.summarize(dict(updates))
        return hit

    def memory(self, summary: CostSummary) -> int:
        """The memory figure the budget applies to."""
        return self.budget.memory(summary)

    def fits(self, updates: Mapping[str, LayerUpdate] | CostSummary) -> bool:
        """Whether a set of updates (or its summary) fits the memory and latency budgets."""
        summary = updates if isinstance(updates, CostSummary) else self.cost(updates)
        return self.budget.fits(summary)

    def largest_fitting(
        self, n: int, build: Callable[[int], Updates], *, lo: int = 0, gallop: bool = False
    ) -> int:
        """The largest ``m`` in ``lo..n`` whose ``build(m)`` fits, by bisection.

        Assumes the cost is monotone in ``m`` (true for growing prefixes of a ranked list) and
        that ``build(lo)`` fits; about ``log2(n - lo)`` evaluations. With ``gallop``, probes
        ``lo + 1, lo + 3, lo + 7...`` first (steps of 1, 2, 4... from the last fitting probe):
        about ``2·log2(answer - lo)`` evaluations, fewer when the answer is near ``lo``.
        """
        if n <= lo:
            return lo
        hi = n
        if gallop:
            step = 1
            while lo + step < n:
                if not self.fits(build(lo + step)):
                    hi = lo + step
                    break
                lo += step
                step *= 2
        if hi == n and self.fits(build(n)):
            return n
        # build(lo) fits, build(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.fits(build(mid)):
                lo = mid
            else:
                hi = mid
        return lo

    # ------------------------------------------------------------------------------- errors
    def infeasible(self, cheapest: Mapping[str, LayerUpdate], what: str) -> BudgetError:
        """The error for a budget below the method's cheapest non-empty plan ``cheapest``."""
        summary = self.cost(cheapest)
        return self.budget.too_small(need_bytes=self.budget.memory(summary),
                                     need_ms=summary.latency_ms, who=f"method {self.method}",
                                     cheapest=what)

    # ------------------------------------------------------------------------------- scores
    def require_scores(self, what: str) -> Scores:
        """The scores, or a clear error naming what they are needed for.

        Raises:
            ScoresError: If no scores were given.
        """
        if self.scores is None:
            raise ScoresError(
                f"method {self.method} needs scores ({what}); compute them with "
                "`budgetsearch score` or budgetsearch.criteria.get_criterion(...).score(model, "
                "data) and pass scores=..."
            )
        return self.scores

    # --------------------------------------------------------------------------------- head
    def head_candidates(self, mode: HeadMode) -> list[tuple[str, Updates]]:
        """The head's possible updates under a ``head`` option, preferred first."""
        if mode not in HEAD_MODES:
            raise PlanError(f"head must be one of {', '.join(HEAD_MODES)}; got {mode!r}")
        has_bias = self.graph.layers[self.head].bias_param is not None
        weight = ("the classifier's weight and bias", {self.head: LayerUpdate("weight")})
        bias = ("the classifier's bias alone", {self.head: LayerUpdate("bias")})
        if mode == "bias" and not has_bias:
            raise PlanError(f"head bias: the classifier {self.head} has no bias to train alone; "
                            "use head weight or auto")
        if mode == "weight" or not has_bias:
            return [weight]
        return [bias] if mode == "bias" else [weight, bias]

    def start_with_head(self, mode: HeadMode) -> tuple[Updates, str]:
        """The head's updates that fit, preferring the weight (``auto``); and ``weight`` or
        ``bias``.

        Raises:
            BudgetError: If the cheapest head update does not fit.
        """
        candidates = self.head_candidates(mode)
        for _what, updates in candidates:
            if self.fits(updates):
                return dict(updates), updates[self.head].mode
        what, cheapest = candidates[-1]
        raise self.infeasible(cheapest, what)


def select(
    method: str,
    *,
    cost_model: CostModel,
    budget_bytes: int | None,
    latency_budget_ms: float | None = None,
    scores: Scores | None = None,
    seed: int = 0,
    memory_measure: MemoryMeasure = "peak",
    **options: Any,
) -> Plan:
    """Choose which layers and channels to train under a memory (and latency) budget.

    Args:
        method: One of :func:`list_methods`.
        cost_model: The cost model of the model on the device; plans are measured with it.
        budget_bytes: Memory budget in bytes under ``memory_measure``; None for no memory limit.
        latency_budget_ms: Latency budget per training step, or None.
        scores: Scores of the model (Fisher, NEq, magnitude...), for the methods that use them.
        seed: Seed of random draws (method ``random``).
        memory_measure: ``peak`` (the step's peak memory) or ``training`` (peak minus the
            inference peak).
        **options: Options of the method (see each method's docstring).

    Returns:
        The plan, with ``predicted`` (the cost summary) and ``provenance`` (method, options,
        seed, version, and method-specific ``details``).

    Raises:
        PlanError: Unknown method or option.
        ScoresError: Missing scores, or scores made for another model.
        BudgetError: The budget is below the method's cheapest non-empty plan.

    Example:
        TinyTrain's choice for MCUNet on an STM32F746 with 64 KB of training memory (what a
        step needs beyond inference), ranking channels by weight magnitude:

        >>> import torch
        >>> from budgetsearch import CostModel, LayerGraph, load_model, load_profile, select
        >>> from budgetsearch.criteria import magnitude_scores
        >>> _ = torch.manual_seed(0)  # the new classifier's weights, hence its scores
        >>> model = load_model("mcunet-5fps", num_classes=10)
        >>> cost_model = CostModel(LayerGraph.from_model(model, input_size=128),
        ...                        load_profile("stm32f746"))
        >>> plan = select("tinytrain", cost_model=cost_model, budget_bytes=64 * 1024,
        ...               scores=magnitude_scores(model), memory_measure="training")
        >>> plan.provenance["fits"], plan.provenance["memory_bytes"]
        (True, 65470)
        >>> len(plan.updated_layers), plan.updated_layers[-1]
        (11, 'classifier')
    """
    spec = get_method(method)
    defaults = spec.defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "none"
        raise PlanError(f"method {spec.name}: unknown option(s) {', '.join(unknown)}; "
                        f"accepted: {accepted}")
    ctx = SelectionContext(
        method=spec.name, cost_model=cost_model, budget_bytes=budget_bytes,
        latency_budget_ms=latency_budget_ms, scores=scores, seed=seed,
        memory_measure=memory_measure,
    )
    if spec.needs_scores:
        ctx.require_scores(spec.summary or "channel scores")
    selection = spec.fn(ctx, **options)
    summary = ctx.cost(selection.updates)
    fits = ctx.fits(summary)
    if spec.enforces_budget and not fits:  # a method bug, never a user error
        raise AssertionError(f"method {spec.name} returned a plan that does not fit the budget")
    provenance = {
        "method": spec.name,
        "options": _jsonable({**defaults, **options}),
        "seed": ctx.seed,
        "budgetsearch_version": __version__,
        "memory_measure": memory_measure,
        "accounting": cost_model.acc.name,
        "bn_train": bool(cost_model.bn_train),
        "memory_bytes": ctx.memory(summary),
        "fits": bool(fits),
        "scores": None if scores is None else {
            "criterion": scores.criterion, "fingerprint": scores.fingerprint},
        "cost_evaluations": ctx.evaluations,
        "details": _jsonable(selection.details),
    }
    return Plan.from_layers(
        ctx.graph,
        selection.updates,
        device=cost_model.profile.name,
        memory_budget_bytes=budget_bytes,
        latency_budget_ms=latency_budget_ms,
        batch_size=cost_model.batch,
        optimizer=cost_model.optimizer,
        predicted=dataclasses.asdict(summary),
        provenance=provenance,
    )


def _jsonable(value: Any) -> Any:
    """Tuples to lists, numpy scalars to Python numbers, paths to strings, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
