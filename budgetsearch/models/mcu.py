"""Float PyTorch models built from the int8 MCU models of the on-device-training literature.

The three ImageNet models released with "On-Device Training Under 256KB Memory" (MCUNet-5fps,
MobileNetV2-w0.35, ProxylessNAS-w0.3) are stored as ``<stem>.json`` (architecture and quantisation
scalars) plus ``<stem>.npz`` (int8 weights, int32 biases, per-channel float32 weight scales). This
module turns them into float models that compute what the device computes, up to int8 rounding:

- every conv is a plain :class:`torch.nn.Conv2d` with weight ``w_int8 * w_scales[c]`` and bias
  ``bias_int32 * x_scale * w_scales[c]``, padding ``(k - 1) // 2``;
- its output is clamped (a separate :class:`Clamp` child) to the real range of the int8 output,
  ``[(-128 - y_zero) * y_scale, (127 - y_zero) * y_scale]``; where ``y_zero = -128`` and
  ``y_scale = 6/255`` this is exactly ReLU6, elsewhere only the int8 range;
- a residual block adds its input to the projection's output, then clamps with the sum's range;
- global mean pooling, then the ``classifier`` 1×1 conv (no clamp on the logits), flattened to
  ``(N, classes)``.

Module names mirror the JSON paths, so the convs are ``first_conv``, ``blocks.<i>.pointwise1``,
``blocks.<i>.depthwise``, ``blocks.<i>.pointwise2`` and ``classifier``. The clamps are
``first_act`` and ``blocks.<i>.act1`` / ``act2`` / ``act3`` (after pointwise1 / depthwise /
pointwise2) and ``blocks.<i>.residual_act``.

Input: 128×128 RGB with ``x = (pixel / 255 - 0.5) * 2`` per channel, that is torchvision's
``ToTensor()`` followed by ``Normalize(MCU_INPUT_MEAN, MCU_INPUT_STD)``.

Every conv loaded from the NPZ also keeps its per-output-channel weight scales ``w_scales`` as a
non-persistent float32 buffer named ``weight_scale`` (not in the ``state_dict``, not in the
fingerprint), so that :func:`int8_weight` can give back the integer weights of the int8 model:
MIT's "magnitude+" ranks input channels by those, not by the de-quantised float weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from budgetsearch.errors import ModelError

__all__ = [
    "ENV_MCU_DIR",
    "MCU_INPUT_MEAN",
    "MCU_INPUT_SIZE",
    "MCU_INPUT_STD",
    "MCU_MODELS",
    "PACKAGED_MCU_DIR",
    "WEIGHT_SCALE_BUFFER",
    "Clamp",
    "MCUBlock",
    "MCUNet",
    "build_mcu_model",
    "find_mcu_files",
    "int8_weight",
    "load_mcu_model",
    "mcu_conv_names",
]

MCU_MODELS: tuple[str, ...] = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")
"""File stems (and model names) of the three MCU models."""

MCU_INPUT_SIZE = 128
"""Input resolution (square) of the MCU models."""

MCU_INPUT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel mean for ``Normalize`` after ``ToTensor``: real input is ``(p/255 - 0.5) * 2``."""

MCU_INPUT_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel std for ``Normalize`` after ``ToTensor``."""

ENV_MCU_DIR = "BUDGETSEARCH_MCU_DIR"
"""Environment variable naming the folder that holds the ``<stem>.json`` / ``<stem>.npz`` files."""

WEIGHT_SCALE_BUFFER = "weight_scale"
"""Name of the non-persistent buffer holding a loaded conv's per-output-channel weight scales."""

_CONV_KEYS = ("pointwise1", "depthwise", "pointwise2")
_ACT_NAMES = {"pointwise1": "act1", "depthwise": "act2", "pointwise2": "act3"}


