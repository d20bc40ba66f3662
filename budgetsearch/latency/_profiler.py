"""``profile-device``: time training steps on this device and fit the measured latency model.

The design: for each calibration model and batch size, a fixed family of plans that switches each
operator group's forward and backward parts on and off (the classifier alone; bias-only; the last
third of the layers; everything; channel-sparse updates along the output and the input axis;
gradient-filtered last blocks with r = 2 and 4; a seeded random mix of frozen, bias, full,
sparse and filtered layers). Each plan is applied with :func:`~budgetsearch.trainer.apply_plan`
and stepped exactly as the trainer steps (forward, cross-entropy, backward, SGD with momentum).
Every plan of every model and batch size is visited once per round (:func:`time_plan_groups`),
so the medians of all plans are taken over the same minutes: this machine's speed drifts by 10-30 %
over minutes even when idle, and a profile timed model after model fitted those drifts into the
coefficients. Each visit to a plan steps it once untimed before its timed steps, because a step
right after another model's step finds that model's weights in the caches (at batch 1 it is up to
twice as slow here) and a training loop does not. The median of the timed steps is the
measurement; the fastest step is not, because it falls as more steps are timed.

Why whole steps rather than operators timed one by one: on a CPU an operator's time depends on
what ran before it (caches, the allocator, thread wake-up), and budgetsearch's planned layers fuse
batch norm and activation into the filtered convolution, so isolated timings do not add up to a
step. The per-kind coefficients are still separable, because the designed plans vary each
group's work independently across models, layers and batch sizes.
"""

from __future__ import annotations

import copy
import datetime as _dt
import gc
import platform
import random
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._threads import cpu_kernels
from ..errors import PlanError, ProfileError
from ._fit import cross_validate, fit_coefficients
from ._model import LatencyModel

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_MODELS",
    "PLAN_FAMILIES",
    "TimedStep",
    "TimingGroup",
    "designed_plans",
    "profile_device",
    "time_plan_groups",
    "time_plans",
    "timed_step_count",
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


@dataclass(frozen=True)
class TimingGroup:
    """Plans of one model at one batch size and input size, to be timed together.

    Attributes:
        model: The model (float, on the CPU); every plan trains its own copy.
        graph: Its layer graph.
        plans: Plans by name.
        batch_size: Samples per step.
        input_size: Input height and width.
    """

    model: Any
    graph: Any
    plans: Mapping[str, Any]
    batch_size: int
    input_size: int


def time_plan_groups(groups: Sequence[TimingGroup], *, repeats: int, burst: int = 2,
                     optimizer: str = "momentum",
                     on_step: Any = None) -> list[dict[str, list[float]]]:
    """Milliseconds of ``repeats`` timed training steps of each plan of each group, stepped as
    the trainer does, the plans visited in turn.

    A visit to a plan is one untimed step followed by ``burst`` timed steps of that plan: the
    timed steps find the plan's weights, its shapes and the allocator's blocks as a training
    loop finds them, not as the previous plan left them (at batch 1 a step after another
    model's step is up to twice as slow here). A round visits every plan of every group once,
    and rounds repeat until each plan has ``repeats`` timed steps, so the medians of all plans
    are taken over the same minutes and a slow spell of the machine touches them alike.
    The garbage collector's generations are frozen over the timed steps (and thawed after)
    unless the caller has frozen objects of its own, which are left as they are.

    Args:
        groups: The groups to time.
        repeats: Timed steps per plan.
        burst: Timed steps per visit.
        optimizer: ``sgd``, ``momentum`` (SGD with momentum 0.9) or ``adam``.
        on_step: Called after each step, untimed ones included (for a progress bar).

    Returns:
        Per group (in order), each plan's step times in milliseconds, in the order timed.
    """
    import torch
    import torch.nn.functional as F

    from ..trainer import apply_plan

    gen = torch.Generator().manual_seed(0)
    # gc.unfreeze() thaws every frozen object: freeze only when the caller has frozen none
    freeze = gc.get_freeze_count() == 0
    data, copies, handles, opts = [], [], [], []
    times: list[dict[str, list[float]]] = [{name: [] for name in g.plans} for g in groups]
    try:
        for g in groups:
            classes = int(g.graph.nodes[-1].shape[-1])
            data.append((torch.randn(g.batch_size, 3, g.input_size, g.input_size, generator=gen),
                         torch.randint(0, classes, (g.batch_size,), generator=gen)))
            nets, hs, os_ = {}, {}, {}
            copies.append(nets)
            handles.append(hs)
            opts.append(os_)
            for name, plan in g.plans.items():
                nets[name] = copy.deepcopy(g.model).train()
                hs[name] = apply_plan(nets[name], plan, graph=g.graph)
                params = hs[name].param_groups()
                if optimizer == "adam":
                    os_[name] = torch.optim.Adam(params, lr=0.0)
                else:
                    os_[name] = torch.optim.SGD(params, lr=0.0,
                                                momentum=0.9 if optimizer == "momentum" else 0.0)

        def step(k: int, name: str) -> float:
            (x, y), net, opt = data[k], copies[k][name], opts[k][name]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - start
            del loss
            if on_step is not None:
                on_step()
            return elapsed

        # The copies are long-lived: keep the cyclic collector from walking all of them during
        # the timed steps (a training loop holds one model, not dozens).
        if freeze:
            gc.collect()
            gc.freeze()
        done = 0
        while done < repeats:
            n = min(burst, repeats - done)
            for k, g in enumerate(groups):
                for name in g.plans:
                    step(k, name)
                    times[k][name].extend(1e3 * step(k, name) for _ in range(n))
            done += n
    finally:
        if freeze:
            gc.unfreeze()
        for hs in handles:
            for handle in hs.values():
                handle.remove()
    return times


