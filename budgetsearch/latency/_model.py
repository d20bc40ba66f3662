"""The measured latency model of a device: per-kind linear predictors fitted on timed steps.

A training step is the sum of its operators' forward and backward calls, the optimizer step and a
fixed cost per step (the loss, zeroing the gradients, the Python around them). Each term is a
linear function of a few features of the operator, with one coefficient per operator group and
feature:

- forward of a conv / depthwise conv / linear: per call, per MAC and per byte moved (input,
  output and weight);
- forward of an elementwise op (batch norm, activation, add, pooling, view): per call and per
  byte;
- backward of each group: per call, per grad-input MAC, per grad-weight MAC and per byte (the
  output gradient, the input gradients and the saved tensors);
- gradient-filtered convs (the patch averaging and the small convolution it leads to) and
  channel-sparse layers (the gather and scatter of the selected channels): per call and per byte;
- the optimizer: per byte of weight, gradient and state it reads and writes; the step: one.

The coefficients are measured on the device (:func:`budgetsearch.latency.profile_device`) and are
non-negative: a feature can only add time. Features are counted in fp32 PyTorch terms whatever
the accounting, because that is what was timed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import ProfileError

__all__ = [
    "FEATURES",
    "LATENCY_MODEL_KIND",
    "OP_GROUPS",
    "LatencyModel",
    "LatencyModelWarning",
    "coefficient_name",
]

LATENCY_MODEL_KIND = "per-kind-linear-v1"
"""The one predictor form this version knows (stored in the profile as ``latency.model``)."""

OP_GROUPS = ("conv", "depthwise", "linear", "elementwise")
"""Operator groups with their own coefficients: dense (groups = 1 or grouped) convs, depthwise
convs, linear layers, and every other op (batch norm, activations, adds, pooling, views)."""


def _features() -> tuple[str, ...]:
    names: list[str] = []
    for g in OP_GROUPS:
        names += [f"forward.{g}.calls"]
        if g != "elementwise":
            names += [f"forward.{g}.macs"]
        names += [f"forward.{g}.bytes"]
    for g in OP_GROUPS:
        names += [f"backward.{g}.calls"]
        if g != "elementwise":
            names += [f"backward.{g}.grad_input_macs", f"backward.{g}.grad_weight_macs"]
        names += [f"backward.{g}.bytes"]
    names += ["backward.filtered.calls", "backward.filtered.bytes", "backward.sparse.calls",
              "backward.sparse.bytes", "optimizer.bytes", "step.calls"]
    return tuple(names)


FEATURES: tuple[str, ...] = _features()
"""Every feature of the predictor, in a fixed order (``<phase>.<group>.<unit>``)."""

_UNIT_SINGULAR = {"calls": "call", "macs": "mac", "bytes": "byte",
                  "grad_input_macs": "grad_input_mac", "grad_weight_macs": "grad_weight_mac"}


def coefficient_name(feature: str) -> str:
    """The profile key of a feature's coefficient: ``forward.conv.macs`` -> ``forward.conv.
    ms_per_mac`` (milliseconds per unit of the feature)."""
    head, _, unit = feature.rpartition(".")
    return f"{head}.ms_per_{_UNIT_SINGULAR[unit]}"


_COEFFICIENTS = tuple(coefficient_name(f) for f in FEATURES)
_FIT_KEYS = ("samples", "folds", "median_error_pct", "p90_error_pct", "max_error_pct")
_CALIBRATION_KEYS = ("models", "batch_sizes", "input_size", "plans", "repeats")


class LatencyModelWarning(UserWarning):
    """A measured latency model is used where its timings may not hold (another torch version,
    thread count or CPU kernels than it was fitted with)."""


@dataclass(frozen=True)
class LatencyModel:
    """Coefficients of the per-kind linear latency predictor, and how they were obtained.

    Attributes:
        coefficients: Milliseconds per unit of each feature, by feature name (:data:`FEATURES`).
        torch_version: The PyTorch version the steps were timed with.
        threads: ``torch.get_num_threads()`` while timing.
        kernels: The CPU kernels torch timed with (:func:`budgetsearch._threads.cpu_kernels`,
            e.g. ``aten=AVX2 onednn=AVX2 cpu=avx512``); None in profiles made before it was
            recorded.
        fit: How well the predictor reproduces timed steps it was not fitted on: ``samples``
            (timed steps), ``folds`` (cross-validation folds) and the median, 90th-percentile
            and largest absolute error in percent.
        calibration: What was timed: ``models``, ``batch_sizes``, ``input_size``, ``plans``
            (plan families per model and batch size) and ``repeats``.
    """

    coefficients: Mapping[str, float]
    torch_version: str
    threads: int
    fit: Mapping[str, float] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    kernels: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.coefficients) - set(FEATURES))
        if unknown:
            raise ProfileError(f"latency model: unknown features {', '.join(unknown)}; "
                               f"known: {', '.join(FEATURES)}")
        object.__setattr__(self, "coefficients", MappingProxyType(
            {f: float(self.coefficients.get(f, 0.0)) for f in FEATURES}))
        object.__setattr__(self, "fit", MappingProxyType(dict(self.fit)))
        object.__setattr__(self, "calibration", MappingProxyType(dict(self.calibration)))

    def predict_ms(self, features: Mapping[str, float]) -> float:
        """Milliseconds of the work described by ``features`` (missing features count 0)."""
        c = self.coefficients
        return float(sum(c[k] * v for k, v in features.items() if v))

    def describe(self) -> str:
        """One line: what the predictor is and how far off it was on held-out steps."""
        fit = self.fit
        err = ""
        if "median_error_pct" in fit:
            err = (f", {fit.get('folds', '?')}-fold error median {fit['median_error_pct']:.1f} %"
                   f" / p90 {fit['p90_error_pct']:.1f} %")
        return (f"measured (budgetsearch profile-device, torch {self.torch_version}, "
                f"{self.threads} threads{err})")

    def check_this_process(self, *, source: str) -> None:
        """:meth:`check_runtime` against this process's torch version, thread count and CPU
        kernels (what loading a profile, or rebuilding one a study stored, checks)."""
        import torch

        from .._threads import cpu_kernels

        self.check_runtime(torch_version=str(torch.__version__), threads=torch.get_num_threads(),
                           source=source, kernels=cpu_kernels(), stacklevel=4)

    def check_runtime(self, *, torch_version: str, threads: int, source: str,
                      kernels: str | None = None, stacklevel: int = 3) -> None:
        """Warn (:class:`LatencyModelWarning`) when timings were made under another torch
        version, thread count or CPU kernels than the caller's.

        Args:
            torch_version: The caller's ``torch.__version__``.
            threads: The caller's ``torch.get_num_threads()``.
            source: Where the model was read from, for the message.
            kernels: The caller's :func:`~budgetsearch._threads.cpu_kernels`; not compared
                when None or when the model did not record its own.
            stacklevel: The warning's stack level (3: the caller's caller).
        """
        problems = []
        if torch_version.split("+")[0] != self.torch_version.split("+")[0]:
            problems.append(f"torch {self.torch_version} (this process runs {torch_version})")
        if threads != self.threads:
            problems.append(f"{self.threads} threads (this process uses {threads})")
        # the whole record, not _threads.same_kernels: timings depend on the CPU itself too
        if kernels is not None and self.kernels is not None and kernels != self.kernels:
            problems.append(f"CPU kernels {self.kernels} (this process computes with "
                            f"{kernels})")
        if problems:
            warnings.warn(
                f"{source}: the measured latency model was fitted with " + " and ".join(problems)
                + "; its step times may not hold here (re-run budgetsearch profile-device, or "
                "match torch.set_num_threads and the kernel variables "
                "ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)", LatencyModelWarning,
                stacklevel=stacklevel)

    # ------------------------------------------------------------------------------ (de)serial
    def to_dict(self) -> dict[str, Any]:
        """The profile's ``latency`` section (YAML-ready)."""
        return {
            "model": LATENCY_MODEL_KIND,
            "torch_version": self.torch_version,
            "threads": self.threads,
            **({"kernels": self.kernels} if self.kernels is not None else {}),
            "coefficients": {coefficient_name(f): float(v)
                             for f, v in self.coefficients.items()},
            "fit": dict(self.fit),
            "calibration": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in self.calibration.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, *, prefix: str = "latency.") -> LatencyModel:
        """Validate a profile's ``latency`` section.

        Raises:
            ProfileError: Listing every missing or invalid field with its dotted path.
        """
        model, errors = validate_latency(data, prefix=prefix)
        if model is None:
            raise ProfileError(errors[0] if len(errors) == 1 else
                               f"{len(errors)} problems:\n  - " + "\n  - ".join(errors))
        return model


