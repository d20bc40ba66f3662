"""PlanCallback: a plan applied for the length of a Lightning fit, removed after."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _toys import conv_pool_linear, small_cnn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning")

from budgetsearch.errors import PlanError
from budgetsearch.graph import LayerGraph
from budgetsearch.ops import PlannedLinear
from budgetsearch.plan import LayerUpdate, Plan
from budgetsearch.trainer import active_plan
from budgetsearch.trainer.lightning import PlanCallback

torch.set_num_threads(1)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = small_cnn(3)
        self.seen_planned = False

    def training_step(self, batch, _index):
        x, y = batch
        self.seen_planned = isinstance(self.model[7], PlannedLinear)
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_callback_trains_only_the_plan_and_removes_it(tmp_path):
    module = Module()
    graph = LayerGraph.from_model(module.model, input_size=8)
    plan = Plan.from_layers(graph, {"3": LayerUpdate("weight", channels=(1, 4)),
                                    "7": LayerUpdate("weight")})
    before = copy.deepcopy(module.model.state_dict())
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 3, (16,)))
    callback = PlanCallback(plan)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert module.seen_planned
    assert active_plan(module.model) is None and isinstance(module.model[7], nn.Linear)
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"3.weight", "3.bias", "7.weight", "7.bias"}
    untouched = [c for c in range(8) if c not in (1, 4)]
    assert torch.equal(before["3.weight"][untouched], after["3.weight"][untouched])
    assert all(p.requires_grad for p in module.model.parameters())


def test_callback_refuses_a_plan_for_another_model():
    other = conv_pool_linear(2)
    plan = Plan.full(LayerGraph.from_model(other, input_size=8))
    with pytest.raises(PlanError, match="no submodule"):
        PlanCallback(plan).target(Module())
    with pytest.raises(PlanError, match="no submodule 'net'"):
        PlanCallback(plan, submodule="net").target(Module())
