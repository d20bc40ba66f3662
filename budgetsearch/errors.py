"""The exception hierarchy of budgetsearch.

Every error that user input can cause derives from :class:`BudgetSearchError`, so a caller (and the
command line) can tell a user's mistake from a bug. Messages name the file, field or layer at fault
and the values that would have been accepted.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BudgetError",
    "BudgetSearchError",
    "CostError",
    "DataError",
    "ExportError",
    "GraphError",
    "ModelError",
    "PlanError",
    "ProfileError",
    "ScoresError",
    "SearchError",
    "StoreError",
    "TrainingError",
]


class BudgetSearchError(Exception):
    """Root of every error budgetsearch raises on bad input."""


class ProfileError(BudgetSearchError):
    """A device profile is unknown, malformed or incomplete."""


class ModelError(BudgetSearchError):
    """A model name is unknown, or its weights or architecture files cannot be read."""


class GraphError(BudgetSearchError):
    """A model cannot be traced into a layer graph."""


class PlanError(BudgetSearchError):
    """A plan is malformed, or does not fit the model it is applied to."""


class ExportError(PlanError):
    """A plan cannot be written for a target runtime (what the runtime cannot express is named)."""


class CostError(BudgetSearchError):
    """A cost cannot be computed (for example an unsupported operator under ``strict``)."""


class DataError(BudgetSearchError):
    """A data set is missing, empty, or does not match what the model expects."""


class ScoresError(BudgetSearchError):
    """A scores file is malformed or belongs to another model."""


class BudgetError(PlanError):
    """No plan of the requested kind fits the budget.

    Attributes:
        minimum_bytes: The smallest memory budget at which a non-empty plan exists, when known.
    """

    def __init__(self, message: str, *, minimum_bytes: int | None = None) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class SearchError(BudgetSearchError):
    """A search study cannot be created, opened or continued (storage, mismatch).

    Attributes:
        transient: True when trying again later may succeed (the storage's database could not
            be reached or was busy), False for a mistake in the input (a missing folder, a
            driver not installed, a study made for something else).
        stale_study: The name of the study refused because it was made for something else
            (None for other errors): a caller that owns the name may delete it and start anew.
        stale_creator: The refused study's recorded creator (None when it records none), so
            that a caller deletes that study and not one made anew under its name meanwhile.
    """

    def __init__(self, message: str, *, transient: bool = False,
                 stale_study: str | None = None, stale_creator: str | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.stale_study = stale_study
        self.stale_creator = stale_creator


class StoreError(BudgetSearchError):
    """A store of records and claims shared by workers cannot be opened or used."""


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
