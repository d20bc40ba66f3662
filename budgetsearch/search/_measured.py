"""A measured accuracy objective: predicted validation accuracy from a contribution table.

The table (``budgetsearch contrib``, :mod:`budgetsearch.contrib`) holds, for units trained with
the classifier from one start: ``head`` (classifier only), ``bias:K`` (the biases of the last K
layers that have one) and ``weight:LAYER:AXIS:RATIO:rP``. A plan is predicted as

    acc(head) + B(k) + Σ_j  decay^j · g_(j)        (positive gains, largest first)
                     + Σ negative gains

- ``k`` is the length of the run of updated layers (bias or weight: a weight update trains the
  bias too) counted back from the last layer with a bias; ``B`` interpolates the measured depths
  linearly (0 at k = 0, the deepest measurement beyond it);
- ``g`` is a weight-updated layer's gain at its ratio (the nearest measured ratio on a log scale),
  axis and patch size, falling back to the same ratio without a filter and then on the other axis;
  a layer without measurements contributes nothing and is counted in ``unmeasured``;
- a unit's gain is its accuracy gain plus ``loss_weight`` times its validation-loss reduction
  (accuracy on a small validation split moves in steps of 1/N; the loss breaks its ties);
- ``decay`` < 1 discounts each further weight layer (the MIT analysis found gains additive for a
  handful of layers and less beyond): 1 is the plain additive model;
- every unit was measured with the whole classifier trained, and the classifier is new: a plan
  that does not update all of the classifier's weight is predicted at chance, 1 / classes
  (``objective_validation.py`` trained such a plan of the additive search to 0.13 on 10
  classes, predicted above the classifier alone).

``decay`` and ``loss_weight`` are the model's parameters. Their defaults are the calibration of
``benchmarks/objective_validation.py`` (:data:`CALIBRATED_DECAY`, :data:`CALIBRATED_LOSS_WEIGHT`):
fitted on one model's trained plans, scored on the other's, it chose decay 0.2 for both models
(loss weight 0.05 and 0.5); the search with (0.2, 0.05), in the 4 of 6 cells where its chosen
plan was not one of the others already trained, chose plans that trained better than the
additive model's in 3 (by 0.7 to 4.3 points) and worse in one (by 0.2)
(``studies/results/objective_validation/report.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from ..errors import SearchError
from ..graph import LayerGraph
from ..plan import LayerUpdate
from ._objectives import AccuracyModel, ProxyModel
from ._space import RATIOS

__all__ = [
    "CALIBRATED_DECAY",
    "CALIBRATED_LOSS_WEIGHT",
    "MeasuredModel",
    "bias_layers",
    "parse_results",
]

#: Discount of each further weight-updated layer's gain (see the module docstring).
CALIBRATED_DECAY = 0.2
#: Weight of a unit's validation-loss reduction beside its accuracy gain.
CALIBRATED_LOSS_WEIGHT = 0.05


def bias_layers(graph: LayerGraph) -> list[str]:
    """Layers before the classifier that have a bias, in forward order (``bias:K`` updates the
    last K of them)."""
    return [n for n, layer in list(graph.layers.items())[:-1] if layer.bias_param is not None]


def parse_results(results: Mapping[str, Mapping[str, Any]], graph: LayerGraph) -> dict[str, Any]:
    """Split a table's results into the head reference, bias depths and weight units.

    Raises:
        SearchError: Without a ``head`` measurement, or with a key of no known form.
    """
    if "head" not in results:
        raise SearchError("the contribution table has no 'head' measurement (the reference "
                          "every gain is measured against)")
    bias: dict[int, dict[str, Any]] = {}
    weight: dict[tuple[str, str, float, int], dict[str, Any]] = {}
    for key, r in results.items():
        parts = key.split(":")
        if key == "head":
            continue
        if parts[0] == "bias" and len(parts) == 2 and parts[1].isdigit():
            bias[int(parts[1])] = dict(r)
        elif parts[0] == "weight" and len(parts) >= 5:
            layer = ":".join(parts[1:-3])
            if layer not in graph.layers:
                raise SearchError(f"contribution table: unit {key!r} names no layer of the model")
            weight[(layer, parts[-3], float(parts[-2]), int(parts[-1].removeprefix("r")))] = dict(r)
        else:
            raise SearchError(f"contribution table: unit key {key!r} is not head, bias:K or "
                              "weight:LAYER:AXIS:RATIO:rP")
    return {"head": dict(results["head"]), "bias": bias, "weight": weight}


class MeasuredModel(AccuracyModel):
    """Predicted validation accuracy of plans (see the module docstring).

    Args:
        graph: The traced model.
        proxy: The study's proxy model: its scores choose the channels, as they did when the
            table was measured.
        results: The table's results, ``{unit key: {"val_accuracy", "val_loss", ...}}``.
        decay: Discount of each further weight-updated layer, in (0, 1].
        loss_weight: Weight of the validation-loss reduction in a unit's gain, >= 0.
        source: Where the table came from (for the record).

    Raises:
        SearchError: A table without ``head``, a malformed key or parameters out of range.
    """

    name = "predicted_accuracy"

    def __init__(
        self,
        graph: LayerGraph,
        proxy: ProxyModel,
        results: Mapping[str, Mapping[str, Any]],
        *,
        decay: float = CALIBRATED_DECAY,
        loss_weight: float = CALIBRATED_LOSS_WEIGHT,
        source: str | None = None,
    ) -> None:
        if not 0 < decay <= 1:
            raise SearchError(f"decay must lie in (0, 1]; got {decay}")
        if not loss_weight >= 0:
            raise SearchError(f"loss_weight must be >= 0; got {loss_weight}")
        self.graph, self.proxy = graph, proxy
        self.decay, self.loss_weight, self.source = float(decay), float(loss_weight), source
        self.results = {k: dict(v) for k, v in results.items()}
        parsed = parse_results(self.results, graph)
        self.head = parsed["head"]
        self.head_layer = graph.layer_names[-1]
        #: Predicted accuracy of a plan that leaves (part of) the new classifier untrained.
        self.chance = 1.0 / graph.layers[self.head_layer].out_channels
        self.bias_layers = bias_layers(graph)
        depths = sorted(parsed["bias"])
        self._depths = np.array([0, *depths], dtype=np.float64)
        self._bias_gains = np.array([0.0, *(self._gain(parsed["bias"][d]) for d in depths)])
        self._weight = {k: self._gain(v) for k, v in parsed["weight"].items()}
        self.measured_layers = tuple(sorted({k[0] for k in self._weight},
                                            key=graph.layer_names.index))
        self._cache: dict[tuple, float] = {}

    def _gain(self, r: Mapping[str, Any]) -> float:
        acc = float(r["val_accuracy"]) - float(self.head["val_accuracy"])
        if self.loss_weight == 0:
            return acc
        a, b = self.head.get("val_loss"), r.get("val_loss")
        if a is None or b is None:  # a diverged unit: its loss gain is as bad as it gets
            return acc - self.loss_weight * 10.0
        return acc + self.loss_weight * (float(a) - float(b))

    def channels(self, name: str, ratio_index: int, axis: str) -> tuple[int, ...] | None:
        return self.proxy.channels(name, ratio_index, axis)

    def weight_gain(self, layer: str, ratio: float, axis: str, patch: int) -> float | None:
        """A weight update's measured gain (None: no measurement of the layer)."""
        logs = {r: abs(math.log2(r) - math.log2(max(ratio, 1e-9))) for r in RATIOS[1:]}
        options = sorted({k[2] for k in self._weight if k[0] == layer},
                         key=lambda r: (logs.get(r, 99.0), -r))
        for r in options:
            for ax, p in ((axis, patch), (axis, 1), ("out", patch), ("out", 1)):
                hit = self._weight.get((layer, ax, r, p))
                if hit is not None:
                    return hit
        return None

    def bias_gain(self, depth: int) -> float:
        """The interpolated gain of the last ``depth`` biases."""
        return float(np.interp(depth, self._depths, self._bias_gains))

    def run_depth(self, updated: Collection[str]) -> int:
        """Length of the run of updated layers counted back from the last one with a bias."""
        depth = 0
        for name in reversed(self.bias_layers):
            if name not in updated:
                break
            depth += 1
        return depth

    def __call__(self, updates: Mapping[str, LayerUpdate]) -> float:
        head = updates.get(self.head_layer)
        if head is None or head.mode != "weight" or head.channels is not None:
            return self.chance
        depth = self.run_depth(updates)
        gains = []
        for name, u in updates.items():
            if name == self.head_layer or u.mode != "weight":
                continue
            layer = self.graph.layers[name]
            n = layer.out_channels if u.axis == "out" else layer.in_channels
            g = self.weight_gain(name, u.fraction(n), u.axis, u.patch_size)
            if g is not None:
                gains.append(g)
        return self._combine(depth, gains)

    def _combine(self, depth: int, gains: list[float]) -> float:
        positive = sorted((g for g in gains if g > 0), reverse=True)
        total = sum(g * self.decay ** j for j, g in enumerate(positive))
        total += sum(g for g in gains if g <= 0)
        return float(self.head["val_accuracy"]) + self.bias_gain(depth) + total

    def score_choices(self, choices: Mapping[str, tuple[int, str, int, bool]]) -> float:
        """The value of the plan the choices decode to (:meth:`__call__`), cached by choice."""
        key = tuple(sorted((n, c) for n, c in choices.items() if c[0] > 0 or c[3]))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = super().score_choices(choices)
        return hit

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(self.results, sort_keys=True).encode()).hexdigest()
        return {"objective": "measured", "decay": self.decay, "loss_weight": self.loss_weight,
                "table_digest": digest[:16], "table_source": self.source,
                "units": len(self.results), "measured_layers": list(self.measured_layers),
                "head_val_accuracy": self.head["val_accuracy"]}
