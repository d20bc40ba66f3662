"""Random scores, the baseline every criterion is compared with; reproducible from a seed."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from torch import nn

from .base import Batches, Criterion, register_criterion, trainable_layers
from .scores import LayerScores, Scores, input_channels

__all__ = ["RandomCriterion", "random_scores"]


def random_scores(model: nn.Module, *, seed: int = 0) -> Scores:
    """Uniform [0, 1) scores drawn from ``numpy.random.default_rng(seed)``.

    Draws go layer by layer in module order (output channels, input channels, layer score), so the
    same seed and the same model give identical scores.
    """
    rng = np.random.default_rng(seed)
    layers: dict[str, LayerScores] = {}
    for name, module in trainable_layers(model).items():
        out = rng.random(int(module.weight.shape[0]))
        inp = rng.random(input_channels(module))
        layers[name] = LayerScores(out_channel=out, in_channel=inp, layer=float(rng.random()))
    metadata = {"samples": 0, "seed": int(seed), "peak_memory_bytes": 0}
    return Scores.for_model(model, criterion="random", layers=layers, metadata=metadata)


@register_criterion("random")
class RandomCriterion(Criterion):
    """Random scores; ``seed`` fixes them. Ignores ``data``.

    Args:
        seed: Seed of the numpy generator.
    """

    needs_data: ClassVar[bool] = False

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = int(seed)

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def score(self, model: nn.Module, data: Batches | None = None) -> Scores:
        return random_scores(model, seed=self.seed)
