"""What a plan must fit: a memory budget under a memory measure, and optionally a latency budget.

A :class:`Budget` is the one place that knows which figure of a cost a memory budget limits
(:data:`~budgetsearch.choices.MEMORY_MEASURES`: the step's ``peak`` memory, or its ``training``
memory, the peak minus the inference peak), whether a cost fits, and how to say why not. The
selectors, the search, the trainer's checks and the command line all measure plans through it, so
"budget too small" reads the same wherever it is raised.

Example:
    >>> from budgetsearch.budget import Budget
    >>> from budgetsearch.cost import CostSummary
    >>> budget = Budget(memory_bytes=64 * 1024, measure="training", latency_ms=50.0)
    >>> summary = CostSummary(peak_memory_bytes=150_000, training_memory_bytes=60_000,
    ...                       saved_activation_bytes=40_000, forward_macs=10**7,
    ...                       backward_macs=2 * 10**7, latency_ms=42.0, trainable_params=3_000,
    ...                       backward_ms=20.0)
    >>> budget.memory(summary), budget.fits(summary)
    (60000, True)
    >>> small = Budget(memory_bytes=50_000)
    >>> small.fits(summary)
    False
    >>> print(small.why_not(summary))
    it needs 150000 bytes (146.5 KB) of peak memory, over the memory budget of 50000 bytes (48.9 KB)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .choices import MEMORY_MEASURES, MemoryMeasure
from .errors import BudgetError, PlanError
from .units import format_kb

if TYPE_CHECKING:
    from .cost import Cost, CostSummary
    from .plan import Plan

__all__ = ["Budget", "HasBudget"]

#: The field of a cost summary each memory measure reads.
_FIELDS: dict[MemoryMeasure, str] = {
    "peak": "peak_memory_bytes",
    "training": "training_memory_bytes",
}


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What a plan must fit.

    Attributes:
        memory_bytes: The memory budget in bytes, or None for no memory limit.
        measure: The memory figure the budget limits: ``peak`` (the step's peak memory) or
            ``training`` (the peak minus the inference peak: the extra memory training needs).
        latency_ms: The latency budget per training step in milliseconds, or None.

    Raises:
        PlanError: For an unknown measure, or a negative (or not-a-number) budget.
    """

    memory_bytes: int | None = None
    measure: MemoryMeasure = "peak"
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if self.measure not in MEMORY_MEASURES:
            raise PlanError(f"memory_measure must be one of {', '.join(MEMORY_MEASURES)}; got "
                            f"{self.measure!r}")
        if self.memory_bytes is not None:
            if not _number(self.memory_bytes) or not self.memory_bytes >= 0:
                raise PlanError(f"the memory budget must be a finite number of bytes >= 0; got "
                                f"{self.memory_bytes!r}")
            object.__setattr__(self, "memory_bytes", int(self.memory_bytes))
        if self.latency_ms is not None:
            try:
                latency = float(self.latency_ms) if _number(self.latency_ms) else math.nan
            except OverflowError:  # an integer past any float
                latency = math.inf
            if not 0 <= latency < math.inf:
                raise PlanError(f"the latency budget must be a finite number of ms >= 0; got "
                                f"{self.latency_ms!r}")
            object.__setattr__(self, "latency_ms", latency)

    @classmethod
    def from_plan(cls, plan: Plan) -> Budget:
        """The budget a plan was made for: its memory and latency budgets, and the memory
        measure its provenance records (``peak`` when it records none)."""
        return cls(memory_bytes=plan.memory_budget_bytes,
                   measure=plan.provenance.get("memory_measure", "peak"),
                   latency_ms=plan.latency_budget_ms)

    def kwargs(self) -> dict[str, Any]:
        """The budget as the keyword arguments of :func:`~budgetsearch.selectors.select` and
        :class:`~budgetsearch.search.Search`: ``budget_bytes``, ``latency_budget_ms`` and
        ``memory_measure``."""
        return {"budget_bytes": self.memory_bytes, "latency_budget_ms": self.latency_ms,
                "memory_measure": self.measure}

    # ---------------------------------------------------------------------------- measuring
    @property
    def field(self) -> str:
        """The name of the cost-summary field the memory budget limits
        (``peak_memory_bytes`` or ``training_memory_bytes``)."""
        return _FIELDS[self.measure]

    @property
    def label(self) -> str:
        """The measured memory in words: ``peak memory`` or ``training memory``."""
        return f"{self.measure} memory"

    def memory(self, cost: CostSummary | Cost | Mapping[str, Any]) -> int:
        """The memory figure the budget limits, read from a cost summary, a full cost or a
        plan's ``predicted`` mapping."""
        if isinstance(cost, Mapping):
            return int(cost[self.field])
        return int(getattr(cost, self.field))

    def fits_memory(self, cost: CostSummary | Cost | Mapping[str, Any]) -> bool:
        """Whether the cost's memory is within the memory budget (always, without one)."""
        return self.memory_bytes is None or self.memory(cost) <= self.memory_bytes

    def fits_latency(self, cost: CostSummary | Cost | Mapping[str, Any]) -> bool:
        """Whether the cost's latency per step is within the latency budget (always, without
        one)."""
        return self.latency_ms is None or _latency(cost) <= self.latency_ms

    def fits(self, cost: CostSummary | Cost | Mapping[str, Any]) -> bool:
        """Whether the cost is within the memory and the latency budgets."""
        return self.fits_memory(cost) and self.fits_latency(cost)

    def excess(self, cost: CostSummary | Cost | Mapping[str, Any]) -> dict[str, float]:
        """How far the cost is over each budget, relative to it: ``(used - budget) / budget``
        under ``memory`` and ``latency`` (only the budgets that are set); a value <= 0 fits.

        These are the search's constraint values.
        """
        out: dict[str, float] = {}
        if self.memory_bytes is not None:
            out["memory"] = _relative(self.memory(cost), self.memory_bytes)
        if self.latency_ms is not None:
            out["latency"] = _relative(_latency(cost), self.latency_ms)
        return out

    # ------------------------------------------------------------------------------ messages
    def describe(self) -> str:
        """The budget in words, e.g. ``65536 bytes (64.0 KB) of training memory and 50 ms per
        step``."""
        parts = []
        if self.memory_bytes is not None:
            parts.append(f"{self.memory_bytes} bytes ({format_kb(self.memory_bytes)}) of "
                         f"{self.label}")
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:.4g} ms per step")
        return " and ".join(parts) or "no limit"

    def why_not(self, cost: CostSummary | Cost | Mapping[str, Any]) -> str | None:
        """Why a cost does not fit, naming the figure, the measure and the budget it exceeds;
        None when it fits."""
        parts = []
        if not self.fits_memory(cost):
            used = self.memory(cost)
            parts.append(f"it needs {used} bytes ({format_kb(used)}) of {self.label}, over the "
                         f"memory budget of {self.memory_bytes} bytes "
                         f"({format_kb(self.memory_bytes or 0)})")
        if not self.fits_latency(cost):
            parts.append(f"it takes {_latency(cost):.4g} ms per step, over the latency budget "
                         f"of {self.latency_ms:.4g} ms")
        return "; ".join(parts) or None

    def too_small(
        self,
        *,
        need_bytes: int,
        need_ms: float | None = None,
        who: str,
        cheapest: str | None = None,
    ) -> BudgetError:
        """The error for a budget below what every non-empty plan needs ("budget too small").

        Args:
            need_bytes: The least memory, under this budget's measure, a non-empty plan needs:
                the minimum feasible memory budget (the error's ``minimum_bytes``).
            need_ms: The least latency per step a non-empty plan needs, when known.
            who: What could not make a plan, e.g. ``method neq`` or ``the search space``.
            cheapest: What the cheapest non-empty plan is, e.g. ``the classifier's bias alone``.

        Returns:
            The error (to raise), naming the budget exceeded, the measure and the bytes (and the
            milliseconds) needed.
        """
        need_bytes = int(need_bytes)
        over = []
        if self.memory_bytes is not None and need_bytes > self.memory_bytes:
            over.append(f"the memory budget of {self.memory_bytes} bytes "
                        f"({format_kb(self.memory_bytes)}) of {self.label}")
        latency_over = (self.latency_ms is not None and need_ms is not None
                        and need_ms > self.latency_ms)
        if latency_over:
            over.append(f"the latency budget of {self.latency_ms:.4g} ms per step")
        message = (f"{who}: no plan fits {' and '.join(over) or 'the budget'}; a non-empty plan "
                   f"needs at least {need_bytes} bytes ({format_kb(need_bytes)}) of {self.label}")
        if need_ms is not None and self.latency_ms is not None:
            message += f" and {need_ms:.4g} ms per step"
        if cheapest:
            message += f" (the cheapest: {cheapest})"
        message += (f"; the minimum feasible memory budget is {need_bytes} bytes "
                    f"({format_kb(need_bytes)})")
        if latency_over:
            message += f", the minimum feasible latency budget {need_ms:.4g} ms"
        return BudgetError(message, minimum_bytes=need_bytes)


