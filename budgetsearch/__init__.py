"""budgetsearch: plan sparse, gradient-filtered on-device training that fits a device's budget.

The data flow goes one way: a model is traced into a :class:`LayerGraph`; a device profile is
loaded with :func:`load_profile`; a :class:`Plan` says which layers and channels to update and with
which gradient filter; a :class:`CostModel` says what one training step of a plan costs on the
device, per layer and in total. :func:`plan_for` makes the plan that trains best for a model, its
data and a :class:`Budget` (the search, then a race of the best candidates on a validation
split); it is imported on first use, with the search and Optuna behind it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .budget import Budget
from .cost import Cost, CostModel, CostSummary, register_rule
from .errors import (
    BudgetError,
    BudgetSearchError,
    CostError,
    DataError,
    GraphError,
    ModelError,
    PlanError,
    ProfileError,
    ScoresError,
    SearchError,
    TrainingError,
)
from .graph import Layer, LayerGraph, OpNode
from .models import list_models, load_model, register_model
from .plan import LayerUpdate, Plan, load_plan
from .profiles import DeviceProfile, list_profiles, load_profile
from .selectors import list_methods, mit_memory_bytes, select
from .trainer import PlanHandle, Trainer, apply_plan, remove_plan

if TYPE_CHECKING:
    from .planner import PlanData, PlanOutcome, plan_for

__all__ = [
    "Budget",
    "BudgetError",
    "BudgetSearchError",
    "Cost",
    "CostError",
    "CostModel",
    "CostSummary",
    "DataError",
    "DeviceProfile",
    "GraphError",
    "Layer",
    "LayerGraph",
    "LayerUpdate",
    "ModelError",
    "OpNode",
    "Plan",
    "PlanData",
    "PlanError",
    "PlanHandle",
    "PlanOutcome",
    "ProfileError",
    "ScoresError",
    "SearchError",
    "Trainer",
    "TrainingError",
    "__version__",
    "apply_plan",
    "list_methods",
    "list_models",
    "list_profiles",
    "load_model",
    "load_plan",
    "load_profile",
    "mit_memory_bytes",
    "plan_for",
    "register_model",
    "register_rule",
    "remove_plan",
    "select",
]

#: Names imported on first use (the planner imports the search, and Optuna with it).
_LAZY = {"plan_for": "planner", "PlanData": "planner", "PlanOutcome": "planner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
