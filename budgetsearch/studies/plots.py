"""The study's PNG plots, one set per (data, model, device):

- ``accuracy_vs_memory``: test accuracy (mean ± std over seeds) against the plan's predicted memory,
  one line per method across the budgets, the budgets as dashed vertical lines;
- ``pareto``: the search's front (memory × proxy, coloured by latency) from the ``front.csv`` files
  search cells leave in their directories, with the other methods' plans where their proxy is
  recorded; drawn only when some cell stored a front;
- ``update_map``: layers × cells heatmap of the chosen plans (first seed): the updated fraction of
  each layer's weight channels, 0 for bias only, blank for frozen.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_open
from .spec import StudySpec

__all__ = ["draw_plots"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    _plt().close(fig)
    return path


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _pct(v: float) -> float:
    return v * 100.0 if abs(v) <= 1.0 else v


def draw_plots(spec: StudySpec, rows: Sequence[dict[str, Any]], out_dir: Path
               ) -> dict[str, Path]:
    """Draw every plot the finished cells allow; returns them by name."""
    files: dict[str, Path] = {}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["model"], r["device"]), []).append(r)
    for key, group in groups.items():
        done = [r for r in group if r["status"] == "done"]
        if not done:
            continue
        tag = _SAFE.sub("-", "__".join(map(str, key)))
        title = " · ".join(map(str, key))
        files[f"accuracy_vs_memory {title}"] = _accuracy_vs_memory(
            spec, done, out_dir / f"accuracy_vs_memory__{tag}.png", title)
        pareto = _pareto(spec, done, out_dir / f"pareto__{tag}.png", title)
        if pareto is not None:
            files[f"pareto {title}"] = pareto
        umap = _update_map(spec, done, out_dir / f"update_map__{tag}.png", title)
        if umap is not None:
            files[f"update_map {title}"] = umap
    return files


def _accuracy_vs_memory(spec: StudySpec, rows: Sequence[dict[str, Any]], path: Path,
                        title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    order = [b.label for d in spec.devices for b in d.budgets]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    xs_all = []
    for i, method in enumerate(methods):
        pts = []
        for budget in sorted({r["budget"] for r in rows if r["method"] == method},
                             key=lambda b: order.index(b) if b in order else len(order)):
            g = [r for r in rows if r["method"] == method and r["budget"] == budget]
            mem = [v for r in g if (v := _num(r.get("memory_bytes"))) is not None]
            acc = [_pct(v) for r in g if (v := _num(r.get("accuracy"))) is not None]
            if mem and acc:
                pts.append((statistics.fmean(mem) / 1024, statistics.fmean(acc),
                            statistics.stdev(acc) if len(acc) > 1 else 0.0))
        if not pts:
            continue
        xs, ys, es = zip(*pts, strict=True)
        xs_all += xs
        role = next(r.get("role") for r in rows if r["method"] == method)
        ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=method,
                    linestyle="--" if role in ("reference", "baseline") else "-",
                    linewidth=2.4 if role == "search" else 1.4, color=f"C{i % 10}")
    budgets = _budget_lines(spec, rows)
    for b in budgets:
        ax.axvline(b / 1024, color="gray", linestyle=":", linewidth=1)
        ax.text(b / 1024, 1.0, f" {b / 1024:g} KB", rotation=90, va="top", fontsize=7,
                color="gray", transform=ax.get_xaxis_transform())
    xs_all += [b / 1024 for b in budgets]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"predicted {spec.cost['memory_measure']} memory (KB, "
                  f"{spec.cost['accounting']} accounting)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy vs memory: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def _read_front(path: Path) -> list[dict[str, float]]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return []
    out = []
    for r in rows:
        try:
            out.append({k: float(v) for k, v in r.items() if v not in (None, "")})
        except ValueError:
            continue
    return out


def _pareto(spec: StudySpec, rows: Sequence[dict[str, Any]], path: Path, title: str
            ) -> Path | None:
    seed = min(r["seed"] for r in rows)
    rows = [r for r in rows if r["seed"] == seed]
    fronts = [(r, f) for r in rows if r.get("role") == "search"
              and (f := _read_front(spec.cells_dir / str(r["cell_id"]) / "front.csv"))]
    if not fronts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    third = next((k for k in fronts[0][1][0] if k in ("latency_ms", "backward_macs")),
                 "latency_ms")
    values = [p.get(third, math.nan) for _, f in fronts for p in f]
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    sc = None
    for i, (r, front) in enumerate(fronts):
        pts = sorted(front, key=lambda p: p.get("memory_bytes", 0))
        sc = ax.scatter([p.get("memory_bytes", math.nan) / 1024 for p in pts],
                        [p.get("proxy", math.nan) for p in pts],
                        c=[p.get(third, math.nan) for p in pts], cmap="viridis", vmin=lo,
                        vmax=hi, s=16, marker="os^vD"[i % 5], edgecolors="black",
                        linewidths=0.3, label=f"{r['method']} front, {r['budget']}")
        chosen = [p for p in pts if p.get("chosen")]
        ax.scatter([p["memory_bytes"] / 1024 for p in chosen], [p["proxy"] for p in chosen],
                   marker="*", s=160, color="gold", edgecolors="black", zorder=5)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="latency per step (ms)" if third == "latency_ms"
                     else "backward MACs")
    seen: dict[str, int] = {}
    labelled: set[str] = set()
    for r, _ in fronts:  # the search's own baselines at the same budget (exact plans)
        for name, point in _baselines(spec.cells_dir / str(r["cell_id"]) / "baselines.csv"):
            i = seen.setdefault(name, len(seen))
            ax.scatter([point["memory_bytes"] / 1024], [point["proxy"]], marker="sDPX<>h"[i % 7],
                       s=48, facecolors="none", edgecolors=f"C{i % 10}", linewidths=1.3,
                       label=None if name in labelled else f"{name} (search baseline)")
            labelled.add(name)
    trained = [r for r in rows if r.get("role") not in ("search", "reference")
               and _num(r.get("proxy")) is not None]
    methods = list(dict.fromkeys(r["method"] for r in trained))
    for i, method in enumerate(methods):
        pts = [r for r in trained if r["method"] == method]
        ax.scatter([_num(r.get("memory_bytes")) / 1024 for r in pts],
                   [_num(r.get("proxy")) for r in pts], marker="x", color=f"C{(i + 3) % 10}",
                   s=44, label=f"{method} (trained cells)")
    for b in _budget_lines(spec, rows):
        ax.axvline(b / 1024, color="crimson", linestyle=":", linewidth=1)
    ax.set_xlabel(f"predicted {spec.cost['memory_measure']} memory (KB)")
    ax.set_ylabel("proxy (captured Fisher potential)")
    ax.set_title(f"search fronts (star: chosen) and baselines, seed {seed}; full fine-tuning "
                 f"off the chart\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def _baselines(path: Path) -> list[tuple[str, dict[str, float]]]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return []
    out = []
    for r in rows:
        try:
            out.append((r["name"], {"proxy": float(r["proxy"]),
                                    "memory_bytes": float(r["memory_bytes"])}))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _budget_lines(spec: StudySpec, rows: Sequence[dict[str, Any]]) -> list[float]:
    """The memory budgets of the rows' device, from the spec (all of them, done or not)."""
    devices = {r["device"] for r in rows}
    return sorted({b.memory_bytes for d in spec.devices if d.name in devices for b in d.budgets
                   if b.memory_bytes is not None})


