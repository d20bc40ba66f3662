"""Byte sizes and durations: parsing, printing, and errors that list the accepted units."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetsearch.errors import BudgetSearchError
from budgetsearch.units import format_bytes, parse_bytes, parse_ms

BYTE_UNITS = ("B", "KB", "MB", "GB", "KiB", "MiB", "GiB")
MS_UNITS = ("us", "ms", "s")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256KB", 256 * 1024),
        ("256kb", 256 * 1024),
        ("256 KiB", 256 * 1024),
        ("1.5 MiB", 1572864),
        ("1.5MB", 1572864),
        ("2GB", 2 * 1024**3),
        ("1gib", 1024**3),
        ("4096", 4096),
        ("4096B", 4096),
        ("  12 b  ", 12),
        (".5KB", 512),
        ("1e3", 1000),
        ("1.5e1KB", 15 * 1024),
        ("1.9B", 1),  # rounded down
        ("0", 0),
        (4096, 4096),
        (0, 0),
        (3.7, 3),
        (10**30, 10**30),  # an int stays exact
    ],
)
def test_parse_bytes(text, expected) -> None:
    value = parse_bytes(text)
    assert value == expected
    assert isinstance(value, int)


@pytest.mark.parametrize(
    "bad", ["1TB", "12 kilobytes", "", "KB", "-1KB", "1..5KB", "1 K B", "0x10", "inf", "nan"]
)
def test_parse_bytes_bad_text_lists_units(bad) -> None:
    with pytest.raises(BudgetSearchError) as info:
        parse_bytes(bad, what="memory budget")
    msg = str(info.value)
    assert msg.startswith("memory budget: ")
    assert repr(bad) in msg
    for unit in BYTE_UNITS:
        assert unit in msg


@pytest.mark.parametrize("bad", [True, False, -1, -0.5, float("nan"), float("inf"), "1e400"])
def test_parse_bytes_rejects_bool_negative_and_non_finite(bad) -> None:
    with pytest.raises(BudgetSearchError) as info:
        parse_bytes(bad, what="memory budget")
    msg = str(info.value)
    assert msg.startswith("memory budget: ")
    assert repr(bad) in msg
    for unit in BYTE_UNITS:
        assert unit in msg


def test_parse_bytes_negative_says_negative() -> None:
    with pytest.raises(BudgetSearchError, match="negative"):
        parse_bytes(-4096)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 500.0),
        ("500 MS", 500.0),
        ("2s", 2000.0),
        ("1.5s", 1500.0),
        ("250us", 0.25),
        ("250", 250.0),
        (" 7 ms ", 7.0),
        (250, 250.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_ms(text, expected) -> None:
    value = parse_ms(text)
    assert value == pytest.approx(expected)
    assert isinstance(value, float)


@pytest.mark.parametrize(
    "bad", ["2min", "1h", "fast", "", "-5ms", True, False, -1, -0.1, float("nan"), "1e400"]
)
def test_parse_ms_errors_list_units(bad) -> None:
    with pytest.raises(BudgetSearchError) as info:
        parse_ms(bad, what="latency budget")
    msg = str(info.value)
    assert msg.startswith("latency budget: ")
    assert repr(bad) in msg
    for unit in MS_UNITS:
        assert unit in msg


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KB"),
        (1536, "1.5 KB"),
        (263168, "257.0 KB"),
        (256 * 1024, "256.0 KB"),
        (1024**2, "1.0 MB"),
        (int(2.5 * 1024**2), "2.5 MB"),
        (1024**3, "1.0 GB"),
        (1024**4, "1024.0 GB"),  # GB is the largest unit
        (-2048, "-2.0 KB"),
        (512.0, "512 B"),
    ],
)
def test_format_bytes(n, expected) -> None:
    assert format_bytes(n) == expected


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=2**42))
def test_format_then_parse_is_close(n) -> None:
    # One decimal of a unit of at least 1: within 5% (or exact below 1 KB).
    back = parse_bytes(format_bytes(n).replace(" ", ""))
    if n < 1024:
        assert back == n
    else:
        assert math.isclose(back, n, rel_tol=0.05)
