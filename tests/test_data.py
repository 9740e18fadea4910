"""Datasets and loaders: digits, CIFAR pickles, image folders, synthetic data, DataLoader, spec parser."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from deltainf.data import (CIFAR10_MEAN, DATASET_SPECS, ImageDataset, as_index_tensor, load_cifar10,
                           load_cifar100, load_digits_dataset, load_image_folder, make_loader,
                           make_synthetic_dataset, parse_dataset_spec)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def _write_pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _cifar_batch(n, num_classes, rng, label_key=b"labels", extra=None):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).tolist()
    d = {b"data": data, label_key: labels, b"batch_label": b"test"}
    if extra:
        d.update(extra)
    return d


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _cifar_batch(3, 10, rng)
        _write_pickle(root / name, batches[name])
    _write_pickle(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return root, batches


@pytest.fixture
def cifar100_dir(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    batches = {}
    for split in ("train", "test"):
        d = _cifar_batch(4, 100, rng, label_key=b"fine_labels")
        d[b"coarse_labels"] = rng.integers(0, 20, size=4).tolist()
        batches[split] = d
        _write_pickle(root / split, d)
    return root, batches


def _expected_images(data: np.ndarray) -> torch.Tensor:
    # CIFAR row layout: 1024 R, 1024 G, 1024 B values, each a row-major 32x32 plane.
    out = np.zeros((data.shape[0], 3, 32, 32), dtype=np.float32)
    for n in range(data.shape[0]):
        for c in range(3):
            out[n, c] = data[n, c * 1024:(c + 1) * 1024].reshape(32, 32) / 255.0
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_range_and_split():
    train = load_digits_dataset("train")
    test = load_digits_dataset("test")
    assert len(train) == 1437 and len(test) == 360
    assert train.images.shape == (1437, 3, 16, 16) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    # grey replicated to 3 identical channels
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 0], train.images[:, 2])
    # stratified: per-class proportions within one example of the full-data proportions
    full = torch.cat([train.labels, test.labels])
    expected = torch.bincount(full, minlength=10).float() * 0.2
    assert (torch.bincount(test.labels, minlength=10).float() - expected).abs().max() <= 1.0
    # test normalisation constants are the training ones
    assert test.mean == train.mean and test.std == train.std


def test_digits_split_deterministic_and_seeded():
    a, b = load_digits_dataset("train", seed=0), load_digits_dataset("train", seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = load_digits_dataset("train", seed=1)
    assert not torch.equal(a.images, c.images)


def test_digits_native_size_and_one_channel():
    d = load_digits_dataset("test", size=8, channels=1)
    from sklearn.datasets import load_digits
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    assert d.images.shape == (360, 1, 8, 8)
    # every image is one of the originals, exactly
    matches = (d.images[:, 0].reshape(360, 1, 64) == raw.reshape(1, -1, 64)).all(-1).any(1)
    assert bool(matches.all())


@pytest.mark.parametrize("kwargs, match", [({"split": "val"}, "split"), ({"size": 4}, "size"),
                                           ({"channels": 2}, "channels")])
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_dataset(**kwargs)


# ----------------------------------------------------------------------------- ImageDataset
def _toy(n=6, k=3):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(n, 3, 4, 4, generator=g), torch.arange(n) % k, num_classes=k)


def test_dataset_items_and_batches():
    d = _toy()
    x, y, i = d[4]
    assert x.shape == (3, 4, 4) and y == 1 and i == 4
    assert d[-1][2] == 5
    xb, yb, ib = d[torch.tensor([5, 0])]
    assert xb.shape == (2, 3, 4, 4) and yb.tolist() == [2, 0] and ib.tolist() == [5, 0]
    assert d[1:3][2].tolist() == [1, 2]
    with pytest.raises(IndexError):
        d[6]


def test_dataset_helpers_do_not_mutate():
    d = _toy()
    before = d.images.clone(), d.labels.clone()
    s = d.subset([4, 1])
    assert torch.equal(s.images, d.images[[4, 1]]) and s.labels.tolist() == [1, 1]
    w = d.without(torch.tensor([0, 2]))
    assert torch.equal(w.images, d.images[[1, 3, 4, 5]])
    new = torch.zeros(2, 3, 4, 4)
    r = d.with_replaced([1, 3], images=new, labels=2)
    assert torch.equal(r.images[[1, 3]], new) and r.labels[[1, 3]].tolist() == [2, 2]
    assert torch.equal(r.images[[0, 2, 4, 5]], d.images[[0, 2, 4, 5]])
    assert torch.equal(d.images, before[0]) and torch.equal(d.labels, before[1])
    assert s.mean == d.mean and r.std == d.std and s.classes == d.classes


def test_dataset_validation_errors():
    x = torch.rand(4, 3, 2, 2)
    with pytest.raises(ValueError, match="labels: the largest label is 1099511627776, which would make"):
        ImageDataset(x, torch.tensor([0, 1, 2, 2 ** 40]))  # one corrupt label, not 2^40 class names
    for stats in ({"mean": [0.5, float("nan"), 0.5]}, {"std": [0.2, 0.2, float("nan")]}):
        with pytest.raises(ValueError, match="must be finite"):
            ImageDataset(x, torch.tensor([0, 1, 1, 0]), **stats)
    with pytest.raises(TypeError, match="num_classes must be an int >= 0, got 2.5"):
        ImageDataset(x, torch.tensor([0, 1, 1, 0]), num_classes=2.5)
    with pytest.raises(ValueError, match="labels must lie in"):
        ImageDataset(x, torch.tensor([0, 1, 2, 5]), num_classes=3)
    with pytest.raises(ValueError, match="labels must lie in"):
        ImageDataset(x, torch.tensor([0, -1, 0, 0]), classes=["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        ImageDataset(x, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"channels last\? \(images.permute\(0, 3, 1, 2\)\)"):  # was taken as
        ImageDataset(torch.rand(4, 8, 8, 3), torch.tensor([0, 1, 1, 0]))                       # 8 channels of 8 x 3
    with pytest.raises(TypeError, match="labels must be integer class indices, got list"):  # torch's bare error
        ImageDataset(x, ["cat", "dog", "cat", "dog"])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(torch.rand(4, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset((x * 255).to(torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageDataset(x * 3, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ImageDataset(x, torch.zeros(4))
    d = _toy()
    with pytest.raises(ValueError, match="labels must lie in"):
        d.with_replaced([0], labels=7)
    with pytest.raises(ValueError, match="shape"):
        d.with_replaced([0, 1], images=torch.zeros(1, 3, 4, 4))
    with pytest.raises(IndexError):
        d.subset([0, 99])
    with pytest.raises(ValueError, match="repeated"):
        d.subset([1, 1])


def test_empty_dataset_is_allowed_but_cannot_train_or_evaluate():
    from deltainf.train import TrainConfig, accuracy, train_model
    from deltainf.models import build_model

    e = ImageDataset(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long), num_classes=2)
    assert len(e) == 0 and e.num_classes == 2
    with pytest.raises(ValueError, match="empty"):
        train_model(e, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="empty"):
        accuracy(build_model("small_cnn", 2, 3, 8), e)
    d = _toy()
    with pytest.raises(ValueError, match="empty"):
        train_model(d, TrainConfig(progress=False), exclude=torch.arange(len(d)))


def test_as_index_tensor_mask_and_errors():
    assert as_index_tensor(torch.tensor([True, False, True]), 3).tolist() == [0, 2]
    with pytest.raises(TypeError):
        as_index_tensor(torch.tensor([0.5]), 3)
    with pytest.raises(ValueError, match="mask"):
        as_index_tensor(torch.tensor([True]), 3)
    # a 0/1 mask as ints (mask.long(), np.isin(...).astype(int)) was read as the positions 0 and 1
    for mask in (torch.tensor([1, 0, 0, 1, 1]), np.array([0, 1, 0, 0, 1])):
        with pytest.raises(ValueError, match=r"^indices: 5 values, all 0 or 1: a mask\? pass it as bool"):
            as_index_tensor(mask, 5)
    assert as_index_tensor([1, 0], 2).tolist() == [1, 0]  # two positions of a two-example set stay positions


# ----------------------------------------------------------------------------- CIFAR
def test_cifar10_round_trip(cifar10_dir):
    root, batches = cifar10_dir
    train = load_cifar10(root, "train")
    data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.images.shape == (15, 3, 32, 32)
    assert torch.equal(train.images, _expected_images(data))
    assert train.labels.tolist() == labels
    assert train.classes == [f"c{i}" for i in range(10)] and train.mean == CIFAR10_MEAN
    # the parent folder works too
    test = load_cifar10(root.parent, "test")
    assert torch.equal(test.images, _expected_images(batches["test_batch"][b"data"]))


def test_cifar100_round_trip_fine_and_coarse(cifar100_dir):
    root, batches = cifar100_dir
    fine = load_cifar100(root, "train")
    coarse = load_cifar100(root, "test", label_mode="coarse")
    assert torch.equal(fine.images, _expected_images(batches["train"][b"data"]))
    assert fine.labels.tolist() == batches["train"][b"fine_labels"] and fine.num_classes == 100
    assert coarse.labels.tolist() == batches["test"][b"coarse_labels"] and coarse.num_classes == 20


def test_cifar_missing_paths(tmp_path, cifar10_dir):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_cifar10(tmp_path / "nope")
    root, _ = cifar10_dir
    os.remove(root / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(root, "train")
    with pytest.raises(FileNotFoundError, match="train"):
        load_cifar100(tmp_path)
    archive = tmp_path / "cifar-10-python.tar.gz"  # the download itself: named as an archive to extract
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(FileNotFoundError, match="is an archive, which is not read; extract it"):
        load_cifar10(archive)


def test_cifar_corrupt_and_malformed(cifar10_dir, cifar100_dir):
    root, batches = cifar10_dir
    (root / "test_batch").write_bytes(b"\x00\x01 this is not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10(root, "test")
    bad = dict(batches["data_batch_1"])
    bad[b"data"] = bad[b"data"][:, :3071]
    _write_pickle(root / "data_batch_1", bad)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(root, "train")
    bad = dict(batches["data_batch_1"])
    bad[b"labels"] = [0, 10, 1]
    _write_pickle(root / "data_batch_1", bad)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        load_cifar10(root, "train")
    bad = dict(batches["data_batch_1"])
    bad[b"labels"] = [0, 1]
    _write_pickle(root / "data_batch_1", bad)
    with pytest.raises(ValueError, match="3 labels"):
        load_cifar10(root, "train")
    root100, b100 = cifar100_dir
    bad = dict(b100["train"])
    bad[b"fine_labels"] = [100, 0, 0, 0]
    _write_pickle(root100 / "train", bad)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        load_cifar100(root100, "train")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_arbitrary_pickled_code(cifar10_dir):
    root, _ = cifar10_dir
    _write_pickle(root / "test_batch", {b"data": _Evil(), b"labels": []})
    with pytest.raises(ValueError, match="refusing to load global"):
        load_cifar10(root, "test")


# ----------------------------------------------------------------------------- image folder
def _make_folder(root, classes=("cat", "ant"), n=2, sizes=((20, 12), (12, 20))):
    colours = {}
    for split in ("train", "val"):
        for ci, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for k in range(n):
                colour = (40 * ci + 10 * k, 100, 200 - 30 * k)
                Image.new("RGB", sizes[k % len(sizes)], colour).save(d / f"img{k}.png")
                colours[(split, name, k)] = colour
    return colours


def test_image_folder_round_trip(tmp_path):
    colours = _make_folder(tmp_path)
    train = load_image_folder(tmp_path, "train", size=8)
    assert train.classes == ["ant", "cat"]  # sorted folder names
    assert train.images.shape == (4, 3, 8, 8) and train.labels.tolist() == [0, 0, 1, 1]
    # uniform-colour PNGs survive resize+crop exactly
    expected = torch.tensor(colours[("train", "ant", 1)], dtype=torch.float32) / 255
    assert torch.allclose(train.images[1], expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-6)
    val = load_image_folder(tmp_path, "val", size=8)
    assert val.classes == train.classes and len(val) == 4


def test_image_folder_reads_as_torchvision_does(tmp_path, caplog):
    """16-bit greyscale PNGs keep their picture (Pillow's own conversion clipped every value above 255 to white);
    .tif and .pgm files and images in a nested folder are read, in torchvision ImageFolder's order, and each index
    has its file; a file without an image extension is named in a warning, not dropped silently."""
    import logging

    picture = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 4)  # 0..252
    for split in ("train", "val"):
        d = tmp_path / split / "a"
        (d / "nested").mkdir(parents=True)
        Image.fromarray(picture.astype(np.uint16) * 257).save(d / "deep16.png")
        Image.fromarray(picture.astype(np.uint8)).save(d / "b.tif")
        Image.fromarray(picture.astype(np.uint8)).save(d / "nested" / "c.pgm")
        (d / "notes.txt").write_text("not an image")
        (tmp_path / split / "z").mkdir()
        Image.fromarray(picture.astype(np.uint8)).save(tmp_path / split / "z" / "d.png")  # a second class
    with caplog.at_level(logging.WARNING, logger="deltainf"):
        train = load_image_folder(tmp_path, "train", size=8, channels=1)
    assert train.files == ["train/a/b.tif", "train/a/deep16.png", "train/a/nested/c.pgm", "train/z/d.png"]
    expected = torch.from_numpy(picture.astype(np.float32) / 255)
    for i in range(3):
        assert torch.allclose(train.images[i, 0], expected, atol=1e-6), train.files[i]
    assert "1 file(s) without an image extension" in caplog.text and "notes.txt" in caplog.text


def test_image_folder_skips_hidden_folders_and_says_what_it_leaves_out(tmp_path, caplog):
    """A notebook's .ipynb_checkpoints copy inside a class folder was read as one more example of the class; files
    beside the class folders, and images smaller than the size when others are not, were left out or enlarged
    without a word; 16-bit images holding 8-bit values read as black (their high byte)."""
    import logging

    _make_folder(tmp_path, sizes=((8, 8),))
    hidden = tmp_path / "train" / "ant" / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(hidden / "img0-checkpoint.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "train" / "loose.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "train" / "cat" / "small.png")
    with caplog.at_level(logging.WARNING, logger="deltainf"):
        train = load_image_folder(tmp_path, "train", size=8)
    assert train.files == ["train/ant/img0.png", "train/ant/img1.png", "train/cat/img0.png", "train/cat/img1.png",
                           "train/cat/small.png"]
    assert "1 file(s) outside the class folders are not read, e.g. 'loose.png'" in caplog.text
    assert "1 image(s) are smaller than 8 px (down to 4 px); they are enlarged" in caplog.text
    eight_bit = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4  # 0..252, in a 16-bit file
    Image.fromarray(eight_bit).save(tmp_path / "val" / "ant" / "img0.png")
    with pytest.warns(UserWarning, match="16-bit images holding values within 0..255 are read as 8-bit values"):
        val = load_image_folder(tmp_path, "val", size=8, channels=1)
    assert torch.allclose(val.images[0, 0], torch.from_numpy(eight_bit.astype(np.float32) / 255), atol=1e-6)


def test_image_folder_leaves_out_macos_metadata_files(tmp_path, caplog):
    """A folder unpacked from a macOS archive holds ``._img0.png`` beside ``img0.png`` (AppleDouble metadata with the
    image's name): it was taken for an image and the load stopped on it ("could not read image file")."""
    import logging

    _make_folder(tmp_path, sizes=((8, 8),))
    (tmp_path / "train" / "ant" / "._img0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    with caplog.at_level(logging.WARNING, logger="deltainf"):
        train = load_image_folder(tmp_path, "train", size=8)
    assert train.files == ["train/ant/img0.png", "train/ant/img1.png", "train/cat/img0.png", "train/cat/img1.png"]
    assert "1 file(s) without an image extension" in caplog.text and "._img0.png" in caplog.text


def test_image_folder_reads_a_linked_folder_once(tmp_path, caplog):
    """A link to a folder is followed (as torchvision does), but a link back to one already read (a loop) is not:
    its images were read again at every level of the loop, as more examples (7,637 for 1,437)."""
    import logging

    _make_folder(tmp_path)
    outside = tmp_path / "more"
    outside.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside / "extra.png")
    (tmp_path / "train" / "ant" / "loop").symlink_to(tmp_path / "train" / "ant", target_is_directory=True)
    (tmp_path / "train" / "cat" / "more").symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="deltainf"):
        train = load_image_folder(tmp_path, "train", size=8)
    assert train.files == ["train/ant/img0.png", "train/ant/img1.png", "train/cat/img0.png", "train/cat/img1.png",
                           "train/cat/more/extra.png"]
    assert "is a link to a folder already read" in caplog.text and "loop" in caplog.text
    # a class folder that is a link to another class folder: its images were read under both labels
    (tmp_path / "val" / "cat").rename(tmp_path / "val" / "cat-old")
    (tmp_path / "val" / "cat").symlink_to(tmp_path / "val" / "ant", target_is_directory=True)
    with pytest.raises(ValueError, match="class folders .*ant' and .*cat' are the same folder"):
        load_image_folder(tmp_path, "val", size=8)


def test_image_folder_says_when_it_enlarges_or_copies_channels(tmp_path, caplog):
    import logging

    _make_folder(tmp_path, sizes=((6, 6),))
    with caplog.at_level(logging.WARNING, logger="deltainf"):
        load_image_folder(tmp_path, "train", size=6)
    assert caplog.text == ""  # at their own size
    with caplog.at_level(logging.WARNING, logger="deltainf"):
        load_image_folder(tmp_path, "train", size=12)
    assert "the images are 6 px or smaller; they are enlarged to 12 px" in caplog.text


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    # one class folder: root/train/images/<class>/... read every image as class 0
    with pytest.raises(ValueError, match="one class folder \\('empty'\\) under .*; a classifier needs two or more"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "full").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "train" / "full" / "a.png")
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "empty" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="val"):
        load_image_folder(tmp_path, "val")


