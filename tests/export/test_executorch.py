"""The ExecuTorch export: five training steps of the exported program, run by ExecuTorch's
Python runtime, give eager PyTorch's losses and updated tensors (``apply_plan``, SGD) within
1e-5, for bias-only, channel-subset (output and input channels), gradient-filtered and mixed
plans; frozen tensors are stored bit for bit; a missing extra is named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetsearch import LayerGraph, LayerUpdate, Plan, apply_plan, load_model
from budgetsearch.cli import main
from budgetsearch.errors import ExportError
from budgetsearch.export import executorch as et_export
from budgetsearch.ops import PlannedConv2d, PlannedLinear

torch.set_num_threads(1)
STEPS, TOL = 5, 1e-5
# SGD's learning rate: on the pretrained models, a rate that keeps five steps on random batches
# from diverging (where float32 summation-order differences grow with the loss)
LR, LR_PRETRAINED = 0.01, 0.002


class SmallNet(nn.Module):
    """Stem conv-BN-ReLU6 (stride 2), depthwise conv-BN-ReLU6, 1x1 conv-BN-ReLU, pooling and a
    linear head: layers ``stem.0``, ``dw.0``, ``pw.0``, ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
                                nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU(inplace=True))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


# plan kind -> layer updates, by position among the model's trainable layers (-1: the head)
PLANS = {
    "bias-only": lambda n: {n[-2]: LayerUpdate("bias"), n[-3]: LayerUpdate("bias")},
    "channels-out": lambda n: {n[-2]: LayerUpdate("weight", channels=(0, 3, 7), axis="out"),
                               n[-1]: LayerUpdate("weight", channels=(1, 4), axis="out")},
    "channels-in": lambda n: {n[-2]: LayerUpdate("weight", channels=(1, 2, 6), axis="in"),
                              n[-1]: LayerUpdate("weight", channels=(0, 5), axis="in")},
    "filtered": lambda n: {n[-3]: LayerUpdate("weight", patch_size=2),
                           n[-1]: LayerUpdate("weight")},
    "mixed": lambda n: {n[-4]: LayerUpdate("weight", channels=(0, 2, 5), patch_size=2),
                        n[-3]: LayerUpdate("bias"),
                        n[-2]: LayerUpdate("weight", channels=(1, 3, 4), axis="in"),
                        n[-1]: LayerUpdate("weight", channels=(0, 1), axis="out")},
}


@pytest.fixture(scope="module")
def runtime():
    pytest.importorskip("executorch.extension.training")
    return et_export


def _plan(model: nn.Module, kind: str, *, name: str | None, size: int, batch: int
          ) -> tuple[Plan, LayerGraph]:
    graph = LayerGraph.from_model(model, input_size=size, model_name=name)
    layers = list(graph.layers)
    plan = Plan.from_layers(graph, PLANS[kind](layers), batch_size=batch, model=name,
                            input_size=(size, size))
    return plan, graph


