"""Effort levels of ``plan``: how much measuring and training goes into the choice.

- ``quick``: the search on a predicted objective only (seconds; the Fisher proxy unless a
  contribution table is given). Nothing is trained, so the plan is a prediction.
- ``standard``: measured contributions, the search on them, then a race (:mod:`.race`) among the
  best front points and every baseline, each with three learning rates, over rungs of 2 and 4
  epochs, keeping the best third; a leading candidate whose best rate in the first rung is the
  grid's lowest or highest is also tried up to two steps beyond it.
- ``thorough``: more measured layers, more front points, five learning rates, a third rung of 8
  epochs, and two seeds in the last rung.

At both efforts that race, a validation split of fewer than 200 images makes the race
cross-validate (:func:`race_folds`): the training and validation images are pooled and dealt into
folds of about the validation split's size (at most 20 folds), so every image is validated on once
and every fold trains on about as many images as the training split holds. Why 200: in the
committed MCU studies (issue 12) the raced plan was within a point of the best baseline in 15 of 18
cells with 200 validation images and in 3 of 9 with 50, where the race's leads were smaller than
the split's standard error (``studies/results/race_separation.md``); cross-validated (each fold
with its own batch order), the 9 were within a point in 6 (``studies/results/FINDINGS.md``,
section 0b).

A race on the validation split (200 or more images) ends with a cross-validated final
(:attr:`~.race.RaceSettings.final_candidates`): the best arm of each of the last rung's 4 best
candidates (6 at ``thorough``) is trained again on folds of about the validation split's size
over the pooled images (:func:`final_folds`: 5 for 800 training and 200 validation images), and
the best of them there wins. Why: the gradient-filtering races on 200 validation images handed
out plans 1.1-1.2 points below the best baseline in 6 of 8 cells, their leads under one
standard error; cross-validated from the first rung, they handed out the best baseline's plan
in all 8, and in the 12 cells raced both ways the first rung on the split had kept the
cross-validated winner's arm every time (``benchmarks/race_final.py``). With the final the
plan was within a point of the best baseline in 6 of the 8 (``gradient_filtering_tuned``,
method ``search-final``). The final trains a few arms five times, not every arm.

Why the grid extends past its edges: in the committed studies MobileNetV2's best rate was the
lowest of the grid (a grid centred on a rate that suits MCUNet), so the true best lay outside
it; a fixed grid wide enough for every model would train every candidate at rates most of them
do not need.

The first rung is 2 epochs, not 1: on MCUNet-5fps (CIFAR-10, 800 training images, batch 32, SGD
0.02) one epoch is 25 steps, after which the published MIT scheme at 148 KB scores 0.245 on
validation, against 0.57 after 2 epochs and 0.66 after 6 (the best of all candidates at 6 is
0.68): a 1-epoch rung eliminates plans that update many layers before they have started to
learn (``benchmarks/learning_curves.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError
from ..recipe import OPTIMIZERS
from .race import MAX_FOLDS, RaceSettings

__all__ = ["CENTER_LR", "EFFORTS", "Effort", "final_folds", "get_effort", "lr_grid",
           "race_folds"]

#: The middle of each optimizer's learning-rate grid. SGD 0.02 is what the committed studies
#: trained MCUNet-5fps and MobileNetV2-w0.35 with (chosen on validation among 0.005 / 0.02 in
#: benchmarks/objective_validation.py); momentum and Adam take their usual defaults.
CENTER_LR = {"sgd": 0.02, "momentum": 0.01, "adam": 0.001}


@dataclass(frozen=True)
class Effort:
    """One effort level.

    Attributes:
        name: ``quick``, ``standard`` or ``thorough``.
        race: Whether the candidates are raced (needs training data).
        rungs: Epochs of the race's rungs.
        lr_factors: The learning-rate grid as factors of the optimizer's :data:`CENTER_LR`.
        final_seeds: Seeds of the last rung.
        front: How many front points (by the search's objective) enter the race.
        candidates: Which layers the contribution analysis measures (``contrib --candidates``).
        lr_extensions: Rates beyond each edge of the grid a leading candidate may be tried at
            (:attr:`~.race.RaceSettings.lr_extensions`; 0: the grid only).
        cv_below: The race cross-validates when the validation split holds fewer images than
            this (:func:`race_folds`; 0: never).
        final: Candidates of a race on the validation split's cross-validated final
            (:attr:`~.race.RaceSettings.final_candidates`; 0: no final).
    """

    name: str
    race: bool
    rungs: tuple[int, ...] = (2, 4)
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    final_seeds: int = 1
    front: int = 4
    candidates: str = "top:6"
    lr_extensions: int = 2
    cv_below: int = 200
    final: int = 4

    def settings(self, optimizer: str, *, lrs: tuple[float, ...] | None = None,
                 lr_extensions: int | None = None, folds: int = 1,
                 final: int | None = None, final_folds: int = 5) -> RaceSettings:
        """The race settings for an optimizer (``lrs`` replaces the grid, ``lr_extensions``
        the effort's bound on the rates tried beyond it, ``final`` its finalists; ``folds``
        and ``final_folds`` as in :class:`~.race.RaceSettings`)."""
        return RaceSettings(rungs=self.rungs, lrs=lrs or lr_grid(optimizer, self.lr_factors),
                            final_seeds=self.final_seeds,
                            lr_extensions=(self.lr_extensions if lr_extensions is None
                                           else lr_extensions), folds=folds,
                            final_candidates=self.final if final is None else final,
                            final_folds=final_folds)


EFFORTS: dict[str, Effort] = {
    "quick": Effort("quick", race=False, lr_extensions=0, final=0),
    "standard": Effort("standard", race=True),
    "thorough": Effort("thorough", race=True, rungs=(2, 4, 8),
                       lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0), final_seeds=2, front=8,
                       candidates="top:10", final=6),
}


def get_effort(name: str) -> Effort:
    """The effort level ``name``.

    Raises:
        PlanError: Unknown name (listing the known ones).
    """
    try:
        return EFFORTS[name]
    except KeyError:
        raise PlanError(f"unknown effort {name!r}; known: {', '.join(EFFORTS)}") from None


def lr_grid(optimizer: str, factors: tuple[float, ...]) -> tuple[float, ...]:
    """The learning rates ``CENTER_LR[optimizer] * f`` for each factor, rounded to 3
    significant digits.

    Raises:
        PlanError: Unknown optimizer.
    """
    if optimizer not in CENTER_LR:
        raise PlanError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    return tuple(float(f"{CENTER_LR[optimizer] * f:.3g}") for f in factors)


def race_folds(*, train_images: int, val_images: int, below: int) -> int:
    """The folds a race cross-validates on: 1 (the validation split as it is) when the split
    holds at least ``below`` images, else folds of about the split's size over the pooled
    images, ``round((train + val) / val)``, at least 2 and at most
    :data:`~.race.MAX_FOLDS` (200 training and 50 validation images: 5 folds of 50)."""
    if val_images >= below or val_images < 1:
        return 1
    return final_folds(train_images=train_images, val_images=val_images)


def final_folds(*, train_images: int, val_images: int) -> int:
    """The folds of a race's cross-validated final: folds of about the validation split's size
    over the pooled images, ``round((train + val) / val)``, at least 2 and at most
    :data:`~.race.MAX_FOLDS` (800 training and 200 validation images: 5 folds of 200)."""
    if val_images < 1:
        return 2
    return min(MAX_FOLDS, max(2, round((train_images + val_images) / val_images)))
