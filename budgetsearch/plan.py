"""The update plan: which layers to train, which of their channels, and with which gradient filter.

A :class:`Plan` addresses layers by qualified module name. Each listed layer gets a
:class:`LayerUpdate`: its bias only, or its weight (all channels, or an explicit list of output- or
input-channel indices) together with its bias, and a gradient-filter patch size ``r`` (1 = none).
Layers not listed are frozen. A plan records the fingerprint of the model it was made for, the input
size, batch size, device profile and budget, and, once computed, its predicted costs and provenance.
It round-trips to JSON (``schema/plan.schema.json`` describes the format for other languages), and
:meth:`Plan.validate` refuses a plan made for another model, naming the differing layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._io import atomic_write_text
from .choices import (
    AXES,
    FILTER_MODES,
    OPTIMIZERS,
    UPDATE_MODES,
    Axis,
    FilterMode,
    Optimizer,
    UpdateMode,
)
from .errors import PlanError
from .fingerprint import diff_layer_shapes, fingerprint
from .graph import LayerGraph
from .recipe import Recipe

__all__ = ["SCHEMA_VERSION", "LayerUpdate", "Plan", "load_plan", "plan_schema"]

SCHEMA_VERSION = 1
#: How a layer is updated. ``AXES``, ``FILTER_MODES`` and ``OPTIMIZERS`` are importable from here
#: too; all four are defined in :mod:`budgetsearch.choices`.
MODES = UPDATE_MODES
_SCHEMA_PATH = Path(__file__).parent / "schema" / "plan.schema.json"


@dataclass(frozen=True)
class LayerUpdate:
    """How one layer is updated.

    Attributes:
        mode: ``"bias"`` (bias only) or ``"weight"`` (weight and bias).
        channels: Indices of the updated channels along ``axis``, sorted, or None for all.
        axis: ``"out"`` (rows of the weight: output channels) or ``"in"`` (columns: input
            channels, so only those channels of the input activation are stored).
        patch_size: Gradient-filter patch size r (1 = no filter).
    """

    mode: UpdateMode = "weight"
    channels: tuple[int, ...] | None = None
    axis: Axis = "out"
    patch_size: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.axis not in AXES:
            raise PlanError(f"axis must be one of {', '.join(AXES)}; got {self.axis!r}")
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise PlanError(f"patch_size must be an integer >= 1; got {self.patch_size!r}")
        if self.channels is not None:
            chans = tuple(sorted({int(c) for c in self.channels}))
            if not chans:
                raise PlanError("channels must list at least one index (or be null for all)")
            object.__setattr__(self, "channels", chans)

    def fraction(self, n_channels: int) -> float:
        """Fraction of the channels along ``axis`` that are updated (1 for all)."""
        return 1.0 if self.channels is None else len(self.channels) / n_channels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; omitted fields take their defaults."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.channels is not None:
            out["channels"] = list(self.channels)
        if self.channels is not None or self.axis != "out":  # so that from_dict gets it back
            out["axis"] = self.axis
        if self.patch_size != 1:
            out["patch_size"] = self.patch_size
        return out


@dataclass(frozen=True)
class Plan:
    """A training plan for one model on one device.

    Attributes:
        updates: Updated layers by qualified module name; every other layer is frozen.
        model: Registered model name (for messages), or None.
        layer_shapes: Weight shape of every trainable layer of the model it was made for.
        input_size: Input height and width.
        batch_size: Training batch size.
        device: Device profile name, or None.
        memory_budget_bytes: Memory budget, or None.
        latency_budget_ms: Latency budget per training step, or None.
        optimizer: ``sgd``, ``momentum`` or ``adam``.
        filter_mode: Gradient-filter variant, ``normalized``, ``paper`` or ``corrected`` (see
            :mod:`budgetsearch.ops.filtered`).
        predicted: Predicted costs (filled by the cost model), a plain mapping.
        provenance: How the plan was made (method, parameters, versions), a plain mapping.
        recipe: How to train it (learning rate, epochs, ...), when the planner chose one: a
            training loop should use it unless told otherwise; None: no recipe.
    """

    updates: Mapping[str, LayerUpdate]
    layer_shapes: Mapping[str, list[int]]
    model: str | None = None
    input_size: tuple[int, int] = (128, 128)
    batch_size: int = 1
    device: str | None = None
    memory_budget_bytes: int | None = None
    latency_budget_ms: float | None = None
    optimizer: Optimizer = "sgd"
    filter_mode: FilterMode = "normalized"
    predicted: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"
            )
        if self.filter_mode not in FILTER_MODES:
            raise PlanError(f"filter_mode must be one of {', '.join(FILTER_MODES)}; got "
                            f"{self.filter_mode!r}")
        if self.batch_size < 1:
            raise PlanError(f"batch_size must be >= 1; got {self.batch_size}")
        order = {name: i for i, name in enumerate(self.layer_shapes)}
        unknown = [name for name in self.updates if name not in order]
        if unknown:
            raise PlanError(
                f"the plan names layers the model lacks: {', '.join(unknown)}; the model's layers "
                f"are: {', '.join(order)}"
            )
        ordered = dict(sorted(self.updates.items(), key=lambda kv: order[kv[0]]))
        for name, update in ordered.items():
            _check_update(name, update, self.layer_shapes[name])
        object.__setattr__(self, "updates", ordered)
        object.__setattr__(self, "_fingerprint", fingerprint(dict(self.layer_shapes)))

    # ------------------------------------------------------------------------------ properties
    @property
    def fingerprint(self) -> str:
        """Fingerprint of the model the plan was made for."""
        return self._fingerprint  # type: ignore[attr-defined]

    @property
    def updated_layers(self) -> list[str]:
        """Names of the layers the plan updates, in forward order."""
        return list(self.updates)

    def with_(self, **changes: Any) -> Plan:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    # ---------------------------------------------------------------------------- constructors
    @classmethod
    def from_layers(
        cls, graph: LayerGraph, updates: Mapping[str, LayerUpdate], **kwargs: Any
    ) -> Plan:
        """A plan for the traced model with the given per-layer updates."""
        kwargs.setdefault("model", graph.model_name)
        kwargs.setdefault("input_size", tuple(graph.input_shape[1:]))
        return cls(updates=dict(updates), layer_shapes=dict(graph.layer_shapes), **kwargs)

    @classmethod
    def full(cls, graph: LayerGraph, **kwargs: Any) -> Plan:
        """Every layer's weight and bias updated (full fine-tuning)."""
        return cls.from_layers(graph, {n: LayerUpdate("weight") for n in graph.layers}, **kwargs)

    @classmethod
    def bias_only(cls, graph: LayerGraph, **kwargs: Any) -> Plan:
        """Every layer's bias updated and the classifier's weight too (TinyTL without lite
        residuals); layers without a bias stay frozen."""
        names = list(graph.layers)
        updates = {n: LayerUpdate("bias") for n in names if graph.layers[n].bias_param}
        updates[names[-1]] = LayerUpdate("weight")
        return cls.from_layers(graph, updates, **kwargs)

    @classmethod
    def last_k_layers(
        cls, graph: LayerGraph, k: int, *, patch_size: int = 1, **kwargs: Any
    ) -> Plan:
        """The last k trainable layers (the classifier counts as one) fully updated; convs other
        than the classifier filtered with ``patch_size``."""
        names = list(graph.layers)
        if not 1 <= k <= len(names):
            raise PlanError(f"k must be between 1 and {len(names)} layers; got {k}")
        chosen = names[len(names) - k :]
        return cls.from_layers(graph, _full_updates(graph, chosen, patch_size), **kwargs)

    @classmethod
    def last_k_blocks(
        cls, graph: LayerGraph, k: int, *, patch_size: int = 1, **kwargs: Any
    ) -> Plan:
        """The classifier plus the last k blocks before it fully updated, as gradient filtering's
        authors place filters; convs of those blocks filtered with ``patch_size``."""
        blocks = list(graph.blocks().items())
        head, body = blocks[-1], blocks[:-1]
        if not 0 <= k <= len(body):
            raise PlanError(f"k must be between 0 and {len(body)} blocks; got {k}")
        chosen = [n for _, names in body[len(body) - k :] for n in names] + head[1]
        return cls.from_layers(graph, _full_updates(graph, chosen, patch_size), **kwargs)

    # ------------------------------------------------------------------------------ validation
    def validate(self, target: LayerGraph | Mapping[str, list[int]]) -> None:
        """Check that the plan was made for this model.

        Args:
            target: A traced model, or its ``layer_shapes``.

        Raises:
            PlanError: Naming the layers that differ.
        """
        if isinstance(target, LayerGraph) and target.fingerprint == self.fingerprint:
            self._check_input_channels(target)
            return
        shapes = target.layer_shapes if isinstance(target, LayerGraph) else dict(target)
        if fingerprint(dict(shapes)) == self.fingerprint:
            if isinstance(target, LayerGraph):
                self._check_input_channels(target)
            return
        diff = diff_layer_shapes(dict(self.layer_shapes), dict(shapes))
        raise PlanError(
            f"the plan was made for another model ({self.model or 'unnamed'}, fingerprint "
            f"{self.fingerprint}, not {fingerprint(dict(shapes))}): " + "; ".join(diff)
        )

    def _check_input_channels(self, graph: LayerGraph) -> None:
        for name, update in self.updates.items():
            if update.channels is None or update.axis != "in":
                continue
            limit = graph.layers[name].in_channels
            bad = [c for c in update.channels if c >= limit]
            if bad:
                raise PlanError(
                    f"layer {name}: input channel indices out of range 0..{limit - 1}: {bad[:10]}"
                )

    # ----------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the plan."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": {
                "name": self.model,
                "fingerprint": self.fingerprint,
                "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
            },
            "input_size": list(self.input_size),
            "batch_size": self.batch_size,
            "device": self.device,
            "budget": {
                "memory_bytes": self.memory_budget_bytes,
                "latency_ms": self.latency_budget_ms,
            },
            "optimizer": self.optimizer,
            "filter_mode": self.filter_mode,
            "updates": {name: u.to_dict() for name, u in self.updates.items()},
            "predicted": dict(self.predicted),
            "provenance": dict(self.provenance),
            **({"recipe": self.recipe.to_dict()} if self.recipe is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<plan>") -> Plan:
        """Read a plan document, validating it against the JSON Schema first.

        Raises:
            PlanError: Naming the source, the field and what was expected.
        """
        import jsonschema

        # "integer" means an int: JSON Schema would take 2.0 as one, and a float batch size or
        # input size would then travel on into the trainer
        strict = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool))
        validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                                 type_checker=strict)(plan_schema())
        errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
            raise PlanError(f"{source}: field {where}: {err.message}")
        model = data["model"]
        shapes = model["layer_shapes"]
        if fingerprint(shapes) != model["fingerprint"]:
            raise PlanError(
                f"{source}: field model.fingerprint {model['fingerprint']} does not match its "
                f"layer_shapes ({fingerprint(shapes)}); the file was edited or corrupted"
            )
        budget = data.get("budget") or {}
        try:
            updates = {
                name: LayerUpdate(
                    mode=u["mode"],
                    channels=tuple(u["channels"]) if u.get("channels") is not None else None,
                    axis=u.get("axis", "out"),
                    patch_size=u.get("patch_size", 1),
                )
                for name, u in data["updates"].items()
            }
            return cls(
                updates=updates,
                layer_shapes=shapes,
                model=model.get("name"),
                input_size=tuple(data["input_size"]),
                batch_size=data["batch_size"],
                device=data.get("device"),
                memory_budget_bytes=budget.get("memory_bytes"),
                latency_budget_ms=budget.get("latency_ms"),
                optimizer=data.get("optimizer", "sgd"),
                filter_mode=data.get("filter_mode", "normalized"),
                predicted=data.get("predicted") or {},
                provenance=data.get("provenance") or {},
                recipe=(Recipe.from_dict(data["recipe"], source="field recipe")
                        if data.get("recipe") is not None else None),
            )
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        """The plan as JSON text."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<plan>") -> Plan:
        """Parse a plan from JSON text."""
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
            raise PlanError(f"{source}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan atomically (a temporary file renamed over the target)."""
        return atomic_write_text(path, self.to_json() + "\n")


