"""Atomic writes (budgetsearch._io): all or nothing, unique temporary names, open()'s modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from budgetsearch._io import (
    UMASK,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    locked,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path: Path,
                                                                   mode: str) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_open(target, mode) as handle:
        handle.write("new, half" if mode == "w" else b"new, half")
        handle.flush()
        raise RuntimeError("mid-write")
    assert target.read_text() == "old\n"
    assert _left_behind(tmp_path) == []


def test_atomic_path_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(target))
    with pytest.raises(RuntimeError, match="writer died"), atomic_path(target) as tmp:
        tmp.write_bytes(b"garbage")
        raise RuntimeError("writer died")
    assert torch.equal(load_file(str(target))["w"], torch.zeros(2))
    assert _left_behind(tmp_path) == []


def test_atomic_path_takes_a_writer_that_wants_a_file_name(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "model.safetensors"  # the folder is created
    with atomic_path(target, fsync=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.safetensors.")
        assert not target.exists()  # nothing visible before the rename
        save_file({"w": torch.arange(3.0)}, str(tmp))
    assert torch.equal(load_file(str(target))["w"], torch.arange(3.0))
    assert _left_behind(target.parent) == []


def test_two_writers_of_one_file_use_two_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    with atomic_open(target) as first, atomic_open(target) as second:
        assert first.name != second.name  # a fixed ".record.json.tmp" would be shared
        first.write("first\n")
        second.write("second\n")
    assert target.read_text() == "first\n"  # the last rename wins, whole
    assert _left_behind(tmp_path) == []


def test_whole_file_helpers_and_options(tmp_path: Path) -> None:
    text = atomic_write_text(tmp_path / "a.yaml", "µ = 1\n", encoding="utf-8", fsync=True)
    assert text.read_bytes() == "µ = 1\n".encode()
    data = atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert data.read_bytes() == b"\x00\x01"


def test_permissions_are_those_open_gives(tmp_path: Path) -> None:
    new = atomic_write_text(tmp_path / "new.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(new) == _mode(plain) == 0o666 & ~UMASK  # not mkstemp's 0600
    os.chmod(new, 0o640)
    atomic_write_text(new, "y")  # an existing file keeps its mode
    assert _mode(new) == 0o640
    atomic_write_text(new, "z", permissions=0o644)  # unless asked otherwise
    assert _mode(new) == 0o644 & ~UMASK


def test_locked_holds_an_exclusive_lock_beside_the_file_until_the_block_ends(
        tmp_path: Path) -> None:
    import fcntl

    shared = tmp_path / "sub" / "cells.json"
    with locked(shared):
        lock = shared.parent / "cells.json.lock"
        assert lock.exists() and not shared.exists()  # the folder made, the file untouched
        # another open file description is another holder: it must wait
        with open(lock, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a") as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
