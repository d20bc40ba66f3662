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
import difflib
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .errors import BudgetSearchError, ProfileError
from .units import format_bytes, parse_bytes

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

SCHEMA_VERSION = 1
KINDS = ("mcu", "sbc", "gpu", "host")
WEIGHT_LOCATIONS = ("flash", "ram")
OPTIMIZERS = ("sgd", "momentum", "adam")
OP_CLASSES = ("conv", "depthwise", "linear")
RATE_KEYS = ("forward_macs_per_s", "backward_macs_per_s")
PROFILES_ENV_VAR = "BUDGETSEARCH_PROFILES"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NUMBER_RE = re.compile(r"^\s*[+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$")


@dataclass(frozen=True)
class _Spec:
    """How one field is checked: its kind (text, enum, bool, int, number, size), unit, choices."""

    kind: str
    unit: str = ""
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    optional: bool = False

    def expected(self) -> str:
        """Describe the accepted values, for error messages."""
        if self.kind == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind == "text":
            return "a non-empty string"
        if self.kind == "size":
            text = "a positive size in bytes (an integer, or a string such as 256KB; KB = 1024)"
            return text + (", or null" if self.nullable else "")
        if self.kind == "int":
            allowed = f" from {{{', '.join(map(str, self.choices))}}}" if self.choices else ""
            return f"a positive integer ({self.unit}){allowed}"
        return f"a positive number ({self.unit})"