def _no_constant(name: str) -> float:
    """``json.loads`` takes NaN and Infinity, which JSON does not have; a plan refuses them."""
    raise ValueError(f"{name} is not a JSON number")


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file.

    Raises:
        PlanError: If the file is missing or malformed, naming the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"cannot read plan file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON: not UTF-8 text ({exc.reason})") from None
    return Plan.from_json(text, source=str(path))


def plan_schema() -> dict[str, Any]:
    """The JSON Schema of plan files (``budgetsearch/schema/plan.schema.json``)."""
    return json.loads(_SCHEMA_PATH.read_text())


def _full_updates(graph: LayerGraph, names: Iterable[str], patch_size: int) -> dict:
    head = list(graph.layers)[-1]
    out = {}
    for name in names:
        layer = graph.layers[name]
        r = patch_size if name != head and len(layer.weight_shape) == 4 else 1
        out[name] = LayerUpdate("weight", patch_size=r)
    return out


def _check_update(name: str, update: LayerUpdate, shape: list[int]) -> None:
    """Refuse an update its layer (weight ``shape``) cannot take: a gradient filter off a
    conv's weight update, channels without a weight update, channel indices out of range."""
    if update.patch_size > 1 and (update.mode != "weight" or len(shape) != 4):
        what = "a linear layer" if len(shape) != 4 else f"mode {update.mode!r}"
        raise PlanError(f"layer {name}: a gradient filter (patch_size {update.patch_size}) "
                        f"filters a conv's weight gradient; this update is {what}: give "
                        "patch_size 1")
    if update.channels is None:
        return
    if update.mode != "weight":
        raise PlanError(f"layer {name}: channels are only meaningful with mode 'weight'")
    # For the input axis the real input channel count is needed; a grouped conv's weight has
    # in/groups columns, so the bound is checked against the graph when costs are computed.
    limit = shape[0] if update.axis == "out" else None
    bad = [c for c in update.channels if c < 0 or (limit is not None and c >= limit)]
    if bad:
        bounds = f"0..{limit - 1}" if limit is not None else "(must be >= 0)"
        raise PlanError(
            f"layer {name}: {update.axis}put channel indices out of range {bounds}: {bad[:10]}"
        )
