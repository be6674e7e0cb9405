"""Pretrained models shipped with pqcompile, verified against their recorded provenance.

Each checkpoint in ``pqcompile/weights/`` has a JSON record beside it (seed, recipe, test
accuracy, sha256) written by the script that trained it; loading checks the file's sha256 so a
damaged or substituted checkpoint fails loudly instead of silently changing results.

>>> model = pretrained_resnet20_fashion()
>>> model.training, provenance("resnet20_fashion_mnist")["test_total"]
(False, 10000)
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .models import CifarResNet, resnet20

__all__ = ["WEIGHTS_DIR", "evaluate", "file_sha256", "predict", "pretrained_resnet20_fashion",
           "provenance"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_RETRAIN = "python scripts/train_fashion_resnet20.py"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(name: str) -> dict:
    """The provenance record ``weights/<name>.json`` of a shipped checkpoint."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"provenance record {path} is missing; reinstall pqcompile or "
                                f"regenerate it with {_RETRAIN}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"provenance record {path} is not valid JSON ({exc}); reinstall "
                         f"pqcompile or regenerate it with {_RETRAIN}") from exc


def _load_verified(name: str) -> dict[str, torch.Tensor]:
    record = provenance(name)
    path = WEIGHTS_DIR / record["file"]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing; reinstall pqcompile (its package "
                                f"data must include pqcompile/weights/*) or run {_RETRAIN}")
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise ValueError(f"checkpoint {path} has sha256 {actual} but its provenance record "
                         f"says {record['sha256']}: the file was altered or replaced; restore "
                         f"it from the repository or regenerate both with {_RETRAIN}")
    return torch.load(path, map_location="cpu", weights_only=True)


def pretrained_resnet20_fashion() -> CifarResNet:
    """ResNet-20 (1 input channel, 10 classes) trained on Fashion-MNIST, in eval mode.

    Inputs are ``N x 1 x 32 x 32`` as produced by :func:`pqcompile.data.fashion_mnist_loaders`;
    its test accuracy and training recipe are in ``provenance("resnet20_fashion_mnist")``.
    """
    model = resnet20(num_classes=10, in_channels=1)
    model.load_state_dict(_load_verified("resnet20_fashion_mnist"))
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a copy of ``model`` in eval mode over every batch of ``loader``.

    The copy runs in ``channels_last`` memory format: on CPU that is about twice as fast for
    these small convolutions, and it is the protocol the recorded accuracies were measured with.
    """
    model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    logits, labels = [], []
    for images, target in loader:
        if images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        logits.append(model(images))
        labels.append(target)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader) -> tuple[int, int]:
    """``(correct, total)`` top-1 predictions of ``model`` over ``loader`` (see :func:`predict`)."""
    logits, labels = predict(model, loader)
    return int((logits.argmax(1) == labels).sum()), len(labels)
