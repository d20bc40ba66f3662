"""The cost model on every registered profile and model: invariants that must hold everywhere."""

from __future__ import annotations

import pytest

from budgetsearch import (
    CostModel,
    LayerGraph,
    Plan,
    list_models,
    list_profiles,
    load_model,
    load_profile,
)


@pytest.fixture(scope="module")
def mbv2_graph():
    return LayerGraph.from_model(load_model("mobilenet_v2", num_classes=10), input_size=64)


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_costs_a_plan(mbv2_graph, name):
    profile = load_profile(name)
    graph = mbv2_graph
    cm = CostModel(graph, profile)
    bias, last, full = (cm.evaluate(p) for p in (
        Plan.bias_only(graph), Plan.last_k_layers(graph, 4), Plan.full(graph)))
    for cost in (bias, last, full):
        t = cost.total()
        assert t["peak_memory_bytes"] >= cm.inference_peak_bytes
        assert t["latency_ms"] > 0
        assert t["forward_macs"] == full.forward_macs
    # more trained means more backward work and more memory
    assert full.backward_macs > bias.backward_macs > 0
    assert full.peak_memory_bytes >= last.peak_memory_bytes
    assert full.saved_activation_bytes > last.saved_activation_bytes
    # the device engine never stores more than stock PyTorch does in fp32 at the same batch
    stock = CostModel(graph, profile, accounting="pytorch").evaluate(Plan.full(graph))
    assert full.saved_activation_bytes <= stock.saved_activation_bytes
    if profile.frozen_weights_in == "flash":  # frozen weights cost no RAM
        assert bias.weight_bytes < full.weight_bytes


@pytest.mark.parametrize("name", list_models())
def test_every_model_traces_and_costs(name):
    graph = LayerGraph.from_model(load_model(name, num_classes=10), input_size=64)
    cm = CostModel(graph, load_profile("jetson-nano"), strict=True)  # every op has a rule
    cost = cm.evaluate(Plan.last_k_blocks(graph, 1, patch_size=2))
    assert cost.unknown_ops == []
    assert cost.backward_macs > 0 and cost.peak_memory_bytes > 0
    # a gradient filter never costs more than the dense update of the same layers
    dense = cm.evaluate(Plan.last_k_blocks(graph, 1))
    assert cost.grad_weight_macs <= dense.grad_weight_macs
    assert cost.saved_activation_bytes <= dense.saved_activation_bytes