def _update_map(spec: StudySpec, rows: Sequence[dict[str, Any]], path: Path, title: str
                ) -> Path | None:
    import numpy as np

    seed = min(r["seed"] for r in rows)
    cols, layers = [], None
    for r in rows:
        if r["seed"] != seed:
            continue
        try:
            rec = json.loads((spec.cells_dir / f"{r['cell_id']}.json").read_text())
        except (OSError, ValueError):
            continue
        fr = rec.get("layers")
        if not isinstance(fr, dict) or not fr:
            continue
        layers = layers or list(fr)
        cols.append((f"{r['budget']} {r['method']}", [fr.get(n) for n in layers]))
    if not cols or layers is None:
        return None
    data = np.array([[np.nan if v is None else float(v) for v in c] for _, c in cols]).T
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.42 * len(cols) + 3), max(4.0, 0.13 * len(layers)
                                                                          + 1.8)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c for c, _ in cols], rotation=75, fontsize=6, ha="right")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=max(3, min(7, int(400 / max(1, len(layers))))))
    fig.colorbar(im, ax=ax, label="updated fraction of weight channels (0 = bias only)")
    ax.set_title(f"per-layer updates, seed {seed}\n{title}", fontsize=9)
    ax.set_xlabel("cell (budget, method); blank = frozen layer")
    fig.tight_layout()
    return _save(fig, path)
