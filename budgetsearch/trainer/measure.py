"""Counting what autograd really keeps for the backward pass, and timing a training step.

:class:`SavedTensorMeter` installs :func:`torch.autograd.graph.saved_tensors_hooks` and records
every tensor autograd saves while it is active, once per storage (a view or an in-place result
shares its producer's storage), leaving out the model's parameters and buffers (they are not
activations). This is exact and independent of the allocator (docs/cost-model.md, 'Measuring
against PyTorch').
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SavedTensorMeter", "StepStats", "measure_step"]


class SavedTensorMeter:
    """Context manager counting the bytes autograd saves for backward, once per storage.

    Args:
        exclude: Tensors not to count (typically ``[*model.parameters(), *model.buffers()]``).

    Attributes:
        storages: Bytes of each counted storage, by storage address.
        dtypes: Bytes counted per dtype name (``float32``, ``bool``...).
    """

    def __init__(self, *, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self.dtypes: dict[str, int] = {}
        self._keep: list[Tensor] = []
        self._ctx: torch.autograd.graph.saved_tensors_hooks | None = None

    @classmethod
    def for_model(cls, model: nn.Module) -> SavedTensorMeter:
        """A meter leaving out ``model``'s parameters and buffers."""
        return cls(exclude=[*model.parameters(), *model.buffers()])

    @property
    def bytes(self) -> int:
        """Total bytes of the distinct storages saved."""
        return int(sum(self.storages.values()))

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self._excluded and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
            name = str(t.dtype).removeprefix("torch.")
            self.dtypes[name] = self.dtypes.get(name, 0) + storage.nbytes()
            self._keep.append(t)  # keep it alive so its address cannot be reused while counting
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._ctx.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._ctx is not None:
                self._ctx.__exit__(exc_type, exc, tb)
        finally:
            self._ctx = None
            self._keep = []


def _unpack(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class StepStats:
    """One measured training step (forward, loss, backward; no optimizer step).

    Attributes:
        saved_bytes: Bytes autograd saved for backward (activations only, once per storage).
        saved_by_dtype: The same, per dtype.
        forward_ms: Forward and loss time.
        backward_ms: Backward time.
        loss: The loss value.
    """

    saved_bytes: int
    saved_by_dtype: dict[str, int]
    forward_ms: float
    backward_ms: float
    loss: float


def measure_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    backward: bool = True,
) -> StepStats:
    """Run one forward/backward step and measure saved bytes and times.

    Gradients accumulate into ``.grad`` as in any step; zero them before if needed.

    Args:
        model: The model, in the mode the step should run in (train, with a plan applied...).
        x: Inputs.
        y: Labels.
        loss_fn: ``loss(logits, labels)``; cross-entropy by default.
        backward: Run the backward too (else only forward and loss are timed).
    """
    loss_fn = loss_fn or F.cross_entropy
    meter = SavedTensorMeter.for_model(model)
    start = time.perf_counter()
    with meter:
        loss = loss_fn(model(x), y)
    mid = time.perf_counter()
    if backward and loss.requires_grad:
        loss.backward()
    end = time.perf_counter()
    return StepStats(
        saved_bytes=meter.bytes,
        saved_by_dtype=dict(meter.dtypes),
        forward_ms=(mid - start) * 1e3,
        backward_ms=(end - mid) * 1e3 if backward else 0.0,
        loss=float(loss.detach()),
    )
