"""torch_threads: the count set for the block, the caller's restored after, also on an error."""

from __future__ import annotations

import pytest
import torch

from budgetsearch._threads import torch_threads


def test_the_count_is_set_inside_and_restored_after_even_on_an_error() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), torch_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_none_leaves_the_count_alone() -> None:
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
