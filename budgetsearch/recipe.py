"""A training recipe: how a plan is trained (optimizer, learning rate, schedule, batch size).

A :class:`Recipe` is plain, validated data. Contribution tables are keyed by the recipe they were
measured with (gains measured with one learning rate say little about another), and a recipe is
what a planner hands out with a plan so that the plan is trained the way it was judged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .choices import BN_MODES, FILTER_MODES, OPTIMIZERS, BnMode, FilterMode, Optimizer
from .errors import PlanError

#: The largest seed of a run, a study or a search: NumPy's generators (the Optuna samplers')
#: take 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1

#: The largest learning rate the command line takes (``train --lr``, ``plan --lrs``) and a race
#: tries, its grid and the rates it adds beyond the grid's edges included.
MAX_LR = 10.0

__all__ = ["BN_MODES", "OPTIMIZERS", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    """How to train: every field is validated on construction.

    Attributes:
        optimizer: ``sgd``, ``momentum`` (SGD with momentum) or ``adam``.
        lr: Learning rate, > 0.
        momentum: Momentum of ``momentum`` (ignored otherwise), in [0, 1).
        weight_decay: L2 weight decay, >= 0.
        epochs: Passes over the training data, >= 1.
        batch_size: Training batch size, >= 1.
        seed: Seed of the batch order and of anything random in training.
        bn: Batch norm ``frozen`` (running statistics) or ``train``.
        filter_mode: Gradient-filter variant (see :mod:`budgetsearch.ops.filtered`).
    """

    optimizer: Optimizer = "momentum"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 2
    batch_size: int = 32
    seed: int = 0
    bn: BnMode = "frozen"
    filter_mode: FilterMode = "normalized"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise PlanError(f"recipe field {name!r} must be {allowed}; got "
                                  f"{getattr(self, name)!r}")

        need(self.optimizer in OPTIMIZERS, "optimizer", "one of " + ", ".join(OPTIMIZERS))
        need(self.bn in BN_MODES, "bn", "one of " + ", ".join(BN_MODES))
        need(self.filter_mode in FILTER_MODES, "filter_mode", "one of " + ", ".join(FILTER_MODES))
        need(_number(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(_number(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             "a finite number >= 0")
        for name in ("epochs", "batch_size"):
            need(_integer(getattr(self, name)) and getattr(self, name) >= 1, name,
                 "an integer >= 1")
        need(_integer(self.seed) and 0 <= self.seed <= MAX_SEED, "seed",
             f"an integer from 0 to {MAX_SEED}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<recipe>") -> Recipe:
        """Rebuild a recipe; unknown fields are an error naming them and the known ones.

        Raises:
            PlanError: Unknown fields or values out of range (naming ``source``).
        """
        known = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a recipe is a mapping of fields; got "
                              f"{type(data).__name__}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"{source}: unknown recipe fields {', '.join(unknown)}; known: "
                              + ", ".join(sorted(known)))
        try:
            return cls(**dict(data))
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    def with_(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated)."""
        return Recipe(**{**self.to_dict(), **changes})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