class Clamp(nn.Module):
    """Clamps its input to ``[lo, hi]``: the real range of an int8 activation.

    Args:
        lo: Lower bound.
        hi: Upper bound.
    """

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        if not lo < hi:
            raise ModelError(f"Clamp needs lo < hi, got lo={lo}, hi={hi}")
        self.lo = float(lo)
        self.hi = float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x`` clamped to ``[lo, hi]``."""
        return torch.clamp(x, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"lo={self.lo:.6g}, hi={self.hi:.6g}"


class MCUBlock(nn.Module):
    """An inverted-residual block: optional 1×1 expand, depthwise, 1×1 project, optional skip.

    Args:
        depthwise: The depthwise conv.
        act2: The clamp after the depthwise conv.
        pointwise2: The 1×1 projection conv.
        act3: The clamp after the projection.
        pointwise1: The 1×1 expansion conv, or None.
        act1: The clamp after the expansion (None exactly when ``pointwise1`` is).
        residual_act: The clamp after the skip addition, or None for a block without skip.
    """

    def __init__(
        self,
        *,
        depthwise: nn.Conv2d,
        act2: Clamp,
        pointwise2: nn.Conv2d,
        act3: Clamp,
        pointwise1: nn.Conv2d | None = None,
        act1: Clamp | None = None,
        residual_act: Clamp | None = None,
    ) -> None:
        super().__init__()
        if (pointwise1 is None) != (act1 is None):
            raise ModelError("MCUBlock: pointwise1 and act1 must be given together")
        # Registration order is forward order, so named_modules() lists convs as they run.
        self.pointwise1 = pointwise1
        self.act1 = act1
        self.depthwise = depthwise
        self.act2 = act2
        self.pointwise2 = pointwise2
        self.act3 = act3
        self.residual_act = residual_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the block on a real-valued activation map."""
        out = x
        if self.pointwise1 is not None:
            out = self.act1(self.pointwise1(out))
        out = self.act2(self.depthwise(out))
        out = self.act3(self.pointwise2(out))
        if self.residual_act is not None:
            out = self.residual_act(out + x)
        return out


