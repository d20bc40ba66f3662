"""NEq velocities against hand-computed sequences; per-channel parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from budgetsearch.criteria import NEqCriterion, NEqTracker, channel_param_counts, get_criterion
from budgetsearch.errors import ScoresError

torch.set_num_threads(1)


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _maps(*per_channel: list[list[float]]) -> torch.Tensor:
    """(N=len(samples), C, D) from per-channel lists of per-sample maps."""
    return torch.tensor(per_channel, dtype=torch.float64).transpose(0, 1)


def test_velocity_matches_hand_computed_sequence():
    model = _Two()
    tracker = NEqTracker(model, torch.zeros(2, 1, 2, 1), momentum=0.5, eps=1e-3)
    # Channel 0, sample 0 turns (1,0) -> (0,1) -> (0,1) -> (0,-1) -> (0,-1): 1 − cos = 1, 0, 2, 0.
    # Channel 0, sample 1 stays (2,2): 1 − cos = 0 always.
    # Channel 1 only changes scale (cos = 1); channel 2 is all zeros (distance 0 by convention).
    turning = [[1, 0], [0, 1], [0, 1], [0, -1], [0, -1]]
    ch0 = [[turn, [2, 2]] for turn in turning]
    expected_phi0 = [None, 0.5, 0.0, 1.0, 0.0]  # means over the two samples
    # v: record 2: Δφ = 0 − 0.5 = −0.5, v = −0.5; record 3: Δφ = 1, v = 1 − 0.5·(−0.5) = 1.25;
    # record 4: Δφ = −1, v = −1 − 0.5·1.25 = −1.625.
    expected_v0 = [None, None, -0.5, 1.25, -1.625]
    for t in range(5):
        scale = float(t + 1)
        outputs = {
            "conv": _maps(ch0[t], [[scale, scale], [scale, 0]], [[0, 0], [0, 0]]),
            "fc": torch.ones(2, 2, 1, dtype=torch.float64),
        }
        tracker.update(outputs)
        assert tracker.records == t + 1
        if expected_phi0[t] is None:
            assert "conv" not in tracker.phi
        else:
            assert tracker.phi["conv"][0].item() == pytest.approx(expected_phi0[t])
            assert tracker.phi["conv"][1:].tolist() == pytest.approx([0.0, 0.0])
        if expected_v0[t] is None:
            assert not tracker.ready
            with pytest.raises(ScoresError, match="3 records"):
                tracker.scores()
        else:
            assert tracker.velocity["conv"][0].item() == pytest.approx(expected_v0[t])
    scores = tracker.scores()
    assert scores["conv"].out_channel.tolist() == pytest.approx([1.625, 0.0, 0.0])
    assert scores["conv"].in_channel is None
    assert scores["conv"].layer == pytest.approx(1.625)
    assert scores.criterion == "neq" and scores.metadata["records"] == 5
    assert tracker.frozen_mask()["conv"].tolist() == [False, True, True]
    assert tracker.frozen_mask()["fc"].tolist() == [True, True]


def test_cosine_conventions():
    from budgetsearch.criteria import cosine_distance

    a = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [-2.0, -2.0]]])
    assert cosine_distance(a, b)[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 2.0])


def test_record_runs_the_model_and_restores_it():
    torch.manual_seed(0)
    model = _Two().train()
    probe = torch.randn(5, 1, 3, 3)
    tracker = NEqTracker(model, probe, batch_size=2)
    for _ in range(3):
        tracker.record()
        with torch.no_grad():
            model.conv.weight.add_(0.3 * torch.randn_like(model.conv.weight))
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())
    scores = tracker.scores()
    assert scores["conv"].out_channel.shape == (3,)
    assert scores["fc"].out_channel.shape == (2,)
    assert scores.metadata["samples"] == 5
    assert tracker.stored_bytes == 5 * 3 * 9 * 4 + 5 * 2 * 4


def test_neq_criterion_replays_snapshots():
    torch.manual_seed(0)
    model = _Two()
    states = []
    for _ in range(3):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            model.conv.weight.mul_(-1.5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    probe = [(torch.randn(4, 1, 3, 3), torch.zeros(4))]
    scores = get_criterion("neq", states=states, probe_samples=4).score(model, probe)
    assert scores.metadata["snapshots"] == 3
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with pytest.raises(ScoresError, match="at least 3"):
        NEqCriterion(states=states[:2]).score(model, probe)


def test_channel_param_counts():
    regular = nn.Conv2d(8, 16, 3)
    assert channel_param_counts(regular).tolist() == [8 * 9 + 1] * 16
    depthwise = nn.Conv2d(16, 16, 3, groups=16, bias=False)
    assert channel_param_counts(depthwise).tolist() == [9] * 16  # K², not C·K²
    grouped = nn.Conv2d(8, 12, (3, 5), groups=4)
    assert channel_param_counts(grouped).tolist() == [2 * 15 + 1] * 12
    linear = nn.Linear(10, 5)
    assert channel_param_counts(linear).tolist() == [11] * 5
    assert channel_param_counts(nn.Linear(10, 5, bias=False)).sum() == 50
    with pytest.raises(ScoresError):
        channel_param_counts(nn.BatchNorm2d(3))
    assert isinstance(channel_param_counts(regular), np.ndarray)
