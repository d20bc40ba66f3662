"""Resumable training checkpoints: tensors in safetensors, state in JSON, written atomically.

A checkpoint of epoch E is two files in the checkpoint directory:

- ``epoch-000E.safetensors``: every tensor (model state dict under ``model/``, optimizer state
  under ``optimizer/<param index>/<key>``, the torch RNG state under ``rng/torch``, and any extra
  tensors a caller adds, e.g. NEq records);
- ``epoch-000E.json``: everything else (epoch, plan, metrics so far, optimizer scalars, Python RNG
  state...), with the SHA-256 of the tensors file.

Each file is written to a temporary name, flushed to disk and renamed over the target
(:mod:`budgetsearch._io`), the JSON last: a checkpoint exists only once both are complete, and a
run killed at any moment leaves the previous one intact. :func:`load_latest` takes the newest
checkpoint whose JSON parses and whose tensors file matches its hash. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_path, atomic_write_text
from ..errors import DataError

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "list_checkpoints",
    "load_latest",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "rng_state",
    "save_checkpoint",
    "set_aside_after",
    "set_rng_state",
]

FORMAT_VERSION = 1
_NAME = re.compile(r"^epoch-(\d+)\.json$")


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        epoch: Number of completed epochs.
        tensors: All tensors, by key.
        state: The JSON state.
        path: The JSON file.
    """

    epoch: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix/``, with the prefix removed."""
        head = prefix.rstrip("/") + "/"
        return {k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    epoch: int,
    tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``epoch`` (completed epochs) and drop all but the last ``keep``.

    Args:
        directory: The checkpoint directory (created if missing).
        epoch: Completed epochs.
        tensors: Tensors to store (copied to contiguous CPU tensors; shared storages are fine).
        state: JSON-serialisable state.
        keep: How many checkpoints to keep (at least 1).

    Returns:
        The JSON file written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"epoch-{epoch:04d}"
    tensor_path, json_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(tensor_path, fsync=True) as tmp:
        save_file(plain, str(tmp))
    doc = {"format": FORMAT_VERSION, "epoch": int(epoch), "tensors": tensor_path.name,
           "sha256": _sha256(tensor_path), **dict(state)}
    atomic_write_text(json_path, json.dumps(doc, indent=1) + "\n", fsync=True)
    # only checkpoints older than this one make way for it: a newer one is no ancestor of this
    # run's state (a damaged one a resume skipped is set aside by set_aside_after)
    older = [e for e in list_checkpoints(directory) if e < epoch]
    for old in older[:max(0, len(older) - (max(1, keep) - 1))]:
        old_doc = directory / f"epoch-{old:04d}"
        old_doc.with_suffix(".json").unlink(missing_ok=True)
        old_doc.with_suffix(".safetensors").unlink(missing_ok=True)
    return json_path


def set_aside_after(directory: str | os.PathLike[str], epoch: int) -> list[Path]:
    """Rename the checkpoints of epochs after ``epoch`` to ``<name>.set-aside`` (kept, never
    loaded): a run resumed from ``epoch`` (0: from scratch) because :func:`load_latest` skipped
    them as damaged would otherwise keep them as its newest, and prune its own good ones.

    Returns:
        The JSON files set aside (their new paths).
    """
    directory = Path(directory)
    moved = []
    for later in [e for e in list_checkpoints(directory) if e > epoch]:
        for suffix in (".safetensors", ".json"):  # the JSON last: it marks a checkpoint
            path = directory / f"epoch-{later:04d}{suffix}"
            if path.exists():
                target = path.with_name(path.name + ".set-aside")
                os.replace(path, target)
                if suffix == ".json":
                    moved.append(target)
    return moved


def list_checkpoints(directory: str | os.PathLike[str]) -> list[int]:
    """Epochs of the checkpoints in ``directory`` (JSON present), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [_NAME.match(p.name) for p in directory.iterdir()]
    return sorted(int(m.group(1)) for m in found if m)


def load_latest(directory: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest complete and intact checkpoint in ``directory``, or None if there is none.

    Damaged checkpoints (unparsable JSON, missing or altered tensors file) are skipped with a
    warning naming them.
    """
    directory = Path(directory)
    for epoch in reversed(list_checkpoints(directory)):
        json_path = directory / f"epoch-{epoch:04d}.json"
        try:
            doc = json.loads(json_path.read_text())
            tensor_path = directory / doc["tensors"]
            if doc.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {doc.get('format')}, expected {FORMAT_VERSION}")
            if _sha256(tensor_path) != doc["sha256"]:
                raise ValueError(f"{tensor_path.name} does not match its recorded SHA-256")
            tensors = load_file(str(tensor_path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"skipping damaged checkpoint {json_path}: {exc}", stacklevel=2)
            continue
        return Checkpoint(epoch=int(doc["epoch"]), tensors=tensors, state=doc, path=json_path)
    return None


# ------------------------------------------------------------------------------ optimizer state
def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (``<param index>/<key>``) and JSON scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": json.loads(json.dumps(
        groups, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))}


def optimizer_state_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Load state saved by :func:`optimizer_state_to_tensors` into an optimizer built the same way
    (same parameters in the same order); the learning rates stay those the optimizer was built
    with (a resumed run may train at another rate than its checkpoint's).

    Raises:
        DataError: If the saved state does not fit the optimizer's parameters.
    """
    sd = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition("/")
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    bad = [i for i in state if not 0 <= i < n_params]
    if bad:
        raise DataError(f"checkpoint optimizer state names parameters {bad[:5]} but the optimizer "
                        f"has {n_params}; the checkpoint belongs to another plan")
    sd["state"] = state
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, RuntimeError) as exc:
        raise DataError(f"checkpoint optimizer state does not fit the optimizer: {exc}") from exc


# ------------------------------------------------------------------------------------ RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch CPU RNG state (a tensor) and Python's ``random`` state (JSON)."""
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state()}, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
