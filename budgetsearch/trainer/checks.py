"""Checks the trainer runs before training (data against the head, the plan against its budget,
settings), and the fixed data subsets of dynamic re-selection."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..budget import Budget
from ..choices import BN_MODES, FILTER_MODES, OPTIMIZERS
from ..cost import CostModel
from ..errors import BudgetError, DataError, PlanError
from ..graph import LayerGraph
from ..plan import Plan
from ..recipe import MAX_SEED
from .dynamic import DYNAMIC_MODES

__all__ = [
    "build_cost_model",
    "check_budget",
    "check_classes",
    "check_trainer_args",
    "dataset_classes",
    "fisher_batches",
    "probe_inputs",
]


def dataset_classes(data: Any) -> list[str] | None:
    """Class names of a data set (``.classes``, looking through ``Subset``), or None."""
    while isinstance(data, Subset) and getattr(data, "classes", None) is None:
        data = data.dataset
    classes = getattr(data, "classes", None)
    return [str(c) for c in classes] if classes is not None else None


def _num_classes(data: Any) -> int | None:
    classes = dataset_classes(data)
    if classes is not None:
        return len(classes)
    targets = getattr(data, "targets", None)
    if targets is not None and len(targets):
        return int(max(int(t) for t in targets)) + 1
    return None


def check_classes(train_data: Dataset, val_data: Dataset | None, graph: LayerGraph, *,
                  other: str = "validation") -> int:
    """The model's number of outputs, after checking the data sets against it.

    Args:
        train_data: The training data.
        val_data: The other data set (validation, or test with ``other="test"``), or None.
        graph: The model's layer graph.
        other: What the other data set is, for messages.

    Raises:
        DataError: If a data set has another number of classes than the head has outputs, or
            the validation classes differ from the training classes.
    """
    head = list(graph.layers)[-1]
    outputs = graph.layers[head].out_channels
    for what, data in (("training", train_data), (other, val_data)):
        if data is None:
            continue
        n = _num_classes(data)
        if n is not None and n != outputs:
            names = dataset_classes(data)
            shown = f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""
            raise DataError(
                f"the {what} data has {n} classes{shown} but the model's head ({head}) has "
                f"{outputs} outputs; build the model with num_classes={n} (--num-classes {n})"
            )
    a, b = dataset_classes(train_data), dataset_classes(val_data) if val_data is not None else None
    if a is not None and b is not None and a != b:
        diff = [f"{x} / {y}" for x, y in zip(a, b, strict=False) if x != y][:4]
        raise DataError(f"the {other} classes differ from the training classes (training / "
                        f"{other}: {'; '.join(diff)}); give both splits the same class folders")
    return outputs


def build_cost_model(
    plan: Plan,
    graph: LayerGraph,
    *,
    batch_size: int,
    optimizer: str,
    bn_train: bool,
    accounting: str = "device",
) -> CostModel | None:
    """The cost model of the plan's device at the trainer's settings, or None if the plan names
    no device."""
    if plan.device is None:
        return None
    from ..profiles import load_profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown-op warnings were shown when the plan was made
        return CostModel(graph, load_profile(plan.device), accounting=accounting,
                         batch_size=batch_size, optimizer=optimizer, bn_train=bn_train)


def check_budget(plan: Plan, cost_model: CostModel | None) -> dict[str, Any] | None:
    """Compare the plan's memory at the trainer's settings with the plan's budget.

    Returns:
        ``{"memory_bytes", "budget_bytes", "measure"}``, or None when the plan has no budget or
        device.

    Raises:
        BudgetError: If the step needs more memory than the budget, naming the batch size, the
            input size, the bytes needed and the plan's own settings. A plan that already did not
            fit at its own settings (``provenance.fits`` false, e.g. method ``full``) only warns
            when trained at those settings.
        PlanError: If the plan records an unknown memory measure.
    """
    # the latency on the training machine is not the device's: only the memory budget is checked
    budget = dataclasses.replace(Budget.from_plan(plan), latency_ms=None)
    if budget.memory_bytes is None or cost_model is None:
        return None
    summary = cost_model.summarize(dict(plan.updates))
    used = budget.memory(summary)
    info = {"memory_bytes": used, "budget_bytes": budget.memory_bytes, "measure": budget.measure}
    why = budget.why_not(summary)
    if why is None:
        return info
    size = tuple(cost_model.graph.input_shape[1:])
    same = cost_model.batch == plan.batch_size and size == tuple(plan.input_size)
    if same and plan.provenance.get("fits") is False:
        warnings.warn(f"the plan does not fit its own budget ({why}); training it anyway",
                      stacklevel=3)
        return info
    raise BudgetError(
        f"a training step at batch size {cost_model.batch}, input {_hw(size)} and optimizer "
        f"{cost_model.optimizer} does not fit the plan's memory budget on {plan.device}: {why}; "
        f"the plan was made for batch size {plan.batch_size} and input {_hw(plan.input_size)}. Use "
        "those settings, make a plan for these ones, or skip the check (check_budget=False, "
        "--ignore-budget)",
        minimum_bytes=used,
    )


def _hw(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


def check_trainer_args(t: Any) -> None:
    """Refuse out-of-range trainer settings.

    Raises:
        PlanError: Naming the setting and the accepted values.
    """
    if t.epochs < 1 or t.batch_size < 1 or t.every < 1:
        raise PlanError(f"epochs, batch_size and every must be >= 1; got {t.epochs}, "
                        f"{t.batch_size}, {t.every}")
    if not t.lr > 0:
        raise PlanError(f"lr must be positive; got {t.lr}")
    if not 0 <= t.seed <= MAX_SEED:
        raise PlanError(f"seed must be an integer from 0 to {MAX_SEED}; got {t.seed}")
    if t.optimizer_name not in OPTIMIZERS:
        raise PlanError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got "
                        f"{t.optimizer_name!r}")
    if t.bn not in BN_MODES:
        raise PlanError(f"bn must be one of {', '.join(BN_MODES)}; got {t.bn!r}")
    if t.filter_mode is not None and t.filter_mode not in FILTER_MODES:
        raise PlanError(f"filter_mode must be None (the plan's) or one of "
                        f"{', '.join(FILTER_MODES)}; got "
                        f"{t.filter_mode!r}")
    for name, value, ok, allowed in (
            ("momentum", t.momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("weight_decay", t.weight_decay, lambda v: v >= 0, ">= 0")):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not ok(value)):
            raise PlanError(f"{name} must be a finite number {allowed}; got {value!r}")
    if t.dynamic is not None and t.dynamic not in DYNAMIC_MODES:
        raise PlanError(f"dynamic must be None or one of {', '.join(DYNAMIC_MODES)}; got "
                        f"{t.dynamic!r}")


def probe_inputs(data: Dataset, n: int) -> Tensor:
    """The first ``n`` inputs of a data set, stacked (NEq's fixed probe set)."""
    count = min(int(n), len(data))
    return torch.stack([data[i][0] for i in range(count)])


def fisher_batches(data: Dataset, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed seeded subset of ``n`` samples in batches of 16 (the Fisher passes' data)."""
    count = min(int(n), len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    loader = DataLoader(Subset(data, order.tolist()), batch_size=16, shuffle=False)
    return [(x, y) for x, y in loader]
