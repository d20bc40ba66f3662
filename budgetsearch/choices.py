"""The named choices of budgetsearch, each defined once.

Every choice is a ``Literal`` type, for annotations and type checkers, and a tuple of its values,
in the order they are listed in messages and command-line help, for run-time checks. The values
are the plain strings that plan files, study configurations, YAML specs and the command line
carry, so nothing written by an earlier version changes meaning.

The modules that check a choice (``budgetsearch.recipe.OPTIMIZERS``,
``budgetsearch.cost.MEMORY_MEASURES``, ``budgetsearch.plan.FILTER_MODES``...) re-export these
tuples rather than defining their own.

Example:
    >>> from budgetsearch.choices import MEMORY_MEASURES, OPTIMIZERS
    >>> MEMORY_MEASURES
    ('peak', 'training')
    >>> "adam" in OPTIMIZERS
    True
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ACCOUNTINGS",
    "AXES",
    "BN_MODES",
    "EFFORT_NAMES",
    "ENGINES",
    "FILTER_MODES",
    "HEAD_MODES",
    "MEMORY_MEASURES",
    "OPTIMIZERS",
    "OP_CLASSES",
    "PHASES",
    "PLAN_OBJECTIVES",
    "PLAN_TARGETS",
    "THIRD_OBJECTIVES",
    "UPDATE_MODES",
    "AccountingName",
    "Axis",
    "BnMode",
    "EffortName",
    "Engine",
    "FilterMode",
    "HeadMode",
    "MemoryMeasure",
    "OpClass",
    "Optimizer",
    "Phase",
    "PlanObjective",
    "PlanTarget",
    "ThirdObjective",
    "UpdateMode",
]

#: Optimizers a plan is trained with (and whose state the cost model counts): SGD, SGD with
#: momentum (one state tensor per parameter), Adam (two).
Optimizer = Literal["sgd", "momentum", "adam"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)

#: What a memory budget limits: the step's ``peak`` memory, or ``training`` memory (the peak minus
#: the inference peak: the extra memory training needs over running the model).
MemoryMeasure = Literal["peak", "training"]
MEMORY_MEASURES: tuple[MemoryMeasure, ...] = get_args(MemoryMeasure)

#: Gradient-filter variants of the operator (:mod:`budgetsearch.ops.filtered`).
FilterMode = Literal["normalized", "paper", "corrected"]
FILTER_MODES: tuple[FilterMode, ...] = get_args(FilterMode)

#: Batch norm during training: frozen on running statistics, or trained on batch statistics.
BnMode = Literal["frozen", "train"]
BN_MODES: tuple[BnMode, ...] = get_args(BnMode)

#: How the cost model counts a step: ``pytorch`` (stock autograd with ``requires_grad``
#: freezing, fp32), ``ops`` (budgetsearch's operators in PyTorch, fp32) or ``device`` (the
#: device profile's engine and data types).
AccountingName = Literal["pytorch", "ops", "device"]
ACCOUNTINGS: tuple[AccountingName, ...] = get_args(AccountingName)

#: What runs the training step an accounting counts (:class:`budgetsearch.cost.Accounting`):
#: ``autograd`` (stock PyTorch autograd, a plan applied by ``requires_grad`` freezing),
#: ``ops`` (budgetsearch's operators under PyTorch autograd) or ``device`` (a minimal on-device
#: training engine).
Engine = Literal["autograd", "ops", "device"]
ENGINES: tuple[Engine, ...] = get_args(Engine)

#: How one layer of a plan is updated: its ``bias`` alone, or its ``weight`` (and bias).
UpdateMode = Literal["bias", "weight"]
UPDATE_MODES: tuple[UpdateMode, ...] = get_args(UpdateMode)

#: The axis a channel subset of a weight update runs along: output or input channels.
Axis = Literal["out", "in"]
AXES: tuple[Axis, ...] = get_args(Axis)

#: How the budgeted selectors update the classifier: ``auto`` (its weight if that fits, else its
#: bias), ``weight`` or ``bias``.
HeadMode = Literal["auto", "weight", "bias"]
HEAD_MODES: tuple[HeadMode, ...] = get_args(HeadMode)

#: The search's third objective: latency per step (ms) or backward MACs.
ThirdObjective = Literal["latency", "macs"]
THIRD_OBJECTIVES: tuple[ThirdObjective, ...] = get_args(ThirdObjective)

#: What the planner's search maximises: the validation accuracy ``measured`` contributions predict
#: (a contribution table), or the captured ``fisher`` potential (a proxy, nothing trained).
PlanObjective = Literal["measured", "fisher"]
PLAN_OBJECTIVES: tuple[PlanObjective, ...] = get_args(PlanObjective)

#: What trains the plans a search hands out: ``pytorch`` (budgetsearch's own trainer and
#: operators, ``apply_plan``: every plan of the space) or ``tte`` (MIT's Tiny Training Engine,
#: ``budgetsearch export --format tte``: the search space and the race keep to what it can
#: express).
PlanTarget = Literal["pytorch", "tte"]
PLAN_TARGETS: tuple[PlanTarget, ...] = get_args(PlanTarget)

#: How much measuring and training goes into a plan (:data:`budgetsearch.planner.EFFORTS`):
#: ``quick`` (the search alone), ``standard`` (measured contributions and a race), ``thorough``.
EffortName = Literal["quick", "standard", "thorough"]
EFFORT_NAMES: tuple[EffortName, ...] = get_args(EffortName)

#: Op kinds a device profile measures compute rates for (``measured.<class>``): dense
#: convolutions, depthwise convolutions and linear layers.
OpClass = Literal["conv", "depthwise", "linear"]
OP_CLASSES: tuple[OpClass, ...] = get_args(OpClass)

#: Phases of a training step, in timeline order: the forward pass, the loss, the backward pass
#: (where a step's memory peak occurs: :attr:`budgetsearch.cost.Cost.peak_phase`).
Phase = Literal["forward", "loss", "backward"]
PHASES: tuple[Phase, ...] = get_args(Phase)
