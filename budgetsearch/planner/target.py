"""Plans for another training runtime: what ``plan --target`` checks before any work and which
race candidates it keeps.

Under target ``tte`` every plan the planner can hand out must export with ``budgetsearch export
--format tte`` (:func:`~budgetsearch.export.to_tte`): the search runs on the space that keeps to
the engine (:class:`~budgetsearch.search.SpaceOptions` ``target="tte"``), the model must be one
of the MCU models the engine indexes and the cost model must be at batch 1 (the engine's), and
every race candidate, baselines included, is judged by the exporter itself: one it refuses is
left out of the race, with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..choices import PLAN_TARGETS, PlanTarget
from ..cost import CostModel
from ..errors import BudgetSearchError, PlanError
from ..plan import LayerUpdate, Plan

__all__ = ["check_target", "resolve_target", "target_problem"]


def resolve_target(target: str | None, space: Any) -> PlanTarget:
    """The target of a plan from the ``target`` argument and the search space's option.

    Raises:
        PlanError: An unknown target (listing the known ones), or one that contradicts the
            space's.
    """
    if target is not None and target not in PLAN_TARGETS:
        raise PlanError(f"unknown target {target!r}; known: {', '.join(PLAN_TARGETS)}")
    given = getattr(space, "target", None)
    if target is not None and given not in (None, "pytorch", target):
        raise PlanError(f"target {target!r} contradicts the search space's target {given!r}")
    chosen = target or given or "pytorch"
    assert chosen in PLAN_TARGETS
    return chosen  # type: ignore[return-value]


def check_target(target: PlanTarget, *, cost_model: CostModel,
                 mcu_dir: str | os.PathLike[str] | None = None,
                 batch_name: str = "the cost model's batch size") -> None:
    """Refuse, before any work, a model or a batch size the target's runtime cannot train.

    Args:
        target: The target.
        cost_model: The cost model the plan is made for (its graph names the model).
        mcu_dir: The MCU model files, when not the shipped ones.
        batch_name: How the error names the batch size (the command line passes its flag).

    Raises:
        PlanError: Under ``tte``: a model that is not an MCU model of the engine, or a batch
            size other than 1.
    """
    if target != "tte":
        return
    from ..models import mcu_conv_names

    name = cost_model.graph.model_name
    try:
        if not name:
            raise PlanError("the model has no name")
        mcu_conv_names(name, mcu_dir=mcu_dir)
    except BudgetSearchError as exc:
        raise PlanError(f"target tte: model {name!r} is not an MCU model MIT's Tiny Training "
                        f"Engine takes ({exc}); models: mcunet-5fps, mbv2-w0.35, "
                        "proxyless-w0.3, or one in --mcu-dir") from exc
    if cost_model.batch != 1:
        raise PlanError(f"target tte: the engine trains at batch 1; {batch_name} is "
                        f"{cost_model.batch}")


def target_problem(target: PlanTarget, updates: Mapping[str, LayerUpdate], *,
                   search: Any, mcu_dir: str | os.PathLike[str] | None = None) -> str | None:
    """Why the target's runtime cannot train these updates (the exporter's refusal), or None.

    Args:
        target: The target (``pytorch`` takes every plan).
        updates: A plan's updates.
        search: The :class:`~budgetsearch.search.Search` (its graph and cost model).
        mcu_dir: The MCU model files, when not the shipped ones.
    """
    if target != "tte":
        return None
    from ..errors import ExportError
    from ..export.tte import to_tte

    plan = Plan.from_layers(search.graph, dict(updates), batch_size=search.cost_model.batch)
    try:
        to_tte(plan, mcu_dir=mcu_dir)
    except ExportError as exc:  # without the exporter's list of the plans it takes
        return str(exc).split(" (plans it takes:")[0]
    return None
