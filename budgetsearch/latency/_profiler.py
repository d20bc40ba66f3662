"""``profile-device``: time training steps on this device and fit the measured latency model.

The design: for each calibration model and batch size, a fixed family of plans that switches each
operator group's forward and backward parts on and off (the classifier alone; bias-only; the last
third of the layers; everything; channel-sparse updates along the output and the input axis;
gradient-filtered last blocks with r = 2 and 4; a seeded random mix of frozen, bias, full,
sparse and filtered layers). Each plan is applied with :func:`~budgetsearch.trainer.apply_plan`
and stepped exactly as the trainer steps (forward, cross-entropy, backward, SGD with momentum),
plans interleaved round by round so that a change in load touches all of them alike; the median
of the timed steps after one warm-up round is the measurement (a step's time varies by 10-30 %
from one step to the next even on an idle machine here; the median of 10 is reproducible, the
fastest step is not: it falls as more steps are timed).

Why whole steps rather than operators timed one by one: on a CPU an operator's time depends on
what ran before it (caches, the allocator, thread wake-up), and budgetsearch's planned layers fuse
batch norm and activation into the filtered convolution, so isolated timings do not add up to a
step. The per-kind coefficients are still separable, because the designed plans vary each
group's work independently across models, layers and batch sizes.
"""

from __future__ import annotations

import copy
import datetime as _dt
import platform
import random
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import PlanError, ProfileError
from ._fit import cross_validate, fit_coefficients
from ._model import LatencyModel

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_MODELS",
    "PLAN_FAMILIES",
    "TimedStep",
    "designed_plans",
    "profile_device",
    "time_plans",
]

DEFAULT_MODELS = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3", "mobilenet_v2")
"""Calibration models: the three MCU models and MobileNetV2 (the Pi / Jetson workhorse)."""
DEFAULT_BATCH_SIZES = (1, 8, 32)
PLAN_FAMILIES = ("classifier", "bias-only", "last-third", "full", "sparse-out", "sparse-in",
                 "filtered-r2", "filtered-r4", "mixed")
_QUICK_FAMILIES = ("classifier", "last-third", "sparse-out", "filtered-r2")


@dataclass(frozen=True)
class TimedStep:
    """One measured training step: which plan, where, its features and its median time."""

    model: str
    batch_size: int
    plan: str
    features: dict[str, float]
    measured_ms: float
    """The median of the timed steps."""
    times_ms: tuple[float, ...] = ()
    """Every timed step, in order."""


def _random_channels(rng: random.Random, n: int, fraction: float) -> tuple[int, ...]:
    k = max(1, min(n - 1, round(n * fraction))) if n > 1 else 1
    return tuple(sorted(rng.sample(range(n), k)))


