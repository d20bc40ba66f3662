"""Per-layer, per-channel importance scores, and their ``.npz`` file format.

A :class:`Scores` holds, for every trainable layer (``nn.Conv2d`` / ``nn.Linear``, by qualified
module name), an output-channel score vector, an input-channel score vector (or ``None`` where the
criterion does not define one) and one layer score. It records the model fingerprint it was made
for, so it cannot silently be applied to another model.

File layout (``np.savez``, readable with ``allow_pickle=False``): ``meta`` is a one-element string
array holding a JSON document (format version, criterion, layer names and shapes, fingerprint,
metadata); ``layer`` holds the layer scores in layer order; ``out_<i>`` and ``in_<i>`` the channel
vectors of the i-th layer (``in_<i>`` absent where undefined); ``filt<r>_<i>`` the i-th layer's
output-channel scores under a gradient filter of patch size r, where the criterion gives them
(the Fisher pass does, for convolutions). Version 1 files (before filtered scores) still load.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .._io import atomic_open
from ..errors import ScoresError
from ..fingerprint import TRAINABLE_LAYER_TYPES, diff_layer_shapes, fingerprint, layer_shapes

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "LayerScores", "Scores", "input_channels"]

#: Version of the ``.npz`` layout written by :meth:`Scores.save`.
FORMAT_VERSION = 2
#: Versions :meth:`Scores.load` reads (1 has no filtered scores).
READABLE_VERSIONS = (1, 2)


def input_channels(module: nn.Module) -> int:
    """Real number of input channels of a conv or linear layer (``C_in/G · G`` for a conv)."""
    if isinstance(module, nn.Conv2d):
        return int(module.weight.shape[1]) * int(module.groups)
    return int(module.weight.shape[1])


@dataclass
class LayerScores:
    """The scores of one layer.

    Attributes:
        out_channel: One score per output channel (length C_out), float64.
        in_channel: One score per real input channel (length C_in), or ``None`` when undefined.
        layer: One score for the whole layer.
        filtered: Output-channel scores when the layer's weight gradient is gradient-filtered
            with patch size r, by r (empty where the criterion does not define them; the Fisher
            pass gives them for convolutions, see :mod:`.fisher`).
    """

    out_channel: np.ndarray
    in_channel: np.ndarray | None
    layer: float
    filtered: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_channel = np.asarray(self.out_channel, dtype=np.float64).reshape(-1)
        if self.in_channel is not None:
            self.in_channel = np.asarray(self.in_channel, dtype=np.float64).reshape(-1)
        self.layer = float(self.layer)
        self.filtered = {int(r): np.asarray(v, dtype=np.float64).reshape(-1)
                         for r, v in sorted(self.filtered.items())}


@dataclass
class Scores:
    """Importance scores of every trainable layer of one model, by qualified layer name.

    Attributes:
        criterion: Name of the criterion that produced the scores (``"fisher"``, ...).
        layers: The scores of each layer, in the model's module order.
        shapes: ``layer_shapes(model)`` of the model scored.
        in_channels: Real input-channel count of each layer (``C_in/G · G`` for a conv).
        fingerprint: ``fingerprint(shapes)``.
        metadata: JSON-serialisable facts about the run: ``samples`` used, ``seed``,
            ``peak_memory_bytes`` of the pass, and criterion-specific entries.
    """

    criterion: str
    layers: dict[str, LayerScores]
    shapes: dict[str, list[int]]
    in_channels: dict[str, int]
    fingerprint: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.shapes)
        self.validate()

    # ----------------------------------------------------------------- construction / access
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        criterion: str,
        layers: Mapping[str, LayerScores],
        metadata: Mapping[str, Any] | None = None,
    ) -> Scores:
        """Build scores for ``model``, taking its shapes and fingerprint from the model itself."""
        shapes = layer_shapes(model)
        in_channels = {
            name: input_channels(module)
            for name, module in model.named_modules()
            if isinstance(module, TRAINABLE_LAYER_TYPES)
        }
        ordered = {name: layers[name] for name in shapes if name in layers}
        missing = [name for name in shapes if name not in layers]
        if missing:
            raise ScoresError(f"criterion {criterion!r} gave no scores for layers {missing}")
        return cls(
            criterion=criterion,
            layers=ordered,
            shapes=shapes,
            in_channels=in_channels,
            metadata=dict(metadata or {}),
        )

    def __getitem__(self, name: str) -> LayerScores:
        try:
            return self.layers[name]
        except KeyError:
            raise ScoresError(
                f"no scores for layer {name!r}; layers: {', '.join(self.layers) or '(none)'}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def layer_scores(self) -> dict[str, float]:
        """The layer score of every layer, by name."""
        return {name: ls.layer for name, ls in self.layers.items()}

    def validate(self) -> None:
        """Check that every vector has the length its layer's shape requires and that every
        score is finite (a NaN would rank first or last, silently).

        Raises:
            ScoresError: Naming the first inconsistent layer.
        """
        if list(self.layers) != list(self.shapes):
            raise ScoresError(
                f"scores cover layers {list(self.layers)[:5]}..., the shapes list "
                f"{list(self.shapes)[:5]}...: they must be the same, in the same order"
            )
        for name, ls in self.layers.items():
            _check_values(name, ls)
            c_out = self.shapes[name][0]
            if ls.out_channel.shape != (c_out,):
                raise ScoresError(
                    f"{name}: {ls.out_channel.shape[0]} output-channel scores for {c_out} channels"
                )
            c_in = self.in_channels.get(name)
            if c_in is None:
                raise ScoresError(f"{name}: input-channel count missing")
            if ls.in_channel is not None and ls.in_channel.shape != (c_in,):
                raise ScoresError(
                    f"{name}: {ls.in_channel.shape[0]} input-channel scores for {c_in} channels"
                )
            for r, values in ls.filtered.items():
                if r < 2 or values.shape != (c_out,):
                    raise ScoresError(
                        f"{name}: filtered scores for patch size {r} must be {c_out} values for "
                        f"a patch size >= 2; got {values.shape[0]}"
                    )

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose layers differ from those the scores were made for.

        Raises:
            ScoresError: Naming the differing layers.
        """
        actual = layer_shapes(model)
        if fingerprint(actual) != self.fingerprint:
            diff = diff_layer_shapes(self.shapes, actual)
            raise ScoresError(
                f"these {self.criterion} scores were made for another model (fingerprint "
                f"{self.fingerprint}, the model's is {fingerprint(actual)}): " + "; ".join(diff)
            )
        # the weight shapes leave the groups out: a grouped conv's input channels are checked
        modules = dict(model.named_modules())
        for name, c_in in self.in_channels.items():
            module = modules.get(name)
            if module is not None and input_channels(module) != c_in:
                raise ScoresError(
                    f"these {self.criterion} scores give layer {name} {c_in} input channels; "
                    f"the model's has {input_channels(module)}")

    # ------------------------------------------------------------------------------ file I/O
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the scores to ``path`` as ``.npz``, atomically (temporary file + rename).

        Returns:
            The path written.
        """
        path = Path(path)
        names = list(self.layers)
        meta = {
            "format": "budgetsearch-scores",
            "version": FORMAT_VERSION,
            "criterion": self.criterion,
            "fingerprint": self.fingerprint,
            "layers": [
                {"name": n, "shape": list(self.shapes[n]), "in_channels": self.in_channels[n]}
                for n in names
            ],
            "metadata": self.metadata,
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.array([_dump_json(meta)]),
            "layer": np.array([self.layers[n].layer for n in names], dtype=np.float64),
        }
        for i, name in enumerate(names):
            arrays[f"out_{i}"] = self.layers[name].out_channel
            if self.layers[name].in_channel is not None:
                arrays[f"in_{i}"] = self.layers[name].in_channel
            for r, values in self.layers[name].filtered.items():
                arrays[f"filt{r}_{i}"] = values
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: nn.Module | None = None) -> Scores:
        """Read scores written by :meth:`save`.

        Args:
            path: The ``.npz`` file.
            model: If given, the scores must have been made for a model with the same layers.

        Raises:
            ScoresError: If the file is missing or malformed, or belongs to another model.
        """
        path = Path(path)
        if not path.is_file():
            raise ScoresError(f"scores file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ScoresError(f"{path}: not a readable .npz scores file ({exc})") from exc
        scores = cls._from_arrays(arrays, where=str(path))
        if model is not None:
            try:
                scores.check_model(model)
            except ScoresError as exc:
                raise ScoresError(f"{path}: {exc}") from None
        return scores

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], *, where: str) -> Scores:
        try:
            meta = json.loads(str(arrays["meta"].reshape(-1)[0]))
            if not isinstance(meta, dict) or meta.get("format") != "budgetsearch-scores":
                raise ScoresError(f"{where}: not a budgetsearch scores file")
            if meta.get("version") not in READABLE_VERSIONS:
                raise ScoresError(
                    f"{where}: scores format version {meta.get('version')}, this budgetsearch "
                    f"reads versions {', '.join(map(str, READABLE_VERSIONS))}"
                )
            filtered: dict[int, dict[int, np.ndarray]] = {}
            for key, values in arrays.items():
                if key.startswith("filt") and "_" in key:
                    r, _, i = key[4:].partition("_")
                    filtered.setdefault(int(i), {})[int(r)] = values
            entries = meta["layers"]
            layer_values = arrays["layer"]
            if layer_values.shape != (len(entries),):
                raise ScoresError(f"{where}: {layer_values.shape} layer scores for {len(entries)}")
            stray = sorted(i for i in filtered if not 0 <= i < len(entries))
            if stray:
                raise ScoresError(f"{where}: filtered scores for layer indices {stray}, the "
                                  f"file has {len(entries)} layers")
            for key, values in arrays.items():  # a vector stored as a matrix, or complex
                if key != "meta" and (values.ndim != 1 or not (
                        np.issubdtype(values.dtype, np.floating)
                        or np.issubdtype(values.dtype, np.integer))):
                    raise ScoresError(f"{where}: array {key!r} must be a vector of real numbers; "
                                      f"got shape {values.shape}, dtype {values.dtype}")
            layers: dict[str, LayerScores] = {}
            for i, entry in enumerate(entries):
                layers[entry["name"]] = LayerScores(
                    out_channel=arrays[f"out_{i}"],
                    in_channel=arrays.get(f"in_{i}"),
                    layer=float(layer_values[i]),
                    filtered=filtered.get(i, {}),
                )
            shapes = {e["name"]: [int(v) for v in e["shape"]] for e in entries}
            if fingerprint(shapes) != meta["fingerprint"]:
                raise ScoresError(f"{where}: the recorded fingerprint does not match its shapes")
            try:
                return cls(
                    criterion=str(meta["criterion"]),
                    layers=layers,
                    shapes=shapes,
                    in_channels={e["name"]: int(e["in_channels"]) for e in entries},
                    fingerprint=str(meta["fingerprint"]),
                    metadata=dict(meta.get("metadata", {})),
                )
            except ScoresError as exc:  # the file's values: say which file
                raise ScoresError(f"{where}: {exc}") from None
        except ScoresError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ScoresError(f"{where}: malformed scores file ({exc!r})") from exc


def _check_values(name: str, ls: LayerScores) -> None:
    """Refuse scores that are not finite (naming the layer): a NaN would rank first or last."""
    vectors = [("output-channel", ls.out_channel)]
    if ls.in_channel is not None:
        vectors.append(("input-channel", ls.in_channel))
    vectors += [(f"filtered (patch size {r})", v) for r, v in ls.filtered.items()]
    for what, values in vectors:
        if not np.isfinite(values).all():
            raise ScoresError(f"{name}: {what} scores contain NaN or infinite values")
    if not math.isfinite(float(ls.layer)):
        raise ScoresError(f"{name}: the layer score is {ls.layer}")


def _dump_json(meta: dict[str, Any]) -> str:
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ScoresError(f"scores metadata is not JSON-serialisable: {exc}") from exc
