"""Allocator-independent measurement of the memory a scoring pass holds.

The PyTorch CPU allocator hides what a pass really keeps (docs/cost-model.md, 'Measuring against
PyTorch'), so the criteria count bytes themselves: every tensor autograd saves for backward
(through ``torch.autograd.graph.saved_tensors_hooks``) and every tensor a criterion keeps by its
own hooks. Tensors are counted once per storage (a view and its base, or a tensor saved by two
operators, count once) and a storage's full size is counted while any holder is alive. The storages
of the model's parameters and buffers are not counted: they are there whether or not the pass runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["MemoryMeter"]

_Key = tuple[str, int]


def _storage(tensor: torch.Tensor) -> tuple[_Key, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta or other storage-less tensors
        return None
    return (str(tensor.device), storage.data_ptr()), storage.nbytes()


class _Packed:
    """What autograd keeps instead of a saved tensor while the meter watches: the tensor itself,
    plus a reference count on its storage that is dropped when autograd frees it."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: MemoryMeter, tensor: torch.Tensor) -> None:
        self.meter = meter
        # Detached: same storage, no grad_fn, so a saved output cannot close a reference cycle
        # (output -> grad_fn -> saved variable -> output) that would outlive the graph.
        self.tensor = tensor.detach()
        self.key = meter.hold(tensor)

    def __del__(self) -> None:
        self.meter.release(self.key)


class MemoryMeter:
    """Running and peak count of the bytes held by autograd and by a criterion's hooks.

    Args:
        exclude: Tensors whose storages are never counted (typically the model's parameters and
            buffers).

    Attributes:
        current_bytes: Bytes held now.
        peak_bytes: Largest value ``current_bytes`` has had.
    """

    def __init__(self, *, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded: set[_Key] = set()
        for tensor in exclude:
            found = _storage(tensor)
            if found is not None:
                self._excluded.add(found[0])
        self._refs: dict[_Key, int] = {}
        self._sizes: dict[_Key, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def hold(self, tensor: torch.Tensor) -> _Key | None:
        """Count ``tensor``'s storage as held (once per storage); returns a key for release."""
        found = _storage(tensor)
        if found is None or found[0] in self._excluded:
            return None
        key, size = found
        count = self._refs.get(key, 0)
        self._refs[key] = count + 1
        if count == 0:
            self._sizes[key] = size
            self.current_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return key

    def release(self, key: _Key | None) -> None:
        """Drop one hold taken by :meth:`hold`."""
        if key is None or key not in self._refs:
            return
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current_bytes -= self._sizes.pop(key)

    @contextmanager
    def saved_tensors(self) -> Iterator[MemoryMeter]:
        """Count every tensor autograd saves for backward while the context is open."""
        with torch.autograd.graph.saved_tensors_hooks(
            lambda tensor: _Packed(self, tensor), lambda packed: packed.tensor
        ):
            yield self
