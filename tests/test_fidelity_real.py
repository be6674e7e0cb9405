"""Fidelity on a real pretrained model: torchvision's ImageNet MobileNetV2 on real photos.

The model, the 20 labelled ImageNet photos (held out) and the tuning photos (Pexels interior,
scikit-image, scikit-learn; disjoint from the held-out ones) are files that
``scripts/setup.sh`` installs (``benchmarks/real_models.py``). The model is compiled for the
host data-free (8-bit everywhere, 16x fewer BOPs) and with data (ILP at 24x fewer BOPs, FIT
sensitivities, a few QAT steps distilled from the FP32 model on crops of the tuning photos);
each built program must equal its integer reference and agree with FP32's top-1 on the
held-out photos. ``benchmarks/fidelity.py`` measures the same at 16x/32x/48x with 300 steps.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pqcompile
from pqcompile.quant.qmodules import Dequantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

real_models = pytest.importorskip("real_models")

BATCH = 4  # the programs' batch size: 20 held-out photos are 5 calls
# Measured here: 18 of 20 (data-free 8-bit, min/max ranges from 4 photos) and 14 of 20 (24x,
# 4 QAT steps); the thresholds leave one and two photos of margin.
AGREE_INT8 = 0.85
AGREE_24X = 0.60


@pytest.fixture(scope="module")
def bed():
    """(model, held-out photos, their labels, FP32 top-1, tuning split)."""
    try:
        model = real_models.mobilenet_v2_imagenet()
        split = real_models.photo_split()
    except FileNotFoundError as exc:  # CI runs setup.sh, so this is a set-up error, not a skip
        pytest.fail(str(exc))
    held = [p for p in split.held_out if p.label is not None]
    x = real_models.load_photos(held)
    labels = np.array([p.label for p in held])
    with torch.no_grad():
        fp32 = model(x).argmax(1).numpy()
    return model, x, labels, fp32, split


def run(compiled, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Program outputs, integer reference outputs, and their worst difference in output LSBs."""
    prog = np.concatenate([np.asarray(compiled(x[i:i + BATCH].numpy()))
                           for i in range(0, len(x), BATCH)])
    with torch.no_grad():
        ref = compiled.reference(x).numpy()
    step = [float(m.out.scale) for m in compiled.reference.modules()
            if isinstance(m, Dequantize)][-1]
    return prog, ref, float(np.abs(prog - ref).max() / step)


def test_fp32_on_the_labelled_photos(bed):
    model, x, labels, fp32, _ = bed
    # torchvision's checkpoint is 71.9% top-1 on ImageNet; these 20 photos are easier.
    assert (fp32 == labels).sum() == 18


def test_data_free_int8(bed):
    model, x, labels, fp32, split = bed
    example = real_models.load_photos(split.tuning[:BATCH])
    c = pqcompile.compile(model, (example,), target="host", budget="bops=16x",
                          bit_options=[(8, 8)], pareto_points=0)
    assert c.totals["bop_reduction"] == pytest.approx(16.0)
    prog, ref, lsb = run(c, x)
    assert lsb <= 1
    agree = (prog.argmax(1) == fp32).mean()
    print(f"\nMobileNetV2 8-bit data-free: agreement with FP32 {agree:.0%}, "
          f"top-1 {(prog.argmax(1) == labels).mean():.0%}, worst {lsb:.0f} LSB")
    assert agree >= AGREE_INT8


def test_with_data_qat(bed):
    model, x, labels, fp32, split = bed
    data = real_models.CropLoader(split.tuning, model, batches=4, batch_size=BATCH, seed=0)
    example = real_models.load_photos(split.tuning[:BATCH])
    c = pqcompile.compile(model, (example,), target="host", budget="bops=24x", data=data,
                          sensitivity_batches=2, calibration_batches=2, pareto_points=0,
                          finetune={"max_batches": 4, "lr": 1e-3, "distill_weight": 1.0})
    assert c.totals["bop_reduction"] >= 24 * 0.99
    prog, ref, lsb = run(c, x)
    assert lsb <= 1
    agree = (prog.argmax(1) == fp32).mean()
    print(f"\nMobileNetV2 24x with data (4 QAT steps): agreement with FP32 {agree:.0%}, "
          f"top-1 {(prog.argmax(1) == labels).mean():.0%}, worst {lsb:.0f} LSB")
    assert agree >= AGREE_24X


def test_crop_loader_rereads_the_same_crops(bed):
    """compile() reads its data several times (sensitivity, calibration, fine-tuning): the
    loader makes each batch when read, from its own seed, and must give the same crops and
    teacher labels on every pass while holding none of them."""
    model, _, _, _, split = bed
    loader = real_models.CropLoader(split.tuning, model, batches=2, batch_size=2, seed=3)
    first, second = list(loader), list(loader)
    assert len(loader) == 2 and len(first) == 2
    for (x1, y1), (x2, y2) in zip(first, second):
        assert x1.shape == (2, 3, 224, 224)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])
    with torch.no_grad():
        assert torch.equal(model(first[1][0]).argmax(1), first[1][1])
    with pytest.raises(IndexError):
        loader.batch(2)
