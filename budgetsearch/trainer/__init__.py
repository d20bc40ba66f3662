"""Training under a plan: ``apply_plan`` for any loop, the :class:`Trainer`, and their parts.

- :func:`apply_plan` / :func:`remove_plan` / :class:`PlanHandle` (:mod:`.apply`): swap a plan's
  operators into a model (sparse and filtered convs, frozen batch norm, mask-saving activations),
  set ``requires_grad``, give the optimizer its parameter groups, and restore the model after.
- :class:`FrozenBatchNorm`, :class:`MaskedActivation` (:mod:`.layers`).
- :class:`Trainer` (:mod:`.loop`): progress bar, evaluation, metrics files, resumable safetensors
  checkpoints, NaN detection, dynamic re-selection (NEq, Fisher).
- :class:`SavedTensorMeter`, :func:`measure_step` (:mod:`.measure`): what autograd really keeps.
- :func:`tune_host_allocator` (:mod:`.allocator`): keep freed memory in the heap (glibc), so
  every step does not page-fault its tensors in again; ``budgetsearch train`` and
  ``budgetsearch study run`` call it.
- ``budgetsearch.trainer.lightning.PlanCallback``: the same for PyTorch Lightning (imported only
  from that module).
"""

from __future__ import annotations

from .allocator import tune_host_allocator
from .apply import BN_MODES, PlanHandle, active_plan, apply_plan, describe, remove_plan
from .checkpoint import Checkpoint, list_checkpoints, load_latest, save_checkpoint
from .dynamic import DYNAMIC_MODES, Replanner
from .errors import TrainingError
from .layers import FrozenBatchNorm, MaskedActivation, masked_activation_for
from .loop import Trainer, build_optimizer
from .measure import SavedTensorMeter, StepStats, measure_step

__all__ = [
    "BN_MODES",
    "DYNAMIC_MODES",
    "Checkpoint",
    "FrozenBatchNorm",
    "MaskedActivation",
    "PlanHandle",
    "Replanner",
    "SavedTensorMeter",
    "StepStats",
    "Trainer",
    "TrainingError",
    "active_plan",
    "apply_plan",
    "build_optimizer",
    "describe",
    "list_checkpoints",
    "load_latest",
    "masked_activation_for",
    "measure_step",
    "remove_plan",
    "save_checkpoint",
    "tune_host_allocator",
]
