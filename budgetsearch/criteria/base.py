"""The contract every selection criterion fulfils, the criterion registry, and helpers the
criteria share.

A criterion class is registered under its name by :func:`register_criterion`, a decorator on the
class; :func:`get_criterion` builds one by name and :func:`list_criteria` lists the names.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .._registry import Registry
from ..errors import DataError, ScoresError
from ..fingerprint import TRAINABLE_LAYER_TYPES
from ..ops.modules import suspended_epilogues
from .scores import Scores

__all__ = [
    "Batches",
    "Criterion",
    "get_criterion",
    "list_criteria",
    "model_dtype_device",
    "preserved_state",
    "register_criterion",
    "take_samples",
    "trainable_layers",
]

#: What a data-driven criterion consumes: an iterable of ``(inputs, labels)`` batches, such as a
#: ``torch.utils.data.DataLoader``.
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Criterion(abc.ABC):
    """A rule that scores the layers and channels of a model for sparse training.

    Contract:
        - A criterion is configured at construction (keyword-only options such as ``samples`` or
          ``seed``) and is then a pure function of the model and the data: :meth:`score` returns
          a :class:`~budgetsearch.criteria.scores.Scores` with one entry for every ``nn.Conv2d``
          and ``nn.Linear`` of the model, in module order, named by qualified module name.
        - Output-channel vectors have length C_out; input-channel vectors have the layer's real
          input-channel count (``C_in/G · G`` for a conv) or are ``None`` where the criterion
          does not define them. Larger means more important (more worth updating).
        - The model comes back as it was given: training mode, ``requires_grad`` flags, weights
          and ``.grad`` buffers are left unchanged, and no hook stays registered, even when
          :meth:`score` raises.
        - ``Scores.metadata`` records at least ``samples`` (data samples used; 0 for data-free
          criteria), ``seed`` (``None`` if not random) and ``peak_memory_bytes`` (memory the
          pass itself held at its peak, 0 if it holds none).
        - Errors caused by the data raise :class:`~budgetsearch.errors.DataError`, those caused
          by the model or a numerical failure :class:`~budgetsearch.errors.ScoresError`.

    Attributes:
        name: Registry name of the criterion (set by :func:`register_criterion`).
        needs_data: Whether :meth:`score` reads ``data`` (``False``: it may be ``None``).
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True

    @abc.abstractmethod
    def score(self, model: nn.Module, data: Batches | None = None) -> Scores:
        """Score every trainable layer of ``model``.

        Args:
            model: The model to score.
            data: Batches of ``(inputs, labels)``, or ``None`` for a criterion that needs no data.

        Returns:
            The scores of every trainable layer.
        """

    def options(self) -> dict[str, Any]:
        """The options this criterion was built with (recorded in the scores' metadata)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


C = TypeVar("C", bound=type[Criterion])

#: The criterion classes by name (case-insensitive).
_CRITERIA: Registry[type[Criterion]] = Registry(
    "criterion", error=ScoresError, normalize=lambda name: name.strip().lower())


def register_criterion(name: str, *, replace: bool = False) -> Callable[[C], C]:
    """A decorator registering a :class:`Criterion` subclass under ``name`` (and setting its
    ``name``), so that :func:`get_criterion` builds it.

    Args:
        name: The registry name (case-insensitive).
        replace: Replace a criterion registered under the name.

    Raises:
        ScoresError: If the name is taken and ``replace`` is false.
    """
    def decorate(cls: C) -> C:
        _CRITERIA.add(name, cls, replace=replace)
        cls.name = name.strip().lower()
        return cls

    return decorate


def list_criteria() -> list[str]:
    """Names of the registered criteria, sorted."""
    return _CRITERIA.names()


def get_criterion(name: str, **options: Any) -> Criterion:
    """Build a criterion by name.

    Args:
        name: One of :func:`list_criteria` (case-insensitive).
        **options: Keyword options of that criterion (e.g. ``samples=128`` for ``fisher``,
            ``seed=0`` for ``random``).

    Raises:
        ScoresError: If the name is unknown (listing the known ones) or an option is not
            accepted by that criterion.
    """
    cls = _CRITERIA[name]
    try:
        return cls(**options)
    except TypeError as exc:
        raise ScoresError(f"criterion {cls.name!r}: bad options {sorted(options)} ({exc})"
                          ) from exc


def trainable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's conv and linear layers by qualified name, in module order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, TRAINABLE_LAYER_TYPES)
    }


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Floating dtype and device of the model's first parameter (float32 / CPU if it has none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype, param.device
    return torch.float32, torch.device("cpu")


@contextmanager
def preserved_state(
    model: nn.Module, *, eval_mode: bool = True, freeze: bool = False, no_inplace: bool = False
) -> Iterator[None]:
    """Temporarily change a model and restore it exactly afterwards, even on error.

    Epilogues fused into planned convs are always suspended within (see
    :func:`~budgetsearch.ops.suspended_epilogues`), so that hooks see each layer's own output.

    Args:
        model: The model.
        eval_mode: Put every module in eval mode (batch norm uses its running statistics, dropout
            is off), so that each sample's result does not depend on the rest of its batch.
        freeze: Set ``requires_grad=False`` on every parameter.
        no_inplace: Set ``inplace=False`` on every module that has such a flag (``ReLU``,
            ``ReLU6``, ``Hardswish``, ``Dropout``...), so that hooked outputs keep their values.
    """
    modes = {module: module.training for module in model.modules()}
    flags = {param: param.requires_grad for param in model.parameters()}
    inplace = {
        module: module.inplace
        for module in model.modules()
        if isinstance(getattr(module, "inplace", None), bool)
    }
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for param in flags:
                param.requires_grad_(False)
        if no_inplace:
            for module in inplace:
                module.inplace = False
        with suspended_epilogues(model):  # each layer's own output, even with a plan applied
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for module, flag in inplace.items():
            module.inplace = flag


def take_samples(
    data: Batches | None, *, samples: int | None, chunk: int, what: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-cut batches into chunks of at most ``chunk`` samples, stopping after ``samples``.

    Raises:
        DataError: If there is no data, a batch is not ``(inputs, labels)``, or the data holds
            fewer than ``samples`` samples (raised once the data is exhausted).
    """
    if data is None:
        raise DataError(f"{what} needs data: batches of (inputs, labels)")
    if samples is not None and samples < 1:
        raise DataError(f"{what}: samples must be at least 1, got {samples}")
    available = _known_length(data)
    if samples is not None and available is not None and available < samples:
        raise DataError(f"{what}: asked for {samples} samples, the data holds only {available}")
    taken = 0
    for index, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{what}: batch {index} is not an (inputs, labels) pair")
        x, y = batch[0], batch[1]
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{what}: batch {index} has {x.shape[0]} inputs but {y.shape[0]} labels"
            )
        if samples is not None:
            x, y = x[: samples - taken], y[: samples - taken]
        for start in range(0, x.shape[0], chunk):
            yield x[start : start + chunk], y[start : start + chunk]
        taken += x.shape[0]
        if samples is not None and taken >= samples:
            return
    if taken == 0:
        raise DataError(f"{what}: the data is empty")
    if samples is not None and taken < samples:
        raise DataError(f"{what}: asked for {samples} samples, the data holds only {taken}")


def _known_length(data: object) -> int | None:
    """Number of samples behind a ``DataLoader`` over a sized dataset, if it can be told cheaply."""
    if isinstance(data, torch.utils.data.DataLoader):
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None
