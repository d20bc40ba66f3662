"""Device profiles: what a device offers for training, with a source for every number.

A profile is a small YAML file (see ``profiles/*.yaml``) describing the memory a device gives to
training, the bytes per element of each tensor kind, a compute and bandwidth model, and training
defaults. Each numeric field must be backed by an entry in the ``sources:`` mapping, keyed by the
field's dotted path (or by a parent path such as ``dtypes``). Files are read with
``yaml.safe_load`` only and validated strictly: every problem is reported with the file, the
dotted field, the expected type and unit, and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

from ._io import atomic_write_text
from ._profile_schema import (
    _FIELDS,
    KINDS,
    OP_CLASSES,
    RATE_KEYS,
    SCHEMA_VERSION,
    _validate,
)
from ._registry import unknown_name
from .errors import ProfileError
from .units import format_bytes

PROFILES_ENV_VAR = "BUDGETSEARCH_PROFILES"

if TYPE_CHECKING:
    from .latency import LatencyModel

__all__ = [
    "KINDS",
    "OP_CLASSES",
    "PROFILES_ENV_VAR",
    "DeviceProfile",
    "MeasuredRate",
    "format_profile_table",
    "list_profiles",
    "load_profile",
    "profile_dirs",
    "profile_from_dict",
    "profile_summary_rows",
    "profile_to_dict",
    "save_profile",
]

@dataclass(frozen=True)
class MeasuredRate:
    """Measured throughput of one operator class on a device."""

    forward_macs_per_s: float
    backward_macs_per_s: float


@dataclass(frozen=True)
class DeviceProfile:
    """A validated device profile; flat attributes with the unit in each name.

    ``memory_bytes`` is the memory available for training (the profile's
    ``memory.training_bytes``); ``flash_bytes`` is None on devices without flash for weights.
    ``measured`` maps an operator class (conv, depthwise, linear) to a :class:`MeasuredRate`;
    ``latency`` is the measured step-time predictor (:class:`~budgetsearch.latency.LatencyModel`,
    from ``budgetsearch profile-device``) or None, in which case step times are the analytic
    roofline over the compute figures;
    ``sources`` maps dotted field paths to where each number comes from; ``path`` is the file the
    profile was read from (not compared for equality).
    """

    name: str
    display_name: str
    kind: str
    memory_bytes: int
    flash_bytes: int | None
    frozen_weights_in: str
    weight_bytes: int
    bias_bytes: int
    activation_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    mask_bits: int
    peak_macs_per_s: float
    memory_bandwidth_bytes_per_s: float
    op_overhead_us: float
    default_batch_size: int
    default_optimizer: str
    in_place_update: bool
    measured: Mapping[str, MeasuredRate] = field(default_factory=dict, hash=False)
    latency: LatencyModel | None = field(default=None, hash=False)
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)
    notes: str = ""
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "measured", MappingProxyType(dict(self.measured)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))


def profile_from_dict(data: Any, *, source: str = "<dict>") -> DeviceProfile:
    """Validate a profile mapping (as read from YAML) and build a :class:`DeviceProfile`.

    Args:
        data: The parsed profile.
        source: Where the data came from (a file name), used in error messages.

    Raises:
        ProfileError: Listing every problem, each with its dotted field and the expected value.
    """
    values, errors = _validate(data)
    if errors:
        if len(errors) == 1:
            raise ProfileError(f"{source}: {errors[0]}")
        raise ProfileError(f"{source}: {len(errors)} problems:\n  - " + "\n  - ".join(errors))
    kwargs = {attr: values[dotted] for dotted, attr, _ in _FIELDS if attr and dotted in values}
    measured = {
        op: MeasuredRate(*(values[f"measured.{op}.{k}"] for k in RATE_KEYS))
        for op in OP_CLASSES
        if f"measured.{op}.{RATE_KEYS[0]}" in values
    }
    return DeviceProfile(**kwargs, measured=measured, latency=values.get("latency"),
                         sources=values["sources"])


def _size_text(n_bytes: int | None) -> int | str | None:
    """Write a byte count as an exact size string (``256KB``) when one exists."""
    if n_bytes is None:
        return None
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n_bytes % scale == 0:
            return f"{n_bytes // scale}{unit}"
    return n_bytes


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The YAML-ready mapping of a profile; ``profile_from_dict`` of it gives the profile back."""
    data: dict[str, Any] = {}
    for dotted, attr, spec in _FIELDS:
        value = getattr(profile, attr) if attr else SCHEMA_VERSION
        if spec.optional and not value:
            continue
        if spec.kind == "size":
            value = _size_text(value)
        elif spec.kind == "number":
            value = float(value)
        section, _, leaf = dotted.rpartition(".")
        (data.setdefault(section, {}) if section else data)[leaf] = value
    if profile.measured:
        data["measured"] = {
            op: {k: float(getattr(rate, k)) for k in RATE_KEYS}
            for op, rate in profile.measured.items()
        }
    if profile.latency is not None:
        data["latency"] = profile.latency.to_dict()
    data["sources"] = dict(profile.sources)
    return data


class _Dumper(yaml.SafeDumper):
    """A safe dumper that writes large and small floats as ``1.08e+08`` rather than 108000000.0."""


def _represent_float(dumper: yaml.SafeDumper, value: float) -> yaml.Node:
    if not math.isfinite(value) or value == 0 or 1e-3 <= abs(value) < 1e6:
        return dumper.represent_float(value)
    for digits in range(1, 18):  # the shortest exponent form that reads back exactly
        text = f"{value:.{digits}e}"
        if float(text) == value:
            break
    return dumper.represent_scalar("tag:yaml.org,2002:float", text)


