"""Fixtures of the planner's tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def images(tmp_path, monkeypatch):
    """An ImageFolder of two classes, ten 32x32 images each (class ``b`` brighter), with the user
    cache (contribution tables, races) in the test's directory."""
    monkeypatch.setenv("BUDGETSEARCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        folder = tmp_path / "imgs" / name
        folder.mkdir(parents=True)
        for i in range(10):
            pixels = (rng.integers(0, 80, (32, 32, 3)) + 120 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "imgs"