class HasBudget:
    """The budget's figures under the names of the older keyword arguments, read from a
    :class:`Budget` held in ``self.budget``: what the search's evaluator and the selectors'
    selection context keep for their callers (``budget_bytes``, ``latency_budget_ms`` and
    ``memory_measure``, the arguments of :meth:`Budget.kwargs`).

    Example:
        >>> from budgetsearch.budget import Budget, HasBudget
        >>> class Holder(HasBudget):
        ...     def __init__(self, budget: Budget) -> None:
        ...         self.budget = budget
        >>> h = Holder(Budget(memory_bytes=1024, measure="training"))
        >>> h.budget_bytes, h.latency_budget_ms, h.memory_measure
        (1024, None, 'training')
    """

    budget: Budget

    @property
    def budget_bytes(self) -> int | None:
        """The memory budget in bytes (:attr:`budget`), or None."""
        return self.budget.memory_bytes

    @property
    def latency_budget_ms(self) -> float | None:
        """The latency budget per step (:attr:`budget`), or None."""
        return self.budget.latency_ms

    @property
    def memory_measure(self) -> MemoryMeasure:
        """The memory figure the budget limits (:attr:`budget`)."""
        return self.budget.measure


def _latency(cost: CostSummary | Cost | Mapping[str, Any]) -> float:
    if isinstance(cost, Mapping):
        return float(cost["latency_ms"])
    return float(cost.latency_ms)


def _relative(used: float, limit: float) -> float:
    """``(used - limit) / limit``; for a zero limit, 0 when nothing is used, else infinity."""
    if limit:
        return (used - limit) / limit
    return 0.0 if used <= 0 else math.inf


def _number(value: Any) -> bool:
    """A finite real number (an integer of any size, NumPy's included, or a float that is not
    inf or NaN), not a bool. An integer too large for a float is finite: ``math.isfinite``
    would overflow on it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)
