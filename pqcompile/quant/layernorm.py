"""Layer norm over the last dim of an integer tensor in fixed point: no float island.

A float64 layer norm island (dequantize, mean, variance, ``rsqrt``, affine, quantize) cost
BERT ~0.15 ms a layer of ~1 ms on the host (paraphrase-MiniLM-L3-v2 at 128 tokens: its 7 norms
~0.55 ms of 3.9). Its input is one tensor of codes ``q`` (8 bits, or
a residual sum's 9..16) of scale ``s``; over a row of ``N`` codes ``x = s q`` and

    ``(x_i - mean) / sqrt(var + eps) = d_i / sqrt(W)``,  ``d_i = N q_i - S1``,
    ``W = N S2 - S1^2 + E``,  ``E = round(eps N^2 / s^2)``

with the row sums ``S1 = sum q``, ``S2 = sum q^2``: ``d`` and ``W - E = N^2 var(q)`` are exact
integers. :class:`QLayerNorm` computes, in int64 (``W`` at least 1):

- ``e = #{j in 0..30: W >= 4^j}`` (``4^(e-1) <= W < 4^e``) and ``Wn = W * 4^(31 - e)`` in
  ``[2^60, 2^62)``;
- ``r = isqrt(Wn)`` in ``[2^30, 2^31)``: :data:`NEWTON_STEPS` integer Newton steps
  ``x = (x + Wn // x) >> 1`` from ``2^31``, then ``x - (x^2 > Wn)`` (exact: from a start within
  a factor 2 the error is under one after five steps); ``R = (2^61 - 1) // r`` in
  ``[2^30, 2^31)``: 32-bit, so ``d_i R`` is one 32 x 32 -> 64-bit product (``smull``,
  ``vpmuldq``: the kernel's per-element work runs in vector lanes);
- ``z_i = (d_i R + 2^(k-1)) >> k`` with ``k = 30 + e - Z_BITS``: ``z_i / 2^Z_BITS`` is the
  normalized value (``2^(30-e) / r ~ 1 / (2 sqrt(W))``), ``|z_i| <= sqrt(N) 2^Z_BITS``;
- per channel, the affine map of :mod:`pqcompile.quant.affine` on ``z`` (input scale
  ``2^-Z_BITS``): ``y_i = clamp((z_i m[c] + off[c]) >> sh[c], lo, hi)``, ``m[c] / 2^sh[c] ~
  gamma[c] / (2^Z_BITS s_out)``, ``off[c]`` carrying ``beta[c] / s_out`` and the rounding half.

Bounds (``N <= 4096``, inputs of at most 16 bits): ``|d| < 2^29``, ``R < 2^31`` so
``|d R| < 2^60``; ``|z| <= z_bound(N) <= 2^22`` (32-bit), ``|z m| < 2^53``. The per-row work
is one square root's seven divisions and one more for ``R``; per element, integer multiplies and shifts. The program stores what a
batch norm's affine map stores: int32 multiplier and shift and an int64 offset per channel
(16 bytes, as the float island's two float64 parameters), plus nothing shared between norms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..meta import QParams
from .affine import affine_requantize, channel_params
from .qmodules import QModule

if TYPE_CHECKING:
    from .plan import Plan

Z_BITS = 16  # fractional bits of the normalized value z
NEWTON_STEPS = 6
MAX_DIM = 4096  # N: keeps |d R| < 2^60 and |z| <= 2^22
RECIPROCAL = (1 << 61) - 1  # R = RECIPROCAL // r < 2^31 for r >= 2^30
Z_SHIFT = 30 - Z_BITS  # k = e + Z_SHIFT
MAX_INPUT_BITS = 16
EPS_CAP = 1 << 60  # E beyond this dominates every variance of 16-bit codes (N^2 2^30 < 2^54)
POWERS_OF_4 = tuple(1 << (2 * j) for j in range(31))


def z_bound(n: int) -> int:
    """``ceil(sqrt(n)) 2^Z_BITS``: at least every ``|z|`` of a row of ``n`` codes (a
    normalized value is at most ``sqrt(n - 1)``; the slack covers the rounding)."""
    return (math.isqrt(n - 1) + 1) << Z_BITS


def integer_layer_norm(gm: torch.fx.GraphModule, plan: Plan, n: torch.fx.Node) -> bool:
    """Whether the reference computes ``n`` as a :class:`QLayerNorm` under ``plan``: a float
    node calling an ``nn.LayerNorm`` over the last dim (one normalized dim of at most
    :data:`MAX_DIM`, weight and bias) on one quantized tensor of at most 16 bits, with no region
    inlined into it. The builder and the stored-bytes prediction both ask this; the program
    runs it as :mod:`pqcompile.lower.kernels_layernorm`'s kernel."""
    if plan.kind.get(n.name) != "float" or n.op != "call_module" or len(n.args) != 1 or \
            n.kwargs or not isinstance(n.args[0], torch.fx.Node):
        return False
    m = gm.get_submodule(n.target)
    if type(m) is not nn.LayerNorm or len(m.normalized_shape) != 1 or m.weight is None or \
            m.bias is None or not 2 <= m.normalized_shape[0] <= MAX_DIM:
        return False
    x = n.args[0]
    return x.name in plan.root and x.name not in plan.inlined and \
        plan.bits.get(plan.root[x.name], 8) <= MAX_INPUT_BITS


