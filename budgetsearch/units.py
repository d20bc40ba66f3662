"""Parsing and printing of byte sizes and durations, with units in every name."""

from __future__ import annotations

import math
import re

from .errors import BudgetSearchError

__all__ = ["format_bytes", "format_kb", "parse_bytes", "parse_ms"]

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
}
_BYTES_HELP = "a size such as 256KB, 1MB or 4096 (units: B, KB, MB, GB, KiB, MiB, GiB)"
_MS_HELP = "a duration such as 500ms or 2s (units: us, ms, s; no unit = ms)"
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float, *, what: str = "size", positive: bool = False) -> int:
    """Parse a memory size such as ``"256KB"``, ``"1.5 MiB"`` or ``4096`` into bytes.

    KB, MB and GB are binary (1 KB = 1024 bytes), as in the on-device-training literature, and so
    are KiB, MiB and GiB.

    Args:
        text: The size, a number of bytes or a number with a unit.
        what: What the size is, for the error message.
        positive: Refuse sizes of less than one byte (zero, or a fraction rounded down to zero),
            as for a memory budget.

    Returns:
        The size in bytes, rounded down.

    Raises:
        BudgetSearchError: If the text is not a non-negative size with a known unit, or is zero
            with ``positive``.
    """
    if isinstance(text, bool):
        raise BudgetSearchError(f"{what}: expected {_BYTES_HELP}, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise BudgetSearchError(
                f"{what}: a size cannot be negative, got {text!r}; expected {_BYTES_HELP}"
            )
        if isinstance(text, int):
            return _at_least_one(text, text, what) if positive else text
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _BYTE_UNITS:
            raise BudgetSearchError(f"{what}: expected {_BYTES_HELP}, got {text!r}")
        value = float(match.group(1)) * _BYTE_UNITS[unit]
    if not math.isfinite(value):
        raise BudgetSearchError(f"{what}: expected {_BYTES_HELP}, got {text!r}")
    return _at_least_one(int(value), text, what) if positive else int(value)


def _at_least_one(size: int, text: object, what: str) -> int:
    if size < 1:
        raise BudgetSearchError(
            f"{what}: must be at least 1 byte, got {text!r}; expected {_BYTES_HELP}"
        )
    return size


def parse_ms(text: str | int | float, *, what: str = "latency", positive: bool = False) -> float:
    """Parse a duration such as ``"500ms"``, ``"2s"`` or ``250`` (milliseconds) into ms.

    Args:
        text: The duration, a number of milliseconds or a number with a unit.
        what: What the duration is, for the error message.
        positive: Refuse a zero duration, as for a latency budget.

    Raises:
        BudgetSearchError: If the text is not a finite, non-negative duration with a known unit,
            or is zero with ``positive``.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise BudgetSearchError(
                f"{what}: a duration cannot be negative, got {text!r}; expected {_MS_HELP}"
            )
        try:
            value = float(text)
        except OverflowError:  # an int too large for a float
            value = math.inf
    else:
        match = _SIZE_RE.match(str(text))
        units = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 1e-3}
        scale = units.get(match.group(2).lower()) if match else None
        if match is None or scale is None:
            raise BudgetSearchError(f"{what}: expected {_MS_HELP}, got {text!r}")
        value = float(match.group(1)) * scale
    if not math.isfinite(value):
        raise BudgetSearchError(f"{what}: expected {_MS_HELP}, got {text!r}")
    if positive and not value > 0:
        raise BudgetSearchError(
            f"{what}: must be more than 0 ms, got {text!r}; expected {_MS_HELP}"
        )
    return value


def format_bytes(n_bytes: float) -> str:
    """Format a byte count with a binary unit, e.g. ``format_bytes(263168) == '257.0 KB'``."""
    value = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def format_kb(n_bytes: float) -> str:
    """Bytes as KB (1024 B) with one decimal, rounded up so the figure is a sufficient budget,
    e.g. ``format_kb(1000) == '1.0 KB'``."""
    return f"{math.ceil(n_bytes / 1024 * 10) / 10:.1f} KB"
