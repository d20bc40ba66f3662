"""The model registry: every name builds, takes a new head, and (where recorded) fx-traces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
from _toys import conv_pool_linear
from safetensors.torch import save_file
from torch import nn

from budgetsearch.errors import ModelError
from budgetsearch.models import (
    input_spec,
    list_models,
    load_model,
    load_state_dict_file,
    register_model,
    replace_head,
)
from budgetsearch.models.zoo import ENV_OFFLINE, get_model_spec

TORCHVISION = [
    "mobilenet_v2", "mobilenet_v2_w0.35", "mobilenet_v2_w0.5", "mobilenet_v2_w0.75",
    "mobilenet_v2_w1.4", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34",
    "mnasnet0_5", "mnasnet1_0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "squeezenet1_0",
    "squeezenet1_1", "efficientnet_b0",
]  # fmt: skip
MCU = ["mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3"]
# Names whose symbolic_trace fails with torch 2.14 / torchvision 0.29 (none at present).
FX_FAILS: set[str] = set()


def test_list_models() -> None:
    names = list_models()
    assert set(TORCHVISION + MCU) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", TORCHVISION + MCU)
def test_builds_with_new_head_and_traces(name: str) -> None:
    torch.manual_seed(0)
    model = load_model(name, weights="random" if name in MCU else None, num_classes=10).eval()
    head_name = get_model_spec(name).head
    head = model.get_submodule(head_name)
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 10
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    if name in FX_FAILS:
        with pytest.raises(Exception):  # noqa: B017 - any tracing error
            torch.fx.symbolic_trace(model)
    else:
        gm = torch.fx.symbolic_trace(model)
        assert head_name in {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="mobilenet_v2") as info:
        load_model("mobilenetv2")
    assert "resnet18" in str(info.value) and "mcunet-5fps" in str(info.value)


def test_bad_arguments() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        load_model("resnet18", num_classes=0)
    with pytest.raises(ModelError, match="no ImageNet weights"):
        load_model("mobilenet_v2_w0.35", weights="imagenet")
    with pytest.raises(ModelError, match="not found"):
        load_model("resnet18", weights="/nonexistent/weights.pth")


def test_mcu_default_is_pretrained() -> None:
    a = load_model("mcunet-5fps")
    b = load_model("mcunet-5fps", weights="imagenet")
    c = load_model("mcunet-5fps", weights="random")
    wa, wb, wc = (m.get_submodule("first_conv").weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert input_spec("mcunet-5fps").size == 128
    assert input_spec("resnet18").size == 224


def test_num_classes_keeps_name_and_pretrained_body() -> None:
    full = load_model("mbv2-w0.35")
    small = load_model("mbv2-w0.35", num_classes=5)
    assert small.classifier.out_channels == 5 and small.classifier.kernel_size == (1, 1)
    body = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")}
    small_state = small.state_dict()
    assert all(torch.equal(v, small_state[k]) for k, v in body.items())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    model = load_model("mobilenet_v3_small", num_classes=7)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        save_file(state, str(path))
    again = load_model("mobilenet_v3_small", weights=path, num_classes=7)
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ModelError, match="num_classes"):
        load_model("mobilenet_v3_small", weights=path)  # 1000-class head vs 7 in the file


def test_mcu_weights_file_round_trip(tmp_path: Path) -> None:
    model = load_model("proxyless-w0.3", num_classes=3)
    path = tmp_path / "proxyless.safetensors"
    save_file(model.state_dict(), str(path))
    again = load_model("proxyless-w0.3", weights=str(path), num_classes=3)
    for k, v in again.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, path)
    with pytest.raises(ModelError, match="weights-only"):
        load_state_dict_file(path)


def test_register_model_and_auto_head() -> None:
    def tiny() -> nn.Module:
        return conv_pool_linear(3, seed=None)

    register_model("tiny-test", tiny, replace=True)
    with pytest.raises(ModelError, match="already registered"):
        register_model("tiny-test", tiny)
    model = load_model("tiny-test", num_classes=2)
    assert isinstance(model[3], nn.Linear) and model[3].out_features == 2
    assert "tiny-test" in list_models()
    with pytest.raises(ModelError, match="no ImageNet weights"):
        load_model("tiny-test", weights="imagenet")


def test_replace_head_on_squeezenet_conv() -> None:
    model = replace_head(load_model("squeezenet1_1"), num_classes=4)
    assert isinstance(model.classifier[1], nn.Conv2d) and model.classifier[1].out_channels == 4
    assert model.num_classes == 4


def test_missing_imagenet_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(ENV_OFFLINE, "1")
    with pytest.raises(ModelError, match=r"resnet18-f37072fd\.pth"):
        load_model("resnet18", weights="imagenet")


def test_failed_download_becomes_model_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(ENV_OFFLINE, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelError, match="no network"):
        load_model("squeezenet1_1", weights="imagenet")
