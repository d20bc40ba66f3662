"""The cost model's ``ops`` accounting equals what autograd keeps when a plan runs on
budgetsearch's operators (``apply_plan``): 20+ random plans per model, counted with
saved_tensors_hooks as in the stock-autograd agreement test."""

from __future__ import annotations

import random

import pytest
import torch
from test_agreement import random_plan
from torch.nn import functional as F

from budgetsearch import CostModel, LayerGraph, apply_plan, load_model, load_profile

MODELS = {"mobilenet_v2": 32, "mcunet-5fps": 64}


def saved_with_operators(model, graph, plan, batch_size: int) -> int:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *graph.input_shape, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    with apply_plan(model, plan, graph=graph):
        excluded = {t.untyped_storage().data_ptr() for t in model.parameters()}
        excluded |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        del loss
    return sum(seen.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_ops_accounting_equals_apply_plan(name):
    torch.manual_seed(0)
    model = load_model(name, weights="random", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=MODELS[name], model_name=name)
    cm = CostModel(graph, load_profile("rpi4"), accounting="ops", batch_size=2)
    rng = random.Random(f"ops-{name}")
    for _ in range(20):
        plan = random_plan(graph, rng)
        predicted = cm.evaluate(plan).saved_activation_bytes
        measured = saved_with_operators(model, graph, plan, batch_size=2)
        assert predicted == measured, plan.to_dict()["updates"]
