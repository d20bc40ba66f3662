"""``train``'s data splits: subsets are seeded class-balanced draws on every kind of source.

The ±1 rule: a subset of N out of a source with C classes holds N/C (±1) images of every class
that has that many, and never leaves out a class that has at least N/C images.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import budgetsearch.data as data_module
from budgetsearch.cli.train import load_splits
from budgetsearch.errors import DataError

CLASSES = ("ant", "bee", "cat", "dog", "eel")
PER_CLASS = 12


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root, sizes, split=None):
    for c, (name, n) in enumerate(zip(CLASSES, sizes, strict=False)):
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"{i:03d}.png").write_bytes(_png_bytes(c * 40 + i))
    return root


def _archive(path, sizes_by_split):
    with tarfile.open(path, "w:gz") as tar:
        for split, sizes in sizes_by_split.items():
            for c, (name, n) in enumerate(zip(CLASSES, sizes, strict=False)):
                for i in range(n):
                    payload = _png_bytes(c * 40 + i)
                    info = tarfile.TarInfo(f"./{split}/{name}/{i:04d}.png")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return path


def _idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _class_sorted(sizes):
    """Labels in class order (the order that made the first-N bug pick one class)."""
    return np.repeat(np.arange(len(sizes)), sizes)


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Every data path ``train`` reads, each with 5 classes of 12 training images."""
    sizes = [PER_CLASS] * len(CLASSES)
    flat = _folder(tmp_path / "flat", sizes)
    split = _folder(_folder(tmp_path / "split", sizes, "train"), [2] * 5, "test")
    archive = _archive(tmp_path / "data.tar.gz", {"train": sizes, "test": [2] * 5})
    shared = tmp_path / "shared"
    (shared / "datasets").mkdir(parents=True)
    _archive(shared / "datasets" / "cifar10-jpeg.tar.gz", {"train": sizes, "test": [2] * 5})
    monkeypatch.setenv("BUDGETSEARCH_SHARED", str(shared))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the archive cache
    labels = _class_sorted(sizes)
    images = (np.arange(len(labels) * 784).reshape(len(labels), 784) % 256) / 256
    pkl = tmp_path / "mnist.pkl.gz"
    with gzip.open(pkl, "wb") as handle:
        test = (images[:10].astype(np.float32), np.arange(10) % 5)
        pickle.dump(((images.astype(np.float32), labels), test, test), handle, protocol=4)
    idx = tmp_path / "digits-idx"
    idx.mkdir()
    _idx(idx / "train-images-idx3-ubyte.gz", images.reshape(-1, 28, 28) * 256)
    _idx(idx / "train-labels-idx1-ubyte.gz", labels)
    _idx(idx / "t10k-images-idx3-ubyte.gz", images[:10].reshape(-1, 28, 28) * 256)
    _idx(idx / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 5)
    return {"cifar10": "cifar10", "flat": str(flat), "split folder": str(split),
            "tar.gz": str(archive), "mnist pickle": str(pkl), "idx": str(idx)}


def _counts(data, num_classes):
    return np.bincount(np.asarray(data.targets), minlength=num_classes)


@pytest.mark.parametrize("kind", ["cifar10", "flat", "split folder", "tar.gz", "mnist pickle",
                                  "idx"])
@pytest.mark.parametrize("n", [5, 10, 17])
def test_train_subset_is_balanced_on_every_source(sources, kind, n):
    train, val, test = load_splits(sources[kind], None, image_size=4, normalization="imagenet",
                                   train_samples=n, val_samples=None, seed=3)
    assert len(train) == n and len(val) == max(1, round(n * 0.25))
    counts = _counts(train, 10)[:5]
    assert counts.min() >= n // 5 and counts.max() <= -(-n // 5), counts
    assert len(val) > 0
    # validation is carved out of the training split; the test split is only reported
    assert (test is None) == (kind == "flat")
    if test is not None:
        assert len(test) == 10
    again, _, _ = load_splits(sources[kind], None, image_size=4, normalization="imagenet",
                              train_samples=n, val_samples=None, seed=3)
    assert np.array_equal(train.targets, again.targets)


def test_flat_folder_holds_out_a_stratified_validation_split(sources):
    train, val, _ = load_splits(sources["flat"], None, image_size=4, normalization="imagenet",
                                train_samples=None, val_samples=None, seed=0)
    assert len(train) + len(val) == 60 and len(val) == 12
    assert sorted(_counts(val, 5).tolist()) == [2, 2, 2, 3, 3]  # 12 / 5 classes
    assert not set(map(str, train._images)) & set(map(str, val._images))
    other, _, _ = load_splits(sources["flat"], None, image_size=4, normalization="imagenet",
                              train_samples=None, val_samples=None, seed=1)
    assert set(map(str, other._images)) != set(map(str, train._images))


