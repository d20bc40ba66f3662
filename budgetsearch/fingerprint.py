"""Model fingerprints: which layers a model has, by qualified name, and their weight shapes.

A plan or a scores file records the fingerprint of the model it was made for, so that applying it
to another model is refused with the differing layers named.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

__all__ = ["TRAINABLE_LAYER_TYPES", "diff_layer_shapes", "fingerprint", "layer_shapes"]

#: Module types whose parameters a plan can update (a linear layer is a 1×1 conv).
TRAINABLE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Weight shape of every trainable layer (conv or linear) by qualified module name, in order."""
    return {
        name: list(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, TRAINABLE_LAYER_TYPES)
    }


def fingerprint(shapes: dict[str, list[int]]) -> str:
    """A short stable hash of a ``layer_shapes`` mapping (16 hex digits): the SHA-256 of the
    [name, shape] pairs sorted by name, as compact JSON. It does not depend on the order of the
    mapping (module registration order and forward order differ in some models)."""
    text = json.dumps(sorted(shapes.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff_layer_shapes(
    expected: dict[str, list[int]], actual: dict[str, list[int]], *, limit: int = 8
) -> list[str]:
    """Human-readable differences between two ``layer_shapes`` mappings (at most ``limit``)."""
    lines: list[str] = []
    for name in expected:
        if name not in actual:
            lines.append(f"{name}: missing from the model")
        elif list(actual[name]) != list(expected[name]):
            lines.append(
                f"{name}: shape {list(actual[name])} in the model, {expected[name]} expected"
            )
    lines.extend(f"{name}: not expected" for name in actual if name not in expected)
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return lines
