"""A rough time estimate of a study's cells, for ``study run --dry-run``.

From the study's own done cells when there are some: their measured seconds per sample-epoch, for
the same model and method (else the same model), times the cell's sample-epochs. Otherwise from the
model's forward MACs at the study's input size: a training step costs about 3 forward passes, a
validation step 1, at an assumed :data:`HOST_MACS_PER_S` per worker; plus the Fisher pass for the
methods ranking channels by Fisher scores, the search's trials at :data:`SEARCH_TRIAL_S` each, and
:data:`CELL_OVERHEAD_S` of loading per cell. Expect a factor of 2 either way until a few cells ran.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .spec import Cell, StudySpec

__all__ = ["CELL_OVERHEAD_S", "HOST_MACS_PER_S", "SEARCH_TRIAL_S", "estimate_seconds",
           "format_duration"]

#: Assumed training throughput of one worker on this kind of host (fp32 PyTorch on one core).
HOST_MACS_PER_S = 1.0e9
SEARCH_TRIAL_S = 0.02
CELL_OVERHEAD_S = 3.0
_SPLIT_SIZES = {"train": 50_000, "test": 10_000}


def _sample_epochs(cell: Cell) -> float:
    d = cell.data
    epochs = d.epochs_or(cell.study.training["epochs"])
    train = d.train_size or (d.per_class * 10 if d.per_class else _SPLIT_SIZES.get(
        d.train_split, 10_000))
    if d.per_class and d.train_size:
        train = min(train, d.per_class * 10)
    if d.legacy:
        val = d.val_size or _SPLIT_SIZES.get(str(d.val_split), 10_000)
    else:  # validation carved out of the draw, and the test split evaluated as well
        val = train * (d.val_fraction or 0.2) + (
            d.test_size or _SPLIT_SIZES.get(d.test_split or "test", 10_000))
    return epochs * (train + val / 3.0)


def _forward_macs(spec: StudySpec, model: str, cache: dict[str, float]) -> float:
    if model not in cache:
        try:
            from ..graph import LayerGraph
            from ..models import load_model
            from ..selectors import layer_macs

            m = next(x for x in spec.models if x.name == model)
            net = load_model(m.name, weights="random", mcu_dir=m.mcu_dir)
            graph = LayerGraph.from_model(net, input_size=spec.input_size, model_name=m.name)
            cache[model] = float(sum(layer_macs(graph, layer) for layer in graph.layers.values()))
        except Exception:  # an estimate must never stop a dry run
            cache[model] = 300e6
    return cache[model]


def estimate_seconds(spec: StudySpec, cells: Sequence[Cell], records: dict[str, dict[str, Any]]
                     ) -> dict[str, float]:
    """Estimated seconds of each cell (see the module docstring)."""
    rates: dict[tuple[str, str], list[float]] = {}
    by_id = {c.id: c for c in spec.cells()}
    for cid, rec in records.items():
        cell = by_id.get(cid)
        if cell is None or rec.get("status") != "done" or not rec.get("seconds"):
            continue
        rate = float(rec["seconds"]) / _sample_epochs(cell)
        rates.setdefault((cell.model.name, cell.method.name), []).append(rate)
        rates.setdefault((cell.model.name, ""), []).append(rate)
    macs: dict[str, float] = {}
    out = {}
    for cell in cells:
        seen = rates.get((cell.model.name, cell.method.name)) or rates.get((cell.model.name, ""))
        if seen:
            out[cell.id] = statistics.mean(seen) * _sample_epochs(cell)
            continue
        fwd = _forward_macs(spec, cell.model.name, macs)
        seconds = CELL_OVERHEAD_S + 3.0 * fwd * _sample_epochs(cell) / HOST_MACS_PER_S
        if cell.method.scores == "fisher":
            seconds += 2.0 * fwd * spec.scores["fisher_samples"] / HOST_MACS_PER_S
        if cell.method.selector is None:
            seconds += SEARCH_TRIAL_S * float(spec.search.get("trials", 200))
        out[cell.id] = seconds
    return out


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
