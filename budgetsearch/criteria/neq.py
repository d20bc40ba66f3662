"""NEq: neurons at equilibrium (Bragagnolo et al., NeurIPS'22), as velocities per output channel.

After each epoch every output channel's output is recorded on a fixed probe set. With ``y_i^t``
channel i's output for one probe sample at record t (flattened over its spatial map),
docs/criteria.md ('NEq velocity') defines
``φ_i^t = mean over samples of [1 − cos(y_i^t, y_i^{t−1})]`` and the velocity
``v_i^t = Δφ_i^t − μ·v_i^{t−1}`` with ``Δφ_i^t = φ_i^t − φ_i^{t−1}``; a channel with
``|v| < ε`` is at equilibrium and is frozen for the next epoch.

Conventions chosen here:

- **Which output**: the layer's own output (a conv's output before its batch norm), as for the
  Fisher potential, computed in eval mode without gradients.
- **First records**: record 0 only stores outputs. Record 1 gives the first ``φ`` (no velocity
  yet). Record 2 gives the second ``φ`` hence the first ``Δφ``, and the first velocity with
  ``v^{prev} = 0``, i.e. ``v = Δφ``. Velocities (and :meth:`NEqTracker.scores`,
  :meth:`NEqTracker.frozen_mask`) are therefore available from the third record on
  (:attr:`NEqTracker.ready`); before that a selector uses its epoch-0 rule (random or static).
- **Zero outputs**: the cosine of two all-zero maps is taken as 1 (nothing moved); of a zero and a
  non-zero map as 0.
- **Linear layers**: a neuron's "map" is one number per sample, so the cosine is its sign
  agreement (1 − cos ∈ {0, 1, 2}); this follows the definition literally.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataError, ScoresError
from .base import (
    Batches,
    Criterion,
    preserved_state,
    register_criterion,
    take_samples,
    trainable_layers,
)
from .scores import LayerScores, Scores

__all__ = ["NEqCriterion", "NEqTracker", "channel_param_counts", "cosine_distance"]


def channel_param_counts(module: nn.Module) -> np.ndarray:
    """Parameters of each output channel: ``C_in/G · K_h · K_w`` (+1 with a bias).

    For a depthwise conv this is ``K²`` (not ``C·K²``); a linear layer counts ``C_in`` (+1).

    Raises:
        ScoresError: If the module is neither a conv nor a linear layer.
    """
    if isinstance(module, nn.Conv2d):
        per_channel = int(np.prod(module.weight.shape[1:]))
    elif isinstance(module, nn.Linear):
        per_channel = int(module.in_features)
    else:
        raise ScoresError(f"channel_param_counts: {type(module).__name__} is not a conv or linear")
    per_channel += 1 if module.bias is not None else 0
    return np.full(int(module.weight.shape[0]), per_channel, dtype=np.int64)


def cosine_distance(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``1 − cos`` per sample and channel of two (N, C, D) tensors, as an (N, C) float64 tensor.

    Two all-zero maps are at distance 0; a zero and a non-zero map at distance 1.
    """
    cur, prev = current.double(), previous.double()
    dot = (cur * prev).sum(dim=-1)
    norm_c = cur.norm(dim=-1)
    norm_p = prev.norm(dim=-1)
    denom = norm_c * norm_p
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    cos = torch.where((norm_c == 0) & (norm_p == 0), 1.0, cos)
    return 1.0 - cos.clamp(-1.0, 1.0)