def timed_step_count(plans: int, *, repeats: int, burst: int = 2) -> int:
    """Steps :func:`time_plan_groups` runs for ``plans`` plans in all, untimed ones included."""
    return plans * (repeats + -(-repeats // burst))


def time_plans(model: Any, graph: Any, plans: Mapping[str, Any], *, batch_size: int,
               input_size: int, repeats: int, optimizer: str = "momentum",
               on_step: Any = None) -> dict[str, list[float]]:
    """Milliseconds of ``repeats`` timed training steps under each plan of one model, stepped
    as the trainer does: :func:`time_plan_groups` with one group.

    Args:
        model: The model (float, on the CPU).
        graph: Its layer graph.
        plans: Plans by name.
        batch_size: Samples per step.
        input_size: Input height and width.
        repeats: Timed steps per plan.
        optimizer: ``sgd``, ``momentum`` (SGD with momentum 0.9) or ``adam``.
        on_step: Called after each step (for a progress bar).
    """
    group = TimingGroup(model=model, graph=graph, plans=plans, batch_size=batch_size,
                        input_size=input_size)
    return time_plan_groups([group], repeats=repeats, optimizer=optimizer, on_step=on_step)[0]


def profile_device(
    *,
    name: str = "host",
    models: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    input_size: int | None = None,
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
        models: Registered model names to calibrate on (default :data:`DEFAULT_MODELS`;
            ``mcunet-5fps`` with ``quick``).
        batch_sizes: Batch sizes to time (default :data:`DEFAULT_BATCH_SIZES`; 1 and 4 with
            ``quick``).
        input_size: Input height and width (default 128; 64 with ``quick``).
        repeats: Timed steps per plan (default 10; 2 with ``quick``).
        quick: Four plan families and the quick defaults above: a smoke run of well under a
            minute (the coefficients are rough). Models, batch sizes or an input size given
            are kept.
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

    if models is None:
        models = ("mcunet-5fps",) if quick else DEFAULT_MODELS
    if batch_sizes is None:
        batch_sizes = (1, 4) if quick else DEFAULT_BATCH_SIZES
    if input_size is None:
        input_size = 64 if quick else 128
    families = _QUICK_FAMILIES if quick else PLAN_FAMILIES
    repeats = repeats if repeats is not None else (2 if quick else 10)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ProfileError(f"repeats: expected a positive integer, got {repeats!r}")
    bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad or not batch_sizes:
        raise ProfileError(f"batch_sizes: expected positive integers, got {list(batch_sizes)!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 8:
        raise ProfileError(f"input_size: expected an integer of at least 8, got {input_size!r}")
    if not models:
        raise ProfileError("models: expected at least one registered model name")
    loaded = {}  # before any timing: a misspelt model is refused at once
    for m in models:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded[m] = load_model(m, num_classes=10)
        except ModelError as exc:
            raise ProfileError(f"models: {exc}") from None
    base = measure_host(name=name, quick=quick, progress=progress)
    tune_host_allocator()
    threads = torch.get_num_threads()
    work = []
    for m, model in loaded.items():
        graph = LayerGraph.from_model(model, input_size=input_size, model_name=m)
        for b in batch_sizes:
            cm = CostModel(graph, base, accounting="ops", batch_size=b, optimizer="momentum")
            work.append((m, model, graph, b, cm, designed_plans(graph, cm, seed=b,
                                                                 families=families)))
    # Every plan of every (model, batch size) visited in turn, so that all medians are taken
    # over the same minutes and a slow spell of the machine touches every plan alike.
    groups = [TimingGroup(model=model, graph=graph, plans=plans, batch_size=b,
                          input_size=input_size) for _m, model, graph, b, _cm, plans in work]
    total = timed_step_count(sum(len(p) for *_, p in work), repeats=repeats)
    with tqdm(total=total, desc="profile-device", unit="step",
              disable=not progress) as bar:
        measured = time_plan_groups(groups, repeats=repeats, on_step=bar.update)
    timed = {(m, b, p): t for (m, _model, _graph, b, _cm, _plans), group in zip(work, measured,
                                                                                 strict=True)
             for p, t in group.items()}
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
        kernels=cpu_kernels(),
        calibration={"models": list(models), "batch_sizes": list(batch_sizes),
                     "input_size": input_size, "plans": list(families), "repeats": repeats})
    stamp = (f"measured by budgetsearch profile-device on {_dt.date.today().isoformat()}, "
             f"torch {torch.__version__}, {threads} threads, kernels {latency.kernels}")
    data = profile_to_dict(replace(base, latency=latency))
    data["sources"]["latency"] = (
        f"{stamp}: median of {repeats} training steps (every plan visited in turn, each visit "
        f"one untimed step and two timed ones) of each designed plan "
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