def row_terms(q: torch.Tensor, eps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, e, R)`` of int64 codes ``q`` (the module doc): ``d`` per element, the exponent
    ``e`` and reciprocal ``R`` per row (last dim kept)."""
    n = q.shape[-1]
    s1 = q.sum(-1, keepdim=True)
    w = (n * (q * q).sum(-1, keepdim=True) - s1 * s1 + eps).clamp(min=1)
    powers = torch.tensor(POWERS_OF_4, dtype=torch.int64)
    e = (w >= powers).sum(-1, keepdim=True)
    wn = w << (2 * (31 - e))
    x = torch.full_like(wn, 1 << 31)
    for _ in range(NEWTON_STEPS):
        x = (x + torch.div(wn, x, rounding_mode="floor")) >> 1
    x = x - (x * x > wn).to(torch.int64)
    return n * q - s1, e, torch.div(torch.full_like(x, RECIPROCAL), x, rounding_mode="floor")


class QLayerNorm(QModule):
    """``LayerNorm`` over the last dim on integers (see the module doc): ``eps_codes`` is
    ``E``, ``mult``/``shift``/``offset`` the per-channel affine map on ``z``; with
    ``fake = True`` the float norm, fake-quantized."""

    def __init__(self, norm: nn.LayerNorm, inp: QParams, out: QParams, lo: int, hi: int, *,
                 where: str = "") -> None:
        super().__init__(out, lo, hi)
        self.inp = inp
        n = norm.normalized_shape[0]
        self.eps_codes = min(EPS_CAP, round(norm.eps * n * n / inp.scale ** 2))
        self.norm_eps = float(norm.eps)
        gamma = norm.weight.detach().to(torch.float64)
        beta = norm.bias.detach().to(torch.float64)
        self.register_buffer("gamma", gamma)
        self.register_buffer("beta", beta)
        span = max(abs(lo), abs(hi))
        bound = z_bound(n)
        params = [channel_params(float(g), float(b), 2.0 ** -Z_BITS, out.scale, span,
                                 where=where, bound=bound) for g, b in zip(gamma, beta)]
        shift = np.array([p[1] for p in params], np.int64)
        self.register_buffer("mult", torch.tensor([p[0] for p in params], dtype=torch.int64))
        self.register_buffer("shift", torch.from_numpy(shift))
        self.register_buffer("offset", torch.from_numpy(
            np.array([p[2] for p in params], np.int64) + (np.int64(1) << (shift - 1))))

    def normalized(self, q: torch.Tensor) -> torch.Tensor:
        """``z`` (int64): the normalized codes at ``2^-Z_BITS``."""
        d, e, r = row_terms(q.to(torch.int64), self.eps_codes)
        k = e + Z_SHIFT
        return (d * r + (1 << (k - 1))) >> k

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.fake:
            x = q.to(torch.float64) * self.inp.scale
            y = F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, self.norm_eps)
            return self._fq(y)
        y = affine_requantize(self.normalized(q), self.mult, self.offset, self.shift,
                              self.lo, self.hi)
        return y.to(torch.float64)


def make_layer_norm(norm: nn.LayerNorm, inp: QParams, out: QParams, lo: int, hi: int, *,
                    where: str = "") -> QLayerNorm | None:
    """The :class:`QLayerNorm` of ``norm`` on ``inp``, or ``None`` (it then stays a float
    island): an input wider than 16 bits or multipliers out of the fixed-point range."""
    if inp.bits > MAX_INPUT_BITS:
        return None
    try:
        return QLayerNorm(norm, inp, out, lo, hi, where=where)
    except ValueError:
        return None
