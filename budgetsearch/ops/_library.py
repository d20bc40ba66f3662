"""The ``budgetsearch::`` operator namespace: the training operators as PyTorch custom ops.

Each operator is a :func:`torch.library.custom_op` with its own backward
(:meth:`~torch._library.custom_ops.CustomOpDef.register_autograd`) and a fake kernel, so that
``torch.export`` keeps it as one node (with its backward, where a ``torch.autograd.Function``'s
custom backward would be dropped) and ``torch.compile`` traces through it. The forward is the
operator's plain computation; what the backward needs is chosen and saved in ``setup_context``,
which runs right after the forward inside the same autograd node. Geometry and channel
selections travel as ints and int lists (an op takes no Python objects); the Python-side
dataclasses stay the public face.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["IMPLS", "NAMESPACE", "define", "is_eager"]

#: The namespace of the operators: ``torch.ops.budgetsearch.<name>``.
NAMESPACE = "budgetsearch"

_EAGER_TYPES = (Tensor, nn.Parameter)

#: Each operator's forward by name (``impl`` of :func:`define`): plain tensor operators, which a
#: graph pass can trace in place of the operator's node where its backward is already in the
#: graph (the ExecuTorch export, :mod:`budgetsearch.export.executorch`).
IMPLS: dict[str, Callable[..., Tensor]] = {}


def define(name: str, schema: str, impl: Callable[..., Tensor], *,
           setup_context: Callable[..., None], backward: Callable[..., tuple]) -> object:
    """Register ``budgetsearch::name``: ``impl`` is both its CPU/CUDA kernel and its fake kernel
    (it runs tensor operators only, so it works on fake tensors too).

    Args:
        name: Operator name, without the namespace.
        schema: Its schema, e.g. ``"(Tensor x) -> Tensor"``.
        impl: The forward.
        setup_context: ``(ctx, inputs, output)``: what to keep for the backward.
        backward: ``(ctx, grad)``: one gradient (or None) per input.

    Returns:
        The custom op (call it like a function).
    """
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(impl)
    op.register_autograd(backward, setup_context=setup_context)
    IMPLS[name] = impl
    return op


def is_eager(t: Tensor) -> bool:
    """Whether ``t`` is a plain tensor (or parameter), not a fake or functional tensor of a
    trace (``torch.compile``, ``torch.export``, ``opcheck``)."""
    return type(t) in _EAGER_TYPES

