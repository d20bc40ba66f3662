"""The float MCU models: structure, names, parameter counts and the int8 semantics they follow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from budgetsearch.errors import ModelError
from budgetsearch.fingerprint import fingerprint, layer_shapes
from budgetsearch.models.mcu import (
    ENV_MCU_DIR,
    MCU_INPUT_MEAN,
    MCU_INPUT_STD,
    MCU_MODELS,
    WEIGHT_SCALE_BUFFER,
    Clamp,
    MCUNet,
    find_mcu_files,
    int8_weight,
    load_mcu_model,
    mcu_conv_names,
)

# Exact counts of this loader (all conv weights and biases, classifier included); the README
# rounds them to 630 k / 357 k / 423 k.
PARAMS = {"mcunet-5fps": 630_224, "mbv2-w0.35": 357_448, "proxyless-w0.3": 423_232}
CONVS = {"mcunet-5fps": 42, "mbv2-w0.35": 51, "proxyless-w0.3": 60}
BLOCKS = {"mcunet-5fps": 14, "mbv2-w0.35": 17, "proxyless-w0.3": 20}


@pytest.fixture(scope="module", params=MCU_MODELS)
def mcu(request: pytest.FixtureRequest) -> tuple[str, MCUNet]:
    return request.param, load_mcu_model(request.param).eval()


def _conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_parameter_count(mcu: tuple[str, MCUNet]) -> None:
    name, model = mcu
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAMS[name]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_conv_names_and_count(mcu: tuple[str, MCUNet]) -> None:
    name, model = mcu
    names = mcu_conv_names(name)
    assert len(names) == CONVS[name]
    assert _conv_names(model) == [*names, "classifier"]
    assert names[0] == "first_conv"
    assert names[1:3] == ["blocks.0.depthwise", "blocks.0.pointwise2"]
    last = BLOCKS[name] - 1
    assert names[-3:] == [f"blocks.{last}.{k}" for k in ("pointwise1", "depthwise", "pointwise2")]
    for conv_name in names:
        conv = model.get_submodule(conv_name)
        k = conv.kernel_size[0]
        assert conv.padding == ((k - 1) // 2, (k - 1) // 2)
        assert conv.bias is not None


def test_named_modules_of_a_block() -> None:
    model = load_mcu_model("mcunet-5fps", pretrained=False)
    names = {n for n, _ in model.named_modules()}
    assert {"blocks.7.pointwise1", "blocks.7.act1", "blocks.7.depthwise", "blocks.7.act2"} <= names
    assert {"blocks.7.pointwise2", "blocks.7.act3", "first_act", "classifier"} <= names
    assert isinstance(model.get_submodule("blocks.2.residual_act"), Clamp)
    assert model.blocks[7].residual_act is None
    assert model.blocks[0].pointwise1 is None and model.blocks[0].act1 is None
    assert model.get_submodule("blocks.1.depthwise").groups == 32


def test_relu6_clamps() -> None:
    model = load_mcu_model("mbv2-w0.35", pretrained=False)
    act = model.blocks[1].act1  # y_zero = -128, y_scale = 6/255: exactly ReLU6
    assert act.lo == pytest.approx(0.0, abs=1e-12)
    assert act.hi == pytest.approx(6.0)


def test_fx_trace(mcu: tuple[str, MCUNet]) -> None:
    name, model = mcu
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert set(mcu_conv_names(name)) | {"classifier"} <= targets
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def _synthetic_image() -> torch.Tensor:
    """A deterministic 128×128 RGB test card (gradients and stripes), normalised for MCU."""
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    r = xx / 127.0
    g = yy / 127.0
    b = 0.5 + 0.5 * np.sin(xx / 6.0) * np.cos(yy / 9.0)
    pixels = np.round(np.stack([r, g, b]) * 255.0) / 255.0  # like ToTensor on uint8
    x = torch.from_numpy(pixels)
    mean = torch.tensor(MCU_INPUT_MEAN).view(3, 1, 1)
    std = torch.tensor(MCU_INPUT_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def test_synthetic_image_gives_a_distribution(mcu: tuple[str, MCUNet]) -> None:
    _, model = mcu
    x = _synthetic_image()
    assert x.min() >= -1.0 and x.max() <= 1.0
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()
    probs = logits.softmax(dim=1)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert logits.std() > 0


def _raw(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    json_path, npz_path = find_mcu_files(name)
    spec = json.loads(json_path.read_text())
    with np.load(npz_path, allow_pickle=False) as npz:
        return spec, {k: npz[k] for k in npz.files}


@pytest.mark.parametrize(
    "path",
    [
        ("first_conv",),
        ("blocks", 1, "depthwise"),
        ("blocks", 4, "pointwise1"),
        ("blocks", 4, "pointwise2"),
    ],
)
def test_float_conv_matches_integer_semantics(path: tuple) -> None:
    name = "mcunet-5fps"
    spec, arrays = _raw(name)
    entry = spec
    for key in path:
        entry = entry[key]
    p = entry["params"]
    w = torch.from_numpy(arrays[p["weight"]["$array"]].astype(np.float64))
    b = torch.from_numpy(arrays[p["bias"]["$array"]].astype(np.float64))
    ws = torch.from_numpy(arrays[p["w_scales"]["$array"]].astype(np.float64))
    xs, xz, ys, yz = p["x_scale"], p["x_zero"], p["y_scale"], p["y_zero"]
    k, groups, stride = entry["kernel_size"][0], entry["groups"], entry["stride"]

    gen = torch.Generator().manual_seed(0)
    q_x = torch.randint(-128, 128, (2, entry["in_channel"], 12, 12), generator=gen)
    # The device: integer accumulation, requantisation, int8 clamp; then dequantised.
    acc = F.conv2d((q_x - xz).double(), w, stride=stride, padding=(k - 1) // 2, groups=groups)
    acc = acc + b.view(1, -1, 1, 1)
    q_y = torch.clamp(torch.round(acc * xs * ws.view(1, -1, 1, 1) / ys) + yz, -128, 127)
    expected = (q_y - yz) * ys

    model = load_mcu_model(name).eval()
    conv_name = ".".join(str(s) for s in path)
    conv = model.get_submodule(conv_name)
    act_suffix = {"pointwise1": "act1", "depthwise": "act2", "pointwise2": "act3"}
    act_name = "first_act" if len(path) == 1 else f"blocks.{path[1]}.{act_suffix[path[2]]}"
    act = model.get_submodule(act_name)
    with torch.no_grad():
        got = act(conv(((q_x - xz) * xs).float())).double()
    # Equal up to the device's final rounding to the int8 grid (half a step), plus float32 noise.
    assert (got - expected).abs().max().item() <= ys * 0.5 + 1e-4
    requantised = torch.round(got / ys) + yz
    assert (requantised == q_y).double().mean().item() > 0.99
    assert (q_y == 127).any() or (q_y == -128).any()  # the clamp is exercised


def test_int8_weights_are_those_of_the_npz(mcu: tuple[str, MCUNet]) -> None:
    """Every conv gives back the NPZ's int8 weights exactly, although its float weight is
    ``w_int8 * w_scales[c]``; the scales do not enter the state_dict or the fingerprint."""
    name, model = mcu
    spec, arrays = _raw(name)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for conv_name, conv in convs.items():
        entry = spec
        for key in conv_name.split("."):
            entry = entry[int(key)] if key.isdigit() else entry[key]
        w_int = arrays[entry["params"]["weight"]["$array"]]
        assert w_int.dtype == np.int8
        got = int8_weight(conv)
        assert got is not None and got.dtype == torch.float64
        assert np.array_equal(got.numpy(), w_int.astype(np.float64)), conv_name
        scales = arrays[entry["params"]["w_scales"]["$array"]]
        assert np.array_equal(getattr(conv, WEIGHT_SCALE_BUFFER).numpy(), scales), conv_name
    bare = load_mcu_model(name, pretrained=False)
    assert list(model.state_dict()) == list(bare.state_dict())
    assert not any(k.endswith(WEIGHT_SCALE_BUFFER) for k in model.state_dict())
    assert fingerprint(layer_shapes(model)) == fingerprint(layer_shapes(bare))
    assert all(int8_weight(m) is None for m in bare.modules())


def test_int8_weight_follows_the_current_weight() -> None:
    """Rounded ``weight / scale``: a changed float weight is read in the int8 model's units, and a
    layer without scales (no int8 form) gives None."""
    model = load_mcu_model("mcunet-5fps")
    conv = model.get_submodule("blocks.4.pointwise1")
    before = int8_weight(conv)
    assert before is not None
    with torch.no_grad():
        conv.weight[3].mul_(2.0)
    after = int8_weight(conv)
    assert after is not None
    assert torch.equal(after[3], 2.0 * before[3])
    assert torch.equal(after[:3], before[:3]) and torch.equal(after[4:], before[4:])
    assert int8_weight(nn.Conv2d(3, 4, 1)) is None
    assert int8_weight(model.first_act) is None


def test_random_init_skips_npz(tmp_path: Path) -> None:
    json_path, _ = find_mcu_files("mbv2-w0.35")
    shutil.copy(json_path, tmp_path / json_path.name)
    model = load_mcu_model("mbv2-w0.35", pretrained=False, mcu_dir=tmp_path)
    assert sum(p.numel() for p in model.parameters()) == PARAMS["mbv2-w0.35"]
    with pytest.raises(ModelError, match=r"mbv2-w0\.35\.npz"):
        load_mcu_model("mbv2-w0.35", mcu_dir=tmp_path)


def test_missing_dir_names_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="mcu_dir") as info:
        load_mcu_model("mcunet-5fps", mcu_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "mcunet-5fps.json") in str(info.value)
    monkeypatch.setenv(ENV_MCU_DIR, str(tmp_path))
    with pytest.raises(ModelError, match=ENV_MCU_DIR):
        mcu_conv_names("mcunet-5fps")


def test_env_dir_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    json_path, _ = find_mcu_files("proxyless-w0.3")
    monkeypatch.setenv(ENV_MCU_DIR, str(json_path.parent))
    assert len(mcu_conv_names("proxyless-w0.3")) == CONVS["proxyless-w0.3"]


def test_unsupported_se_is_rejected(tmp_path: Path) -> None:
    json_path, _ = find_mcu_files("mcunet-5fps")
    spec = json.loads(json_path.read_text())
    spec["blocks"][3]["se"] = {"reduction": 4}
    (tmp_path / "mcunet-5fps.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=r"blocks\.3.*squeeze-excite"):
        load_mcu_model("mcunet-5fps", pretrained=False, mcu_dir=tmp_path)


def test_clamp_rejects_empty_range() -> None:
    with pytest.raises(ModelError):
        Clamp(1.0, 1.0)


def _int_conv(entry: dict, arrays: dict[str, np.ndarray], q: torch.Tensor) -> torch.Tensor:
    p = entry["params"]
    w, b, ws = (
        torch.from_numpy(arrays[p[k]["$array"]].astype(np.float64))
        for k in ("weight", "bias", "w_scales")
    )
    k = entry["kernel_size"][0]
    acc = F.conv2d(q - p["x_zero"], w, stride=entry["stride"], padding=(k - 1) // 2,
                   groups=entry["groups"])  # fmt: skip
    acc = acc + b.view(1, -1, 1, 1)
    scale = p["x_scale"] * ws.view(1, -1, 1, 1) / p["y_scale"]
    return torch.clamp(torch.round(acc * scale) + p["y_zero"], -128, 127)


def _int_model(spec: dict, arrays: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """The whole network in the README's integer semantics; returns dequantised logits."""
    q = _int_conv(spec["first_conv"], arrays, torch.round(x / (2 / 255)).double())
    for block in spec["blocks"]:
        skip = q
        if block["pointwise1"]:
            q = _int_conv(block["pointwise1"], arrays, q)
        q = _int_conv(block["depthwise"], arrays, q)
        q = _int_conv(block["pointwise2"], arrays, q)
        if block["residual"]:
            r, p2 = block["residual"]["params"], block["pointwise2"]["params"]
            real = (skip - r["x_zero"]) * r["x_scale"] + (q - p2["y_zero"]) * p2["y_scale"]
            q = torch.clamp(torch.round(real / r["y_scale"]) + r["y_zero"], -128, 127)
    q = torch.round(q.mean((2, 3), keepdim=True))
    p = spec["classifier"]["params"]
    w, b, ws = (
        torch.from_numpy(arrays[p[k]["$array"]].astype(np.float64))
        for k in ("weight", "bias", "w_scales")
    )
    acc = F.conv2d(q - p["x_zero"], w) + b.view(1, -1, 1, 1)
    return (acc * p["x_scale"] * ws.view(1, -1, 1, 1)).flatten(1)


def test_whole_network_follows_integer_inference(mcu: tuple[str, MCUNet]) -> None:
    name, model = mcu
    spec, arrays = _raw(name)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 128, 128), generator=gen).double()
    x = (pixels / 255 - 0.5) * 2
    expected = _int_model(spec, arrays, x)
    with torch.no_grad():
        got = model(x.float()).double()
    corr = torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1]
    assert corr > 0.99
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 2


def test_the_published_models_ship_with_the_package(monkeypatch, tmp_path):
    """With no folder given and no environment variable, the packaged files are found first,
    byte-identical to the shared copies where those exist (SOURCE.md lists their digests)."""
    import hashlib

    from budgetsearch.models.mcu import ENV_MCU_DIR, PACKAGED_MCU_DIR, find_mcu_files

    monkeypatch.delenv(ENV_MCU_DIR, raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared beside the working directory
    note = (PACKAGED_MCU_DIR / "SOURCE.md").read_text()
    for name in ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3"):
        json_path, npz_path = find_mcu_files(name)
        assert json_path.parent == PACKAGED_MCU_DIR and npz_path.is_file()
        for path in (json_path, npz_path):
            assert hashlib.sha256(path.read_bytes()).hexdigest() in note
