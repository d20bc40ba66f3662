"""The results of a cost evaluation: the queryable :class:`Cost` (per op, per layer, by kind, and
in total, as :class:`CostTotals`) and the lighter :class:`CostSummary` a search needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from ..choices import AccountingName, Optimizer, Phase
from ..units import format_bytes

__all__ = ["Cost", "CostSummary", "CostTotals", "LayerRow", "OpRow"]

_SUMMED = (
    "forward_macs",
    "grad_input_macs",
    "grad_weight_macs",
    "grad_bias_macs",
    "saved_activation_bytes",
    "trainable_params",
    "gradient_bytes",
    "forward_ms",
    "backward_ms",
)


@dataclass(frozen=True)
class OpRow:
    """Cost of one op of the forward/backward pass (MACs and bytes for the whole batch)."""

    index: int
    name: str
    kind: str
    module: str | None
    layer: str
    forward_macs: int
    grad_input_macs: int
    grad_weight_macs: int
    grad_bias_macs: int
    saved_activation_bytes: int
    trainable_params: int
    gradient_bytes: int
    backward: bool
    forward_ms: float
    backward_ms: float = 0.0

    @property
    def backward_macs(self) -> int:
        """grad-input + grad-weight + grad-bias MACs."""
        return self.grad_input_macs + self.grad_weight_macs + self.grad_bias_macs


@dataclass(frozen=True)
class LayerRow:
    """Costs of a trainable layer and the ops after it up to the next layer (its batch norm,
    activation, residual add...)."""

    name: str
    update: str
    ops: int
    forward_macs: int
    grad_input_macs: int
    grad_weight_macs: int
    grad_bias_macs: int
    saved_activation_bytes: int
    trainable_params: int
    gradient_bytes: int
    backward: bool

    @property
    def backward_macs(self) -> int:
        """grad-input + grad-weight + grad-bias MACs."""
        return self.grad_input_macs + self.grad_weight_macs + self.grad_bias_macs


@dataclass(frozen=True)
class CostSummary:
    """The totals of one evaluation that a search needs, without the per-op table
    (:meth:`budgetsearch.cost.CostModel.summarize`, or :meth:`Cost.summary`).

    ``training_memory_bytes`` is the peak minus the inference peak: the extra memory training
    needs over running the model. ``latency_ms`` is the forward, ``backward_ms`` and the
    optimizer step.
    """

    peak_memory_bytes: int
    training_memory_bytes: int
    saved_activation_bytes: int
    forward_macs: int
    backward_macs: int
    latency_ms: float
    trainable_params: int
    backward_ms: float
    latency_model: str = ""


@dataclass(frozen=True)
class CostTotals:
    """Every total of one training step (:attr:`Cost.totals`); units are in the names.

    ``backward_macs`` is grad-input + grad-weight + grad-bias MACs; ``training_memory_bytes``
    the peak minus the inference peak; ``saved_activation_bytes`` includes what the loss keeps.
    """

    forward_macs: int
    backward_macs: int
    grad_input_macs: int
    grad_weight_macs: int
    grad_bias_macs: int
    peak_memory_bytes: int
    training_memory_bytes: int
    inference_peak_bytes: int
    saved_activation_bytes: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    trainable_params: int
    forward_ms: float
    backward_ms: float
    latency_ms: float


@dataclass(frozen=True)
class Cost:
    """What one training step costs under a plan, on a device, under an accounting.

    A finished, immutable result (:meth:`budgetsearch.cost.CostModel.evaluate`): its totals
    (:attr:`totals`, also read as attributes such as ``cost.backward_macs``) and its per-layer
    rows are computed once, on first use. Query it with :meth:`total`, :meth:`layers`,
    :meth:`by_kind` and :meth:`layer`; print it with :meth:`format_table`; serialise it with
    :meth:`to_dict`; :meth:`summary` gives the :class:`CostSummary` of the same step.
    """

    ops: list[OpRow]
    accounting: AccountingName
    device: str
    batch_size: int
    optimizer: Optimizer
    peak_memory_bytes: int
    inference_peak_bytes: int
    peak_phase: Phase
    peak_op: str
    persistent_bytes: int
    weight_bytes: int
    optimizer_bytes: int
    latency_ms: float
    unknown_ops: list[str] = field(default_factory=list)
    loss_saved_bytes: int = 0
    updates: dict[str, dict] = field(default_factory=dict)
    latency_model: str = ""

    # ---------------------------------------------------------------------------------- totals
    @cached_property
    def totals(self) -> CostTotals:
        """The totals of the step: MACs, memory, parameters, latency (computed once)."""
        sums = {k: sum(getattr(r, k) for r in self.ops) for k in _SUMMED}
        backward = sums["grad_input_macs"] + sums["grad_weight_macs"] + sums["grad_bias_macs"]
        return CostTotals(
            forward_macs=sums["forward_macs"],
            backward_macs=backward,
            grad_input_macs=sums["grad_input_macs"],
            grad_weight_macs=sums["grad_weight_macs"],
            grad_bias_macs=sums["grad_bias_macs"],
            peak_memory_bytes=self.peak_memory_bytes,
            training_memory_bytes=self.peak_memory_bytes - self.inference_peak_bytes,
            inference_peak_bytes=self.inference_peak_bytes,
            saved_activation_bytes=sums["saved_activation_bytes"] + self.loss_saved_bytes,
            weight_bytes=self.weight_bytes,
            gradient_bytes=sums["gradient_bytes"],
            optimizer_bytes=self.optimizer_bytes,
            trainable_params=sums["trainable_params"],
            forward_ms=sums["forward_ms"],
            backward_ms=sums["backward_ms"],
            latency_ms=self.latency_ms,
        )

    def total(self) -> dict[str, Any]:
        """The :attr:`totals` as a dict (units in the key names)."""
        return asdict(self.totals)

    def summary(self) -> CostSummary:
        """The :class:`CostSummary` of this step (what ``CostModel.summarize`` returns)."""
        t = self.totals
        return CostSummary(
            peak_memory_bytes=t.peak_memory_bytes,
            training_memory_bytes=t.training_memory_bytes,
            saved_activation_bytes=t.saved_activation_bytes,
            forward_macs=t.forward_macs,
            backward_macs=t.backward_macs,
            latency_ms=t.latency_ms,
            trainable_params=t.trainable_params,
            backward_ms=t.backward_ms,
            latency_model=self.latency_model,
        )

    # the totals that are not fields, read as attributes: cost.backward_macs, ...
    @property
    def forward_macs(self) -> int:
        """Forward MACs of the step (:attr:`totals`)."""
        return self.totals.forward_macs

    @property
    def backward_macs(self) -> int:
        """Backward MACs: grad-input + grad-weight + grad-bias (:attr:`totals`)."""
        return self.totals.backward_macs

    @property
    def grad_input_macs(self) -> int:
        """MACs of the activation gradients (:attr:`totals`)."""
        return self.totals.grad_input_macs

    @property
    def grad_weight_macs(self) -> int:
        """MACs of the weight gradients (:attr:`totals`)."""
        return self.totals.grad_weight_macs

    @property
    def grad_bias_macs(self) -> int:
        """MACs of the bias gradients (:attr:`totals`)."""
        return self.totals.grad_bias_macs

    @property
    def training_memory_bytes(self) -> int:
        """The peak minus the inference peak (:attr:`totals`)."""
        return self.totals.training_memory_bytes

    @property
    def saved_activation_bytes(self) -> int:
        """Bytes saved for the backward pass, the loss's included (:attr:`totals`)."""
        return self.totals.saved_activation_bytes

    @property
    def gradient_bytes(self) -> int:
        """Bytes of the parameter gradients held (:attr:`totals`)."""
        return self.totals.gradient_bytes

    @property
    def trainable_params(self) -> int:
        """Updated parameter elements (:attr:`totals`)."""
        return self.totals.trainable_params

    @property
    def forward_ms(self) -> float:
        """Forward time of the step (:attr:`totals`)."""
        return self.totals.forward_ms

    @property
    def backward_ms(self) -> float:
        """Backward time of the step (:attr:`totals`)."""
        return self.totals.backward_ms

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Memory by kind (activations, weights, gradients, optimizer) and MACs by pass."""
        t = self.totals
        return {
            "memory_bytes": {
                "activations": t.saved_activation_bytes,
                "weights": t.weight_bytes,
                "gradients": t.gradient_bytes,
                "optimizer": t.optimizer_bytes,
            },
            "macs": {
                "forward": t.forward_macs,
                "backward": t.backward_macs,
                "grad_input": t.grad_input_macs,
                "grad_weight": t.grad_weight_macs,
                "grad_bias": t.grad_bias_macs,
            },
        }

    # ------------------------------------------------------------------------------- per layer
    def layers(self) -> list[LayerRow]:
        """One row per trainable layer (with the ops after it), in forward order; ops before the
        first layer are listed as ``(input)``."""
        return list(self._layer_rows)

    @cached_property
    def _layer_rows(self) -> tuple[LayerRow, ...]:
        groups: dict[str, list[OpRow]] = {}
        for row in self.ops:
            groups.setdefault(row.layer, []).append(row)
        out = []
        for name, rows in groups.items():
            u = self.updates.get(name)
            update = "frozen" if u is None else _describe(u)
            out.append(LayerRow(
                name=name,
                update=update,
                ops=len(rows),
                backward=any(r.backward for r in rows),
                **{k: sum(getattr(r, k) for r in rows) for k in _SUMMED if not k.endswith("_ms")},
            ))
        return tuple(out)

    def layer(self, name: str) -> LayerRow:
        """The row of one trainable layer.

        Raises:
            KeyError: Naming the layer and listing the known ones.
        """
        for row in self._layer_rows:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in this cost; layers: "
                       + ", ".join(r.name for r in self._layer_rows))

    # ----------------------------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document: totals, context, per-layer rows and per-op rows."""
        layers = []
        for row in self.layers():
            d = asdict(row)
            d["backward_macs"] = row.backward_macs
            layers.append(d)
        return {
            **self.total(),
            "accounting": self.accounting,
            "device": self.device,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "latency_model": self.latency_model,
            "peak": {"phase": self.peak_phase, "op": self.peak_op,
                     "persistent_bytes": self.persistent_bytes},
            "unknown_ops": self.unknown_ops,
            "layers": layers,
            "ops": [asdict(r) for r in self.ops],
        }

    def format_table(self, *, all_layers: bool = True) -> str:
        """A per-layer table and the totals, as text."""
        head = (f"{'layer':<28} {'update':<16} {'fwd MMAC':>9} {'bwd MMAC':>9} "
                f"{'saved':>10} {'params':>9}")
        lines = [head, "-" * len(head)]
        for row in self.layers():
            if not all_layers and not row.backward:
                continue
            lines.append(
                f"{row.name[:28]:<28} {row.update[:16]:<16} {row.forward_macs / 1e6:>9.2f} "
                f"{row.backward_macs / 1e6:>9.2f} {format_bytes(row.saved_activation_bytes):>10} "
                f"{row.trainable_params:>9,}"
            )
        t = self.totals
        lines += [
            "-" * len(head),
            f"device {self.device}, accounting {self.accounting}, batch {self.batch_size}, "
            f"optimizer {self.optimizer}",
            f"forward MACs        {t.forward_macs / 1e6:12.2f} M",
            f"backward MACs       {t.backward_macs / 1e6:12.2f} M  (grad-input "
            f"{t.grad_input_macs / 1e6:.2f} M, grad-weight {t.grad_weight_macs / 1e6:.2f} M,"
            f" grad-bias {t.grad_bias_macs / 1e6:.2f} M)",
            f"saved activations   {format_bytes(t.saved_activation_bytes):>14}",
            f"weights in RAM      {format_bytes(t.weight_bytes):>14}",
            f"parameter grads     {format_bytes(t.gradient_bytes):>14}",
            f"optimizer state     {format_bytes(t.optimizer_bytes):>14}",
            f"peak memory         {format_bytes(t.peak_memory_bytes):>14}  (at {self.peak_op}, "
            f"{self.peak_phase})",
            f"  over inference    {format_bytes(t.training_memory_bytes):>14}  (inference "
            f"peak {format_bytes(t.inference_peak_bytes)})",
            f"trainable params    {t.trainable_params:>14,}",
            f"latency per step    {t.latency_ms:>11.2f} ms"
            + (f"  ({self.latency_model})" if self.latency_model else ""),
        ]
        if self.unknown_ops:
            lines.append("warning: no cost rule for " + ", ".join(self.unknown_ops))
        return "\n".join(lines)


def _describe(update: dict) -> str:
    text = update["mode"]
    if update.get("channels") is not None:
        text += f" {len(update['channels'])}{update.get('axis', 'out')}"
    if update.get("patch_size", 1) > 1:
        text += f" r{update['patch_size']}"
    return text