_BYTES = ("bytes per element", (1, 2, 4, 8))
# (dotted YAML path, DeviceProfile attribute or "", spec), in file order.
_FIELDS: tuple[tuple[str, str, _Spec], ...] = (
    ("schema_version", "", _Spec("int", "schema version", (SCHEMA_VERSION,))),
    ("name", "name", _Spec("text")),
    ("display_name", "display_name", _Spec("text")),
    ("kind", "kind", _Spec("enum", choices=KINDS)),
    ("notes", "notes", _Spec("text", optional=True)),
    ("memory.training_bytes", "memory_bytes", _Spec("size")),
    ("memory.flash_bytes", "flash_bytes", _Spec("size", nullable=True)),
    ("memory.frozen_weights_in", "frozen_weights_in", _Spec("enum", choices=WEIGHT_LOCATIONS)),
    ("dtypes.weight", "weight_bytes", _Spec("int", *_BYTES)),
    ("dtypes.bias", "bias_bytes", _Spec("int", *_BYTES)),
    ("dtypes.activation", "activation_bytes", _Spec("int", *_BYTES)),
    ("dtypes.gradient", "gradient_bytes", _Spec("int", *_BYTES)),
    ("dtypes.optimizer_state", "optimizer_state_bytes", _Spec("int", *_BYTES)),
    ("dtypes.mask_bits", "mask_bits", _Spec("int", "bits per element", (1, 8, 16, 32))),
    ("compute.peak_macs_per_s", "peak_macs_per_s", _Spec("number", "MAC/s")),
    (
        "compute.memory_bandwidth_bytes_per_s",
        "memory_bandwidth_bytes_per_s",
        _Spec("number", "B/s"),
    ),
    ("compute.op_overhead_us", "op_overhead_us", _Spec("number", "microseconds per operator")),
    ("training.default_batch_size", "default_batch_size", _Spec("int", "samples")),
    ("training.default_optimizer", "default_optimizer", _Spec("enum", choices=OPTIMIZERS)),
    ("training.in_place_update", "in_place_update", _Spec("bool")),
)
_SPECS = {dotted: spec for dotted, _, spec in _FIELDS}
_RATE_SPEC = _Spec("number", "MAC/s")
_SECTIONS = ("memory", "dtypes", "compute", "training")
# Numeric fields that are format metadata, not device figures, and need no source.
_UNSOURCED = frozenset({"schema_version"})
_SOURCE_KEYS = "expected a dotted field path such as compute.peak_macs_per_s, or a section name"


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
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)
    notes: str = ""
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "measured", MappingProxyType(dict(self.measured)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def macs_per_s(self, op_class: str, *, backward: bool = False) -> float:
        """The MAC rate of an operator class: the measured rate if any, else the peak rate.

        Args:
            op_class: One of ``conv``, ``depthwise``, ``linear``.
            backward: Return the backward rate instead of the forward rate.
        """
        rate = self.measured.get(op_class)
        if rate is None:
            return self.peak_macs_per_s
        return rate.backward_macs_per_s if backward else rate.forward_macs_per_s


def _show(value: Any) -> str:
    """A short repr of a user value for an error message."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _key(key: Any) -> str:
    """A mapping key as written in a dotted path."""
    return key if isinstance(key, str) and len(key) <= 60 else _show(key)


def _check(spec: _Spec, value: Any) -> tuple[Any, bool]:
    """Convert a field value according to its spec; return (value, ok)."""
    if value is None:
        return None, spec.nullable
    if spec.kind == "text":
        return value, isinstance(value, str) and bool(value.strip())
    if spec.kind == "enum":
        return value, isinstance(value, str) and value in spec.choices
    if spec.kind == "bool":
        return value, isinstance(value, bool)
    if spec.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return value, ok and (not spec.choices or value in spec.choices)
    if spec.kind == "number":
        if isinstance(value, str) and _NUMBER_RE.match(value):  # PyYAML reads 1e9 as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, False
        try:
            number = float(value)
        except OverflowError:
            return value, False
        return number, math.isfinite(number) and number > 0
    # size
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value, False
    if isinstance(value, float) and not math.isfinite(value):
        return value, False
    try:
        size = parse_bytes(value)
    except (BudgetSearchError, ValueError, OverflowError):
        return value, False
    return size, size > 0


def _walk(
    mapping: Mapping[Any, Any],
    prefix: str,
    fields: Mapping[str, _Spec | None],
    values: dict[str, Any],
    errors: list[str],
) -> None:
    """Check one mapping: no unknown keys, then each field (a None spec is checked elsewhere)."""
    allowed = ", ".join(fields)
    errors += [
        f"{prefix}{_key(k)}: unknown key; allowed keys: {allowed}"
        for k in mapping
        if k not in fields
    ]
    for leaf, spec in fields.items():
        if spec is None:
            continue
        if leaf not in mapping:
            if not spec.optional:
                errors.append(f"{prefix}{leaf}: missing; expected {spec.expected()}")
            continue
        value, ok = _check(spec, mapping[leaf])
        if ok:
            values[prefix + leaf] = value
        else:
            errors.append(f"{prefix}{leaf}: expected {spec.expected()}, got {_show(mapping[leaf])}")


def _sub(
    data: Mapping[Any, Any], key: str, errors: list[str], keys: Any, *, prefix: str = ""
) -> Mapping[Any, Any] | None:
    """The sub-mapping ``data[key]``, or None after recording why it is unusable."""
    sub = data.get(key)
    if isinstance(sub, Mapping):
        return sub
    what = "missing" if key not in data else f"got {_show(sub)}"
    errors.append(f"{prefix}{key}: {what}; expected a mapping with keys {', '.join(keys)}")
    return None


def _validate(data: Any) -> tuple[dict[str, Any], list[str]]:
    """Check a profile mapping; return the flat field values (by dotted path) and the problems."""
    if not isinstance(data, Mapping):
        return {}, [f"<top level>: expected a mapping of profile fields, got {_show(data)}"]
    errors: list[str] = []
    values: dict[str, Any] = {}
    top = {k: s for k, s in _SPECS.items() if "." not in k}
    top |= dict.fromkeys((*_SECTIONS, "measured", "sources"))  # checked below
    _walk(data, "", top, values, errors)
    for section in _SECTIONS:
        fields = {k.split(".")[1]: s for k, s in _SPECS.items() if k.startswith(section + ".")}
        sub = _sub(data, section, errors, fields)
        if sub is not None:
            _walk(sub, section + ".", fields, values, errors)
    # The measured section is optional, and may be null.
    measured = None if data.get("measured") is None else _sub(data, "measured", errors, OP_CLASSES)
    if measured:
        _walk(measured, "measured.", dict.fromkeys(OP_CLASSES), values, errors)
        for op in (op for op in OP_CLASSES if op in measured):
            rates = _sub(measured, op, errors, RATE_KEYS, prefix="measured.")
            if rates is not None:
                _walk(
                    rates, f"measured.{op}.", dict.fromkeys(RATE_KEYS, _RATE_SPEC), values, errors
                )
    values["sources"] = _validate_sources(data.get("sources", ...), values, errors)
    name = values.get("name")
    if name is not None and not _NAME_RE.match(name):
        errors.append(
            f"name: expected letters, digits, '.', '_' or '-' (a file stem), got {name!r}"
        )
    in_flash = values.get("memory.frozen_weights_in") == "flash"
    if in_flash and "memory.flash_bytes" in values and values["memory.flash_bytes"] is None:
        errors.append("memory.flash_bytes: must be a size when memory.frozen_weights_in is flash")
    return values, errors


def _validate_sources(raw: Any, values: dict[str, Any], errors: list[str]) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        what = "missing" if raw is ... else f"got {_show(raw)}"
        errors.append(f"sources: {what}; expected a mapping from dotted field paths to text")
        return {}
    numeric = [
        k
        for k, v in values.items()
        if k.startswith("measured.")
        or (v is not None and k not in _UNSOURCED and _SPECS[k].kind in ("int", "number", "size"))
    ]
    tails = ("", *(f".{k}" for k in RATE_KEYS))
    known = {
        *_SPECS,
        *_SECTIONS,
        "measured",
        *(f"measured.{o}{t}" for o in OP_CLASSES for t in tails),
    }
    sources: dict[str, str] = {}
    for key, text in raw.items():
        if key not in known:
            errors.append(f"sources.{_key(key)}: names no profile field; {_SOURCE_KEYS}")
        elif not isinstance(text, str) or not text.strip():
            errors.append(f"sources.{key}: expected a non-empty string, got {_show(text)}")
        else:
            sources[key] = text
    for dotted in numeric:
        parts = dotted.split(".")
        if not any(".".join(parts[:i]) in sources for i in range(1, len(parts) + 1)):
            errors.append(
                f"{dotted}: numeric field without a source; add sources.{dotted}: "
                "'<datasheet section, paper, or stated derivation>'"
            )
    return sources


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
    return DeviceProfile(**kwargs, measured=measured, sources=values["sources"])


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
    """Write a profile as YAML, atomically (a temporary file, then ``os.replace``).

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
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except OSError as exc:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
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
        names = sorted(files)
        close = difflib.get_close_matches(text, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProfileError(
            f"unknown device profile {text!r}.{hint} Valid names: {', '.join(names) or '(none)'}; "
            f"or pass a path to a .yaml file (extra directories: ${PROFILES_ENV_VAR})"
        )
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
