"""Toy models shared by several test files (``from _toys import ...``: pyproject.toml puts
``tests`` on pytest's path).

Tests whose expected numbers are worked out by hand for one architecture keep that architecture
next to the numbers; only models that several files build alike live here.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TanhNet", "conv_pool_linear", "fake_cifar10_archive", "small_cnn"]


def conv_pool_linear(num_classes: int = 2, *, seed: int | None = 0) -> nn.Sequential:
    """Two trainable layers: ``0`` a 3->4 conv (3x3, no padding), global pooling, ``3`` a linear
    head 4->``num_classes``.

    Args:
        num_classes: Outputs of the head.
        seed: Seed of the initial weights (``torch.manual_seed``), or None to draw them from
            the global generator as it stands.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


class TanhNet(nn.Module):
    """A 3->4 conv (3x3, no padding), tanh (an op kind without a built-in cost rule), a global
    mean and a 4->2 linear layer: trainable layers ``conv`` and ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


def small_cnn(num_classes: int = 3, *, seed: int | None = 0) -> nn.Sequential:
    """A strided conv-BN-ReLU6 stem, a 1x1 conv with its own bias and a ReLU, global pooling and a
    linear head; trainable layers ``0`` (3->8, 3x3, stride 2, no bias), ``3`` (8->8, 1x1) and
    ``7`` (8->``num_classes``).

    Args:
        num_classes: Outputs of the head.
        seed: Seed of the initial weights (``torch.manual_seed``), or None to draw them from
            the global generator as it stands.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def fake_cifar10_archive(path, *, train_per_class: int = 4, test_per_class: int = 2):
    """Write a tiny stand-in for ``cifar10-jpeg.tar.gz`` (the same layout: ``./<split>/<class>/``
    with 32x32 images, one grey level per image) so tests that train on "cifar10" do not need
    the real archive; point ``$BUDGETSEARCH_DATA`` at it. Returns the path."""
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            for c, name in enumerate(CIFAR10_CLASSES):
                for i in range(n):
                    buffer = io.BytesIO()
                    level = (c * 23 + i * 7) % 256
                    Image.new("RGB", (32, 32), (level, 255 - level, (level * 3) % 256)).save(
                        buffer, format="PNG")
                    payload = buffer.getvalue()
                    info = tarfile.TarInfo(f"./{split}/{name}/{i:04d}.png")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return path
