"""Model fingerprints: stable, sensitive to names and shapes but not order, readable differences."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from torch import nn

import budgetsearch.fingerprint as fingerprint_module
from budgetsearch.fingerprint import (
    TRAINABLE_LAYER_TYPES,
    diff_layer_shapes,
    fingerprint,
    layer_shapes,
)

SHAPES = {
    "features.0.0": [32, 3, 3, 3],
    "features.1.conv.0.0": [32, 1, 3, 3],
    "features.1.conv.1": [16, 32, 1, 1],
    "classifier.1": [1000, 1280],
}


def _documented_fingerprint(shapes: dict[str, list[int]]) -> str:
    """The schema's definition: the first 16 hex digits of the SHA-256 of the layer_shapes as a
    compact JSON list of [name, shape] pairs sorted by name, written out independently of the
    library."""
    pairs = ",".join(
        "[" + json.dumps(name) + ",[" + ",".join(str(d) for d in shape) + "]]"
        for name, shape in sorted(shapes.items())
    )
    return hashlib.sha256(f"[{pairs}]".encode()).hexdigest()[:16]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 10)


def test_matches_the_documented_definition() -> None:
    fp = fingerprint(SHAPES)
    assert len(fp) == 16
    assert all(c in "0123456789abcdef" for c in fp)
    assert fp == _documented_fingerprint(SHAPES)
    assert fingerprint(layer_shapes(_Net())) == _documented_fingerprint(layer_shapes(_Net()))


# Loads fingerprint.py alone in a fresh interpreter; torch is stubbed (the module only needs the
# nn.Conv2d / nn.Linear names at import time) so the subprocess starts in a fraction of a second.
_SUBPROCESS = """
import importlib.util, json, sys, types
nn = types.SimpleNamespace(Conv2d=type("Conv2d", (), {}), Linear=type("Linear", (), {}))
sys.modules["torch"] = types.SimpleNamespace(nn=nn)
spec = importlib.util.spec_from_file_location("fp", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(mod.fingerprint(json.loads(sys.argv[2])))
"""


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_stable_across_processes(seed) -> None:
    # Another interpreter with another hash seed computes the same fingerprint.
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, fingerprint_module.__file__, json.dumps(SHAPES)],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.strip() == fingerprint(SHAPES)


def test_independent_of_list_or_tuple_and_dict_identity() -> None:
    as_tuples = {k: tuple(v) for k, v in SHAPES.items()}
    assert fingerprint(dict(SHAPES)) == fingerprint(SHAPES)
    assert fingerprint(json.loads(json.dumps(SHAPES))) == fingerprint(SHAPES)
    assert fingerprint({k: list(v) for k, v in as_tuples.items()}) == fingerprint(SHAPES)


@pytest.mark.parametrize(
    "changed",
    [
        {**SHAPES, "classifier.1": [10, 1280]},  # another head
        {**SHAPES, "features.1.conv.0.0": [32, 2, 3, 3]},  # another shape
        {**SHAPES, "features.1.conv.1": [16, 32]},  # another rank
        {("features.0.1" if k == "features.0.0" else k): v for k, v in SHAPES.items()},  # renamed
        {k: SHAPES[k] for k in list(SHAPES)[:-1]},  # a layer less
        {**SHAPES, "extra": [4, 4]},  # a layer more
    ],
)
def test_changes_with_any_name_or_shape_change(changed) -> None:
    assert changed != SHAPES or list(changed) != list(SHAPES)
    assert fingerprint(changed) != fingerprint(SHAPES)
    assert fingerprint(changed) == _documented_fingerprint(changed)


def test_does_not_depend_on_the_order_of_layers() -> None:
    # module registration order and forward order differ in some models; both name one model
    reordered = dict(reversed(list(SHAPES.items())))
    assert list(reordered) != list(SHAPES)
    assert fingerprint(reordered) == fingerprint(SHAPES)


def test_layer_shapes_lists_convs_and_linears_in_order() -> None:
    net = _Net()
    assert layer_shapes(net) == {
        "stem": [8, 3, 3, 3],
        "body.0": [8, 1, 3, 3],
        "body.2": [4, 8, 1, 1],
        "head": [10, 4],
    }
    assert list(layer_shapes(net)) == ["stem", "body.0", "body.2", "head"]
    assert nn.Conv2d in TRAINABLE_LAYER_TYPES
    assert nn.Linear in TRAINABLE_LAYER_TYPES
    assert nn.BatchNorm2d not in TRAINABLE_LAYER_TYPES


def test_layer_shapes_follow_the_model() -> None:
    a, b = _Net(), _Net()
    b.head = nn.Linear(4, 3)
    assert fingerprint(layer_shapes(a)) == fingerprint(layer_shapes(_Net()))
    assert fingerprint(layer_shapes(a)) != fingerprint(layer_shapes(b))


def test_diff_identical_is_empty() -> None:
    assert diff_layer_shapes(SHAPES, dict(SHAPES)) == []


def test_diff_lists_missing_extra_and_different_layers() -> None:
    actual = {k: v for k, v in SHAPES.items() if k != "features.1.conv.1"}
    actual["classifier.1"] = [10, 1280]
    actual["fc"] = [10, 512]
    lines = diff_layer_shapes(SHAPES, actual)
    assert len(lines) == 3
    (missing,) = [line for line in lines if line.startswith("features.1.conv.1")]
    assert "missing" in missing
    (different,) = [line for line in lines if line.startswith("classifier.1")]
    assert "[10, 1280]" in different  # what the model has
    assert "[1000, 1280]" in different  # what was expected
    assert different.index("[10, 1280]") < different.index("[1000, 1280]")
    (extra,) = [line for line in lines if line.startswith("fc")]
    assert "not expected" in extra
    # Unchanged layers are not mentioned.
    assert not any(line.startswith(("features.0.0", "features.1.conv.0.0")) for line in lines)


@pytest.mark.parametrize(("n_missing", "limit"), [(9, 8), (20, 8), (5, 3), (30, 1)])
def test_diff_truncates_with_count_of_the_rest(n_missing, limit) -> None:
    expected = {f"layer{i}": [4, 4] for i in range(n_missing)}
    actual = {"other": [4, 4]}
    lines = diff_layer_shapes(expected, actual, limit=limit)
    total = n_missing + 1
    assert len(lines) == limit + 1
    assert lines[-1] == f"... and {total - limit} more"
    assert lines[:limit] == [f"layer{i}: missing from the model" for i in range(limit)]


def test_diff_at_the_limit_is_not_truncated() -> None:
    expected = {f"layer{i}": [4, 4] for i in range(8)}
    lines = diff_layer_shapes(expected, {}, limit=8)
    assert len(lines) == 8
    assert not any("more" in line for line in lines)