def _batches(plan: Plan, classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    h, w = plan.input_size
    return [(torch.randn(plan.batch_size, 3, h, w, generator=gen),
             torch.randint(0, classes, (plan.batch_size,), generator=gen))
            for _ in range(STEPS)]


def check_export(model: nn.Module, plan: Plan, graph: LayerGraph, tmp_path, *, prefix: str,
                 classes: int, lr: float = LR, momentum: float = 0.0) -> tuple[dict, int]:
    """Export, train five steps in ExecuTorch and in eager PyTorch, compare; returns the
    manifest and the number of frozen weights found in the training program."""
    original = copy.deepcopy(model)
    result = et_export.to_executorch(plan, model=model, out_dir=tmp_path, graph=graph,
                                     prefix=prefix, optimizer="momentum" if momentum else "sgd",
                                     lr=lr, momentum=momentum, dropout=False)
    manifest = result.manifest
    # the model handed in is untouched
    for (n, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    # eager reference: apply_plan, SGD, dropout off as in the export
    reference = copy.deepcopy(original)
    handle = apply_plan(reference, plan, graph=graph)
    initial = {f"model.{n}": p.detach().clone() for n, p in handle.named_parameters()}
    for m in reference.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    optimizer = torch.optim.SGD(handle.param_groups(), lr=lr, momentum=momentum)
    trainer = et_export.ExecuTorchTrainer(tmp_path)
    for step, (x, y) in enumerate(_batches(plan, classes)):
        got = trainer.step(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        optimizer.step()
        assert got == pytest.approx(loss.item(), abs=TOL), f"step {step}"
    # the program trains exactly the plan's tensors, and ends where eager PyTorch does
    trained = trainer.named_parameters()
    expected = {f"model.{n}": p.detach() for n, p in handle.named_parameters()}
    assert set(trained) == set(expected) == set(manifest["programs"]["training"]["parameters"])
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=TOL, msg=name)
        # moved exactly where eager PyTorch moved (a dead channel's slice stays put in both)
        assert torch.equal(trained[name], initial[name]) == torch.equal(value, initial[name])
    assert any(not torch.equal(trained[n], initial[n]) for n in expected), "nothing trained"
    # frozen weights are stored in the training program bit for bit: every conv and linear
    # weight the plan does not train whole (without a prefix program), or the frozen rest of
    # a weight trained on a channel subset (the XNNPACK prefix repacks its own weights)
    program = (tmp_path / "training.pte").read_bytes()
    trained_whole = {n.removeprefix("model.") for n in expected}
    if prefix == "none":
        frozen = [(f"{n}.weight", m.weight) for n, m in original.named_modules()
                  if isinstance(m, nn.Conv2d | nn.Linear) and f"{n}.weight" not in trained_whole]
    else:
        frozen = [(f"{n}.weight", m.weight) for n, m in handle.replaced.items()
                  if isinstance(m, PlannedConv2d | PlannedLinear) and m.weight_slice is not None]
    for name, weight in frozen:
        assert weight.detach().contiguous().numpy().tobytes() in program, name
    handle.remove()
    # the manifest: the plan's shape of batch, every updated layer's tensors by program name
    assert manifest["batch_size"] == plan.batch_size
    assert manifest["input_size"] == list(plan.input_size)
    named = {t for doc in manifest["layers"].values() for t in doc["tensors"].values()}
    assert named == set(expected)
    assert set(manifest["layers"]) == set(plan.updates)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    return manifest, len(frozen)


@pytest.mark.parametrize("kind", list(PLANS))
def test_small_model_matches_eager(runtime, tmp_path, kind):
    model = small_net()
    plan, graph = _plan(model, kind, name=None, size=16, batch=4)
    # the mixed plan filters the stem: no frozen prefix; the others get an XNNPACK prefix
    manifest, frozen = check_export(model, plan, graph, tmp_path, prefix="xnnpack", classes=5)
    assert frozen == sum(u.channels is not None for u in plan.updates.values())
    has_prefix = manifest["programs"]["prefix"] is not None
    assert has_prefix == (kind != "mixed")
    if has_prefix:
        assert (tmp_path / "prefix.pte").exists()


def test_small_model_without_prefix(runtime, tmp_path):
    model = small_net()
    plan, graph = _plan(model, "channels-out", name=None, size=16, batch=4)
    manifest, frozen = check_export(model, plan, graph, tmp_path, prefix="none", classes=5)
    assert frozen == 4  # the stem and depthwise convs, the 1x1 conv and head beside slices
    assert manifest["programs"]["prefix"] is None
    assert not (tmp_path / "prefix.pte").exists()


def test_momentum_matches_eager(runtime, tmp_path):
    """The runtime's SGD with momentum steps as torch.optim.SGD does."""
    model = small_net()
    plan, graph = _plan(model, "mixed", name=None, size=16, batch=4)
    manifest, _ = check_export(model, plan, graph, tmp_path, prefix="none", classes=5,
                               momentum=0.9)
    assert manifest["optimizer"]["momentum"] == 0.9


@pytest.mark.parametrize("kind", ["mixed", "bias-only"])
def test_mcunet(runtime, tmp_path, kind):
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=10)
    plan, graph = _plan(model, kind, name="mcunet-5fps", size=48, batch=2)
    check_export(model, plan, graph, tmp_path, prefix="xnnpack", classes=10,
                 lr=LR_PRETRAINED)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["channels-out", "channels-in", "filtered"])
def test_mcunet_slow(runtime, tmp_path, kind):
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=10)
    plan, graph = _plan(model, kind, name="mcunet-5fps", size=64, batch=4)
    check_export(model, plan, graph, tmp_path, prefix="xnnpack", classes=10,
                 lr=LR_PRETRAINED)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PLANS))