def test_image_folder_val_with_unknown_class(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "val" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "zebra" / "z.png")
    with pytest.raises(ValueError, match="zebra"):
        load_image_folder(tmp_path, "val", size=8)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_determinism_and_learnability():
    a = make_synthetic_dataset(400, channels=3, height=12, width=10, num_classes=4, seed=3)
    b = make_synthetic_dataset(400, channels=3, height=12, width=10, num_classes=4, seed=3)
    t = make_synthetic_dataset(200, channels=3, height=12, width=10, num_classes=4, seed=3, split="test")
    assert a.images.shape == (400, 3, 12, 10) and torch.equal(a.images, b.images)
    assert a.class_counts().tolist() == [100] * 4
    assert not torch.equal(a.images[:200], t.images)
    # class structure is shared by train and test: nearest class mean is far above chance (0.25)
    means = torch.stack([a.images[a.labels == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(t.images.flatten(1), means).argmin(1)
    assert float((pred == t.labels).float().mean()) > 0.8


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_dataset(10, num_classes=1)
    with pytest.raises(ValueError, match="n must be"):
        make_synthetic_dataset(0)


# ----------------------------------------------------------------------------- loaders
def test_make_loader_seeded_order_and_coverage():
    d = _toy(n=10)
    def order(loader):
        return torch.cat([b[2] for b in loader]).tolist()
    l1, l2 = make_loader(d, 3, shuffle=True, seed=7), make_loader(d, 3, shuffle=True, seed=7)
    e1, e2 = order(l1), order(l2)
    assert e1 == order(make_loader(d, 3, shuffle=True, seed=7)) and sorted(e1) == list(range(10))
    assert order(l1) == order(l2)  # second epochs agree too
    assert e1 != order(make_loader(d, 3, shuffle=True, seed=8))
    assert order(make_loader(d, 4)) == list(range(10))
    x, y, i = next(iter(make_loader(d, 4)))
    assert x.shape == (4, 3, 4, 4) and y.dtype == torch.int64 and i.dtype == torch.int64
    assert [len(b[2]) for b in make_loader(d, 4, drop_last=True)] == [4, 4]


def test_make_loader_generic_dataset_and_errors():
    td = TensorDataset(torch.rand(5, 2), torch.arange(5))
    batches = list(make_loader(td, 2, shuffle=True, seed=0))
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(5))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(td, 0)


def test_a_shuffling_loader_is_read_in_dataset_order():
    """The passes read a loader that shuffles its whole dataset in dataset order, with its batches, collate function
    and drop_last; any other sampler stays as it is."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, WeightedRandomSampler
    from deltainf.data.loaders import in_dataset_order, positioned_batches

    d, td = _toy(n=10), TensorDataset(torch.rand(10, 2), torch.arange(10))
    ordered = in_dataset_order(make_loader(d, 3, shuffle=True, seed=7))  # a BatchSampler as the sampler
    assert [b[2].tolist() for b in ordered] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    collate = lambda items: tuple(torch.stack(v) * 2 for v in zip(*items))  # noqa: E731
    shuffled = DataLoader(td, batch_size=4, shuffle=True, drop_last=True, collate_fn=collate)
    assert [b[1].tolist() for b in in_dataset_order(shuffled)] == [[0, 2, 4, 6], [8, 10, 12, 14]]
    assert [i.tolist() for _, _, i, _ in positioned_batches(DataLoader(td, batch_size=4, shuffle=True))] == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for other in (DataLoader(td, batch_size=4), DataLoader(td, sampler=SubsetRandomSampler(range(3, 10))),
                  DataLoader(td, sampler=WeightedRandomSampler(torch.ones(10), 10)),
                  DataLoader(td, sampler=torch.utils.data.RandomSampler(td, replacement=True)), [(1, 2)]):
        assert in_dataset_order(other) is other
    # a subset sampler yielding positions: the examples both reads hold are compared, not the positions drawn
    from deltainf.data.loaders import first_batch_repeats
    indexed = TensorDataset(torch.rand(10, 2), torch.arange(10), torch.arange(10))
    assert first_batch_repeats(DataLoader(indexed, batch_size=8, sampler=SubsetRandomSampler(range(10))))


class _Stream(torch.utils.data.IterableDataset):
    """Ten (x, y) examples streamed in order; with several workers each streams them all (torch's default)."""

    def __iter__(self):
        return iter([(torch.full((2,), float(i)), i) for i in range(10)])


def _dropping(items):
    """A collate function that leaves out unreadable items (here: every odd label), as users write for bad files."""
    return torch.utils.data.default_collate([it for it in items if int(it[1]) % 2 == 0])


def test_loaders_whose_positions_cannot_be_counted_are_refused():
    """Positions counted along the batches are wrong, without a word, for an IterableDataset read by several workers
    (1,200 positions for 600 examples), a collate function that drops items (every later example moved), and a
    sampler that draws another subset on every read (each pass saw other examples): refused, naming the loader."""
    from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
    from deltainf.data.loaders import positioned_batches

    td = TensorDataset(torch.rand(10, 2), torch.arange(10))
    with pytest.raises(ValueError, match=r"^train_loader: its IterableDataset is read by 2 workers"):
        list(positioned_batches(DataLoader(_Stream(), batch_size=4, num_workers=2)))
    assert len(list(positioned_batches(DataLoader(_Stream(), batch_size=4)))) == 3
    with pytest.raises(ValueError, match=r"^train_loader: its batches held 5 examples, its dataset has 10"):
        list(positioned_batches(DataLoader(td, batch_size=4, collate_fn=_dropping)))
    for sampler, what in ((RandomSampler(td, num_samples=6), "RandomSampler draws 6 of its 10"),
                          (WeightedRandomSampler(torch.ones(10), 6, replacement=False),
                           "WeightedRandomSampler draws 6 of its 10")):
        with pytest.raises(ValueError, match=rf"^train_loader: its {what} examples anew on every read"):
            list(positioned_batches(DataLoader(td, batch_size=4, sampler=sampler)))
    with pytest.raises(TypeError, match=r"^train_loader: its DataLoader cannot make tensors of its items .* ToTensor"):
        list(positioned_batches(DataLoader([(object(), 1)] * 3, batch_size=2)))
    with pytest.raises(TypeError, match=r"^train_loader: a batch holds one label, not one per example"):
        list(positioned_batches(DataLoader(td, batch_size=None)))
    # a batch sampler that drops its last batch is not a collate function that drops items
    dropping = DataLoader(td, batch_sampler=torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(td), batch_size=4, drop_last=True))
    assert len(list(positioned_batches(dropping))) == 2


def test_labels_and_controls_come_from_what_the_loaders_yield():
    """A collate function that relabels: the candidates' labels are the yielded ones (the TensorDataset's stored
    labels were read); a reference DataLoader: its sampler (a held-out split) and collate function (a
    standardisation) decide the controls (its dataset was indexed directly: controls from the training part)."""
    from torch.utils.data import DataLoader, SubsetRandomSampler
    from deltainf.delta import pick_controls, training_labels

    td = TensorDataset(torch.rand(10, 2), torch.arange(10) + 1)
    shift = lambda items: (torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]) - 1)  # noqa: E731
    assert training_labels(DataLoader(td, batch_size=4, collate_fn=shift), 10).tolist() == list(range(10))
    assert training_labels(DataLoader(td, batch_size=4), 10).tolist() == list(range(1, 11))
    whole = TensorDataset(torch.arange(20.0)[:, None].expand(20, 3).clone(), torch.zeros(20, dtype=torch.int64))
    held_out = DataLoader(whole, batch_size=4, sampler=SubsetRandomSampler(range(12, 20)))
    x, y = pick_controls(None, held_out, torch.tensor([0]), count=5)
    assert y.tolist() == [0] * 5 and set(x[:, 0].tolist()) <= set(range(12, 20))
    doubled = DataLoader(whole, batch_size=4, collate_fn=lambda b: (torch.stack([v for v, _ in b]) * 2,
                                                                    torch.stack([c for _, c in b])))
    assert pick_controls(None, doubled, torch.tensor([0]), count=3)[0][:, 0].tolist() == [0.0, 2.0, 4.0]
    with pytest.raises(TypeError, match=r"^reference: its items must be \(x, y, ...\) with x a tensor"):
        pick_controls(None, [(object(), 0)] * 3, torch.tensor([0]), count=2)


# ----------------------------------------------------------------------------- spec parser
def test_parse_dataset_spec(cifar10_dir, tmp_path):
    train, test = parse_dataset_spec("digits")
    assert len(train) == 1437 and len(test) == 360
    train, test = parse_dataset_spec("synthetic:50")
    assert len(train) == 50 and len(test) == 10 and train.image_shape == (3, 32, 32)
    root, _ = cifar10_dir
    train, test = parse_dataset_spec(f"cifar10:{root}")
    assert len(train) == 15 and len(test) == 3
    _make_folder(tmp_path / "folder")
    train, test = parse_dataset_spec(f"imagefolder:{tmp_path / 'folder'}", size=8)
    assert train.image_shape == (3, 8, 8)


@pytest.mark.parametrize("spec, match", [("mnist", "valid specs: digits"), ("cifar10", "needs a path"),
                                         ("synthetic:abc", "integer"), ("digits:x", "no argument"), ("", "non-empty")])
def test_parse_dataset_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_dataset_spec(spec)
    assert "imagefolder:PATH" in DATASET_SPECS
