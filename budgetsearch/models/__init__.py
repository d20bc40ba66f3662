"""Models: a registry of torchvision CNNs and the MCU int8 networks as float PyTorch models.

``load_model(name, weights=..., num_classes=...)`` builds any registered model; see
:mod:`budgetsearch.models.zoo` for what ``weights`` means, :mod:`budgetsearch.models.mcu` for the
MCU loader and :mod:`budgetsearch.models.weights` for installing ImageNet MobileNetV2 weights
offline (``python -m budgetsearch.models.weights``).
"""

from __future__ import annotations

from typing import Any

from budgetsearch.models.mcu import (
    MCU_INPUT_MEAN,
    MCU_INPUT_SIZE,
    MCU_INPUT_STD,
    MCU_MODELS,
    Clamp,
    MCUNet,
    load_mcu_model,
    mcu_conv_names,
)
from budgetsearch.models.zoo import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
    input_spec,
    list_models,
    load_model,
    register_model,
    replace_head,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MCU_INPUT_MEAN",
    "MCU_INPUT_SIZE",
    "MCU_INPUT_STD",
    "MCU_MODELS",
    "Clamp",
    "InputSpec",
    "MCUNet",
    "input_spec",
    "install_imagenet_weights",
    "list_models",
    "load_mcu_model",
    "load_model",
    "load_state_dict_file",
    "mcu_conv_names",
    "register_model",
    "replace_head",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m budgetsearch.models.weights` runs without a warning.
    if name in ("install_imagenet_weights", "load_state_dict_file"):
        from budgetsearch.models import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
