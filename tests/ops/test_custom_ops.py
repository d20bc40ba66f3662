"""The training operators as PyTorch custom ops: ``opcheck`` on each, ``torch.export`` of a
planned model keeping them (and their backward), and ``torch.compile`` of a planned model
matching eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetsearch.graph import LayerGraph
from budgetsearch.ops._library import NAMESPACE
from budgetsearch.ops.sparse import ChannelSelection
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.trainer import apply_plan

torch.set_num_threads(1)
OPS = getattr(torch.ops, NAMESPACE)


def _sparse_conv_args(*, groups, stride, padding, out_channels=(), in_channels=()):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 7, generator=gen, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, generator=gen)
    b = torch.randn(6, generator=gen, requires_grad=True)
    if not out_channels and not in_channels:  # all channels: the full weight is trained
        return (x, w.requires_grad_(), b, None, [], [], [stride] * 2, [padding] * 2, [1, 1],
                groups, True, True)
    sel = ChannelSelection(w.shape, groups=groups, out_channels=out_channels or None,
                           in_channels=in_channels or None)
    ws = sel.gather(w).requires_grad_()
    return (x, w, b, ws, list(out_channels), list(in_channels), [stride] * 2, [padding] * 2,
            [1, 1], groups, True, True)


def _filtered_args(*, stride, patch, scale, border, in_channels=(), epilogue=False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 11, 10, generator=gen, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    b = torch.randn(6, generator=gen, requires_grad=True)
    ws = None
    if in_channels:
        ws = ChannelSelection(w.shape, in_channels=in_channels).gather(w).requires_grad_()
    else:
        w.requires_grad_()
    ep: tuple = (None, None, None, None, None, False)
    if epilogue:
        ep = (torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen),
              torch.randn(6, generator=gen, requires_grad=True), 0.0, 6.0, True)
    return (x, w, b, ws, [], list(in_channels), [stride] * 2, [1, 1], [1, 1], 1, [patch] * 2,
            scale, border, True, True, *ep)


CASES = {
    "sparse_conv2d rows grouped": (
        "sparse_conv2d", lambda: _sparse_conv_args(groups=2, stride=2, padding=1,
                                                   out_channels=(3, 1))),
    "sparse_conv2d columns": (
        "sparse_conv2d", lambda: _sparse_conv_args(groups=1, stride=1, padding=0,
                                                   in_channels=(3, 0))),
    "sparse_conv2d all channels": (
        "sparse_conv2d", lambda: _sparse_conv_args(groups=1, stride=1, padding=1)),
    "sparse_linear columns": (
        "sparse_linear", lambda: (torch.randn(3, 5, 6, requires_grad=True), torch.randn(4, 6),
                                  torch.randn(4, requires_grad=True),
                                  torch.randn(4, 2, requires_grad=True), [], [1, 4], True, True)),
    "filtered_conv2d normalized": (
        "filtered_conv2d", lambda: _filtered_args(stride=2, patch=2, scale=0.25, border=False)),
    "filtered_conv2d corrected, columns, epilogue": (
        "filtered_conv2d", lambda: _filtered_args(stride=1, patch=4, scale=1.0, border=True,
                                                  in_channels=(2, 0), epilogue=True)),
    "frozen_batch_norm": (
        "frozen_batch_norm", lambda: (torch.randn(2, 3, 4, 4, requires_grad=True),
                                      torch.rand(3) + 0.5, torch.randn(3),
                                      torch.randn(3, requires_grad=True))),
    "masked_clamp": (
        "masked_clamp", lambda: (torch.randn(2, 3, 4, 4, requires_grad=True), 0.0, 0.5, False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    """Schema, autograd registration, fake kernel, and AOT autograd (dynamic shapes) agree with
    the eager op, backward included."""
    name, make = CASES[case]
    op = getattr(OPS, name).default
    torch.library.opcheck(op, make())


class ToyNet(nn.Module):
    """Conv-BN-ReLU6 (in place), conv 1x1-BN-ReLU (in place), global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def planned_toy(*, fuse: bool = True) -> tuple[nn.Module, object]:
    """The toy with a channel-sparse, gradient-filtered plan applied (filtered rows of the stem,
    with its batch norm and ReLU6 fused as the epilogue; columns of the 1x1 conv; rows of the
    head)."""
    torch.manual_seed(0)
    model = ToyNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    graph = LayerGraph.from_model(model, input_size=16)
    stem, pw, head = list(graph.layers)
    plan = Plan.from_layers(graph, {
        stem: LayerUpdate("weight", channels=(0, 3, 5), patch_size=2),
        pw: LayerUpdate("weight", channels=(1, 2, 6), axis="in"),
        head: LayerUpdate("weight", channels=(0, 4)),
    })
    handle = apply_plan(model, plan, graph=graph, fuse=fuse)
    return model, handle


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 5, (4,), generator=gen)


class Loss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


def grads(named) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def test_export_keeps_the_ops_and_their_backward():
    model, handle = planned_toy()
    x, y = batch()
    ep = torch.export.export(Loss(model), (x, y))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    ours = {t for t in targets if t.startswith(f"{NAMESPACE}.")}
    assert ours == {f"{NAMESPACE}.{op}.default" for op in (
        "filtered_conv2d", "sparse_conv2d", "sparse_linear", "frozen_batch_norm",
        "masked_clamp")}
    # the exported program computes the same loss, and its backward (the ops' own) the same
    # gradients on the same trainable tensors
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    expected = grads(model.named_parameters())
    assert set(expected) == {n.removeprefix("model.") for n in ep.graph_signature.parameters
                             if ep.state_dict[n].requires_grad}
    exported = ep.module()
    for p in exported.parameters():
        p.grad = None
    got_loss = exported(x, y)
    got_loss.backward()
    got = {n.removeprefix("model."): g for n, g in grads(exported.named_parameters()).items()}
    assert torch.equal(got_loss, loss)
    assert set(got) == set(expected)
    for name, g in expected.items():
        assert torch.equal(got[name], g), name
    handle.remove()


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_compile_matches_eager(fuse):
    """One graph (no break), and the loss and gradients of eager mode."""
    model, handle = planned_toy(fuse=fuse)
    reference = copy.deepcopy(model)
    x, y = batch()
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, backend="aot_eager")
        for _ in range(2):  # the second call runs the cached graph
            for m in (model, reference):
                m.zero_grad(set_to_none=True)
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            ref_loss = F.cross_entropy(reference(x), y)
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss)
            got, want = grads(model.named_parameters()), grads(reference.named_parameters())
            assert set(got) == set(want) and got
            for name in want:
                torch.testing.assert_close(got[name], want[name], msg=name)
    finally:
        torch._dynamo.reset()
        handle.remove()
