"""The error the trainer raises when training itself fails (not the user's input)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BudgetSearchError

__all__ = ["TrainingError"]


class TrainingError(BudgetSearchError):
    """Training cannot go on: the loss became NaN or infinite, or a run directory is in the way.

    Attributes:
        epoch: The epoch (1-based) in which it happened, if during training.
        step: The step within that epoch (1-based), if during training.
        checkpoint: The last good checkpoint kept on disk, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        epoch: int | None = None,
        step: int | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint
