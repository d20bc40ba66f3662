"""The metrics files of a run: ``metrics.json`` (everything) and ``metrics.csv`` (per epoch).

``metrics.json`` holds ``status`` (``running``, which an interrupted run keeps until resumed;
``completed``, ``diverged`` or ``failed``), ``reason`` (why it stopped, if it did not
complete), the run's configuration and plan summary, one row per epoch (:data:`EPOCH_FIELDS`),
and the summary: ``best_val_accuracy`` and ``best_epoch`` (chosen on validation),
``final_val_accuracy``, with test data ``test_accuracy_at_best_epoch`` and
``final_test_accuracy`` (test data is only reported, never used for a choice), mean
``images_per_s``, ``saved_activation_bytes`` (as measured on the first step of the last
epoch), mean ``backward_ms`` per step. Both files are rewritten atomically after
every epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_text

__all__ = ["EPOCH_FIELDS", "epoch_line", "summarize", "validation_key", "write_metrics"]

#: Columns of ``metrics.csv``, one row per epoch (epochs counted from 1).
EPOCH_FIELDS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "images_per_s",
    "epoch_s",
    "step_ms",
    "forward_ms",
    "backward_ms",
    "saved_activation_bytes",
    "trainable_params",
    "updated_layers",
    "replanned",
    "lr",
    "threads",
    "kernels",
)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Best and final accuracy, mean speed and the last measured memory of the epoch rows."""
    if not rows:
        return {"best_val_accuracy": None, "best_epoch": None, "final_val_accuracy": None,
                "test_accuracy_at_best_epoch": None, "final_test_accuracy": None,
                "images_per_s": None, "saved_activation_bytes": None, "backward_ms": None}
    scored = [r for r in rows if _finite(r.get("val_accuracy"))]
    # the best epoch is chosen on validation (the earliest of equals); test is only reported
    best = max(scored, key=lambda r: (r["val_accuracy"], -r["epoch"])) if scored else None
    return {
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_val_accuracy": rows[-1].get("val_accuracy"),
        "test_accuracy_at_best_epoch": best.get("test_accuracy") if best else None,
        "final_test_accuracy": rows[-1].get("test_accuracy"),
        "images_per_s": _mean([r.get("images_per_s") for r in rows]),
        "saved_activation_bytes": rows[-1].get("saved_activation_bytes"),
        "backward_ms": _mean([r.get("backward_ms") for r in rows]),
    }


def validation_key(doc: Mapping[str, Any]) -> tuple[float, float]:
    """How runs of the same plan (at different learning rates) are ranked, higher first: the
    best validation accuracy (``best_val_accuracy``, or a runner's ``best_accuracy``; -1 when
    there is none), then the lower validation loss (the run's ``val_loss``, or its best
    epoch's; a missing or non-finite loss ranks last)."""
    acc = next((v for v in (doc.get("best_accuracy"), doc.get("best_val_accuracy"))
                if _finite(v)), None)
    loss = doc.get("val_loss")
    for row in doc.get("epochs") or []:
        if isinstance(row, Mapping) and row.get("epoch") == doc.get("best_epoch"):
            loss = row.get("val_loss")
    return (-1.0 if acc is None else float(acc), -float(loss) if _finite(loss) else -math.inf)


def write_metrics(out_dir: str | os.PathLike[str], document: Mapping[str, Any]) -> None:
    """Write ``metrics.json`` (the document) and ``metrics.csv`` (its ``epochs`` rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "metrics.json", json.dumps(document, indent=1, default=str) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(EPOCH_FIELDS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in document.get("epochs", []):
        writer.writerow({k: row.get(k, "") for k in EPOCH_FIELDS})
    _atomic_text(out / "metrics.csv", buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean(values: Sequence[Any]) -> float | None:
    ok = [float(v) for v in values if _finite(v)]
    return sum(ok) / len(ok) if ok else None


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """One line summarising an epoch row, for the console."""
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
           if row.get("val_accuracy") is not None else "no validation")
    if row.get("test_accuracy") is not None:
        val += f" (test acc {row['test_accuracy']:.4f})"
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc "
            f"{row['train_accuracy']:.4f}; {val}; {row['images_per_s']:.1f} img/s; saved "
            f"activations {row['saved_activation_bytes'] / 2**20:.1f} MB/step; backward "
            f"{row['backward_ms']:.0f} ms/step" + ("; re-planned" if row.get("replanned") else ""))
