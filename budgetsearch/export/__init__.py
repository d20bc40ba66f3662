"""Plans written for other training runtimes.

- :func:`to_tte`: the sparse-update configuration of MIT's Tiny Training Engine, for the MCU
  models (``budgetsearch export --format tte``).
- :func:`to_executorch`: the planned model's training step as ExecuTorch programs, for phones
  (``budgetsearch export --format executorch``; needs the ``executorch`` extra), and
  :class:`ExecuTorchTrainer`, which runs them from Python.
"""

from __future__ import annotations

from .executorch import (
    EXECUTORCH_EXTRA,
    EXECUTORCH_FORMAT,
    ExecuTorchExport,
    ExecuTorchTrainer,
    executorch_available,
    to_executorch,
)
from .tte import TTE_FORMAT, TTE_RATIOS, to_tte

#: The formats ``budgetsearch export`` writes.
FORMATS = ("tte", "executorch")

__all__ = [
    "EXECUTORCH_EXTRA",
    "EXECUTORCH_FORMAT",
    "FORMATS",
    "TTE_FORMAT",
    "TTE_RATIOS",
    "ExecuTorchExport",
    "ExecuTorchTrainer",
    "executorch_available",
    "to_executorch",
    "to_tte",
]
