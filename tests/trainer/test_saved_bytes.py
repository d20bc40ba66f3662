"""Measured saved activations: apply_plan against stock requires_grad freezing, on real models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from budgetsearch.cost.measure import measure_saved_bytes
from budgetsearch.graph import LayerGraph
from budgetsearch.models import load_model
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.trainer import apply_plan, measure_step

torch.set_num_threads(1)
N, SIZE = 2, 64


@pytest.fixture(scope="module", params=["mobilenet_v2", "mcunet-5fps"])
def model_graph(request):
    torch.manual_seed(0)
    model = load_model(request.param, weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=SIZE, model_name=request.param)
    return model, graph


def example(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (N,), generator=gen)


def planned_bytes(model, graph, plan) -> int:
    x, y = example()
    with apply_plan(model, plan, graph=graph):
        stats = measure_step(model, x, y)
    model.zero_grad(set_to_none=True)
    return stats.saved_bytes


def sparse_plans(graph: LayerGraph) -> dict[str, Plan]:
    names = list(graph.layers)
    head = names[-1]
    mid, late = names[len(names) // 2], names[-4]

    def half(name: str, axis: str) -> tuple[int, ...]:
        layer = graph.layers[name]
        n = layer.out_channels if axis == "out" else layer.in_channels
        return tuple(range(0, n, 2))

    W = LayerUpdate
    return {
        "bias-only": Plan.bias_only(graph),
        "last-4": Plan.last_k_layers(graph, 4),
        "out-subset": Plan.from_layers(graph, {mid: W("weight", channels=half(mid, "out")),
                                               late: W("weight", channels=half(late, "out")),
                                               head: W("weight")}),
        "in-subset": Plan.from_layers(graph, {mid: W("weight", channels=half(mid, "in"),
                                                     axis="in"),
                                              late: W("bias"), head: W("bias")}),
    }


@pytest.mark.parametrize("kind", ["bias-only", "last-4", "out-subset", "in-subset"])
def test_sparse_plans_save_strictly_less_than_stock_freezing(model_graph, kind):
    model, graph = model_graph
    plan = sparse_plans(graph)[kind]
    stock = measure_saved_bytes(model, graph, plan, batch_size=N)
    assert planned_bytes(model, graph, plan) < stock


def test_full_fine_tuning_differs_from_stock_only_by_bn_and_activation_savings(model_graph):
    """Stock keeps each frozen BN's input and, for each ReLU6 / clamp, a float tensor of its input
    (torch 2.14 saves a separate copy even for the in-place ReLU6); apply_plan keeps neither, but a
    bool mask per activation; everything else is the same."""
    model, graph = model_graph
    plan = Plan.full(graph)
    stock = measure_saved_bytes(model, graph, plan, batch_size=N)
    bn_inputs = sum(4 * N * graph.nodes[n.inputs[0]].numel for n in graph.nodes
                    if n.kind == "batch_norm")
    acts = [n for n in graph.nodes if n.kind in ("relu", "hardtanh", "clamp")]
    float_inputs = sum(4 * N * graph.nodes[n.inputs[0]].numel for n in acts
                       if n.kind in ("hardtanh", "clamp"))
    masks = sum(N * n.numel for n in acts)
    assert acts
    assert planned_bytes(model, graph, plan) == stock - bn_inputs - float_inputs + masks


def test_one_training_step_updates_only_the_plan(model_graph):
    model, graph = model_graph
    plan = sparse_plans(graph)["out-subset"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = example(1)
    with apply_plan(model, plan, graph=graph) as handle:
        opt = torch.optim.SGD(handle.param_groups(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = set()
    for name, update in plan.updates.items():
        allowed.add(graph.layers[name].bias_param)
        if update.mode == "weight":
            allowed.add(f"{name}.weight")
    assert changed and changed <= allowed
    for name, update in plan.updates.items():
        if update.channels is not None:
            w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
            untouched = [c for c in range(w0.shape[0]) if c not in update.channels]
            assert torch.equal(w0[untouched], w1[untouched])
    model.load_state_dict(before)
