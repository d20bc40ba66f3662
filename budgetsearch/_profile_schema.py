"""The schema of device profile files: fields, units, allowed values, and their validation.

Used by :mod:`budgetsearch.profiles`; every problem is reported with the dotted field, the
expected type and unit, and the allowed values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .choices import OP_CLASSES, OPTIMIZERS
from .errors import BudgetSearchError
from .units import parse_bytes

SCHEMA_VERSION = 1
KINDS = ("mcu", "sbc", "gpu", "host")
WEIGHT_LOCATIONS = ("flash", "ram")
RATE_KEYS = ("forward_macs_per_s", "backward_macs_per_s")
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
    maximum: int | None = None

    def expected(self) -> str:
        """Describe the accepted values, for error messages."""
        if self.kind == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind == "text":
            return "a non-empty string"
        at_most = f" of at most {self.maximum:,}" if self.maximum is not None else ""
        if self.kind == "size":
            text = ("a positive size in bytes (an integer, or a string such as 256KB; KB = 1024)"
                    + (f", at most {self.maximum:,} bytes" if self.maximum is not None else ""))
            return text + (", or null" if self.nullable else "")
        if self.kind == "int":
            allowed = f" from {{{', '.join(map(str, self.choices))}}}" if self.choices else ""
            return f"a positive integer{at_most} ({self.unit}){allowed}"
        return f"a positive number ({self.unit})"


_BYTES = ("bytes per element", (1, 2, 4, 8))
#: The largest memory and batch size a profile may give: the command line's bounds
#: (``cli._common.MAX_BUDGET_BYTES`` and ``MAX_BATCH_SIZE``), so that a typo is refused by name.
MAX_MEMORY_BYTES = 1 << 40
MAX_BATCH_SIZE = 65536
# (dotted YAML path, DeviceProfile attribute or "", spec), in file order.
_FIELDS: tuple[tuple[str, str, _Spec], ...] = (
    ("schema_version", "", _Spec("int", "schema version", (SCHEMA_VERSION,))),
    ("name", "name", _Spec("text")),
    ("display_name", "display_name", _Spec("text")),
    ("kind", "kind", _Spec("enum", choices=KINDS)),
    ("notes", "notes", _Spec("text", optional=True)),
    ("memory.training_bytes", "memory_bytes", _Spec("size", maximum=MAX_MEMORY_BYTES)),
    ("memory.flash_bytes", "flash_bytes", _Spec("size", nullable=True,
                                                maximum=MAX_MEMORY_BYTES)),
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
    ("training.default_batch_size", "default_batch_size",
     _Spec("int", "samples", maximum=MAX_BATCH_SIZE)),
    ("training.default_optimizer", "default_optimizer", _Spec("enum", choices=OPTIMIZERS)),
    ("training.in_place_update", "in_place_update", _Spec("bool")),
)
_SPECS = {dotted: spec for dotted, _, spec in _FIELDS}
_RATE_SPEC = _Spec("number", "MAC/s")
_SECTIONS = ("memory", "dtypes", "compute", "training")
# Numeric fields that are format metadata, not device figures, and need no source.
_UNSOURCED = frozenset({"schema_version"})
_SOURCE_KEYS = "expected a dotted field path such as compute.peak_macs_per_s, or a section name"


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
        ok = ok and (spec.maximum is None or value <= spec.maximum)
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
    return size, size > 0 and (spec.maximum is None or size <= spec.maximum)


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
    top |= dict.fromkeys((*_SECTIONS, "measured", "latency", "sources"))  # checked below
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
    if data.get("latency") is not None:
        from .latency._model import validate_latency

        latency, problems = validate_latency(data["latency"])
        errors += problems
        if latency is not None:
            values["latency"] = latency
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
        if k.startswith("measured.") or k == "latency"
        or (v is not None and k not in _UNSOURCED and _SPECS[k].kind in ("int", "number", "size"))
    ]
    tails = ("", *(f".{k}" for k in RATE_KEYS))
    known = {
        *_SPECS,
        *_SECTIONS,
        "measured",
        "latency",
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
