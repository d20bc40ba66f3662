"""Checkpoint files: atomic pairs, damaged ones skipped, optimizer and RNG state round trips."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from budgetsearch.errors import DataError
from budgetsearch.trainer import build_optimizer, list_checkpoints, load_latest, save_checkpoint
from budgetsearch.trainer.checkpoint import (
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    rng_state,
    set_aside_after,
    set_rng_state,
)


def stepped(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    groups = [{"params": list(model.parameters()), "param_names": ["weight", "bias"]}]
    opt = build_optimizer(name, groups, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_optimizer_state_round_trip(tmp_path, name):
    _model, opt = stepped(name)
    tensors, meta = optimizer_state_to_tensors(opt)
    save_checkpoint(tmp_path, epoch=1, tensors={f"optimizer/{k}": v for k, v in tensors.items()},
                    state={"optimizer": meta})
    ckpt = load_latest(tmp_path)
    fresh, _ = stepped(name)
    groups = [{"params": list(fresh.parameters()), "param_names": ["weight", "bias"]}]
    other = build_optimizer(name, groups, lr=0.1)
    optimizer_state_from_tensors(other, ckpt.section("optimizer"), ckpt.state["optimizer"])
    a, b = opt.state_dict()["state"], other.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        for key, value in a[index].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(b[index][key], value, rtol=0, atol=0)
            else:
                assert b[index][key] == value
    bigger = build_optimizer(name, [{"params": [nn.Parameter(torch.zeros(1))]}], lr=0.1)
    if a:
        with pytest.raises(DataError, match="another plan"):
            optimizer_state_from_tensors(bigger, ckpt.section("optimizer"),
                                         ckpt.state["optimizer"])


def test_keeps_the_last_two_and_skips_damaged_ones(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch=epoch, tensors={"x": torch.full((3,), float(epoch))},
                        state={"note": epoch})
    assert list_checkpoints(tmp_path) == [2, 3]
    assert load_latest(tmp_path).state["note"] == 3
    (tmp_path / "epoch-0003.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="epoch-0003.json"):
        ckpt = load_latest(tmp_path)
    assert ckpt.epoch == 2 and torch.equal(ckpt.tensors["x"], torch.full((3,), 2.0))
    (tmp_path / "epoch-0002.json").write_text("{not json")
    with pytest.warns(UserWarning):
        assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "missing") is None
    assert not list(tmp_path.glob("*.tmp"))
    doc = json.loads((tmp_path / "epoch-0003.json").read_text())
    assert doc["tensors"] == "epoch-0003.safetensors" and len(doc["sha256"]) == 64


def test_rng_state_round_trip():
    tensors, meta = rng_state()
    a = (torch.rand(3), random.random())
    set_rng_state(tensors, json.loads(json.dumps(meta)))
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize("keep", [1, 2, 3, 4, 6])
def test_the_last_keep_checkpoints_are_kept(tmp_path, keep):
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, epoch=epoch, tensors={"x": torch.zeros(1)}, state={},
                        keep=keep)
        assert list_checkpoints(tmp_path) == list(range(max(1, epoch - keep + 1), epoch + 1))


def test_newer_damaged_checkpoints_neither_prune_a_resumed_run_nor_stay_its_newest(tmp_path):
    """Damaged epochs 4 and 5 (skipped by load_latest) beside good 1..3: a run that resumes
    from epoch 3 sets them aside, and the checkpoints it writes prune only older ones."""
    for epoch in (3, 4, 5):
        save_checkpoint(tmp_path, epoch=epoch, tensors={"x": torch.full((3,), float(epoch))},
                        state={"note": epoch}, keep=3)
    for epoch in (4, 5):
        (tmp_path / f"epoch-{epoch:04d}.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="epoch-0005.json"):
        assert load_latest(tmp_path).epoch == 3
    # before the fix, writing epoch 4 then kept [4, 5] and dropped the good 3, writing 1 kept
    # [4, 5] and dropped itself
    save_checkpoint(tmp_path, epoch=1, tensors={"x": torch.zeros(3)}, state={})
    assert list_checkpoints(tmp_path) == [1, 3, 4, 5]  # nothing newer is pruned by epoch 1
    moved = set_aside_after(tmp_path, 3)
    assert [p.name for p in moved] == ["epoch-0004.json.set-aside", "epoch-0005.json.set-aside"]
    assert list_checkpoints(tmp_path) == [1, 3]
    assert (tmp_path / "epoch-0005.safetensors.set-aside").read_bytes() == b"garbage"
    save_checkpoint(tmp_path, epoch=4, tensors={"x": torch.full((3,), 4.0)}, state={})
    assert list_checkpoints(tmp_path) == [3, 4] and load_latest(tmp_path).epoch == 4
