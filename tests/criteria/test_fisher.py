"""Proofs for the streamed Fisher potential: it equals the brute-force pass and the definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetsearch.criteria import (
    FisherCriterion,
    fisher_bruteforce,
    fisher_potential,
    tinytrain_layer_scores,
)
from budgetsearch.errors import DataError, ScoresError

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """conv-BN-ReLU, a 1×1 conv feeding a depthwise conv directly, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.pw = nn.Conv2d(6, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.dw(self.pw(x))
        return self.fc(F.relu(x).mean(dim=(2, 3)))


class ResNetish(nn.Module):
    """A stem and one residual block with a strided 1×1 shortcut conv; in-place ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(True))
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + self.shortcut(x))
        return self.fc(out.mean(dim=(2, 3)))


def _make(net_cls: type[nn.Module], n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = net_cls().double()
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    classes = model.fc.out_features
    x = torch.randn(n, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, classes, (n,))
    return model, x, y


def _by_definition(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Theis et al.'s definition: Δ_o = (1/2N) Σ_n (∂ℓ_n/∂m_o)², m a channel mask of ones on the
    layer's output; one sample at a time, no tensor hooks."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    masks = {
        n: torch.ones(m.weight.shape[0], dtype=torch.float64, requires_grad=True)
        for n, m in layers.items()
    }

    def make(name: str, module: nn.Module):
        def hook(_m, _a, out):
            shape = (1, -1, 1, 1) if isinstance(module, nn.Conv2d) else (1, -1)
            return out * masks[name].view(shape)

        return hook

    handles = [m.register_forward_hook(make(n, m)) for n, m in layers.items()]
    totals = {n: torch.zeros_like(v) for n, v in masks.items()}
    model.eval()
    try:
        for i in range(x.shape[0]):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
            grads = torch.autograd.grad(loss, list(masks.values()))
            for name, grad in zip(masks, grads, strict=True):
                totals[name] += grad**2
    finally:
        for h in handles:
            h.remove()
    return {n: (t / (2 * x.shape[0])).detach().numpy() for n, t in totals.items()}


def _assert_same(a, b, rtol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name].out_channel, b[name].out_channel, rtol=rtol, atol=1e-14)
        if b[name].in_channel is None:
            assert a[name].in_channel is None, name
        else:
            np.testing.assert_allclose(a[name].in_channel, b[name].in_channel, rtol=rtol)
        assert a[name].layer == pytest.approx(b[name].layer, rel=rtol, abs=1e-14)
        assert list(a[name].filtered) == list(b[name].filtered), name
        for r, values in b[name].filtered.items():
            np.testing.assert_allclose(a[name].filtered[r], values, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("net", [TinyNet, ResNetish])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("micro", [1, 2, "whole"])
def test_streamed_equals_bruteforce(net, n, micro):
    model, x, y = _make(net, n)
    brute = fisher_bruteforce(model, x, y)
    micro_batch = n if micro == "whole" else micro
    # Feed the data as uneven batches, so micro-batches straddle batch boundaries.
    batches = [(x[:1], y[:1]), (x[1:], y[1:])] if n > 1 else [(x, y)]
    streamed = fisher_potential(model, batches, micro_batch=micro_batch)
    _assert_same(streamed, brute)
    assert streamed.metadata["samples"] == n
    assert any(ls.layer > 0 for ls in streamed.layers.values())


@pytest.mark.parametrize("net", [TinyNet, ResNetish])
def test_bruteforce_equals_mask_definition(net):
    model, x, y = _make(net, 4, seed=1)
    brute = fisher_bruteforce(model, x, y)
    expected = _by_definition(model, x, y)
    for name, delta in expected.items():
        np.testing.assert_allclose(brute[name].out_channel, delta, rtol=1e-9, atol=1e-15)
        assert brute[name].layer == pytest.approx(delta.sum(), rel=1e-9)


def test_input_channel_delta_is_producer_output_delta():
    model, x, y = _make(TinyNet, 6)
    scores = fisher_potential(model, [(x, y)], micro_batch=4)
    # pw feeds dw directly: dw's input channels are pw's output channels.
    np.testing.assert_allclose(scores["dw"].in_channel, scores["pw"].out_channel, rtol=1e-12)
    assert scores["conv1"].in_channel is None  # fed by the model input: no producer
    res, xr, yr = _make(ResNetish, 3)
    rs = fisher_potential(res, [(xr, yr)], micro_batch=2)
    # conv1 and the shortcut conv read the same tensor.
    np.testing.assert_allclose(rs["conv1"].in_channel, rs["shortcut.0"].in_channel, rtol=1e-12)
    assert rs["conv1"].in_channel.shape == (4,)


def test_streamed_peak_is_bounded_and_below_bruteforce():
    model, x, y = _make(TinyNet, 8)
    brute = fisher_bruteforce(model, x, y)
    small = fisher_potential(model, [(x[:4], y[:4])], micro_batch=2)
    large = fisher_potential(model, [(x, y)], micro_batch=2)
    assert large.metadata["peak_memory_bytes"] == small.metadata["peak_memory_bytes"] > 0
    assert large.metadata["peak_memory_bytes"] < brute.metadata["peak_memory_bytes"]
    whole = fisher_potential(model, [(x, y)], micro_batch=8)
    assert whole.metadata["peak_memory_bytes"] < brute.metadata["peak_memory_bytes"]


def test_samples_takes_the_first_samples():
    model, x, y = _make(ResNetish, 6)
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2)]
    scores = fisher_potential(model, batches, samples=3, micro_batch=2)
    _assert_same(scores, fisher_bruteforce(model, x[:3], y[:3]))
    assert scores.metadata["samples"] == 3


def test_model_state_restored():
    model, x, y = _make(ResNetish, 2)
    model.train()
    model.conv2.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    FisherCriterion(samples=2, micro_batch=1).score(model, [(x, y)])
    assert all(m.training for m in model.modules())
    assert model.relu.inplace and model.stem[2].inplace
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags.pop("conv2.weight") is False and all(flags.values())
    for name, param in model.named_parameters():
        assert param.grad is None
        assert torch.equal(param, before[name])
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name])
    assert not any(m._forward_hooks for m in model.modules())


class _SqrtNet(nn.Module):
    """Adds sqrt(0·a) to conv_a's output: finite forward, NaN gradient (inf·0) into conv_a."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_a(x)
        x = x + torch.sqrt(x * 0)
        return self.fc(self.conv_b(x).mean(dim=(2, 3)))


def test_non_finite_gradient_names_the_layer_and_restores_the_model():
    torch.manual_seed(0)
    model = _SqrtNet().train()
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([0, 1])
    with pytest.raises(ScoresError, match="conv_a"):
        fisher_potential(model, [(x, y)], micro_batch=2)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_non_finite_loss_and_inputs():
    model, x, y = _make(TinyNet, 2)
    with torch.no_grad():
        model.fc.bias[0] = float("inf")
    with pytest.raises(ScoresError, match="loss"):
        fisher_potential(model, [(x, y)])
    model, x, y = _make(TinyNet, 2)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fisher_potential(model, [(x, y)])


def test_data_errors():
    model, x, y = _make(TinyNet, 3)
    with pytest.raises(DataError, match="asked for 5 samples, the data holds only 3"):
        fisher_potential(model, [(x, y)], samples=5)
    with pytest.raises(DataError, match="needs data"):
        fisher_potential(model, None)
    with pytest.raises(DataError, match="empty"):
        fisher_potential(model, [])
    with pytest.raises(DataError, match="labels"):
        fisher_potential(model, [(x, y[:2])])
    classes = model.fc.out_features
    wrong = y.clone()
    wrong[1] = classes  # one past the last class: a bare IndexError of the loss before
    with pytest.raises(DataError, match=rf"the labels of .* run from \d+ to {classes}; the model "
                                        rf"has {classes} classes \(0 to {classes - 1}\)"):
        fisher_potential(model, [(x, wrong)])


def test_float32_model_and_dataloader():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    scores = FisherCriterion(samples=6, micro_batch=3).score(model, loader)
    brute = fisher_bruteforce(model, x, y)
    _assert_same(scores, brute, rtol=1e-4)
    assert scores.criterion == "fisher" and scores.metadata["loss_reduction"] == "sum"
    with pytest.raises(DataError, match="only 6"):
        fisher_potential(model, loader, samples=7)


def test_tinytrain_layer_scores():
    potential = {"a": 2.0, "b": 1.0}
    s = tinytrain_layer_scores(potential, params={"a": 10, "b": 5}, macs={"a": 4, "b": 8})
    # a: cost (10/10)·(4/8) = 0.5 -> 4; b: (5/10)·(8/8) = 0.5 -> 2
    assert s == {"a": pytest.approx(4.0), "b": pytest.approx(2.0)}
    with pytest.raises(ScoresError):
        tinytrain_layer_scores({"a": 1.0}, params={"a": 0}, macs={"a": 1})


def _filtered_by_definition(model: nn.Module, x: torch.Tensor, y: torch.Tensor, r: int):
    """Δ^(r)_o = clip((1/2N) Σ_n γ γ̂, 0, Δ_o) written out with explicit patches: γ = Σ_d a·g,
    γ̂ = Σ_cells (Σ_cell a)(mean_cell g); the patch grid has ceil(H/r) cells per side and
    ceil((cells·r − H)/2) leading rows (columns) outside the map."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    cross = {n: 0.0 for n in convs}
    square = {n: 0.0 for n in convs}
    kept: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(
        lambda _m, _a, out, n=n: kept.__setitem__(n, out)) for n, m in convs.items()]
    model.eval()
    try:
        for i in range(x.shape[0]):
            kept.clear()
            loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
            grads = torch.autograd.grad(loss, [kept[n] for n in convs])
            for (name, a), g in zip(((n, kept[n]) for n in convs), grads, strict=True):
                a, g = a[0].detach().numpy(), g[0].numpy()
                _c, h, w = a.shape
                ph, pw = -(-h // r), -(-w // r)
                oh, ow = (ph * r - h + 1) // 2, (pw * r - w + 1) // 2
                hat = np.zeros(a.shape[0])
                for ci in range(ph):
                    for cj in range(pw):
                        rows = slice(max(0, ci * r - oh), min(h, (ci + 1) * r - oh))
                        cols = slice(max(0, cj * r - ow), min(w, (cj + 1) * r - ow))
                        hat += a[:, rows, cols].sum((1, 2)) * g[:, rows, cols].mean((1, 2))
                gamma = (a * g).sum((1, 2))
                cross[name] = cross[name] + gamma * hat
                square[name] = square[name] + gamma**2
    finally:
        for handle in handles:
            handle.remove()
    n = 2 * x.shape[0]
    return {k: np.clip(cross[k] / n, 0, square[k] / n) for k in convs}


@pytest.mark.parametrize("size", [8, 7])
def test_filtered_potential_matches_its_definition(size):
    torch.manual_seed(3)
    model = TinyNet().double()
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    scores = fisher_potential(model, [(x, y)], micro_batch=2)
    assert set(scores["fc"].filtered) == set()  # a linear layer is never filtered
    for r in (2, 4, 8):
        expected = _filtered_by_definition(model, x, y, r)
        for name, values in expected.items():
            got = scores[name].filtered[r]
            np.testing.assert_allclose(got, values, rtol=1e-9, atol=1e-15)
            assert (got <= scores[name].out_channel + 1e-15).all()
    # a patch at least as large as the map averages g over the whole map: on an 8x8 map r = 8
    # loses more than r = 2 on every conv, summed over the channels
    if size == 8:
        for name in ("conv1", "pw", "dw"):
            assert scores[name].filtered[8].sum() <= scores[name].filtered[2].sum() + 1e-15


def test_filtered_potential_is_the_potential_on_a_one_pixel_map():
    """On a 1x1 map the patch mean of g is g itself: nothing is lost."""
    torch.manual_seed(0)
    model = TinyNet().double()
    x = torch.randn(3, 3, 1, 1, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    scores = fisher_potential(model, [(x, y)])
    for name in ("conv1", "pw", "dw"):
        for r in (2, 4, 8):
            np.testing.assert_allclose(scores[name].filtered[r], scores[name].out_channel,
                                       rtol=1e-12, atol=1e-18)
