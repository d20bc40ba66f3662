"""Plots people would rather look at than read: per-layer costs of a plan."""

from __future__ import annotations

import os
from pathlib import Path

from ._io import atomic_open
from .cost.result import Cost

__all__ = ["plot_layer_costs"]


def plot_layer_costs(cost: Cost, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Write a PNG with two panels over the trainable layers in forward order: saved activation
    memory per layer, and forward and backward MACs per layer; updated layers are marked.

    Args:
        cost: A detailed cost result.
        path: Output PNG path (written atomically).
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in cost.layers() if r.name != "(input)"]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.22), 7), sharex=True)
    colors = ["tab:red" if r.update != "frozen" else "tab:gray" for r in rows]
    ax1.bar(x, [r.saved_activation_bytes / 1024 for r in rows], color=colors)
    ax1.set_ylabel("saved activations (KB)")
    ax1.set_title(title or f"per-layer cost ({cost.accounting} accounting, batch "
                           f"{cost.batch_size})")
    ax2.bar(x, [r.forward_macs / 1e6 for r in rows], color="tab:blue", label="forward")
    ax2.bar(x, [-r.backward_macs / 1e6 for r in rows], color="tab:orange", label="backward")
    ax2.axhline(0, color="black", linewidth=0.5)
    ax2.set_ylabel("MMACs (backward below 0)")
    ax2.legend(loc="lower left")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    for tick, r in zip(ax2.get_xticklabels(), rows, strict=True):
        if r.update != "frozen":
            tick.set_color("tab:red")
    peak = cost.peak_memory_bytes / 1024
    fig.text(0.01, 0.01, f"peak memory {peak:.1f} KB at {cost.peak_op} ({cost.peak_phase}); "
                         f"red = updated layer", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return path
