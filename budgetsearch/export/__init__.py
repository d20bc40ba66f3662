"""Plans written for other training runtimes.

- :func:`to_tte`: the sparse-update configuration of MIT's Tiny Training Engine, for the MCU
  models (``budgetsearch export --format tte``).
"""

from __future__ import annotations

from .tte import TTE_FORMAT, TTE_RATIOS, to_tte

#: The formats ``budgetsearch export`` writes.
FORMATS = ("tte",)

__all__ = ["FORMATS", "TTE_FORMAT", "TTE_RATIOS", "to_tte"]