def test_mobilenet_v2(runtime, tmp_path, kind):
    torch.manual_seed(0)
    model = load_model("mobilenet_v2", weights="imagenet", num_classes=10)
    plan, graph = _plan(model, kind, name="mobilenet_v2", size=64, batch=2)
    check_export(model, plan, graph, tmp_path, prefix="xnnpack" if kind != "mixed" else "none",
                 classes=10, lr=LR_PRETRAINED)


def test_adam_plan_and_empty_plan_are_refused(runtime, tmp_path):
    model = small_net()
    plan, graph = _plan(model, "bias-only", name=None, size=16, batch=2)
    with pytest.raises(ExportError, match=r"optimizer 'adam'.*allowed: sgd, momentum"):
        et_export.to_executorch(plan.with_(optimizer="adam"), model=model, out_dir=tmp_path,
                                graph=graph)
    with pytest.raises(ExportError, match="trains no layer"):
        et_export.to_executorch(Plan.from_layers(graph, {}), model=model, out_dir=tmp_path,
                                graph=graph)
    with pytest.raises(ExportError, match="prefix must be one of xnnpack, none"):
        et_export.to_executorch(plan, model=model, out_dir=tmp_path, graph=graph,
                                prefix="coreml")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_cli_exports_mcunet(runtime, tmp_path, capsys):
    torch.manual_seed(0)
    model = load_model("mcunet-5fps", num_classes=10)
    plan, _graph = _plan(model, "channels-out", name="mcunet-5fps", size=48, batch=2)
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    out = tmp_path / "et"
    assert main(["export", "--plan", str(plan_path), "--format", "executorch", "--out", str(out),
                 "--optimizer", "sgd", "--lr", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "prefix.pte" in text and "training.pte" in text and "SGD lr 0.05" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_classes"] == 10 and manifest["batch_size"] == 2
    assert manifest["input_size"] == [48, 48] and manifest["optimizer"]["lr"] == 0.05
    trainer = et_export.ExecuTorchTrainer(out)
    x, y = torch.randn(2, 3, 48, 48), torch.tensor([1, 7])
    assert torch.isfinite(torch.tensor(trainer.step(x, y)))


def test_missing_extra_is_named(tmp_path, monkeypatch, capsys):
    """Without ExecuTorch, the export says which extra to install; tte is unaffected."""
    monkeypatch.setattr(et_export, "executorch_available", lambda: False)
    model = small_net()
    plan, graph = _plan(model, "bias-only", name="mcunet-5fps", size=16, batch=1)
    with pytest.raises(ExportError, match=r"pip install 'budgetsearch\[executorch\]'"):
        et_export.to_executorch(plan, model=model, out_dir=tmp_path, graph=graph)
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    assert main(["export", "--plan", str(plan_path), "--format", "executorch", "--out",
                 str(tmp_path / "et")]) == 2
    assert "budgetsearch[executorch]" in capsys.readouterr().err
    assert not (tmp_path / "et").exists()


def test_a_folder_mixing_two_exports_is_refused(runtime, tmp_path):
    """The manifest records each program's SHA-256: a training program from another export
    (an export killed between its writes leaves such a folder) is refused when loaded."""
    model = small_net()
    plan, graph = _plan(model, "channels-out", name=None, size=16, batch=4)
    first, second = tmp_path / "first", tmp_path / "second"
    et_export.to_executorch(plan, model=model, out_dir=first, graph=graph, prefix="xnnpack")
    other = Plan.from_layers(graph, {list(graph.layers)[-1]: LayerUpdate("weight")},
                             batch_size=4, input_size=(16, 16))
    et_export.to_executorch(other, model=model, out_dir=second, graph=graph, prefix="xnnpack")
    manifest = json.loads((first / "manifest.json").read_text())
    assert all(len(doc["sha256"]) == 64 for doc in manifest["programs"].values()
               if doc is not None)
    et_export.ExecuTorchTrainer(first)  # as written: loads
    (first / "training.pte").write_bytes((second / "training.pte").read_bytes())
    with pytest.raises(ExportError, match=r"training.pte: its contents are not the ones .*"
                                          r"manifest.json records .* parts of two exports"):
        et_export.ExecuTorchTrainer(first)
