"""The queryable result of a cost evaluation: per op, per layer, by kind, and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..units import format_bytes

__all__ = ["Cost", "LayerRow", "OpRow"]

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


@dataclass
class Cost:
    """What one training step costs under a plan, on a device, under an accounting.

    Query it with :meth:`total`, :meth:`layers`, :meth:`by_kind` and :meth:`layer`; print it with
    :meth:`format_table`; serialise it with :meth:`to_dict`.
    """

    ops: list[OpRow]
    accounting: str
    device: str
    batch_size: int
    optimizer: str
    peak_memory_bytes: int
    inference_peak_bytes: int
    peak_phase: str
    peak_op: str
    persistent_bytes: int
    weight_bytes: int
    optimizer_bytes: int
    latency_ms: float
    unknown_ops: list[str] = field(default_factory=list)
    loss_saved_bytes: int = 0
    updates: dict[str, dict] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------- totals
    def total(self) -> dict[str, Any]:
        """Totals of the step: MACs, memory, parameters, latency (units in the key names)."""
        sums = {k: sum(getattr(r, k) for r in self.ops) for k in _SUMMED}
        backward = sums["grad_input_macs"] + sums["grad_weight_macs"] + sums["grad_bias_macs"]
        return {
            "forward_macs": sums["forward_macs"],
            "backward_macs": backward,
            "grad_input_macs": sums["grad_input_macs"],
            "grad_weight_macs": sums["grad_weight_macs"],
            "grad_bias_macs": sums["grad_bias_macs"],
            "peak_memory_bytes": self.peak_memory_bytes,
            "training_memory_bytes": self.peak_memory_bytes - self.inference_peak_bytes,
            "inference_peak_bytes": self.inference_peak_bytes,
            "saved_activation_bytes": sums["saved_activation_bytes"] + self.loss_saved_bytes,
            "weight_bytes": self.weight_bytes,
            "gradient_bytes": sums["gradient_bytes"],
            "optimizer_bytes": self.optimizer_bytes,
            "trainable_params": sums["trainable_params"],
            "forward_ms": sums["forward_ms"],
            "backward_ms": sums["backward_ms"],
            "latency_ms": self.latency_ms,
        }

    def __getattr__(self, name: str) -> Any:
        # total() keys read as attributes: cost.backward_macs, cost.saved_activation_bytes, ...
        if name.startswith("_") or name in ("ops",):
            raise AttributeError(name)
        totals = self.total()
        if name in totals:
            return totals[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Memory by kind (activations, weights, gradients, optimizer) and MACs by pass."""
        t = self.total()
        return {
            "memory_bytes": {
                "activations": t["saved_activation_bytes"],
                "weights": t["weight_bytes"],
                "gradients": t["gradient_bytes"],
                "optimizer": t["optimizer_bytes"],
            },
            "macs": {
                "forward": t["forward_macs"],
                "backward": t["backward_macs"],
                "grad_input": t["grad_input_macs"],
                "grad_weight": t["grad_weight_macs"],
                "grad_bias": t["grad_bias_macs"],
            },
        }

    # ------------------------------------------------------------------------------- per layer
    def layers(self) -> list[LayerRow]:
        """One row per trainable layer (with the ops after it), in forward order; ops before the
        first layer are listed as ``(input)``."""
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
        return out

    def layer(self, name: str) -> LayerRow:
        """The row of one trainable layer.

        Raises:
            KeyError: Naming the layer and listing the known ones.
        """
        for row in self.layers():
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in this cost; layers: "
                       + ", ".join(r.name for r in self.layers()))

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
        t = self.total()
        lines += [
            "-" * len(head),
            f"device {self.device}, accounting {self.accounting}, batch {self.batch_size}, "
            f"optimizer {self.optimizer}",
            f"forward MACs        {t['forward_macs'] / 1e6:12.2f} M",
            f"backward MACs       {t['backward_macs'] / 1e6:12.2f} M  (grad-input "
            f"{t['grad_input_macs'] / 1e6:.2f} M, grad-weight {t['grad_weight_macs'] / 1e6:.2f} M,"
            f" grad-bias {t['grad_bias_macs'] / 1e6:.2f} M)",
            f"saved activations   {format_bytes(t['saved_activation_bytes']):>14}",
            f"weights in RAM      {format_bytes(t['weight_bytes']):>14}",
            f"parameter grads     {format_bytes(t['gradient_bytes']):>14}",
            f"optimizer state     {format_bytes(t['optimizer_bytes']):>14}",
            f"peak memory         {format_bytes(t['peak_memory_bytes']):>14}  (at {self.peak_op}, "
            f"{self.peak_phase})",
            f"  over inference    {format_bytes(t['training_memory_bytes']):>14}  (inference "
            f"peak {format_bytes(t['inference_peak_bytes'])})",
            f"trainable params    {t['trainable_params']:>14,}",
            f"latency per step    {t['latency_ms']:>11.2f} ms",
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