class MCUNet(nn.Module):
    """The float model of one MCU network.

    Args:
        first_conv: The stem conv.
        first_act: The clamp after the stem conv.
        blocks: The inverted-residual blocks, in order.
        classifier: The 1×1 conv to the class logits.
        name: The model's name (its file stem).
        quant: The int8 quantisation scalars per layer (``x_scale``, ``x_zero``, ``y_scale``,
            ``y_zero``), keyed by conv name and by ``blocks.<i>.residual`` for skip additions.
    """

    def __init__(
        self,
        *,
        first_conv: nn.Conv2d,
        first_act: Clamp,
        blocks: list[MCUBlock],
        classifier: nn.Conv2d,
        name: str,
        quant: Mapping[str, Mapping[str, float]],
    ) -> None:
        super().__init__()
        self.first_conv = first_conv
        self.first_act = first_act
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier
        self.mcu_name = name
        self.input_size = MCU_INPUT_SIZE
        self.quant = {k: dict(v) for k, v in quant.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps a normalised ``(N, 3, H, W)`` batch to ``(N, classes)`` logits."""
        x = self.first_act(self.first_conv(x))
        x = self.blocks(x)
        x = self.pool(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)


# ---------------------------------------------------------------------------------------------
# Files


#: The MCU model files shipped inside the package (see its SOURCE.md).
PACKAGED_MCU_DIR = Path(__file__).resolve().parent / "mcu_files"


def _default_dirs() -> list[Path]:
    beside_repo = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "mcu"
    beside_cwd = Path.cwd().parent / "shared" / "models" / "mcu"
    return list(dict.fromkeys([PACKAGED_MCU_DIR, beside_repo, beside_cwd]))


def find_mcu_files(
    name: str, *, mcu_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """Locates the JSON and NPZ files of an MCU model.

    Looks in ``mcu_dir`` if given, else in ``$BUDGETSEARCH_MCU_DIR`` if set, else in the files
    shipped with the package (:data:`PACKAGED_MCU_DIR`: the three published models), then in
    ``shared/models/mcu`` beside the repository and beside the current directory.

    Args:
        name: The file stem, one of :data:`MCU_MODELS` (or any stem present in the folder).
        mcu_dir: The folder holding ``<name>.json`` and ``<name>.npz``.

    Returns:
        The paths of ``<name>.json`` and ``<name>.npz`` (the NPZ may not exist; the caller checks
        it only when it needs the tensors).

    Raises:
        ModelError: No candidate folder holds ``<name>.json``.
    """
    if mcu_dir is not None:
        candidates, origin = [Path(mcu_dir).expanduser()], "the mcu_dir argument"
    elif os.environ.get(ENV_MCU_DIR):
        candidates, origin = [Path(os.environ[ENV_MCU_DIR]).expanduser()], f"${ENV_MCU_DIR}"
    else:
        candidates, origin = _default_dirs(), "the default locations"
    for folder in candidates:
        json_path = folder / f"{name}.json"
        if json_path.is_file():
            return json_path, folder / f"{name}.npz"
    tried = ", ".join(str(d / f"{name}.json") for d in candidates)
    raise ModelError(
        f"MCU model {name!r}: architecture file not found (tried {tried}, from {origin}). "
        f"Point to the folder holding {name}.json and {name}.npz with mcu_dir=... "
        f"or the environment variable {ENV_MCU_DIR}."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            spec = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read MCU architecture {path}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ModelError(f"{path}: expected a JSON object at the top level")
    return spec


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ModelError(
            f"MCU weights file not found: {path}. It must sit beside {path.with_suffix('.json')}."
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read MCU weights {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Building


def _field(entry: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(entry, Mapping) or key not in entry:
        raise ModelError(f"MCU architecture: {where} has no field {key!r}")
    return entry[key]


def _array(
    ref: Any, arrays: Mapping[str, np.ndarray], where: str, shape: tuple[int, ...]
) -> np.ndarray:
    if not isinstance(ref, Mapping) or "$array" not in ref:
        raise ModelError(f"MCU architecture: {where} is not an array reference")
    key = ref["$array"]
    if key not in arrays:
        raise ModelError(f"MCU weights: array {key!r} (for {where}) is missing from the NPZ")
    arr = arrays[key]
    if tuple(arr.shape) != shape:
        raise ModelError(f"MCU weights: {key!r} has shape {arr.shape}, expected {shape}")
    return arr


def _range(params: Mapping[str, Any], where: str) -> tuple[float, float]:
    y_scale = float(_field(params, "y_scale", where))
    y_zero = float(_field(params, "y_zero", where))
    return (-128.0 - y_zero) * y_scale, (127.0 - y_zero) * y_scale


def _quant(params: Mapping[str, Any], where: str) -> dict[str, float]:
    return {k: float(_field(params, k, where)) for k in ("x_scale", "x_zero", "y_scale", "y_zero")}


def _conv(
    entry: Mapping[str, Any], where: str, arrays: Mapping[str, np.ndarray] | None
) -> nn.Conv2d:
    """Builds one conv from its JSON entry; dequantised weights if ``arrays`` is given."""
    act = entry.get("act") if isinstance(entry, Mapping) else None
    if act is not None:
        raise ModelError(f"MCU architecture: {where} has act={act!r}; only null is supported")
    c_in = int(_field(entry, "in_channel", where))
    c_out = int(_field(entry, "out_channel", where))
    groups = int(_field(entry, "groups", where))
    stride = int(_field(entry, "stride", where))
    ks = _field(entry, "kernel_size", where)
    kh, kw = (int(ks), int(ks)) if isinstance(ks, int) else (int(ks[0]), int(ks[1]))
    if groups < 1 or c_in % groups or c_out % groups:
        raise ModelError(f"MCU architecture: {where}: groups={groups} does not divide channels")
    pad = ((kh - 1) // 2, (kw - 1) // 2)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=pad, groups=groups, bias=True)
    if arrays is None:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")
        nn.init.zeros_(conv.bias)
        return conv
    params = _field(entry, "params", where)
    w_int = _array(_field(params, "weight", where), arrays, where, (c_out, c_in // groups, kh, kw))
    b_int = _array(_field(params, "bias", where), arrays, where, (c_out,))
    w_scales = _array(_field(params, "w_scales", where), arrays, where, (c_out,))
    x_scale = float(_field(params, "x_scale", where))
    scales = w_scales.astype(np.float64)
    weight = w_int.astype(np.float64) * scales[:, None, None, None]
    bias = b_int.astype(np.float64) * x_scale * scales
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        conv.bias.copy_(torch.from_numpy(bias))
    if not np.all(w_scales > 0):
        raise ModelError(f"MCU weights: {where} has a non-positive weight scale")
    conv.register_buffer(
        WEIGHT_SCALE_BUFFER, torch.from_numpy(w_scales.astype(np.float32)), persistent=False
    )
    return conv


def int8_weight(module: nn.Module) -> torch.Tensor | None:
    """The integer weights of a conv loaded from an int8 MCU model, or None for any other layer.

    The weights are those the int8 model stores: the float weight divided by its output
    channel's scale (the ``weight_scale`` buffer), rounded to the nearest integer. For a model as
    loaded this is exactly the NPZ's int8 weight; after fine-tuning it is the current weight in
    the int8 model's units. A layer without the buffer (a torchvision model, a replaced head, an
    MCU model built without its NPZ) has no int8 form.

    Args:
        module: A conv or linear layer.

    Returns:
        A float64 CPU tensor of the weight's shape holding integers, or None.

    Raises:
        ModelError: The scale buffer does not have one entry per output channel.
    """
    scale = getattr(module, WEIGHT_SCALE_BUFFER, None)
    weight = getattr(module, "weight", None)
    if not isinstance(scale, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    s = scale.detach().to(device="cpu", dtype=torch.float64)
    if s.shape != (w.shape[0],):
        raise ModelError(
            f"{WEIGHT_SCALE_BUFFER} has shape {tuple(s.shape)}; expected ({w.shape[0]},), "
            "one scale per output channel"
        )
    return torch.round(w / s.reshape(-1, *([1] * (w.dim() - 1))))


def _block(
    entry: Mapping[str, Any],
    i: int,
    arrays: Mapping[str, np.ndarray] | None,
    quant: dict[str, Any],
    c_in: int,
) -> MCUBlock:
    where = f"blocks.{i}"
    se = entry.get("se") if isinstance(entry, Mapping) else None
    if se is not None:
        raise ModelError(f"MCU architecture: {where} has a squeeze-excite ('se'), not supported")
    parts: dict[str, nn.Module | None] = {}
    for key in _CONV_KEYS:
        conv_entry = entry.get(key)
        if conv_entry is None:
            if key != "pointwise1":
                raise ModelError(f"MCU architecture: {where} has no {key!r}")
            continue
        name = f"{where}.{key}"
        parts[key] = _conv(conv_entry, name, arrays)
        params = _field(conv_entry, "params", name)
        quant[name] = _quant(params, f"{name}.params")
        parts[_ACT_NAMES[key]] = Clamp(*_range(params, f"{name}.params"))
    residual = entry.get("residual")
    if residual is not None:
        out_c = parts["pointwise2"].out_channels  # type: ignore[union-attr]
        stride = parts["depthwise"].stride  # type: ignore[union-attr]
        if out_c != c_in or tuple(stride) != (1, 1):
            raise ModelError(f"MCU architecture: {where} has a residual but changes shape")
        params = _field(residual, "params", f"{where}.residual")
        quant[f"{where}.residual"] = _quant(params, f"{where}.residual.params")
        parts["residual_act"] = Clamp(*_range(params, f"{where}.residual.params"))
    return MCUBlock(**parts)  # type: ignore[arg-type]


def build_mcu_model(
    spec: Mapping[str, Any], *, arrays: Mapping[str, np.ndarray] | None = None, name: str = "mcu"
) -> MCUNet:
    """Builds the float model from a parsed architecture and (optionally) its tensors.

    Args:
        spec: The parsed ``<stem>.json``.
        arrays: The NPZ arrays by key; None builds a randomly initialised model (Kaiming-normal
            convs, zero biases, the clamps still from the JSON's quantisation scalars).
        name: The model's name, kept as ``model.mcu_name``.

    Returns:
        The float model.

    Raises:
        ModelError: The architecture is malformed or uses an unsupported feature.
    """
    if spec.get("feature_mix") is not None:
        raise ModelError(f"MCU model {name!r}: a non-null 'feature_mix' is not supported")
    blocks_spec = _field(spec, "blocks", "the model")
    if not isinstance(blocks_spec, list) or not blocks_spec:
        raise ModelError(f"MCU model {name!r}: 'blocks' must be a non-empty list")
    first = _field(spec, "first_conv", "the model")
    first_conv = _conv(first, "first_conv", arrays)
    first_params = _field(first, "params", "first_conv")
    quant: dict[str, Any] = {"first_conv": _quant(first_params, "first_conv.params")}
    first_act = Clamp(*_range(first_params, "first_conv.params"))
    head = _field(spec, "classifier", "the model")
    classifier = _conv(head, "classifier", arrays)
    if arrays is None:
        nn.init.normal_(classifier.weight, 0.0, 0.01)
    blocks: list[MCUBlock] = []
    c_in = first_conv.out_channels
    for i, entry in enumerate(blocks_spec):
        block = _block(entry, i, arrays, quant, c_in)
        blocks.append(block)
        c_in = block.pointwise2.out_channels
    quant["classifier"] = _quant(_field(head, "params", "classifier"), "classifier.params")
    if classifier.in_channels != c_in:
        raise ModelError(
            f"MCU model {name!r}: classifier takes {classifier.in_channels} channels, "
            f"the last block gives {c_in}"
        )
    return MCUNet(
        first_conv=first_conv,
        first_act=first_act,
        blocks=blocks,
        classifier=classifier,
        name=name,
        quant=quant,
    )


def load_mcu_model(
    name: str, *, pretrained: bool = True, mcu_dir: str | os.PathLike[str] | None = None
) -> MCUNet:
    """Loads one MCU model as a float PyTorch model.

    Args:
        name: The file stem, e.g. ``"mcunet-5fps"``.
        pretrained: Load the ImageNet weights from the NPZ; False builds the architecture only
            (random init, the NPZ is not read).
        mcu_dir: The folder holding the files (see :func:`find_mcu_files`).

    Returns:
        The float model, in training mode like any freshly built module.

    Raises:
        ModelError: The files are missing, unreadable or malformed.
    """
    json_path, npz_path = find_mcu_files(name, mcu_dir=mcu_dir)
    spec = _read_json(json_path)
    arrays = _read_npz(npz_path) if pretrained else None
    try:
        return build_mcu_model(spec, arrays=arrays, name=name)
    except ModelError as exc:
        raise ModelError(f"{json_path}: {exc}") from exc


def mcu_conv_names(model_name: str, *, mcu_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Lists the conv module names of an MCU model in forward order, without the classifier.

    This is the indexing of the MIT sparse-update schemes (MCUNet-5fps has 42 such convs,
    MobileNetV2-w0.35 51, ProxylessNAS-w0.3 60). Only the JSON is read.

    Args:
        model_name: The file stem, e.g. ``"mcunet-5fps"``.
        mcu_dir: The folder holding the files (see :func:`find_mcu_files`).

    Returns:
        Names such as ``["first_conv", "blocks.0.depthwise", "blocks.0.pointwise2", ...]``.

    Raises:
        ModelError: The architecture file is missing or malformed.
    """
    json_path, _ = find_mcu_files(model_name, mcu_dir=mcu_dir)
    spec = _read_json(json_path)
    blocks = _field(spec, "blocks", "the model")
    if not isinstance(blocks, list):
        raise ModelError(f"{json_path}: 'blocks' must be a list")
    names = ["first_conv"]
    for i, entry in enumerate(blocks):
        if not isinstance(entry, Mapping):
            raise ModelError(f"{json_path}: blocks.{i} must be an object")
        names.extend(f"blocks.{i}.{key}" for key in _CONV_KEYS if entry.get(key) is not None)
    return names
