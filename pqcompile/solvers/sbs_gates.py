"""The differentiable pieces of :mod:`pqcompile.solvers.sbs`: the bit-sharing quantizer
(one residual decomposition over a chain of bit widths, gated refinements) and the channel-group
pruning gates with their masks and closing costs, the thresholds' optimizer and the read-off's
channel ranking. The search network and the solver live in ``sbs.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..meta import ChannelGroup

__all__ = ["bit_chain", "bit_sharing", "discretize"]


# --- the bit-sharing quantizer ---------------------------------------------------------------


def discretize(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain ``bits``-bit quantization of ``z`` in [0, 1]: ``round(z (2^b - 1)) / (2^b - 1)``."""
    levels = 2 ** bits - 1
    return torch.floor(z * levels + 0.5) / levels


def bit_chain(bits: Sequence[int]) -> tuple[int, ...]:
    """The longest chain of ``bits`` ending at the highest, each dividing the next (ties: the
    one with the lowest start): the candidates bit sharing can nest exactly.

    >>> bit_chain((2, 4, 8)), bit_chain((2, 3, 4, 6, 8)), bit_chain((8,))
    ((2, 4, 8), (2, 4, 8), (8,))
    """
    values = sorted({int(b) for b in bits})
    if not values or values[0] < 1:
        raise ValueError(f"bit widths must be positive ints, got {list(bits)}")
    best: dict[int, tuple[int, ...]] = {}
    for b in values:
        chains = [best[a] + (b,) for a in best if b % a == 0]
        best[b] = max(chains, key=lambda c: (len(c), -c[0]), default=(b,))
    return best[values[-1]]


