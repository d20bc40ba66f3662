"""Units of the contribution analysis: the small updates whose effect on accuracy is measured.

Every unit trains the classifier plus one thing:

- ``head``: nothing more (the reference every gain is measured against);
- ``bias:K``: the biases of the last K layers before the classifier that have one (a bias
  held by the batch norm after a bias-free conv counts);
- ``weight:LAYER:AXIS:RATIO:rP``: the weight (and bias) of one layer on the top ``RATIO`` of its
  channels along ``AXIS`` (``out`` rows or ``in`` columns, chosen by the same scores and the same
  rule as the search's, :meth:`~budgetsearch.search.ProxyModel.channels`), with a
  gradient filter of patch size P (1: none). A filtered update is its own unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import PlanError
from ..graph import LayerGraph
from ..plan import LayerUpdate
from ..search import RATIOS, bias_layers, offered_patches

__all__ = ["DEFAULT_RATIOS", "Unit", "bias_layers", "build_units", "parse_unit"]

#: Channel ratios measured by default (those of the search's space, without 0).
DEFAULT_RATIOS: tuple[float, ...] = tuple(r for r in RATIOS if r > 0)


@dataclass(frozen=True)
class Unit:
    """One measured update (see the module docstring).

    Attributes:
        kind: ``head``, ``bias`` or ``weight``.
        depth: Number of bias-updated layers (``bias``).
        layer: The weight-updated layer (``weight``).
        axis: ``out`` or ``in`` (``weight``).
        ratio: Share of the channels along ``axis``, one of the search's ratios (``weight``).
        patch_size: Gradient-filter patch size, 1 for none (``weight``).
    """

    kind: str
    depth: int = 0
    layer: str | None = None
    axis: str = "out"
    ratio: float = 1.0
    patch_size: int = 1

    @property
    def key(self) -> str:
        """The unit's name in tables and on the command line."""
        if self.kind == "head":
            return "head"
        if self.kind == "bias":
            return f"bias:{self.depth}"
        return f"weight:{self.layer}:{self.axis}:{self.ratio:g}:r{self.patch_size}"

    def updates(
        self, graph: LayerGraph, channels: Callable[[str, int, str], tuple[int, ...] | None]
    ) -> dict[str, LayerUpdate]:
        """The layer updates of this unit, the classifier's included.

        Args:
            graph: The model's layer graph.
            channels: ``(layer, ratio index, axis) -> kept channels or None``, the search's
                channel choice.
        """
        head = graph.layer_names[-1]
        out = {head: LayerUpdate("weight")}
        if self.kind == "bias":
            for name in bias_layers(graph)[-self.depth:]:
                out[name] = LayerUpdate("bias")
        elif self.kind == "weight":
            assert self.layer is not None
            ratio_index = RATIOS.index(self.ratio)
            chans = channels(self.layer, ratio_index, self.axis)
            out[self.layer] = LayerUpdate("weight", channels=chans,
                                          axis=self.axis if chans is not None else "out",
                                          patch_size=self.patch_size)
        return out



def parse_unit(text: str, graph: LayerGraph) -> Unit:
    """A unit from its key (see :attr:`Unit.key`), checked against the graph.

    Raises:
        PlanError: A malformed key, an unknown layer, or a value the search does not offer.
    """
    parts = text.split(":")
    if text == "head":
        return Unit("head")
    if parts[0] == "bias" and len(parts) == 2 and parts[1].isdigit():
        depth = int(parts[1])
        n = len(bias_layers(graph))
        if not 1 <= depth <= n:
            raise PlanError(f"unit {text!r}: the depth must be in 1..{n} (layers with a bias)")
        return Unit("bias", depth=depth)
    if parts[0] == "weight" and len(parts) >= 5:
        layer, axis, ratio, patch = ":".join(parts[1:-3]), parts[-3], parts[-2], parts[-1]
        if layer not in graph.layers or layer == graph.layer_names[-1]:
            raise PlanError(f"unit {text!r}: {layer!r} is not a trainable layer before the "
                            "classifier")
        try:
            r, p = float(ratio), int(patch.removeprefix("r"))
        except ValueError:
            r, p = -1.0, -1
        if axis not in ("out", "in") or r not in DEFAULT_RATIOS:
            raise PlanError(f"unit {text!r}: axis must be out or in and the ratio one of "
                            + ", ".join(f"{x:g}" for x in DEFAULT_RATIOS))
        offered = offered_patches(graph, layer)
        if p not in offered:
            raise PlanError(f"unit {text!r}: patch size must be one of "
                            f"{', '.join(f'r{x}' for x in offered)} for {layer}")
        return Unit("weight", layer=layer, axis=axis, ratio=r, patch_size=p)
    raise PlanError(f"unit {text!r}: expected head, bias:K or weight:LAYER:AXIS:RATIO:rP")


def build_units(
    graph: LayerGraph,
    *,
    candidates: Sequence[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    axes: Sequence[str] = ("out", "in"),
    filters: bool = True,
    bias_depths: Sequence[int] | None = None,
) -> list[Unit]:
    """The units of an analysis: ``head``, a grid of bias depths, and weight units.

    Args:
        graph: The model's layer graph.
        candidates: Layers whose weight units are measured (default: every layer before the
            classifier).
        ratios: Channel ratios, each one of the search's.
        axes: Channel axes. The ``in`` axis is skipped where it is the same update as ``out``
            (ratio 1, depthwise convs).
        filters: Also measure every gradient-filter patch size the search offers for a layer.
        bias_depths: Bias depths (default: 1, 2, 4, ... and the number of layers with a bias).

    Raises:
        PlanError: An unknown candidate layer or a ratio the search does not use.
    """
    head = graph.layer_names[-1]
    names = list(candidates) if candidates is not None else graph.layer_names[:-1]
    unknown = [n for n in names if n not in graph.layers or n == head]
    if unknown:
        raise PlanError(f"candidate layers {', '.join(unknown)} are not trainable layers before "
                        f"the classifier (e.g. {', '.join(graph.layer_names[-3:-1])})")
    bad = [r for r in ratios if r not in DEFAULT_RATIOS]
    if bad:
        raise PlanError(f"ratios {bad} are not the search's; use "
                        + ", ".join(f"{r:g}" for r in DEFAULT_RATIOS))
    n_bias = len(bias_layers(graph))
    if bias_depths is None:
        depths, k = [], 1
        while k < n_bias:
            depths.append(k)
            k *= 2
        bias_depths = [*depths, n_bias] if n_bias else []
    units = [Unit("head")]
    units += [Unit("bias", depth=int(d)) for d in sorted(set(bias_depths)) if 1 <= d <= n_bias]
    for name in names:
        layer = graph.layers[name]
        depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
        patches = offered_patches(graph, name) if filters else (1,)
        for ratio in ratios:
            for axis in axes:
                if axis == "in" and (ratio == 1.0 or depthwise or layer.groups > 1):
                    continue
                for p in patches:
                    units.append(Unit("weight", layer=name, axis=axis, ratio=float(ratio),
                                      patch_size=p))
    return units
