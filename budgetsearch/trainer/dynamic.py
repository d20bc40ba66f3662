"""Dynamic plans: re-select the trained channels every K epochs under the same budget.

- ``neq`` (Quelennec et al., WACVW'24): every layer's output-channel velocities are recorded on a
  fixed probe set before training and after every epoch (:class:`~budgetsearch.criteria.NEqTracker`;
  velocities exist from the third record on, i.e. after epoch 2); at a re-selection the ``neq``
  selector ranks channels by ``|velocity|`` per parameter and fills the budget. Until velocities
  exist the initial plan is kept (the "static scheme" of epoch 0).
- ``fisher`` (TinyTrain-style): at a re-selection the Fisher potential is recomputed on a fixed
  subset of the training data with the current weights, and the ``tinytrain`` selector picks
  layers and top-K channels under the budget.

The budget is the plan's memory budget (or the one given) measured by the cost model of the plan's
device at the trainer's batch size, input size and optimizer, under the plan's memory measure. Both
selections run on the model with the plan removed (plain modules), then the new plan is applied.

Who picks the new plan (``method``): ``search``, a re-planning function the caller hands in
(``search_replan``, e.g. :func:`budgetsearch.search.replan`: seeded with the plan in use,
``search_trials`` trials, seed ``seed + epoch`` so a resumed run re-plans identically);
``selector``, the ``neq`` / ``tinytrain`` selector; ``auto`` (default), the search when a
re-planning function is given, else the selector. The trainer never imports the search: data
flows search -> plan -> trainer, and a caller above both (the CLI, the studies) connects them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..budget import Budget
from ..choices import MemoryMeasure
from ..cost import CostModel
from ..criteria import NEqTracker, fisher_potential
from ..criteria.base import preserved_state
from ..errors import BudgetError, PlanError, SearchError
from ..graph import LayerGraph
from ..plan import Plan

__all__ = ["DYNAMIC_MODES", "REPLAN_METHODS", "Replanner", "SearchReplan"]

DYNAMIC_MODES = ("neq", "fisher")
REPLAN_METHODS = ("auto", "search", "selector")

#: A re-planning function: keyword arguments ``cost_model``, ``scores``, ``previous`` (the plan in
#: use), ``trials``, ``seed`` and the budget's (:meth:`~budgetsearch.budget.Budget.kwargs`:
#: ``budget_bytes``, ``latency_budget_ms``, ``memory_measure``); returns a plan or raises
#: BudgetError / SearchError when nothing fits (:func:`budgetsearch.search.replan`).
SearchReplan = Callable[..., Plan]


class Replanner:
    """Re-selection state for one training run.

    Args:
        kind: ``"neq"`` or ``"fisher"``.
        cost_model: Cost model the selections are measured with.
        budget: The budget every selection fits (it needs a memory budget).
        probe: NEq's fixed probe inputs (``neq``).
        fisher_batches: Fixed ``(inputs, labels)`` batches for the Fisher pass (``fisher``).
        seed: Seed passed to the selector or the search.
        method: ``auto``, ``search`` or ``selector`` (see the module docstring).
        search_trials: Trials of each search re-plan.
        search_replan: The re-planning function of method ``search`` (:data:`SearchReplan`).
        budget_bytes: Deprecated: the memory budget, for ``budget``.
        memory_measure: Deprecated: the memory measure of ``budget_bytes``.

    Raises:
        PlanError: For an unknown kind or method, a missing memory budget, probe inputs or
            batches, or method ``search`` without a re-planning function.
    """

    def __init__(
        self,
        kind: str,
        *,
        cost_model: CostModel,
        budget: Budget | None = None,
        probe: Tensor | None = None,
        fisher_batches: Sequence[tuple[Tensor, Tensor]] = (),
        seed: int = 0,
        method: str = "auto",
        search_trials: int = 100,
        search_replan: SearchReplan | None = None,
        budget_bytes: int | None = None,
        memory_measure: MemoryMeasure | None = None,
    ) -> None:
        if budget_bytes is not None or memory_measure is not None:
            if budget is not None:
                raise PlanError("give budget= or the deprecated budget_bytes= and "
                                "memory_measure=, not both")
            warnings.warn("Replanner(budget_bytes=..., memory_measure=...) is deprecated: pass "
                          "budget=Budget(memory_bytes=..., measure=...)", DeprecationWarning,
                          stacklevel=2)
            budget = Budget(memory_bytes=budget_bytes, measure=memory_measure or "peak")
        if budget is None or budget.memory_bytes is None:
            raise PlanError("dynamic re-selection needs a memory budget: pass "
                            "budget=Budget(memory_bytes=...)")
        if method not in REPLAN_METHODS:
            raise PlanError(f"method must be one of {', '.join(REPLAN_METHODS)}; got {method!r}")
        if method == "search" and search_replan is None:
            raise PlanError("re-planning by search needs a re-planning function: pass "
                            "search_replan=budgetsearch.search.replan")
        if kind not in DYNAMIC_MODES:
            raise PlanError(f"dynamic must be one of {', '.join(DYNAMIC_MODES)}; got {kind!r}")
        if kind == "neq" and (probe is None or probe.shape[0] < 1):
            raise PlanError("dynamic neq needs probe inputs")
        if kind == "fisher" and not fisher_batches:
            raise PlanError("dynamic fisher needs batches for the Fisher pass")
        self.kind, self.cost_model, self.budget = kind, cost_model, budget
        self.probe, self.fisher_batches = probe, list(fisher_batches)
        self.seed, self.search_trials = seed, int(search_trials)
        self.search_replan = search_replan
        self.method = ("search" if search_replan is not None else "selector") \
            if method == "auto" else method
        self.tracker: NEqTracker | None = None
        self.history: list[dict[str, Any]] = []

    @property
    def budget_bytes(self) -> int:
        """The memory budget in bytes (:attr:`budget`)."""
        assert self.budget.memory_bytes is not None
        return self.budget.memory_bytes

    @property
    def memory_measure(self) -> MemoryMeasure:
        """The memory figure the budget limits (:attr:`budget`)."""
        return self.budget.measure

    # --------------------------------------------------------------------------------- NEq
    def start(self, model: nn.Module) -> None:
        """Create the NEq tracker on the plain model (before any plan is applied)."""
        if self.kind == "neq":
            assert self.probe is not None
            self.tracker = NEqTracker(model, self.probe)

    def record(self, model: nn.Module, graph: LayerGraph) -> None:
        """Record every layer's outputs on the probe set (NEq only; works with a plan applied)."""
        if self.tracker is None:
            return
        self.tracker.update(_layer_outputs(model, graph, self.probe))

    # ---------------------------------------------------------------------------- selection
    def replan(self, model: nn.Module, plan: Plan, *, epoch: int) -> Plan | None:
        """A new plan for the plain model, or None to keep ``plan`` (NEq velocities not ready yet,
        or no plan of the method fits). Records what happened in :attr:`history`."""
        if self.kind == "neq":
            assert self.tracker is not None
            if not self.tracker.ready:
                self._note(epoch, "kept", "NEq velocities need 3 records (after epoch 2)")
                return None
            scores, method = self.tracker.scores(), "neq"
        else:
            samples = sum(int(x.shape[0]) for x, _ in self.fisher_batches)
            scores = fisher_potential(model, self.fisher_batches, samples=samples)
            method = "tinytrain"
        try:
            if self.method == "search":
                assert self.search_replan is not None
                method = "search"
                new = self.search_replan(cost_model=self.cost_model, scores=scores,
                                         previous=plan, trials=self.search_trials,
                                         seed=self.seed + epoch, **self.budget.kwargs())
            else:
                from ..selectors import select

                new = select(method, cost_model=self.cost_model, scores=scores, seed=self.seed,
                             **self.budget.kwargs())
        except (BudgetError, SearchError) as exc:
            self._note(epoch, "kept", f"no {method} plan fits: {exc}")
            return None
        new = new.with_(filter_mode=plan.filter_mode,
                        provenance={**new.provenance, "dynamic": self.kind, "epoch": epoch})
        self._note(epoch, "replanned", f"{method}: {len(new.updates)} layers, "
                   f"{new.predicted.get('trainable_params', 0)} trainable parameters")
        return new

    def _note(self, epoch: int, action: str, why: str) -> None:
        self.history.append({"epoch": epoch, "action": action, "why": why})

    # --------------------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON state to checkpoint (the NEq records)."""
        meta: dict[str, Any] = {"kind": self.kind, "history": self.history}
        tensors: dict[str, Tensor] = {}
        if self.tracker is not None:
            t = self.tracker
            meta["records"] = t.records
            for prefix, table in (("previous", t._previous), ("phi", t.phi),
                                  ("velocity", t.velocity)):
                tensors.update({f"{prefix}/{name}": v for name, v in table.items()})
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.history = list(meta.get("history", []))
        if self.tracker is None:
            return
        t = self.tracker
        t.records = int(meta.get("records", 0))
        tables: dict[str, dict[str, Tensor]] = {"previous": {}, "phi": {}, "velocity": {}}
        for key, value in tensors.items():
            prefix, _, name = key.partition("/")
            if prefix in tables:
                tables[prefix][name] = value
        t._previous, t.phi, t.velocity = tables["previous"], tables["phi"], tables["velocity"]


@torch.no_grad()
def _layer_outputs(model: nn.Module, graph: LayerGraph, probe: Tensor,
                   batch_size: int = 32) -> dict[str, Tensor]:
    """Every trainable layer's output on ``probe`` as (N, C, D), looked up by name so that it
    works whether the plan's modules or the plain ones are in place (``preserved_state``
    suspends the epilogues fused into filtered convs, so a conv's output is its own)."""
    collected: dict[str, list[Tensor]] = {name: [] for name in graph.layers}

    def make(name: str, is_conv: bool):
        def hook(_module: nn.Module, _args: Any, out: Tensor) -> None:
            n = out.shape[0]
            if is_conv:
                maps = out.reshape(n, out.shape[1], -1)
            else:
                maps = out.reshape(n, -1, out.shape[-1]).transpose(1, 2)
            collected[name].append(maps.detach().clone())

        return hook

    handles = []
    try:
        for name, layer in graph.layers.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(make(name, len(layer.weight_shape) == 4)))
        with preserved_state(model, eval_mode=True):
            for start in range(0, probe.shape[0], batch_size):
                model(probe[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in collected.items() if parts}