def _codes(z: torch.Tensor, bits: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Integer codes on the finest grid: the lowest level ``c_0`` and the residuals ``f_k r_k``,
    plus each gate's statistic (RMS of ``z - z_(k-1)`` in steps of ``s_(k-1)``)."""
    top = 2 ** bits[-1] - 1
    z = z.detach()
    parts, stats = [], []
    code = None  # the previous level's code, in its own units
    for k, b in enumerate(bits):
        levels = 2 ** b - 1
        scaled = z * levels
        if code is None:
            code = torch.floor(scaled + 0.5)
            parts.append(code * (top // levels))
            continue
        prev = 2 ** bits[k - 1] - 1
        stats.append((z * prev - code).pow(2).mean().sqrt())
        base = code * (levels // prev)  # the previous code on this grid (an integer)
        residual = torch.floor(scaled - base + 0.5)
        parts.append(residual * (top // levels))
        code = base + residual
    return parts, stats


def _combine(parts: Sequence[torch.Tensor], gates: Sequence[torch.Tensor], top: int
             ) -> torch.Tensor:
    acc = None
    for part, gate in zip(reversed(parts[1:]), reversed(list(gates))):
        acc = gate * (part if acc is None else part + acc)
    return (parts[0] if acc is None else parts[0] + acc) / top


def bit_sharing(z: torch.Tensor, bits: Sequence[int], gates: Sequence[torch.Tensor]
                ) -> torch.Tensor:
    """``z_0 + g_1 (eps_1 + g_2 (eps_2 + ...))`` for ``z`` in [0, 1] over the nested ``bits``
    (each dividing the next), one gate per refinement; gradient straight through to ``z`` and
    through the residuals to the gates."""
    bits = tuple(bits)
    if len(gates) != len(bits) - 1:
        raise ValueError(f"bits {bits} take {len(bits) - 1} gates, got {len(gates)}")
    if any(b % a for a, b in pairwise(bits)):
        raise ValueError(f"bit candidates must each divide the next (e.g. 2, 4, 8), got {bits}")
    parts, _ = _codes(z, bits)
    out = _combine(parts, gates, 2 ** bits[-1] - 1)
    return out + (z - z.detach())


def _gate(stat: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``1[stat > alpha]`` forward, ``sigmoid(stat - alpha)`` gradient (to ``alpha``)."""
    soft = torch.sigmoid(stat.detach() - alpha)
    return (stat.detach() > alpha).to(soft.dtype) + (soft - soft.detach())


def _nest(gates: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Finer first: a refinement gate counts as open while any finer one is (``g_k OR
    g_(k+1) OR ...``, as ``a + b - a b`` so the surrogate gradient flows). Closing the gates
    then walks 8 -> 4 -> 2 bits: while the finer gate is open the coarser one gets no cost
    gradient, where raw gates would close the coarse one first (it carries ``b_1 - b_0``
    plus every finer step of the expected bits) and drop a layer from 8 to 2 bits."""
    out: list[torch.Tensor] = []
    finer = None
    for g in reversed(list(gates)):
        finer = g if finer is None else g + finer - g * finer
        out.append(finer)
    return out[::-1]


def _expected_bits(bits: Sequence[int], gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """``b_0 + sum_k (b_k - b_(k-1)) g_1 ... g_k``: the bits the gates select."""
    total, opened = torch.tensor(float(bits[0]), dtype=torch.float64), None
    for (lo, hi), g in zip(pairwise(bits), gates):
        opened = g.double() if opened is None else opened * g.double()
        total = total + (hi - lo) * opened
    return total


def _running_mean(mean: torch.Tensor, seen: torch.Tensor, now: torch.Tensor,
                  momentum: float) -> None:
    """In place: ``mean`` takes ``now`` on the first update, then the exponential mean with
    ``momentum``; ``seen`` counts the updates."""
    m = 0.0 if int(seen) == 0 else momentum
    mean.mul_(m).add_((1 - m) * now)
    seen += 1


def _read_bits(bits: Sequence[int], gates: Sequence[bool]) -> int:
    chosen = bits[0]
    for b, g in zip(bits[1:], gates):
        if not g:
            break
        chosen = b
    return chosen


class _Quantizer(nn.Module):
    """Bit-sharing quantizer of one tensor: learnable log-range, one threshold per gate."""

    def __init__(self, bits: tuple[int, ...], amax: torch.Tensor, signed: bool,
                 momentum: float) -> None:
        super().__init__()
        self.bits, self.signed, self.momentum = bits, signed, momentum
        self.register_buffer("amax0", amax.detach().clone().clamp_min(1e-8))
        self.log_range = nn.Parameter(torch.zeros_like(self.amax0))
        self.alpha = nn.Parameter(torch.zeros(len(bits) - 1))
        self.register_buffer("stat_mean", torch.zeros(len(bits) - 1))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.gates: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.amax0 * self.log_range.exp()
        if self.signed:
            z = (torch.clamp(x / v, -1.0, 1.0) + 1) / 2
        else:
            z = torch.clamp(x / v, 0.0, 1.0)
        parts, stats = _codes(z, self.bits)
        if stats and self.training:
            with torch.no_grad():
                _running_mean(self.stat_mean, self.seen, torch.stack(stats), self.momentum)
        self.gates = _nest([_gate(s, a) for s, a in zip(stats, self.alpha)])
        z_hat = _combine(parts, self.gates, 2 ** self.bits[-1] - 1) + (z - z.detach())
        return (2 * z_hat - 1) * v if self.signed else z_hat * v

    def open_gates(self, stats: Sequence[torch.Tensor] | None = None) -> list[bool]:
        stats = self.stat_mean if stats is None else stats
        raw = [bool(s > a) for s, a in zip(stats, self.alpha.detach())]
        return [any(raw[k:]) for k in range(len(raw))]  # nested as in forward (_nest)


class _WeightQuantizer(_Quantizer):
    """The weight's quantizer; its gates depend on the weights only."""

    def open_weight_gates(self, w: torch.Tensor) -> list[bool]:
        with torch.no_grad():
            v = self.amax0 * self.log_range.exp()
            z = (torch.clamp(w / v, -1.0, 1.0) + 1) / 2
            return self.open_gates(_codes(z, self.bits)[1])


class _SBSLayer(nn.Module):
    """A conv2d/linear layer (shared, not copied) with bit-sharing weights and input."""

    def __init__(self, layer: nn.Module, weights: _WeightQuantizer,
                 activations: _Quantizer) -> None:
        super().__init__()
        self.layer, self.weights, self.activations = layer, weights, activations
        self.masks = nn.ModuleList()  # pruning gates on the input channels
        self.calibrating: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating is not None:
            self.calibrating["min"] = min(self.calibrating["min"], float(x.detach().min()))
            self.calibrating["max"] = max(self.calibrating["max"], float(x.detach().abs().max()))
            return self.layer(x)
        xq = self.activations(x)
        for mask in self.masks:
            xq = mask(xq)
        wq = self.weights(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(xq, wq, self.layer.bias)
        return F.linear(xq, wq, self.layer.bias)


# --- pruning gates ------------------------------------------------------------------------------


class _GroupGate(nn.Module):
    """Block gates of one channel group: ``g_p = 1[A_p > alpha]``, ``A_p`` the block's mean
    channel L1 norm of the producing weights, over the largest block's, times 0.5."""

    def __init__(self, group: ChannelGroup, block: int,
                 producers: Sequence[tuple[nn.Module, np.ndarray]]) -> None:
        super().__init__()
        self.size, self.block = group.size, block
        self.blocks = [np.arange(s, min(s + block, group.size))
                       for s in range(0, group.size, block)]
        self.register_buffer("block_of", torch.tensor(
            np.repeat(np.arange(len(self.blocks)), [len(b) for b in self.blocks]),
            dtype=torch.long))
        self.register_buffer("block_size", torch.tensor([float(len(b)) for b in self.blocks]))
        # (layer, its weight rows, the group channel of each row): plain attributes.
        self.producers = [(layer, *_rows(index)) for layer, index in producers]
        self.alpha = nn.Parameter(torch.zeros(()))
        self.gates = torch.ones(len(self.blocks))
        # Per sample and block, d(task)/d(g_p) summed over the mask sites of one backward
        # (filled by the masks' hooks while ``tracking``), and the running estimate of the
        # task loss a block's closing costs, 0.5 E[(d task_i / d g_p)^2] (see fisher_update).
        self.tracking = False
        self.sample_grad: torch.Tensor | None = None
        self.register_buffer("closing_cost", torch.zeros(len(self.blocks), dtype=torch.float64))
        self.register_buffer("fisher_seen", torch.zeros((), dtype=torch.long))

    def channel_norms(self) -> torch.Tensor:
        """Per channel: the producers' mean |w| over its rows, each producer over its mean."""
        total = torch.zeros(self.size)
        for layer, rows, channel in self.producers:
            w = layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).mean(1)
            per = torch.zeros(self.size).index_add_(0, channel, w[rows])
            per = per / torch.zeros(self.size).index_add_(0, channel, torch.ones(len(rows)))
            total = total + per / per.mean().clamp_min(1e-12)
        return total if self.producers else torch.ones(self.size)

    def stats(self) -> torch.Tensor:
        norms = self.channel_norms()
        sums = torch.zeros(len(self.blocks)).index_add_(0, self.block_of, norms)
        stat = sums / self.block_size
        return 0.5 * stat / stat.max().clamp_min(1e-12)

    def refresh(self) -> None:
        self.gates = _gate(self.stats(), self.alpha)

    def channel_gates(self) -> torch.Tensor:
        return self.gates[self.block_of]

    def kept(self) -> torch.Tensor:
        return (self.gates.double() * self.block_size.double()).sum()

    def add_sample_grad(self, per_channel: torch.Tensor) -> None:
        """Add one mask site's ``(N, channels)`` per-sample derivatives, summed per block."""
        blocks = torch.zeros(per_channel.shape[0], len(self.blocks), dtype=torch.float64)
        blocks.index_add_(1, self.block_of, per_channel.double())
        self.sample_grad = blocks if self.sample_grad is None else self.sample_grad + blocks

    def fisher_update(self, momentum: float) -> None:
        """Fold the last backward's per-sample derivatives into ``closing_cost``: the empirical
        Fisher of the block's gate, halved (the second-order loss change of moving the gate by
        one, the first-order term averaging out at a trained model)."""
        if self.sample_grad is None:
            return
        n = self.sample_grad.shape[0]
        now = 0.5 * ((n * self.sample_grad) ** 2).mean(0)  # the loss is a batch mean
        _running_mean(self.closing_cost, self.fisher_seen, now, momentum)
        self.sample_grad = None

    def fisher_penalty(self) -> torch.Tensor:
        """``sum_p (1 - g_p) * closing_cost_p``: the task loss the closed blocks are estimated
        to cost, with the gates' surrogate gradient to ``alpha``."""
        return ((1.0 - self.gates.double()) * self.closing_cost).sum()


def _rows(index: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight rows of a producer and the group channel owning each (``index[i]``: channel i's)."""
    rows = [np.asarray(ix).ravel() for ix in index]
    channel = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    return (torch.from_numpy(np.concatenate(rows).astype(np.int64)),
            torch.from_numpy(channel.astype(np.int64)))


class _Mask(nn.Module):
    """Multiplies a consumer's input by its group's channel gates along the group's dims."""

    def __init__(self, gate: _GroupGate, position_channel: torch.Tensor, shape: Sequence[int],
                 dims: tuple[int, ...]) -> None:
        super().__init__()
        self.gate = gate
        self.register_buffer("position_channel", position_channel)
        self.view = [shape[d] if d in dims else 1 for d in range(len(shape))]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.gate.channel_gates(), torch.ones(1)])
        out = y * table[self.position_channel].reshape(self.view).to(y.dtype)
        if self.gate.tracking and out.requires_grad and self.view[0] == 1:
            kept_y = y.detach()
            out.register_hook(lambda grad: self._record(kept_y, grad))
        return out

    def _record(self, y: torch.Tensor, grad: torch.Tensor) -> None:
        """Per sample and group channel: ``sum y * dL/d(out)``, the derivative of the loss by
        the channel's gate at this site (dim 0 is the batch)."""
        prod = (y * grad).double()
        dims = [d for d, v in enumerate(self.view) if v == 1 and d > 0]
        if dims:
            prod = prod.sum(dim=dims)
        prod = prod.reshape(prod.shape[0], -1)
        per = torch.zeros(prod.shape[0], self.gate.size + 1, dtype=torch.float64)
        per.index_add_(1, self.position_channel, prod)
        self.gate.add_sample_grad(per[:, :-1])


def _mask_for(gate: _GroupGate, member: Any, shape: Sequence[int]) -> _Mask:
    dims = member.dim if isinstance(member.dim, tuple) else (member.dim,)
    dims = tuple(d % len(shape) for d in dims)
    positions = math.prod(shape[d] for d in dims)
    table = np.full(positions, gate.size, dtype=np.int64)  # not in the group: factor 1
    for channel, ix in enumerate(member.index):
        table[np.asarray(ix).ravel()] = channel
    return _Mask(gate, torch.from_numpy(table), shape, dims)


# --- the thresholds' optimizer and the read-off ranking ---------------------------------


class _ThresholdOptimizer:
    """Momentum SGD on a set of thresholds, the gradients divided by a running RMS of the
    whole set: scale-free like Adam, but a gate with a larger gradient (a larger cost saving
    or task loss at stake) still moves faster than the others."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float, beta1: float = 0.5,
                 beta2: float = 0.99) -> None:
        self.params, self.lr, self.beta1, self.beta2 = list(params), lr, beta1, beta2
        self.velocity = [torch.zeros_like(p) for p in self.params]
        self.square, self.count = 0.0, 0

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        mean_square = float(sum(float(g.pow(2).sum()) for g in grads)) / max(
            1, sum(g.numel() for g in grads))
        self.count += 1
        self.square = self.beta2 * self.square + (1 - self.beta2) * mean_square
        scale = math.sqrt(self.square / (1 - self.beta2 ** self.count)) + 1e-12
        for p, g, v in zip(self.params, grads, self.velocity):
            v.mul_(self.beta1).add_((1 - self.beta1) * (g / scale).clamp(-2.0, 2.0))
            p.sub_(self.lr * v)


def _channel_scores(gate: _GroupGate, margin: torch.Tensor) -> np.ndarray:
    """Blocks by gate margin (rank), channels inside a block by their own norm (in [0, 0.5])."""
    order = np.argsort(margin.numpy(), kind="stable")
    rank = np.empty(len(order))
    rank[order] = np.arange(len(order))
    norms = gate.channel_norms().numpy().astype(np.float64)
    inside = 0.5 * norms / max(float(norms.max()), 1e-12)
    return rank[gate.block_of.numpy()] + inside
