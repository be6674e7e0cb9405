"""Small trained models on real data (sklearn digits, 8x8) for the searching solvers' tests:
a residual CNN, a Linear-only MLP and a small transformer encoder, each with the
:class:`~pqcompile.solvers.search.SearchContext` its solver is handed inside ``compile``."""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import nn

from pqcompile.build import analysis
from pqcompile.passes.sensitivity import (
    SensitivityAnalysis,
    channel_importance,
    layer_sensitivities,
)
from pqcompile.solvers import build_problem
from pqcompile.solvers.search import SearchContext

from training import train_steps


class DigitsCNN(nn.Module):
    """conv-BN-ReLU, a strided conv, a residual block (a tied channel group), pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32),
                                   nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                   nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = self.down(self.stem(x))
        y = torch.relu(y + self.block(y))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64),
                                 nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class DigitsEncoder(nn.Module):
    """A one-block pre-norm transformer encoder over the image's 8 rows as tokens: embedding,
    two-head self-attention (q/k/v/out projections), a ReLU feed-forward, mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 2, ffn: int = 64):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2)) + self.pos  # (B, 1, 8, 8) -> 8 tokens of 8
        b, n, d = t.shape
        h = self.ln1(t)

        def split(z):
            return z.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = torch.softmax(split(self.q(h)) @ split(self.k(h)).transpose(-1, -2)
                          / (d // self.heads) ** 0.5, -1) @ split(self.v(h))
        t = t + self.out(a.transpose(1, 2).reshape(b, n, d))
        t = t + self.ff2(torch.relu(self.ff1(self.ln2(t))))
        return self.head(t.mean(1))


MODELS = {"cnn": DigitsCNN, "mlp": DigitsMLP, "encoder": DigitsEncoder}


@functools.lru_cache(maxsize=None)
def digits(batch: int = 64) -> tuple[list, list]:
    """``(train, test)`` lists of ``(x, y)`` batches: 1,437 / 360 images, scaled to [0, 1]."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    n = int(0.8 * len(y))
    split = [(x[:n], y[:n]), (x[n:], y[n:])]
    return tuple([(xs[i:i + batch], ys[i:i + batch]) for i in range(0, len(ys) - batch + 1, batch)]
                 for xs, ys in split)


@functools.lru_cache(maxsize=None)
def trained(name: str) -> nn.Module:
    """``name`` trained briefly on digits (deterministic); tests must deep-copy before changing."""
    torch.manual_seed(0)
    train, _ = digits()
    return train_steps(MODELS[name](), train, 400)


def accuracy(model: nn.Module, batches) -> float:
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def context(name: str, criterion: str | None = "fisher", seed: int = 0) -> SearchContext:
    """The problem and search context ``compile`` would hand a searching solver."""
    model = trained(name)
    train, test = digits()
    gm = analysis(model, (train[0][0],))
    scored = SensitivityAnalysis(criterion, train[:8])(gm).graph_module
    importance = channel_importance(scored)
    problem = build_problem(scored, layer_sensitivities(scored), importance)
    return SearchContext(problem, scored, teacher=model, data=train, held_out=test[:3],
                         channel_scores=importance, seed=seed)


def bops_ratio(ctx: SearchContext, solution) -> float:
    return ctx.problem.reference["bops"] / solution.costs["bops"]





def digits_train() -> list:
    """The digits training batches (a ``--data`` factory for the CLI tests)."""
    return digits()[0]
