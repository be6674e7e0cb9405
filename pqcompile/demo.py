"""``pqcompile demo``: the shipped Fashion-MNIST ResNet-20, compressed and built for arm and host.

Loads the pretrained checkpoint (checksum-verified), measures its accuracy on the real 10k test
set, compresses it to the budget (default: 60x fewer BOPs than FP32) with FIT sensitivities
from training batches, the ILP solver (weights 2/4/8 bits, activations 4/5/6/8) and a short
QAT fine-tune, builds the integer program for
the host and for aarch64, measures the compiled host program's accuracy on the same 10k
images, and writes both artifacts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .api import compile
from .budget import Budget
from .data import fashion_mnist_loaders
from .zoo import evaluate, pretrained_resnet20_fashion

BATCH = 100  # the artifact's static batch size; 10k test images = 100 calls
# Weights 2/4/8 bits; activations 4/5/6/8 (stored in 8-bit bytes whatever their bits, so the
# finer options cost no storage and give the solver finer BOP trade-offs).
BIT_OPTIONS = tuple((w, a) for w in (2, 4, 8) for a in (4, 5, 6, 8))


def artifact_predictions(compiled, loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    art, ref, labels = [], [], []
    for x, y in loader:
        if x.shape[0] != BATCH:
            raise ValueError(f"the test loader must give batches of {BATCH}")
        art.append(np.argmax(compiled(x.numpy()), axis=1))
        with torch.no_grad():
            ref.append(compiled.reference(x).argmax(1).numpy())
        labels.append(y.numpy())
    return np.concatenate(art), np.concatenate(ref), np.concatenate(labels)


def run_demo(out: str | Path = "pqcompile-demo", budget: str = "bops=60x",
             finetune_batches: int = 150, epochs: int = 1, log=print,
             progress: bool = True) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    model = pretrained_resnet20_fashion()
    loaders = fashion_mnist_loaders(128, augment=True, eval_batch_size=BATCH)
    correct, total = evaluate(model, loaders.test)
    fp_acc = correct / total
    log(f"FP32 ResNet-20 on the Fashion-MNIST test set: {fp_acc:.2%} ({correct}/{total})")
    example = next(iter(loaders.test))[0]
    compiled = compile(model, (example,), target="host", budget=Budget.parse(budget),
                       data=loaders.train, solver="ilp", bit_options=BIT_OPTIONS,
                       finetune={"epochs": epochs, "max_batches": finetune_batches,
                                 "lr": 0.01, "distill": True},
                       progress=progress)
    log(compiled.report())
    art, ref, labels = artifact_predictions(compiled, loaders.test)
    acc_art, acc_ref = float((art == labels).mean()), float((ref == labels).mean())
    agree = float((art == ref).mean())
    log(f"compiled host program: {acc_art:.2%}; fake-quant reference: {acc_ref:.2%}; "
        f"same prediction on {agree:.2%} of {len(labels)} images; FP32 {fp_acc:.2%}")
    host_dir = compiled.save(out / "host", overwrite=True)
    arm_dir = compiled.retarget("arm").save(out / "arm", overwrite=True)
    plots = compiled.plots(out / "plots")
    log(f"artifacts: {host_dir} (host), {arm_dir} (aarch64; run runner.py there); plots: "
        + ", ".join(str(p) for p in plots))
    log(f"demo took {time.perf_counter() - t0:.0f} s")
    return {"fp32_accuracy": fp_acc, "accuracy": acc_art, "reference_accuracy": acc_ref,
            "agreement": agree, "bop_reduction": compiled.totals["bop_reduction"]}
