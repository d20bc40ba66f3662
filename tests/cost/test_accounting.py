"""Accountings are built from keyword arguments, with their engine as one value."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

import budgetsearch.cost.rules
from budgetsearch import CostModel, LayerGraph, Plan, load_profile
from budgetsearch.choices import ENGINES
from budgetsearch.cost import Accounting, accounting_for
from budgetsearch.errors import CostError
from budgetsearch.models import load_model

# What each accounting was before it had an engine: (stock_autograd, planned_ops, realises_plan).
_FLAGS = {"pytorch": (True, False, False), "ops": (True, True, True),
          "device": (False, False, True)}


@pytest.mark.parametrize("name", sorted(_FLAGS))
def test_named_accountings_keep_their_flags(name):
    acc = accounting_for(load_profile("stm32f746"), name)
    assert (acc.stock_autograd, acc.planned_ops, acc.realises_plan) == _FLAGS[name]
    assert acc.name == name and acc.engine in ENGINES


def test_fp32_defaults_and_keywords_only():
    profile = load_profile("rpi4")
    assert accounting_for(profile, "pytorch") == Accounting(
        name="pytorch", engine="autograd", activation_bytes=4, weight_bytes=4, bias_bytes=4,
        gradient_bytes=4, optimizer_state_bytes=4, mask_bits=8, frozen_weights_in_ram=True,
        fold_batchnorm=False, in_place_update=False)
    with pytest.raises(TypeError):
        Accounting("pytorch", "autograd")  # type: ignore[misc]
    with pytest.raises(CostError, match="engine must be one of autograd, ops, device"):
        Accounting(name="x", engine="tflite")  # type: ignore[arg-type]


def test_an_accounting_built_by_hand_costs_as_the_named_one():
    graph = LayerGraph.from_model(load_model("mcunet-5fps", num_classes=10), input_size=64)
    profile = load_profile("stm32f746")
    plan = Plan.last_k_blocks(graph, 2)
    for name in _FLAGS:
        by_name = CostModel(graph, profile, accounting=name).summarize(plan)
        acc = dataclasses.replace(accounting_for(profile, name), name=f"my-{name}")
        assert CostModel(graph, profile, accounting=acc).summarize(plan) == by_name


def test_module_examples_run():
    results = doctest.testmod(budgetsearch.cost.rules, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 2 and results.failed == 0
