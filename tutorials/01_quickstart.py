"""Quickstart: compress a real trained model, compile it, save it, load it, check it.

What this teaches, in five steps:

1. load the shipped Fashion-MNIST ResNet-20 (checksum-verified weights) and real data;
2. ``pqcompile.compile(model, example_inputs, target=..., budget=..., data=...)``: search
   bits per layer and kept channels under a BOP budget, quantize, lower to integers, build;
3. read ``compiled.report()`` (bits, channels, MACs, BOPs, bytes per layer);
4. save the artifact directory and load it back (every file's sha256 is verified);
5. run the loaded program on real test images: its accuracy against the float model, and its
   outputs against the fake-quant reference (``compiled.reference``), bit for bit.

Run: python tutorials/01_quickstart.py   (about 35 s on an idle 2-core machine)
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pqcompile
from pqcompile.runtime.artifact import Artifact  # (not re-exported as pqcompile.Artifact yet)
from pqcompile.data import fashion_mnist_loaders
from pqcompile.zoo import pretrained_resnet20_fashion, provenance

t_start = time.perf_counter()
torch.manual_seed(0)

# --- 1. A trained model and real data -----------------------------------------------------------
# ResNet-20 trained on Fashion-MNIST; inputs are 1 x 32 x 32 (28 x 28 images zero-padded).
model = pretrained_resnet20_fashion()
print(f"FP32 test accuracy recorded when it was trained: "
      f"{provenance('resnet20_fashion_mnist')['test_accuracy']:.2f}%")

# Training batches feed the sensitivity analysis and the calibration; the test batches of 100
# images are what we measure on. The compiled program has a fixed batch size: the example
# input's (100 here).
BATCH = 100
loaders = fashion_mnist_loaders(128, eval_batch_size=BATCH)
example = next(iter(loaders.test))[0]  # a (100, 1, 32, 32) float32 batch

# --- 2. Compress and compile ------------------------------------------------------------------
# budget: 30 times fewer bit operations (BOPs = MACs x weight bits x activation bits) than FP32
# (uniform 8-bit gives 16x; 30x needs 4-bit weights in most layers).
# data: real batches, so FIT (Fisher) sensitivities (on sensitivity_batches=8 batches here; 16
# by default) and real calibration ranges are used.
# target="host" builds for this machine so we can run it here. For a 64-bit Arm board use
# target="arm" (or "arm-dotprod", or a TVM tag such as "arm/rasp4b64"): the library is then
# cross-linked with aarch64-linux-gnu-gcc and runs on the board with the artifact's runner.py
# (or here under QEMU with compiled.artifact.run_emulated(x)). compiled.retarget("arm") builds
# the same program for arm without compressing again.
# finetune={"epochs": 1, "max_batches": 150, "lr": 0.01} adds a short QAT fine-tune: slower,
# and what `pqcompile demo` uses to reach 60x within 0.7 pt of FP32.
# pareto_points=0: skip measuring the accuracy of other candidates for the report's Pareto
# plot (saves tens of seconds here).
compiled = pqcompile.compile(model, (example,), target="host",
                             budget=pqcompile.Budget(bops="30x"), data=loaders.train,
                             solver="ilp", sensitivity_batches=8, pareto_points=0,
                             progress=True)

# --- 3. What was decided ----------------------------------------------------------------------
print(compiled.report())
totals = compiled.totals
assert totals["bop_reduction"] >= 30 * 0.999, totals["bop_reduction"]
assert totals["weight_bytes"] < totals["fp32_weight_bytes"] / 4  # 4/8-bit weights: >4x smaller

# --- 4. Save the artifact and load it back ----------------------------------------------------
with tempfile.TemporaryDirectory() as tmp:
    folder = compiled.save(Path(tmp) / "resnet20-host")
    print("artifact files:", sorted(p.name for p in folder.iterdir()))
    loaded = Artifact.load(folder)  # verifies every file's sha256 against the manifest
print(loaded)
manifest = loaded.manifest
print(f"manifest: target {manifest['target']['name']} ({manifest['target']['arch']}), input "
      f"{manifest['inputs'][0]['shape']} {manifest['inputs'][0]['dtype']}, "
      f"{manifest['totals']['bop_reduction']:.1f}x fewer BOPs")
assert manifest["target"]["name"] == "host"
assert manifest["inputs"][0]["shape"] == [BATCH, 1, 32, 32]

# --- 5. Run it on real test images -----------------------------------------------------------
# The loaded program takes numpy arrays and returns numpy logits. compiled.reference is the
# fake-quant torch model: the integer arithmetic, in torch. The program must equal it exactly.
N_BATCHES = 10  # 1,000 test images (the full 10k take ~100 s more here)
labels, fp32_pred, program_pred = [], [], []
identical = 0
with torch.no_grad():
    for i, (x, y) in enumerate(loaders.test):
        if i == N_BATCHES:
            break
        out = loaded(x.numpy())
        ref = compiled.reference(x).numpy()
        identical += int(np.array_equal(out, ref))  # bit for bit, not "close"
        program_pred.append(out.argmax(1))
        fp32_pred.append(model(x).argmax(1).numpy())
        labels.append(y.numpy())
labels, fp32_pred, program_pred = map(np.concatenate, (labels, fp32_pred, program_pred))
fp32_acc = float((fp32_pred == labels).mean())
program_acc = float((program_pred == labels).mean())
print(f"on {len(labels)} test images: FP32 {fp32_acc:.2%}, compiled program {program_acc:.2%} "
      f"({program_acc - fp32_acc:+.2%}); program == reference on {identical}/{N_BATCHES} "
      f"batches")

# Measured here: FP32 95.50%, compiled program 94.90% (-0.6 pt) on these 1,000 images,
# without fine-tuning. Allow 1.5 pt (other CPUs round float kernels differently).
MARGIN = 0.015
assert identical == N_BATCHES, "the compiled program must equal the reference bit for bit"
assert program_acc >= fp32_acc - MARGIN, (program_acc, fp32_acc)
print(f"quickstart OK in {time.perf_counter() - t_start:.0f} s")
