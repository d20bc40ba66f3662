"""Fixtures shared by the test packages; the toy models several files build are in
:mod:`_toys`."""

from __future__ import annotations

import pytest
import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile


@pytest.fixture(scope="module")
def mcunet() -> dict:
    """MCUNet-5fps with a 10-class head (seed 0), its graph at 128 px and a cost model on the
    STM32H743: ``model``, ``graph``, ``cm``."""
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name="mcunet-5fps")
    return {"model": model, "graph": graph, "cm": CostModel(graph, load_profile("stm32h743"))}