def _as_maps(output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(N, C, D) view of a layer output: channel dim 1 for a conv, last for a linear layer."""
    if isinstance(module, nn.Conv2d):
        return output.reshape(output.shape[0], output.shape[1], -1)
    return output.reshape(output.shape[0], -1, output.shape[-1]).transpose(1, 2)


class NEqTracker:
    """Records output-channel velocities of a model across epochs on a fixed probe set.

    Args:
        model: The model being trained (not modified; run in eval mode for each record).
        probe_inputs: The fixed probe inputs (N, ...), the same at every record.
        momentum: μ in ``v^t = Δφ^t − μ·v^{t−1}``.
        eps: Channels with ``|v| < eps`` are at equilibrium (frozen).
        batch_size: Probe samples per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_inputs: torch.Tensor,
        *,
        momentum: float = 0.5,
        eps: float = 1e-3,
        batch_size: int = 64,
    ) -> None:
        if probe_inputs.shape[0] < 1:
            raise DataError("NEq: the probe set is empty")
        self.model = model
        self.probe_inputs = probe_inputs
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.batch_size = int(batch_size)
        self.layers = trainable_layers(model)
        self.records = 0
        self._previous: dict[str, torch.Tensor] = {}
        self.phi: dict[str, torch.Tensor] = {}
        self.velocity: dict[str, torch.Tensor] = {}

    @property
    def ready(self) -> bool:
        """Whether velocities exist (from the third record on)."""
        return bool(self.velocity)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the previous outputs kept between records."""
        return sum(t.numel() * t.element_size() for t in self._previous.values())

    @torch.no_grad()
    def outputs(self) -> dict[str, torch.Tensor]:
        """Every layer's output on the probe set, as (N, C, D) tensors."""
        collected: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}

        def make(name: str, module: nn.Module):
            def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
                collected[name].append(_as_maps(output.detach(), module).clone())

            return hook

        handles = [m.register_forward_hook(make(n, m)) for n, m in self.layers.items()]
        try:
            with preserved_state(self.model, eval_mode=True):
                dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
                for start in range(0, self.probe_inputs.shape[0], self.batch_size):
                    chunk = self.probe_inputs[start : start + self.batch_size]
                    self.model(chunk.to(dtype) if chunk.is_floating_point() else chunk)
        finally:
            for handle in handles:
                handle.remove()
        return {name: torch.cat(parts) for name, parts in collected.items() if parts}

    def record(self) -> None:
        """Record the current outputs (call after each epoch) and update φ and the velocities."""
        self.update(self.outputs())

    def update(self, outputs: Mapping[str, torch.Tensor]) -> None:
        """Advance one record from given (N, C, D) outputs per layer (what :meth:`record` does
        after its forward pass; usable directly with outputs computed elsewhere)."""
        if self._previous and set(outputs) != set(self._previous):
            raise ScoresError(
                "NEq: the layers recorded changed between records: "
                f"{sorted(set(outputs) ^ set(self._previous))[:8]}"
            )
        new_phi: dict[str, torch.Tensor] = {}
        for name, current in outputs.items():
            if name in self._previous:
                previous = self._previous[name]
                if previous.shape != current.shape:
                    raise ScoresError(
                        f"NEq: {name}: output shape {tuple(current.shape)} at record "
                        f"{self.records}, {tuple(previous.shape)} before"
                    )
                new_phi[name] = cosine_distance(current, previous).mean(dim=0)
        for name, phi in new_phi.items():
            if name in self.phi:
                delta = phi - self.phi[name]
                prev_v = self.velocity.get(name, torch.zeros_like(delta))
                self.velocity[name] = delta - self.momentum * prev_v
        self.phi.update(new_phi)
        self._previous = {name: t.detach().clone() for name, t in outputs.items()}
        self.records += 1

    def _check_ready(self) -> None:
        if not self.ready:
            raise ScoresError(
                f"NEq: velocities need 3 records (outputs, then two φ's); {self.records} so far"
            )

    def frozen_mask(self) -> dict[str, np.ndarray]:
        """Per layer, a boolean vector over output channels: ``|v| < eps`` (at equilibrium)."""
        self._check_ready()
        return {name: (v.abs() < self.eps).numpy() for name, v in self.velocity.items()}

    def scores(self) -> Scores:
        """``|v|`` as output-channel scores, their sum as layer score (no input-channel scores).

        Layers that were never run get zero scores (listed in ``metadata["layers_not_run"]``).
        """
        self._check_ready()
        layers: dict[str, LayerScores] = {}
        for name, module in self.layers.items():
            v = self.velocity.get(name)
            speed = v.abs().numpy() if v is not None else np.zeros(module.weight.shape[0])
            layers[name] = LayerScores(out_channel=speed, in_channel=None, layer=speed.sum())
        metadata = {
            "samples": int(self.probe_inputs.shape[0]),
            "seed": None,
            "peak_memory_bytes": self.stored_bytes,
            "records": self.records,
            "momentum": self.momentum,
            "eps": self.eps,
            "layers_not_run": [n for n in self.layers if n not in self.velocity],
        }
        return Scores.for_model(self.model, criterion="neq", layers=layers, metadata=metadata)


@register_criterion("neq")
class NEqCriterion(Criterion):
    """NEq velocities over a sequence of weight snapshots (e.g. one state dict per epoch).

    During training use :class:`NEqTracker` directly. This criterion replays snapshots: it loads
    each into a copy of the model (the model passed in is untouched), records the outputs on the
    first ``probe_samples`` samples of the data, and returns the velocities after the last one.

    Args:
        states: At least three state dicts, in epoch order.
        probe_samples: Size of the fixed probe set taken from the data.
        momentum: μ.
        eps: Equilibrium threshold.
    """

    def __init__(
        self,
        *,
        states: Sequence[Mapping[str, torch.Tensor]] = (),
        probe_samples: int = 64,
        momentum: float = 0.5,
        eps: float = 1e-3,
    ) -> None:
        self.states = list(states)
        self.probe_samples = probe_samples
        self.momentum = momentum
        self.eps = eps

    def options(self) -> dict[str, Any]:
        return {
            "snapshots": len(self.states),
            "probe_samples": self.probe_samples,
            "momentum": self.momentum,
            "eps": self.eps,
        }

    def score(self, model: nn.Module, data: Batches | None = None) -> Scores:
        if len(self.states) < 3:
            raise ScoresError(
                f"neq needs at least 3 weight snapshots (one per epoch), got {len(self.states)}; "
                "during training, record velocities with NEqTracker instead"
            )
        n_probe = self.probe_samples
        chunks = take_samples(data, samples=n_probe, chunk=n_probe, what="NEq")
        probe = torch.cat([x for x, _ in chunks])
        replica = copy.deepcopy(model)
        tracker = NEqTracker(replica, probe, momentum=self.momentum, eps=self.eps)
        for index, state in enumerate(self.states):
            try:
                replica.load_state_dict(state)
            except RuntimeError as exc:
                raise ScoresError(f"neq: snapshot {index} does not fit the model: {exc}") from exc
            tracker.record()
        scores = tracker.scores()
        scores.metadata["snapshots"] = len(self.states)
        return scores
