"""The search space: a fixed-length encoding of sparse-update plans as Optuna parameters.

Every parameter is present in every trial (no conditional parameters), so NSGA-II, TPE and GP
samplers model all of them. The space is built once from a :class:`~budgetsearch.graph.LayerGraph`
and :class:`SpaceOptions`:

- **Units**: the candidate layers (all trainable layers, or the last ``last_n``), one unit per layer
  (``granularity="layer"``) or per block (``"block"``: the layers of a block share the unit's
  parameters).
- Per unit ``r:<unit>``: index into :data:`RATIOS` ``(0, 1/8, 1/4, 1/2, 1)`` of the fraction of
  channels whose weights are updated (0: weight frozen); ordered integer.
- Per unit ``a:<unit>``: the channel axis, ``out`` (rows of the weight) or ``in`` (columns, so only
  the kept input channels are stored).
- Per unit with a gradient filter on offer ``p:<unit>``: index into the unit's patch sizes, a prefix
  of :data:`PATCH_SIZES` ``(1, 2, 4, 8)``. A size is offered for a conv only if
  :func:`~budgetsearch.ops.filtered.check_filterable` accepts the conv's shape with it and it makes
  the pooled grid strictly smaller than the previous size does (``r = 8`` on a 4 x 4 output is the
  same operator as ``r = 4``), so the search never proposes a filter the operator would refuse.
- ``bias_depth``: the number of candidate layers (from the end, counting layers that have a bias)
  whose bias is updated even where the weight is frozen. A layer whose weight is updated always
  updates its bias too (``LayerUpdate("weight")``).

Which channels a ratio selects is decided by the scores (see :mod:`._objectives`), so parameters
plus scores give a plan deterministically.

**Target ``tte``** (:attr:`SpaceOptions.target`): every point decodes to a plan MIT's Tiny
Training Engine can express (``budgetsearch export --format tte``): no gradient filters;
channel subsets only on 1x1 and depthwise convs, along input channels (``a:<unit>`` offers only
``in``; the export's permutation puts the chosen channels first, where the engine trains them);
a unit with a k x k (dense) conv, the classifier (the last layer) or a linear layer is updated
whole or not at all (``r:<unit>`` is 0 or 4); ``bias_depth`` counts the convs before the
classifier only and is the engine's contiguous run of the last convs: a conv is updated only
inside it (a weight ratio outside it decodes to frozen), and the classifier's bias is never
updated alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from ..choices import AXES, PLAN_TARGETS, PlanTarget
from ..errors import SearchError
from ..graph import LayerGraph
from ..ops.filtered import check_filterable
from ..plan import LayerUpdate

__all__ = ["AXES", "PATCH_SIZES", "PLAN_TARGETS", "RATIOS", "SearchSpace", "SpaceOptions", "Unit",
           "layer_kind"]

RATIOS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0)
PATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8)
GRANULARITIES = ("layer", "block")


@dataclass(frozen=True)
class SpaceOptions:
    """How the space is cut.

    Attributes:
        granularity: ``layer`` (one set of parameters per layer) or ``block``.
        last_n: Only the last N trainable layers are candidates (None: all).
        filters: Offer gradient-filter patch sizes where the conv shape allows them.
        weight_layers: Only these candidates may have their weight updated; the others are
            bias-only candidates (their biases still count in ``bias_depth``). None: all. A
            measured objective sets it to the layers it has measurements for.
        target: ``pytorch`` (every plan budgetsearch's trainer runs) or ``tte`` (only plans
            MIT's Tiny Training Engine can express; see the module docstring; ``filters`` is
            then False).
    """

    granularity: str = "layer"
    last_n: int | None = None
    filters: bool = True
    weight_layers: tuple[str, ...] | None = None
    target: PlanTarget = "pytorch"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise SearchError(
                f"granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}"
            )
        if self.last_n is not None and (isinstance(self.last_n, bool)
                                        or not isinstance(self.last_n, int) or self.last_n < 1):
            raise SearchError(f"last_n must be an integer of at least 1 (or None for all); got "
                              f"{self.last_n!r}")
        if not isinstance(self.filters, bool):
            raise SearchError(f"filters must be true or false; got {self.filters!r}")
        if self.weight_layers is not None:
            object.__setattr__(self, "weight_layers", tuple(self.weight_layers))
        if self.target not in PLAN_TARGETS:
            raise SearchError(f"target must be one of {', '.join(PLAN_TARGETS)}; got "
                              f"{self.target!r}")
        if self.target == "tte":  # the engine has no gradient filter
            object.__setattr__(self, "filters", False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``target`` only when not ``pytorch``: the studies made before it
        keep their configuration and name)."""
        out = asdict(self)
        if self.target == "pytorch":
            del out["target"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpaceOptions:
        """Inverse of :meth:`to_dict`.

        Raises:
            SearchError: Unknown fields (naming them and the known ones) or bad values.
        """
        known = ("granularity", "last_n", "filters", "weight_layers", "target")
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise SearchError(f"unknown space option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(known)}")
        return cls(**{k: data[k] for k in ("granularity", "last_n", "filters", "weight_layers",
                                           "target")
                      if k in data and (k != "weight_layers" or data[k] is not None)})


@dataclass(frozen=True)
class Unit:
    """One group of layers sharing a ratio, an axis and a patch size.

    Attributes:
        name: The layer or block name (parameter names are ``r:<name>``...).
        layers: Its candidate layers, in forward order.
        patches: Patch sizes offered for the unit (always starting with 1).
        layer_patches: Patch sizes offered for each layer of the unit.
        ratios: The indices into :data:`RATIOS` the unit may take: all of them, or 0 and the
            last (frozen or whole) under target ``tte`` for a unit with a k x k conv or a linear
            layer.
        axes: The channel axes it may take (``in`` alone under target ``tte``).
    """

    name: str
    layers: tuple[str, ...]
    patches: tuple[int, ...]
    layer_patches: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    ratios: tuple[int, ...] = tuple(range(len(RATIOS)))
    axes: tuple[str, ...] = AXES

    def patch_for(self, layer: str, patch: int) -> int:
        """The largest patch size offered for ``layer`` not above ``patch``."""
        return max(r for r in self.layer_patches[layer] if r <= patch)

    def ratio(self, index: int, rounding: str = "up") -> int:
        """The allowed ratio index nearest ``index``: the least one at or above it (``up``) or
        the greatest at or below it (``down``)."""
        if index in self.ratios:
            return index
        if rounding == "down":
            return max(r for r in self.ratios if r <= index)
        return min((r for r in self.ratios if r >= index), default=self.ratios[-1])

    def step(self, index: int, direction: int) -> int:
        """The next allowed ratio index above (``direction`` 1) or below (-1) ``index``,
        clipped to the allowed range."""
        if direction > 0:
            return min((r for r in self.ratios if r > index), default=self.ratios[-1])
        return max((r for r in self.ratios if r < index), default=self.ratios[0])


def layer_kind(graph: LayerGraph, name: str) -> str:
    """``pointwise`` (1x1 conv), ``depthwise``, ``conv`` (k x k, dense or grouped) or
    ``linear``, from a layer's weight shape (the Tiny Training Engine's distinction)."""
    layer = graph.layers[name]
    shape = tuple(layer.weight_shape)
    if len(shape) == 2:
        return "linear"
    depthwise = layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels
    if len(shape) == 4 and depthwise and shape[2] * shape[3] > 1:
        return "depthwise"
    if len(shape) == 4 and shape[2] == shape[3] == 1 and layer.groups == 1:
        return "pointwise"
    return "conv"


def offered_patches(graph: LayerGraph, name: str) -> tuple[int, ...]:
    """Patch sizes a gradient filter may take on a layer: 1, then every size of
    :data:`PATCH_SIZES` that :func:`check_filterable` accepts and that shrinks the pooled grid."""
    layer = graph.layers[name]
    node = graph.nodes[layer.node]
    if node.kind != "conv2d" or len(node.shape) != 4 or not node.inputs:
        return (1,)
    src = graph.nodes[node.inputs[0]]
    in_hw, out_hw = tuple(src.shape[2:4]), tuple(node.shape[2:4])
    attrs = node.attrs
    out = [1]
    cells = out_hw[0] * out_hw[1]
    for r in PATCH_SIZES[1:]:
        why = check_filterable(
            in_hw=in_hw, out_hw=out_hw, kernel_size=attrs.get("kernel_size", (1, 1)),
            stride=attrs.get("stride", (1, 1)), padding=attrs.get("padding", (0, 0)),
            dilation=attrs.get("dilation", (1, 1)), groups=int(attrs.get("groups", 1)),
            patch_size=r,
        )
        grid = math.ceil(out_hw[0] / r) * math.ceil(out_hw[1] / r)
        if why is None and grid < cells:
            out.append(r)
            cells = grid
    return tuple(out)


class SearchSpace:
    """The fixed-length parameter space of one model (see the module docstring).

    Args:
        graph: The traced model.
        options: How to cut the space.
    """

    def __init__(self, graph: LayerGraph, options: SpaceOptions | None = None) -> None:
        self.graph = graph
        self.options = options or SpaceOptions()
        names = list(graph.layers)
        if not names:
            raise SearchError("the model has no trainable layer to search over")
        n = self.options.last_n
        self.candidates: tuple[str, ...] = tuple(
            names if n is None else names[-min(n, len(names)):])
        allowed = self.options.weight_layers
        if allowed is not None:
            unknown = sorted(set(allowed) - set(names))
            if unknown:
                raise SearchError(f"weight_layers {', '.join(unknown[:5])} are not trainable "
                                  "layers of the model")
        #: Candidates whose weight may be updated (the others are bias-only candidates).
        self.weight_candidates: tuple[str, ...] = tuple(
            n for n in self.candidates if allowed is None or n in set(allowed))
        if not self.weight_candidates:
            raise SearchError("no candidate layer may have its weight updated: weight_layers "
                              "and the last_n candidates do not overlap")
        cand = set(self.weight_candidates)
        patches = {
            name: offered_patches(graph, name) if self.options.filters else (1,)
            for name in self.weight_candidates
        }
        groups: dict[str, list[str]] = {}
        for name in self.weight_candidates:
            key = name if self.options.granularity == "layer" else graph.layers[name].block
            groups.setdefault(key, []).append(name)
        #: Whether the space keeps to the Tiny Training Engine (see the module docstring).
        self.tte = self.options.target == "tte"
        top = len(RATIOS) - 1
        # tte: the classifier (the last layer, whatever its shape: a 1x1 conv in the MCU
        # models) and any linear layer are updated whole or not at all, outside the bias run
        classifier = {names[-1]} | {n for n in names if layer_kind(graph, n) == "linear"}
        self.units: tuple[Unit, ...] = tuple(
            Unit(
                name=key,
                layers=tuple(members),
                patches=tuple(sorted({r for m in members for r in patches[m]})),
                layer_patches={m: patches[m] for m in members},
                **({} if not self.tte else {
                    "axes": ("in",),
                    "ratios": (0, top) if any(m in classifier or layer_kind(graph, m) == "conv"
                                              for m in members) else tuple(range(top + 1))}),
            )
            for key, members in groups.items()
        )
        #: Candidate layers with a bias, in forward order (``bias_depth`` counts from the end);
        #: under target ``tte`` the convs only (the engine's run of the last convs).
        self.bias_layers: tuple[str, ...] = tuple(
            name for name in self.candidates if graph.layers[name].bias_param is not None
            and not (self.tte and name in classifier)
        )
        if self.tte:
            biasless = [n for n in self.candidates if graph.layers[n].bias_param is None
                        and n not in classifier]
            if biasless:
                raise SearchError(f"target tte: convs {', '.join(biasless[:4])} have no bias; "
                                  "the engine's run of updated convs is a run of biases")
        self.distributions: dict[str, BaseDistribution] = {}
        for unit in self.units:
            self.distributions[f"r:{unit.name}"] = (
                IntDistribution(0, top) if len(unit.ratios) == top + 1
                else IntDistribution(0, top, step=top))
            self.distributions[f"a:{unit.name}"] = CategoricalDistribution(unit.axes)
            if len(unit.patches) > 1:
                self.distributions[f"p:{unit.name}"] = IntDistribution(0, len(unit.patches) - 1)
        self.distributions["bias_depth"] = IntDistribution(0, len(self.bias_layers))
        self.param_names: tuple[str, ...] = tuple(self.distributions)
        assert cand == {m for u in self.units for m in u.layers}

    def __len__(self) -> int:
        return len(self.distributions)

    def __repr__(self) -> str:
        return (f"SearchSpace({len(self.units)} {self.options.granularity} units over "
                f"{len(self.candidates)} layers, {len(self)} parameters)")

    # ------------------------------------------------------------------------------- decoding
    def key(self, params: Mapping[str, Any]) -> tuple:
        """A hashable key of a parameter set, in the space's parameter order.

        Raises:
            SearchError: If a parameter is missing.
        """
        try:
            return tuple(params[p] for p in self.param_names)
        except KeyError as exc:
            raise SearchError(f"parameter {exc.args[0]!r} missing from the trial") from None

    def choices(self, params: Mapping[str, Any]) -> dict[str, tuple[int, str, int, bool]]:
        """Per candidate layer: (ratio index, axis, patch size, bias updated)."""
        depth = int(params["bias_depth"])
        biased = set(self.bias_layers[len(self.bias_layers) - depth:]) if depth else set()
        out: dict[str, tuple[int, str, int, bool]] = {}
        for unit in self.units:
            ri = int(params[f"r:{unit.name}"])
            axis = str(params[f"a:{unit.name}"])
            pi = int(params.get(f"p:{unit.name}", 0))
            patch = unit.patches[pi]
            for layer in unit.layers:
                # tte: a conv outside the run of the last convs stays frozen
                frozen = self.tte and layer not in biased and layer in self.bias_layers
                out[layer] = (0 if frozen else ri, axis, unit.patch_for(layer, patch),
                              layer in biased)
        if len(out) < len(self.candidates):  # bias-only candidates
            for layer in self.bias_layers:
                out.setdefault(layer, (0, "out", 1, layer in biased))
        return out

    # ------------------------------------------------------------------------------- encoding
    def encode(self, updates: Mapping[str, LayerUpdate], *, rounding: str = "nearest") -> dict:
        """The point of the space nearest to a plan's updates.

        Args:
            updates: Per-layer updates (layers outside the candidates are ignored).
            rounding: How a channel fraction between two ratios is rounded: ``nearest`` (in log
                scale, never to 0 for an updated weight), ``up`` or ``down`` (possibly to 0: the
                weight frozen, its bias kept).

        Returns:
            The parameters.
        """
        if rounding not in ("nearest", "up", "down"):
            raise SearchError(f"rounding must be nearest, up or down; got {rounding!r}")
        params: dict[str, Any] = {}
        for unit in self.units:
            fracs, weights, axes, patches = [], [], [], []
            for name in unit.layers:
                update = updates.get(name)
                layer = self.graph.layers[name]
                if update is None or update.mode != "weight":
                    continue
                n_axis = layer.out_channels if update.axis == "out" else layer.in_channels
                fracs.append(update.fraction(n_axis))
                weights.append(layer.weight_numel)
                axes.append(update.axis)
                patches.append(update.patch_size)
            if fracs:
                frac = sum(f * w for f, w in zip(fracs, weights, strict=True)) / sum(weights)
                ri = unit.ratio(_round_ratio(frac, rounding),
                                "down" if rounding == "down" else "up")
                axis = max(unit.axes, key=lambda a: (axes.count(a), a == "out"))
                pi = _nearest_patch(unit.patches, max(patches))
            else:
                ri, axis, pi = 0, unit.axes[0] if self.tte else "out", 0
            params[f"r:{unit.name}"] = ri
            params[f"a:{unit.name}"] = axis
            if len(unit.patches) > 1:
                params[f"p:{unit.name}"] = pi
        depth = 0
        weighted = set(self.weight_candidates)
        for i, name in enumerate(reversed(self.bias_layers)):
            update = updates.get(name)
            # tte: the run reaches the earliest updated conv, whatever its update
            if update is not None and (update.mode == "bias" or name not in weighted
                                       or self.tte):
                depth = i + 1
        params["bias_depth"] = depth
        return {p: params[p] for p in self.param_names}

    def outside(self, updates: Mapping[str, LayerUpdate]) -> list[str]:
        """Layers a plan updates that are not candidates of this space."""
        cand = set(self.candidates)
        return [name for name in updates if name not in cand]

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary of the space."""
        return {
            **self.options.to_dict(),
            "units": len(self.units),
            "candidate_layers": len(self.candidates),
            "parameters": len(self),
            "filterable_units": sum(len(u.patches) > 1 for u in self.units),
        }


def _round_ratio(frac: float, rounding: str) -> int:
    frac = min(max(frac, 0.0), 1.0)
    if rounding == "up":
        return next(i for i, r in enumerate(RATIOS) if r >= frac - 1e-12)
    if rounding == "down":
        return max(i for i, r in enumerate(RATIOS) if r <= frac + 1e-12)
    logs = [abs(math.log2(r) - math.log2(max(frac, 1e-9))) for r in RATIOS[1:]]
    return 1 + min(range(len(logs)), key=lambda i: (logs[i], -i))


def _nearest_patch(patches: Sequence[int], patch: int) -> int:
    dist = [abs(math.log2(r) - math.log2(max(patch, 1))) for r in patches]
    return min(range(len(patches)), key=lambda i: (dist[i], i))