def validate_latency(data: Any, *, prefix: str = "latency.") -> tuple[LatencyModel | None,
                                                                       list[str]]:
    """Check a ``latency`` section: the model, or None and every problem (dotted paths)."""
    errors: list[str] = []
    if not isinstance(data, Mapping):
        return None, [f"{prefix.rstrip('.')}: expected a mapping with keys model, "
                      f"torch_version, threads, coefficients, fit, calibration (and "
                      f"optionally kernels); got {type(data).__name__}"]
    allowed = ("model", "torch_version", "threads", "kernels", "coefficients", "fit",
               "calibration")
    errors += [f"{prefix}{k}: unknown key; allowed keys: {', '.join(allowed)}"
               for k in data if k not in allowed]
    if data.get("model") != LATENCY_MODEL_KIND:
        errors.append(f"{prefix}model: expected {LATENCY_MODEL_KIND!r} (the predictor form "
                      f"this version reads), got {data.get('model')!r}")
    version = data.get("torch_version")
    if not isinstance(version, str) or not version.strip():
        errors.append(f"{prefix}torch_version: expected a version string, got {version!r}")
    threads = data.get("threads")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        errors.append(f"{prefix}threads: expected a positive integer, got {threads!r}")
    kernels = data.get("kernels")
    if kernels is not None and (not isinstance(kernels, str) or not kernels.strip()):
        errors.append(f"{prefix}kernels: expected the CPU kernels as a string such as "
                      f"'aten=AVX2 onednn=auto cpu=avx2' (or no key), got {kernels!r}")
    coefs: dict[str, float] = {}
    raw = data.get("coefficients")
    if not isinstance(raw, Mapping):
        errors.append(f"{prefix}coefficients: expected a mapping of {len(FEATURES)} "
                      f"coefficients ({', '.join(_COEFFICIENTS[:2])}, ...), got {raw!r}")
    else:
        by_name = dict(zip(_COEFFICIENTS, FEATURES, strict=True))
        errors += [f"{prefix}coefficients.{k}: unknown coefficient; known: "
                   f"{', '.join(_COEFFICIENTS)}" for k in raw if k not in by_name]
        for name, feature in by_name.items():
            if name not in raw:
                errors.append(f"{prefix}coefficients.{name}: missing (a partial profile?); "
                              "expected a number >= 0 (milliseconds per unit)")
                continue
            value = raw[name]
            ok = (not isinstance(value, bool) and isinstance(value, (int, float))
                  and math.isfinite(value) and value >= 0)
            if not ok:
                errors.append(f"{prefix}coefficients.{name}: expected a finite number >= 0 "
                              f"(milliseconds per unit), got {value!r}")
            else:
                coefs[feature] = float(value)
    fit = data.get("fit")
    if not isinstance(fit, Mapping) or any(k not in fit for k in _FIT_KEYS):
        errors.append(f"{prefix}fit: expected a mapping with keys {', '.join(_FIT_KEYS)}, "
                      f"got {fit!r}")
    else:
        for key in _FIT_KEYS:
            value = fit[key]
            whole = key in ("samples", "folds")
            if (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))
                    or not math.isfinite(value) or value < 0):
                errors.append(f"{prefix}fit.{key}: expected "
                              + ("a whole number >= 0" if whole else "a finite number >= 0")
                              + f", got {value!r}")
    calibration = data.get("calibration")
    if not isinstance(calibration, Mapping) or any(k not in calibration
                                                   for k in _CALIBRATION_KEYS):
        errors.append(f"{prefix}calibration: expected a mapping with keys "
                      f"{', '.join(_CALIBRATION_KEYS)}, got {calibration!r}")
    if errors:
        return None, errors
    return LatencyModel(coefficients=coefs, torch_version=version, threads=threads, fit=fit,
                        calibration=calibration, kernels=kernels), []
