"""Measured step times: a per-kind latency model fitted on training steps timed on the device.

:func:`profile_device` times designed plans on this machine and returns a device profile whose
``latency`` section (a :class:`LatencyModel`) the cost model then uses instead of its analytic
roofline. See ``docs/latency.md``.
"""

from __future__ import annotations

from ._fit import cross_validate, fit_coefficients, nnls
from ._model import (
    FEATURES,
    LATENCY_MODEL_KIND,
    OP_GROUPS,
    LatencyModel,
    LatencyModelWarning,
    coefficient_name,
)
from ._profiler import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_MODELS,
    PLAN_FAMILIES,
    TimedStep,
    TimingGroup,
    designed_plans,
    profile_device,
    time_plan_groups,
    time_plans,
    timed_step_count,
)

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_MODELS",
    "FEATURES",
    "LATENCY_MODEL_KIND",
    "OP_GROUPS",
    "PLAN_FAMILIES",
    "LatencyModel",
    "LatencyModelWarning",
    "TimedStep",
    "TimingGroup",
    "coefficient_name",
    "cross_validate",
    "designed_plans",
    "fit_coefficients",
    "nnls",
    "profile_device",
    "time_plan_groups",
    "time_plans",
    "timed_step_count",
]
