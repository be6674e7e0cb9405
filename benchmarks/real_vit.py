"""A small vision transformer trained here on Fashion-MNIST, compressed and compiled.

:class:`ViT`: non-overlapping ``patch x patch`` patches embedded by a strided convolution, a
learned position table, ``depth`` pre-norm encoder blocks (multi-head self-attention written
with ``matmul``/``softmax``, a GELU MLP), mean pooling over the tokens and a linear head.
:func:`trained_vit` trains it for ``epochs`` on the 60k training images (a few minutes on two
CPU cores) and caches the weights in ``~/.cache/pqcompile`` (nothing is committed, nothing
downloads: the images come from the Debian package ``dataset-fashion-mnist`` that
``scripts/setup.sh`` installs).

:func:`vit_rows`: test accuracy on the 10k test images of FP32, uniform int8 and
``pqcompile.compile`` under weight-byte budgets (the ILP on Fisher sensitivities of the
distillation objective), with program == reference checked on every test image.

    python benchmarks/real_vit.py          # prints one JSON row per configuration
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CACHE = Path.home() / ".cache" / "pqcompile"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training pixel mean and std (0..1 scale)


class Attention(nn.Module):
    """Multi-head self-attention: q, k, v projections, softmax(q k^T / sqrt(d)) v, output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        y = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class Block(nn.Module):
    """A pre-norm encoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A vision transformer for 1 x 28 x 28 images (module docstring)."""

    def __init__(self, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp: int = 128, classes: int = 10, image: int = 28) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def images(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` normalized, ``(N, 1, 28, 28)`` float32, and the labels."""
    from pqcompile.data import load_fashion_mnist

    x, y = load_fashion_mnist(split)
    x, y = x[:n], y[:n]
    return ((x.float() / 255 - MEAN) / STD).unsqueeze(1), y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, *,
          batch: int = 128, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """AdamW with a cosine schedule on ``(x, y)``; returns ``model`` in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch):
            idx = order[s:s + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def trained_vit(epochs: int = 2, **shape: int) -> ViT:
    """The ViT trained on the 60k training images (cached in ``~/.cache/pqcompile``)."""
    key = "_".join(f"{k}{v}" for k, v in sorted(shape.items()))
    path = CACHE / f"vit_fashion_mnist_e{epochs}{'_' + key if key else ''}.pt"
    model = ViT(**shape)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    model = ViT(**shape)
    x, y = images("train")
    train(model, x, y, epochs)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def accuracy(fn, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of ``fn`` over ``x`` in batches of ``batch`` (the program's traced batch
    size: the last partial batch is padded with copies) and the logits."""
    out = []
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        if len(xb) < batch:
            xb = torch.cat([xb, xb[:1].expand(batch - len(xb), -1, -1, -1)])
        with torch.no_grad():
            z = fn(xb)
        z = z.numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
        out.append(z[:min(batch, len(x) - s)])
    logits = np.concatenate(out)
    return float((logits.argmax(1) == y.numpy()).mean()), logits


def vit_rows(ratios: tuple[str, ...] = ("4x", "6x"), batch: int = 100,
             calibration: int = 8, test: int | None = None) -> list[dict]:
    """FP32, uniform int8 and weight-byte budgets on the test set (module docstring)."""
    from pqcompile import compile as pq_compile
    from pqcompile.budget import Budget, InfeasibleBudgetError
    from pqcompile.build import analysis, compile_assignment
    from pqcompile.presets import uniform

    model = trained_vit()
    xt, yt = images("train", calibration * batch)
    data = [(xt[s:s + batch], yt[s:s + batch]) for s in range(0, len(xt), batch)]
    x, y = images("test", test)
    acc32, _ = accuracy(model, x, y, batch)
    rows = [{"model": "vit_fashion_mnist", "mode": "fp32", "accuracy": acc32}]
    example = (x[:batch],)
    gm = analysis(model, example)
    builds = [("int8", compile_assignment(model, example, uniform(gm, 8), target="host",
                                          calibration=[b[0] for b in data],
                                          observer="percentile"))]
    for ratio in ratios:
        try:
            builds.append((f"weight_bytes={ratio}", pq_compile(
                model, example, target="host", budget=Budget(weight_bytes=ratio), data=data,
                calibration_batches=calibration, sensitivity_batches=calibration,
                observer="percentile", bit_options=[(8, 8), (4, 8), (2, 8)],
                keep_levels=(1.0,), pareto_points=0)))
        except InfeasibleBudgetError as exc:  # the message names the smallest reachable size
            rows.append({"model": "vit_fashion_mnist", "mode": f"weight_bytes={ratio}",
                         "feasible": False, "refused": str(exc)})
    for mode, c in builds:
        acc, program = accuracy(lambda b: c(b.numpy()), x, y, batch)
        _, reference = accuracy(lambda b: c.reference(b), x, y, batch)
        bits = [b.weight for b in c.assignment.bits.values()]
        rows.append({
            "model": "vit_fashion_mnist", "mode": mode, "accuracy": acc,
            "accuracy_delta": acc - acc32,
            "linear_weight_bits": {str(b): bits.count(b) for b in sorted(set(bits))},
            "sqnr_db": c.fidelity["sqnr_db"], "weight_bytes": c.totals["weight_bytes"],
            "predicted_weight_bytes": c.totals["predicted_weight_bytes"],
            "fp32_weight_bytes": c.totals["fp32_weight_bytes"],
            "weight_reduction": c.totals["fp32_weight_bytes"] / c.totals["weight_bytes"],
            "program_vs_reference": float(np.abs(program - reference).max())})
    return rows


if __name__ == "__main__":
    for row in vit_rows(tuple(sys.argv[1:]) or ("4x", "6x")):
        print(json.dumps(row), flush=True)
