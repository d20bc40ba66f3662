"""Magnitude scores against a hand computation; random scores are reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from budgetsearch.criteria import (
    MagnitudeCriterion,
    RandomCriterion,
    get_criterion,
    list_criteria,
    magnitude_scores,
    random_scores,
)
from budgetsearch.errors import ScoresError


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1, bias=False)
        self.grouped = nn.Conv2d(4, 2, 1, groups=2, bias=False)
        self.dw = nn.Conv2d(2, 2, 2, groups=2, bias=False)
        self.fc = nn.Linear(2, 3, bias=False)


def _net() -> _Net:
    net = _Net()
    with torch.no_grad():
        conv = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 4.0], [2.0, 2.0]])
        net.conv.weight.copy_(conv[..., None, None])
        net.grouped.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]])[..., None, None])
        dw = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 3.0], [4.0, 0.0]]])
        net.dw.weight.copy_(dw[:, None])
        net.fc.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]]))
    return net


def test_magnitude_by_hand():
    s = magnitude_scores(_net())
    assert s["conv"].out_channel.tolist() == pytest.approx([math.sqrt(5), 3, 4, math.sqrt(8)])
    assert s["conv"].in_channel.tolist() == pytest.approx([math.sqrt(14), math.sqrt(24)])
    # grouped: out 0 reads in 0,1 (weights 1,2); out 1 reads in 2,3 (weights 3,4)
    assert s["grouped"].out_channel.tolist() == pytest.approx([math.sqrt(5), 5])
    assert s["grouped"].in_channel.tolist() == pytest.approx([1, 2, 3, 4])
    # depthwise: each channel's own kernel
    assert s["dw"].out_channel.tolist() == pytest.approx([2, 5])
    assert s["dw"].in_channel.tolist() == pytest.approx([2, 5])
    assert s["fc"].in_channel.tolist() == pytest.approx([math.sqrt(10), math.sqrt(17)])
    assert s["fc"].layer == pytest.approx(math.sqrt(27 / 6))
    assert s.metadata == {"samples": 0, "seed": None, "peak_memory_bytes": 0}
    assert MagnitudeCriterion().score(_net(), None)["conv"].layer == s["conv"].layer


def test_magnitude_ranks_input_channels_by_int8_weights():
    """A layer with per-output-channel scales (an int8 MCU conv) ranks its input channels by the
    integer weights; output-channel and layer scores stay on the float weights."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    ints = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # int8 norms: in 0 -> 3, in 1 -> 2
    scales = torch.tensor([0.1, 1.0])  # float norms: in 0 -> 0.3, in 1 -> 2
    with torch.no_grad():
        conv.weight.copy_((ints * scales[:, None])[..., None, None])
    plain = magnitude_scores(nn.Sequential(conv))["0"]
    assert plain.in_channel.tolist() == pytest.approx([0.3, 2.0])
    conv.register_buffer("weight_scale", scales, persistent=False)
    s = magnitude_scores(nn.Sequential(conv))["0"]
    assert s.in_channel.tolist() == pytest.approx([3.0, 2.0])
    assert s.out_channel.tolist() == pytest.approx(plain.out_channel.tolist())
    assert s.layer == pytest.approx(plain.layer)


def test_random_reproducible():
    a = random_scores(_net(), seed=3)
    b = RandomCriterion(seed=3).score(_net())
    c = random_scores(_net(), seed=4)
    for name in a:
        np.testing.assert_array_equal(a[name].out_channel, b[name].out_channel)
        np.testing.assert_array_equal(a[name].in_channel, b[name].in_channel)
    assert not np.array_equal(a["conv"].out_channel, c["conv"].out_channel)
    assert a["grouped"].in_channel.shape == (4,)
    assert a.metadata["seed"] == 3


def test_registry():
    assert list_criteria() == ["fisher", "magnitude", "neq", "random"]
    assert get_criterion("Random", seed=1).seed == 1
    assert get_criterion("fisher", samples=8).samples == 8
    with pytest.raises(ScoresError, match="fisher, magnitude, neq, random"):
        get_criterion("taylor")
    with pytest.raises(ScoresError, match="bad options"):
        get_criterion("random", samples=3)
