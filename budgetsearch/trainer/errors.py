"""The trainer's error, defined with the others in :mod:`budgetsearch.errors`."""

from __future__ import annotations

from ..errors import TrainingError

__all__ = ["TrainingError"]
