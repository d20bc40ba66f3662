"""Weight-magnitude criterion (MIT "magnitude+" channel ranking); needs no data.

- Output channel o: the L2 norm of its weight slice ``W[o]`` (all its inputs and kernel taps).
- Input channel c: the L2 norm of the weights that read it. For an ungrouped conv or a linear
  layer that is the column ``W[:, c]`` (all output channels and kernel taps); for a grouped conv
  only the output channels of c's group read it, so it is ``W[group rows, c mod C_in/G]``; for a
  depthwise conv that is channel c's own kernel. On a layer of an int8 MCU model (one with a
  ``weight_scale`` buffer, see :func:`budgetsearch.models.mcu.int8_weight`) ``W`` is the int8
  integer weight, before the per-output-channel scales, as MIT's "magnitude+" ranks it in its
  int8 training model; the de-quantised float weight would reweight every row and keep other
  channels. Elsewhere ``W`` is the float weight.
- Layer score: the root-mean-square weight (``‖W‖ / sqrt(numel)``), comparable across layers of
  different sizes.

Biases are not counted. Output-channel and layer scores always use the float weight.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..models.mcu import int8_weight
from .base import Batches, Criterion, register_criterion, trainable_layers
from .scores import LayerScores, Scores

__all__ = ["MagnitudeCriterion", "magnitude_scores"]


def _layer_magnitudes(module: nn.Module) -> LayerScores:
    weight = module.weight.detach().to(torch.float64).cpu()
    c_out = weight.shape[0]
    groups = int(module.groups) if isinstance(module, nn.Conv2d) else 1
    per_group_in = weight.shape[1]
    out = weight.reshape(c_out, -1).norm(dim=1)
    integer = int8_weight(module)
    ranked = weight if integer is None else integer
    # (G, C_out/G, C_in/G, taps) -> squared norm per (group, input column) -> (C_in,)
    grouped = ranked.reshape(groups, c_out // groups, per_group_in, -1)
    inp = grouped.pow(2).sum(dim=(1, 3)).reshape(groups * per_group_in).sqrt()
    rms = weight.norm() / np.sqrt(max(weight.numel(), 1))
    return LayerScores(out_channel=out.numpy(), in_channel=inp.numpy(), layer=float(rms))


def magnitude_scores(model: nn.Module) -> Scores:
    """Magnitude scores of every conv and linear layer of ``model``."""
    layers = {name: _layer_magnitudes(m) for name, m in trainable_layers(model).items()}
    metadata = {"samples": 0, "seed": None, "peak_memory_bytes": 0}
    return Scores.for_model(model, criterion="magnitude", layers=layers, metadata=metadata)


@register_criterion("magnitude")
class MagnitudeCriterion(Criterion):
    """Weight-magnitude criterion (see the module docstring); ignores ``data``."""

    needs_data: ClassVar[bool] = False

    def score(self, model: nn.Module, data: Batches | None = None) -> Scores:
        return magnitude_scores(model)
