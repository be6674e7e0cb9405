"""Shared by the accuracy benchmarks: one compression point on Fashion-MNIST ResNet-20.

Every point is measured the same way: ``pqcompile.compile`` with the given solver and budget
(FIT sensitivities on 16 training batches), the same QAT fine-tune, the host build, and the
compiled integer program's top-1 accuracy on the real 10k test set (with the fake-quant
reference's predictions for agreement).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pqcompile.api import compile  # noqa: E402
from pqcompile.budget import Budget  # noqa: E402
from pqcompile.data import fashion_mnist_loaders  # noqa: E402
from pqcompile.demo import BATCH  # noqa: E402
from pqcompile.zoo import evaluate, pretrained_resnet20_fashion  # noqa: E402


class Setup:
    """The pretrained model, its loaders (with a 5k validation split for searching solvers'
    rewards) and its FP32 test accuracy. :meth:`train` gives each point a fresh training
    loader, so a point's data order depends on its seed only, not on the points run
    before it in the same process."""

    def __init__(self) -> None:
        self.model = pretrained_resnet20_fashion()
        self.loaders = fashion_mnist_loaders(128, augment=True, eval_batch_size=BATCH)
        correct, total = evaluate(self.model, self.loaders.test)
        self.fp32 = correct / total
        self.example = next(iter(self.loaders.test))[0]
        val = fashion_mnist_loaders(128, val_split=1 / 12, eval_batch_size=BATCH).val
        self.validation = [b for _, b in zip(range(8), val)]

    def train(self, seed: int = 0):
        """A training loader whose shuffling and augmentation start from ``seed``."""
        return fashion_mnist_loaders(128, augment=True, eval_batch_size=BATCH, seed=seed).train


def finetune_options(steps: int) -> dict[str, Any]:
    return {"epochs": 1, "max_batches": steps, "lr": 0.01, "distill": True}


def predictions(compiled, loader, program_batches: int | None = None):
    """Predictions of the compiled program (on the first ``program_batches`` batches, default
    all) and of its integer-exact reference (all), with the labels."""
    import numpy as np
    import torch

    art, ref, labels = [], [], []
    for i, (x, y) in enumerate(loader):
        if program_batches is None or i < program_batches:
            art.append(np.argmax(compiled(x.numpy()), axis=1))
        with torch.no_grad():
            ref.append(compiled.reference(x).argmax(1).numpy())
        labels.append(y.numpy())
    return np.concatenate(art), np.concatenate(ref), np.concatenate(labels)


def run_point(setup: Setup, label: str, solver: str, budget: str, steps: int,
              solver_options: dict | None = None, program_batches: int | None = None,
              bit_options=None, seed: int = 0) -> dict[str, Any]:
    """One point; accuracy of the compiled program on the whole test set, or (with
    ``program_batches``) of the integer-exact reference, the program checked against it on
    the first ``program_batches`` batches. ``seed``: the training data order (shuffling and
    augmentation) and compile's seed."""
    t = time.perf_counter()
    c = compile(setup.model, (setup.example,), target="host", budget=Budget.parse(budget),
                data=setup.train(seed), validation=setup.validation, solver=solver,
                solver_options=solver_options, finetune=finetune_options(steps),
                bit_options=bit_options, seed=seed)
    total = time.perf_counter() - t
    art, ref, labels = predictions(c, setup.loaders.test, program_batches)
    n = len(art)
    return {"method": label, "solver": solver, "family": solver, "budget": budget,
            "seed": seed, "finetune_steps": steps,
            "bop_reduction": c.totals["bop_reduction"], "bops": c.totals["bops"],
            "accuracy": float((art == labels[:n]).mean()) if program_batches is None
            else float((ref == labels).mean()),
            "reference_accuracy": float((ref == labels).mean()),
            "agreement": float((art == ref[:n]).mean()), "agreement_images": n,
            "weight_kb": c.totals["weight_bytes"] / 1e3,
            "search_seconds": c.timings["solve"],
            "compile_seconds": total,
            "bits": {k: list(v) for k, v in c.solution.bits.items()},
            "kept": {str(k): v for k, v in c.solution.kept.items()}}


def print_row(row: dict[str, Any], fp32: float) -> None:
    print(f"{row['method']:28s} {row['bop_reduction']:6.1f}x  acc {row['accuracy']:.2%} "
          f"(FP32 {fp32:.2%}, {100 * (row['accuracy'] - fp32):+.2f} pt)  "
          f"agree {row['agreement']:.2%}  {row['weight_kb']:.1f} KB  "
          f"search {row['search_seconds']:.1f} s  total {row['compile_seconds']:.0f} s",
          flush=True)


def save(rows: list[dict[str, Any]], fp32: float, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fp32_accuracy": fp32, "rows": rows}, indent=1))
