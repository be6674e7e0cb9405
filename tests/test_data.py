"""Offline datasets (pqcompile.data) and the shipped pretrained checkpoint (pqcompile.zoo)."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from pqcompile import data, zoo

# The data is installed by scripts/setup.sh; missing data fails with the loader's message
# (what to install), it is never skipped.


def write_idx(folder, prefix, images, labels, *, compress=True, image_magic=0x803):
    """Write an IDX image/label pair like the upstream files (gzip or raw)."""
    n, h, w = images.shape
    blobs = {f"{prefix}-images-idx3-ubyte": image_magic.to_bytes(4, "big")
             + b"".join(d.to_bytes(4, "big") for d in (n, h, w)) + images.tobytes(),
             f"{prefix}-labels-idx1-ubyte": (0x801).to_bytes(4, "big") + n.to_bytes(4, "big")
             + labels.tobytes()}
    for name, blob in blobs.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_files(split, count):
    images, labels = data.load_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    # Fashion-MNIST is balanced: every class has a tenth of each split.
    assert torch.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_loaders_shapes_padding_and_normalization():
    loaders = data.fashion_mnist_loaders(64, val_split=0.1, eval_batch_size=500)
    assert (len(loaders.train.dataset), len(loaders.val.dataset),
            len(loaders.test.dataset)) == (54000, 6000, 10000)
    x, y = next(iter(loaders.test))
    assert x.shape == (500, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    spec = data.DATASETS["fashion_mnist"]
    background = -spec.mean / spec.std
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(),
                        x[..., :2].flatten(), x[..., -2:].flatten()])
    torch.testing.assert_close(border, torch.full_like(border, background))
    raw, _ = data.load_fashion_mnist("test")
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], (raw[:500].float() / 255 - spec.mean)
                               / spec.std)
    xt, yt = next(iter(loaders.train))
    assert xt.shape == (64, 1, 32, 32) and yt.shape == (64,)


def test_val_split_is_disjoint_from_train():
    loaders = data.fashion_mnist_loaders(128, val_split=0.05, seed=3)
    train = loaders.train.dataset.images.flatten(1)
    val = loaders.val.dataset.images.flatten(1)
    assert len(train) + len(val) == 60000
    # A partition covers every distinct image of the train split (the raw data has duplicates,
    # so compare distinct images rather than counts).
    full, _ = data.load_fashion_mnist("train")
    rows = {bytes(r.numpy()) for r in torch.nn.functional.pad(full, (2, 2, 2, 2)).flatten(1)}
    assert len({bytes(r.numpy()) for r in train} | {bytes(r.numpy()) for r in val}) == len(rows)


@pytest.mark.parametrize("augment", [False, True])
def test_loaders_deterministic_by_seed(augment):
    def first_batches(seed):
        loader = data.fashion_mnist_loaders(32, seed=seed, augment=augment,
                                            train_subset=256).train
        return [x for x, _ in loader][:3]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for xa, xb in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])


def test_augmentation_shifts_and_flips_within_bounds():
    plain = data.fashion_mnist_loaders(256, train_subset=256).train.dataset
    aug = data.fashion_mnist_loaders(256, train_subset=256, augment=True).train.dataset
    indices = list(range(256))
    x = torch.stack([s[0] for s in plain.__getitems__(indices)])
    xa = torch.stack([s[0] for s in aug.__getitems__(indices)])
    assert xa.shape == x.shape and not torch.equal(x, xa)
    # Shifts of at most 4 px and zero padding never create ink: the ink sums can only shrink.
    ink = (x - x.amin()).sum((1, 2, 3))
    ink_aug = (xa - xa.amin()).sum((1, 2, 3))
    assert bool((ink_aug <= ink + 1e-3).all())


def test_calibration_batches():
    batches = list(data.calibration_batches(3, 16))
    assert [tuple(b.shape) for b in batches] == [(16, 1, 32, 32)] * 3
    again = list(data.calibration_batches(3, 16))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="exceed"):
        next(data.calibration_batches(1000, 100))


def test_mnist_files_and_loaders():
    train, train_labels = data.load_mnist("train")
    test, _ = data.load_mnist("test")
    assert train.shape == (60000, 28, 28) and test.shape == (10000, 28, 28)
    assert train_labels.dtype == torch.int64 and int(train_labels.max()) == 9
    x, _ = next(iter(data.mnist_loaders(8).test))
    assert x.shape == (8, 1, 32, 32)


def test_missing_root_names_the_package(tmp_path):
    message = "install the Debian package dataset-fashion-mnist"
    with pytest.raises(FileNotFoundError, match=message + r".*or pass root="):
        data.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=message):
        data.load_fashion_mnist("test", root=tmp_path / "absent")


def test_raw_and_gzip_idx_files_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, 2], dtype=np.uint8)
    write_idx(tmp_path, "train", images, labels, compress=False)
    write_idx(tmp_path, "t10k", images[:2], labels[:2])
    x, y = data.load_fashion_mnist("train", root=tmp_path)
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == [0, 3, 9, 1, 2]
    assert data.load_fashion_mnist("test", root=tmp_path)[0].shape == (2, 28, 28)

    bad = tmp_path / "bad"
    bad.mkdir()
    write_idx(bad, "train", images, labels, image_magic=0x801)
    with pytest.raises(ValueError, match="magic number"):
        data.load_fashion_mnist("train", root=bad)
    short = tmp_path / "short"
    short.mkdir()
    write_idx(short, "train", images, labels, compress=False)
    blob = (short / "train-images-idx3-ubyte").read_bytes()
    (short / "train-images-idx3-ubyte").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match="truncated"):
        data.load_fashion_mnist("train", root=short)


@pytest.mark.parametrize("kwargs,match", [
    ({"resize": 29}, "resize"), ({"resize": 24}, "resize"), ({"val_split": 1.0}, "val_split"),
    ({"train_subset": 0}, "train_subset")])
def test_loader_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.fashion_mnist_loaders(8, **kwargs)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="fashion_mnist, mnist"):
        data.get_loaders("cifar10", 8)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_fashion_mnist("validation")


@pytest.mark.slow
def test_pretrained_accuracy_matches_record():
    # About 30 s of one CPU core: a full forward pass over the 10,000 test images.
    record = zoo.provenance("resnet20_fashion_mnist")
    model = zoo.pretrained_resnet20_fashion()
    assert not model.training
    batch = int(record["eval_protocol"].split("batches of ")[1].split(",")[0])
    test = data.fashion_mnist_loaders(batch, eval_batch_size=batch).test
    correct, total = zoo.evaluate(model, test)
    assert total == record["test_total"] == 10000
    assert correct == record["test_correct"]
    assert record["test_accuracy"] == round(100 * correct / total, 2)


def test_pretrained_rejects_altered_or_missing_file(tmp_path, monkeypatch):
    for name in ("resnet20_fashion_mnist.pt", "resnet20_fashion_mnist.json"):
        shutil.copy(zoo.WEIGHTS_DIR / name, tmp_path / name)
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    weights = tmp_path / "resnet20_fashion_mnist.pt"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="altered or replaced"):
        zoo.pretrained_resnet20_fashion()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        zoo.pretrained_resnet20_fashion()