_Dumper.add_representer(float, _represent_float)


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write a profile as YAML, atomically (:func:`budgetsearch._io.atomic_write_text`).

    Args:
        profile: The profile to write.
        path: The target ``.yaml`` file; its stem must equal ``profile.name``.

    Returns:
        The path written.

    Raises:
        ProfileError: If the file stem differs from the profile name, or the file cannot be written.
    """
    target = Path(path)
    if target.stem != profile.name:
        raise ProfileError(
            f"{target}: name: a profile file must be named after its profile; save profile "
            f"{profile.name!r} as {profile.name}.yaml (or build it with name={target.stem!r})"
        )
    text = "# budgetsearch device profile; every number has a source below.\n"
    text += yaml.dump(
        profile_to_dict(profile), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=96
    )
    try:
        atomic_write_text(target, text, encoding="utf-8", fsync=True)
    except OSError as exc:
        raise ProfileError(f"{target}: cannot write device profile: {exc}") from exc
    return target


def profile_dirs() -> list[Path]:
    """Directories searched for ``<name>.yaml``: those in ``$BUDGETSEARCH_PROFILES`` first,
    then the built-in ``profiles/`` (source checkout) or ``budgetsearch/_profiles`` (wheel)."""
    extra = [Path(p) for p in os.environ.get(PROFILES_ENV_VAR, "").split(os.pathsep) if p]
    checkout = Path(__file__).resolve().parent.parent / "profiles"
    builtin = checkout if checkout.is_dir() else Path(__file__).parent / "_profiles"
    return [*extra, builtin]


def _profile_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in profile_dirs():
        if directory.is_dir():
            for file in sorted(directory.glob("*.yaml")):
                found.setdefault(file.stem, file)
    return found


def list_profiles() -> list[str]:
    """The names of every registered profile, sorted."""
    return sorted(_profile_files())


def _yaml_context(text: str, line: int) -> str:
    """The dotted path of the last key at or before a (0-based) line, for YAML syntax errors."""
    stack: list[tuple[int, str]] = []
    for raw in text.splitlines()[: line + 1]:
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+)\s*:", raw)
        if match:
            indent = len(match.group(1))
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
    return ".".join(k for _, k in stack)


def _read(path: Path) -> DeviceProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read device profile: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        context = getattr(exc, "context_mark", None)
        where, near = "", ""
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
            in_flow = context is not None and "flow" in str(getattr(exc, "context", ""))
            field_path = _yaml_context(text, (context if in_flow else mark).line)
            near = f" (field {field_path})" if field_path else ""
        what = " ".join(
            filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])
        )
        raise ProfileError(f"{path}: malformed YAML{where}{near}: {what or exc}") from exc
    profile = profile_from_dict(data, source=str(path))
    if profile.name != path.stem:
        raise ProfileError(
            f"{path}: name: expected the file stem {path.stem!r}, got {profile.name!r}"
        )
    if profile.latency is not None:
        profile.latency.check_this_process(source=str(path))
    return dataclasses.replace(profile, path=path)


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a registered profile by name, or a profile file by path.

    Args:
        name_or_path: A name from :func:`list_profiles`, or a path to a ``.yaml`` file.

    Raises:
        ProfileError: If the name is unknown (the message lists valid names) or the file is invalid.
    """
    text = os.fspath(name_or_path)
    is_path = isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml"))
    if is_path or "/" in text or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"{path}: no such device profile file")
        return _read(path)
    files = _profile_files()
    if text not in files:
        # profiles are files found in directories, not registered entries: the error reads as
        # every registry's does
        raise unknown_name(
            "device profile", text, files, error=ProfileError,
            suffix=f"; or pass a path to a .yaml file (extra directories: ${PROFILES_ENV_VAR})")
    return _read(files[text])


_SUMMARY = {  # row key -> DeviceProfile attribute
    "name": "name",
    "display_name": "display_name",
    "kind": "kind",
    "training_memory_bytes": "memory_bytes",
    "frozen_weights_in": "frozen_weights_in",
    "peak_macs_per_s": "peak_macs_per_s",
    "memory_bandwidth_bytes_per_s": "memory_bandwidth_bytes_per_s",
    "batch_size": "default_batch_size",
    "optimizer": "default_optimizer",
}


def profile_summary_rows(*, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Key numbers of each profile, for a ``budgetsearch devices`` table.

    Args:
        names: The profiles (names or paths) to summarise, in this order; by default all
            registered ones, MCUs first, then by training memory.

    Returns:
        One dict per profile with keys name, display_name, kind, training_memory_bytes,
        frozen_weights_in, peak_macs_per_s, memory_bandwidth_bytes_per_s, batch_size, optimizer.
    """
    profiles = [load_profile(n) for n in (list_profiles() if names is None else names)]
    if names is None:  # MCUs first, then by training memory
        profiles.sort(key=lambda p: (KINDS.index(p.kind), p.memory_bytes, p.name))
    return [{key: getattr(p, attr) for key, attr in _SUMMARY.items()} for p in profiles]


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_profile_table(rows: list[dict[str, Any]]) -> str:
    """Format :func:`profile_summary_rows` output as an aligned plain-text table."""
    header = ("name", "kind", "training mem", "frozen wts", "peak", "bandwidth", "batch", "optim")
    body = [
        (
            str(r["name"]),
            str(r["kind"]),
            format_bytes(r["training_memory_bytes"]),
            str(r["frozen_weights_in"]),
            _si(r["peak_macs_per_s"], "MAC/s"),
            _si(r["memory_bandwidth_bytes_per_s"], "B/s"),
            str(r["batch_size"]),
            str(r["optimizer"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    numeric = {2, 4, 5, 6}

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])