def designed_plans(graph: Any, cost_model: Any, *, seed: int = 0,
                   families: Sequence[str] = PLAN_FAMILIES) -> dict[str, Any]:
    """The calibration plans of one model (see the module docstring), by family name.

    A family that cannot be built on this model (e.g. no layer a gradient filter fits) is left
    out; every returned plan is accepted by ``cost_model``.
    """
    from ..plan import LayerUpdate, Plan

    rng = random.Random(seed)
    names = list(graph.layers)
    n = len(names)
    later = names[n // 2:]

    def sparse(axis: str, fraction: float) -> Plan:
        updates = {}
        for name in later:
            layer = graph.layers[name]
            dw = layer.groups > 1
            ax = "out" if (axis == "in" and dw) else axis
            count = layer.out_channels if ax == "out" else layer.in_channels // layer.groups
            updates[name] = LayerUpdate(channels=_random_channels(rng, count, fraction), axis=ax)
        return Plan.from_layers(graph, updates)

    def mixed() -> Plan:
        updates = {}
        for name in names[n // 3:]:
            layer = graph.layers[name]
            draw = rng.random()
            if draw < 0.4:
                continue
            if draw < 0.55 and layer.bias_param is not None:
                updates[name] = LayerUpdate(mode="bias")
            elif draw < 0.7:
                updates[name] = LayerUpdate()
            elif draw < 0.85:
                updates[name] = LayerUpdate(
                    channels=_random_channels(rng, layer.out_channels, rng.uniform(0.1, 0.6)))
            else:
                update = LayerUpdate(patch_size=rng.choice((2, 4)))
                try:
                    cost_model.latency_features(Plan.from_layers(graph, {name: update}))
                except PlanError:
                    update = LayerUpdate()
                updates[name] = update
        return Plan.from_layers(graph, updates or {names[-1]: LayerUpdate()})

    builders = {
        "classifier": lambda: Plan.last_k_layers(graph, 1),
        "bias-only": lambda: Plan.bias_only(graph),
        "last-third": lambda: Plan.last_k_layers(graph, max(2, n // 3)),
        "full": lambda: Plan.full(graph),
        "sparse-out": lambda: sparse("out", 0.3),
        "sparse-in": lambda: sparse("in", 0.5),
        "filtered-r2": lambda: Plan.last_k_blocks(graph, 3, patch_size=2),
        "filtered-r4": lambda: Plan.last_k_blocks(graph, 2, patch_size=4),
        "mixed": mixed,
    }
    plans = {}
    for family in families:
        if family not in builders:
            raise ProfileError(f"unknown plan family {family!r}; known: {', '.join(builders)}")
        try:
            plan = builders[family]()
            cost_model.latency_features(plan)
        except PlanError:
            continue
        plans[family] = plan
    return plans


def time_plans(model: Any, graph: Any, plans: dict[str, Any], *, batch_size: int,
               input_size: int, repeats: int, optimizer: str = "momentum",
               on_step: Any = None) -> dict[str, list[float]]:
    """Milliseconds of each timed training step under each plan, stepped as the trainer does.

    Every plan trains its own copy of ``model``; plans are interleaved one step each per round,
    after one warm-up round, so a burst of other load slows one round of every plan rather than
    every step of one plan.

    Args:
        model: The model (float, on the CPU).
        graph: Its layer graph.
        plans: Plans by name.
        batch_size: Samples per step.
        input_size: Input height and width.
        repeats: Timed rounds.
        optimizer: ``sgd``, ``momentum`` (SGD with momentum 0.9) or ``adam``.
        on_step: Called after each step (for a progress bar).
    """
    import torch
    import torch.nn.functional as F

    from ..trainer import apply_plan

    classes = int(graph.nodes[-1].shape[-1])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=gen)
    y = torch.randint(0, classes, (batch_size,), generator=gen)
    copies, handles, opts = {}, {}, {}
    times: dict[str, list[float]] = {name: [] for name in plans}
    try:
        for name, plan in plans.items():
            copies[name] = copy.deepcopy(model).train()
            handles[name] = apply_plan(copies[name], plan, graph=graph)
            groups = handles[name].param_groups()
            if optimizer == "adam":
                opts[name] = torch.optim.Adam(groups, lr=0.0)
            else:
                opts[name] = torch.optim.SGD(groups, lr=0.0,
                                             momentum=0.9 if optimizer == "momentum" else 0.0)
        for rnd in range(repeats + 1):
            for name in plans:
                net, opt = copies[name], opts[name]
                start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                elapsed = time.perf_counter() - start
                del loss
                if rnd:
                    times[name].append(elapsed)
                if on_step is not None:
                    on_step()
    finally:
        for handle in handles.values():
            handle.remove()
    return {name: [1e3 * x for x in t] for name, t in times.items()}


def profile_device(
    *,
    name: str = "host",
    models: Sequence[str] = DEFAULT_MODELS,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    input_size: int = 128,
    repeats: int | None = None,
    quick: bool = False,
    folds: int = 5,
    progress: bool = True,
) -> tuple[Any, list[TimedStep]]:
    """Measure this device and build a profile whose latency comes from timed training steps.

    Runs :func:`budgetsearch.hostprofile.measure_host` for the analytic figures (MAC rates,
    bandwidth, per-op overhead: the fallback and the memory rule), then times the designed
    plans of each model at each batch size and fits the per-kind latency model, reporting its
    cross-validated error (folds hold whole plans out, at every batch size).

    Args:
        name: The profile name (the stem of the file it will be saved to).
        models: Registered model names to calibrate on.
        batch_sizes: Batch sizes to time.
        input_size: Input height and width.
        repeats: Timed rounds per plan (default 10; 2 with ``quick``).
        quick: One small model at 64 px, batch sizes 1 and 4, four plan families: a smoke run of
            well under a minute (the coefficients are rough).
        folds: Cross-validation folds for the reported error.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        The profile, and every timed step (features and median time).

    Raises:
        ProfileError: For an invalid name, repeats, batch size or model.
    """
    import torch
    from tqdm import tqdm

    from ..cost import CostModel
    from ..errors import ModelError
    from ..graph import LayerGraph
    from ..hostprofile import measure_host
    from ..models import load_model
    from ..profiles import profile_from_dict, profile_to_dict
    from ..trainer import tune_host_allocator

    if quick:
        models, batch_sizes, input_size = ("mcunet-5fps",), (1, 4), 64
    families = _QUICK_FAMILIES if quick else PLAN_FAMILIES
    repeats = repeats if repeats is not None else (2 if quick else 10)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ProfileError(f"repeats: expected a positive integer, got {repeats!r}")
    bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad or not batch_sizes:
        raise ProfileError(f"batch_sizes: expected positive integers, got {list(batch_sizes)!r}")
    if not models:
        raise ProfileError("models: expected at least one registered model name")
    base = measure_host(name=name, quick=quick, progress=progress)
    tune_host_allocator()
    threads = torch.get_num_threads()
    loaded = {}
    for m in models:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded[m] = load_model(m, num_classes=10)
        except ModelError as exc:
            raise ProfileError(f"models: {exc}") from None
    work = []
    for m, model in loaded.items():
        graph = LayerGraph.from_model(model, input_size=input_size, model_name=m)
        for b in batch_sizes:
            cm = CostModel(graph, base, accounting="ops", batch_size=b, optimizer="momentum")
            work.append((m, model, graph, b, cm, designed_plans(graph, cm, seed=b,
                                                                 families=families)))
    # Two passes over every (model, batch size), minutes apart, half of the repeats each: a
    # slow spell of the machine then touches half of a plan's steps, not all of them.
    halves = (repeats - repeats // 2, repeats // 2) if repeats > 1 else (1,)
    total = sum(len(p) for *_, p in work) * sum(h + 1 for h in halves)
    timed: dict[tuple[str, int, str], list[float]] = {}
    with tqdm(total=total, desc="profile-device", unit="step", disable=not progress) as bar:
        for k, half in enumerate(halves):
            for m, model, graph, b, _cm, plans in work:
                bar.set_postfix_str(f"pass {k + 1}: {m} batch {b}")
                measured = time_plans(model, graph, plans, batch_size=b, input_size=input_size,
                                      repeats=half, on_step=bar.update)
                for p, times in measured.items():
                    timed.setdefault((m, b, p), []).extend(times)
    steps = [TimedStep(m, b, p, cm.latency_features(plan),
                       statistics.median(timed[m, b, p]), tuple(timed[m, b, p]))
             for m, _model, _graph, b, cm, plans in work for p, plan in plans.items()]
    feats = [s.features for s in steps]
    ms = [s.measured_ms for s in steps]
    coef = fit_coefficients(feats, ms)
    err = np.abs(cross_validate(feats, ms, folds=folds,
                                groups=[f"{s.model}/{s.plan}" for s in steps]))
    fit = {"samples": len(steps), "folds": min(folds, len({(s.model, s.plan) for s in steps})),
           "median_error_pct": round(100 * float(np.median(err)), 2),
           "p90_error_pct": round(100 * float(np.quantile(err, 0.9)), 2),
           "max_error_pct": round(100 * float(err.max()), 2)}
    latency = LatencyModel(
        coefficients=coef, torch_version=str(torch.__version__), threads=threads, fit=fit,
        calibration={"models": list(models), "batch_sizes": list(batch_sizes),
                     "input_size": input_size, "plans": list(families), "repeats": repeats})
    stamp = (f"measured by budgetsearch profile-device on {_dt.date.today().isoformat()}, "
             f"torch {torch.__version__}, {threads} threads")
    data = profile_to_dict(replace(base, latency=latency))
    data["sources"]["latency"] = (
        f"{stamp}: median of {repeats} training steps (two passes minutes apart, each after "
        f"a warm-up) of each designed plan "
        f"({', '.join(families)}) of {', '.join(models)} at {input_size} px, batch "
        f"{', '.join(map(str, batch_sizes))}, SGD with momentum, applied with apply_plan; "
        "coefficients by non-negative least squares on relative error; fit: cross-validated "
        "with whole plans held out")
    data["notes"] = (f"Timed on {platform.platform()} with torch {torch.__version__}, "
                     f"{threads} threads{' (quick mode: rough)' if quick else ''}. Step times "
                     "come from the measured latency model (section latency); the compute "
                     "section is the analytic fallback. Other load while measuring slows the "
                     "medians. The memory figure is a rule, not a measurement.")
    return profile_from_dict(data, source=f"<profile_device {name}>"), steps