def test_imbalanced_flat_folder_keeps_every_class_it_can(tmp_path):
    # Class sizes 3, 40, 40, 2, 40: a draw of 20 (4 a class) keeps all of the small classes it
    # can and shares the rest evenly.
    root = _folder(tmp_path / "skewed", [3, 40, 40, 2, 40])
    train, val, _ = load_splits(str(root), None, image_size=4, normalization="imagenet",
                                train_samples=20, val_samples=10, seed=0)
    counts, held = _counts(train, 5), _counts(val, 5)
    assert counts.sum() == 20 and held.sum() == 10
    assert counts[0] == 3 - held[0] and counts[3] == 2 - held[3]  # all the small classes have
    large = counts[[1, 2, 4]]
    assert large.min() >= 4 and large.max() - large.min() <= 1


def test_too_many_train_samples_is_a_named_error(sources):
    with pytest.raises(DataError, match=r"--train-samples 100 plus 25 validation images, but "
                       r"the training split has only 60"):
        load_splits(sources["flat"], None, image_size=4, normalization="imagenet",
                    train_samples=100, val_samples=None, seed=0)


def test_flat_folder_subset_is_not_the_first_files_in_class_order(sources):
    # The bug this guards against: sorting the shuffled training indices and keeping the first
    # N gave N images of the first class.
    train, _, _ = load_splits(sources["flat"], None, image_size=4, normalization="imagenet",
                              train_samples=12, val_samples=None, seed=0)
    assert (_counts(train, 5) > 0).all()
    assert data_module.ImageDataset is type(train)


def test_split_folder_validates_on_training_images_and_tests_on_the_test_split(sources):
    train, val, test = load_splits(sources["split folder"], None, image_size=4,
                                   normalization="imagenet", train_samples=None,
                                   val_samples=None, seed=0, val_fraction=0.25)
    assert (len(train), len(val), len(test)) == (45, 15, 10)
    names = {str(p) for p in train._images} | {str(p) for p in val._images}
    assert all("/train/" in n for n in names) and all("/test/" in str(p) for p in test._images)
    assert not {str(p) for p in train._images} & {str(p) for p in val._images}
    # an explicit --val-data is used as it is (its test/val split)
    _, given, _ = load_splits(sources["split folder"], sources["tar.gz"], image_size=4,
                              normalization="imagenet", train_samples=None, val_samples=None,
                              seed=0)
    assert len(given) == 10
    # ... unless it is --data itself: its held-out split is the test data, only reported, and
    # a flat folder's only split is the training data
    for kind, what in (("split folder", "'test' split is the test data, only reported,"),
                       ("flat", "'train' split is the training data")):
        with pytest.raises(DataError, match=rf"--val-data .*: its {what} of --data"):
            load_splits(sources[kind], sources[kind] + "/", image_size=4,
                        normalization="imagenet", train_samples=None, val_samples=None, seed=0)
    # ... nor one of its split folders, however written: the images are compared by where
    # they were read, not by the spec
    root = sources["split folder"]
    for val_spec, what in ((f"{root}/train", "training data"), (f"{root}/./test", "test data"),
                           (f"{root}/../split/train/", "training data")):
        with pytest.raises(DataError, match=rf"--val-data .*: its images .* are the {what}"):
            load_splits(root, val_spec, image_size=4, normalization="imagenet",
                        train_samples=None, val_samples=None, seed=0)
    # the registered name and the archive it reads are one source too
    with pytest.raises(DataError, match=r"are the test data, only reported, of --data cifar10"):
        load_splits("cifar10", str(Path(os.environ["BUDGETSEARCH_SHARED"]) / "datasets"
                                   / "cifar10-jpeg.tar.gz"), image_size=4,
                    normalization="imagenet", train_samples=None, val_samples=None, seed=0)
    with pytest.raises(DataError, match=r"--val-fraction must be in \(0, 1\)"):
        load_splits(sources["flat"], None, image_size=4, normalization="imagenet",
                    train_samples=None, val_samples=None, seed=0, val_fraction=1.0)


def test_an_archive_with_other_splits_than_test(tmp_path, monkeypatch):
    """An archive's own split list decides: train + val validates on val; train alone holds
    out validation images from train and has no test split (it failed asking for 'test')."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the archive cache
    sizes = [PER_CLASS] * len(CLASSES)
    with_val = _archive(tmp_path / "tv.tar.gz", {"train": sizes, "val": [2] * 5})
    train, val, test = load_splits(str(with_val), None, image_size=4, normalization="imagenet",
                                   train_samples=None, val_samples=None, seed=0)
    assert (len(train), len(val), len(test)) == (48, 12, 10)
    assert test.source.endswith("[val]")
    only_train = _archive(tmp_path / "t.tar.gz", {"train": sizes})
    train, val, test = load_splits(str(only_train), None, image_size=4,
                                   normalization="imagenet", train_samples=None,
                                   val_samples=None, seed=0)
    assert test is None and len(train) + len(val) == 60
