"""Inference batch norms as integer per-channel affine maps (no float island).

An eval-mode batch norm computes ``y = x * k[c] + s[c]`` per channel ``c`` with
``k = gamma / sqrt(var + eps)`` and ``s = beta - mean * k``. On a quantized input
``x = q_in * s_in`` and at the output scale ``s_out`` this is
``y / s_out = q_in * M[c] + B[c]`` with ``M[c] = s_in * k[c] / s_out`` and
``B[c] = s[c] / s_out``. The integer program computes it in int64 with the fixed-point
multipliers of requantization (:func:`~pqcompile.quant.fixedpoint.quantize_multiplier` on
``|M[c]|``, the mantissa carrying the sign of ``k[c]``) and one rounding:

    ``q_out = clamp((q_in * m[c] + b[c] + (1 << (sh[c] - 1))) >> sh[c], lo, hi)``

where ``b[c] = round(B[c] * 2^sh[c])`` is the offset at the shift's precision, so the offset
is not rounded to whole output steps before the product is (a single round-half-up of the
exact fixed-point sum, as a requantized conv does). A folded ReLU is the clamp's ``lo = 0``.
The reference and the program compute the same integers, so they agree bit for bit.

The program stores per channel the int32 mantissa, the int32 shift and the int64 offset
``b[c] + (1 << (sh[c] - 1))``: 4 32-bit words, the weight bytes
:mod:`pqcompile.passes.cost` counts (``AFFINE_CHANNEL_WORDS``); the op does no
multiply-accumulate (0 MACs, 0 BOPs).

>>> import torch
>>> from pqcompile.meta import QParams
>>> bn = torch.nn.BatchNorm2d(1).eval()
>>> with torch.no_grad():
...     _ = bn.weight.fill_(0.5), bn.bias.fill_(1.0)
>>> m = QAffine.from_norm(bn, QParams(0.1, 8, True), QParams(0.1, 8, True), -127, 127)
>>> (int(m.mult[0]), int(m.shift[0]))  # M = 0.5 / sqrt(1 + 1e-5) at equal scales
(2147472911, 32)
>>> m(torch.tensor([[[[-30.0]], [[0.0]], [[4.0]]]]).view(1, 1, 3, 1)).flatten().tolist()
[-5.0, 10.0, 12.0]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..meta import QParams
from .fixedpoint import quantize_multiplier
from .qmodules import QModule

_PRODUCT_BITS = 47  # |q_in * m| < 2^16 * 2^31: inputs of up to 16 bits, 31-bit mantissas
_OFFSET_BITS = 60  # |b| <= 2^60, so |q_in * m + b + 2^(sh-1)| < 2^62 (int64; the ONNX export
#                    adds 2^62 to shift unsigned)


def is_affine_norm(module: nn.Module, rank: int) -> bool:
    """An eval-mode batch norm with running statistics over axis 1 of a rank-``rank`` input:
    it lowers as an integer per-channel affine map."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training and \
        module.running_mean is not None and module.running_var is not None and rank >= 2


def norm_terms(bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """``(k, s)`` in float64: the norm computes ``x * k + s`` per channel."""
    k = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.detach().to(torch.float64)
    s = -bn.running_mean.detach().to(torch.float64) * k
    if bn.bias is not None:
        s = s + bn.bias.detach().to(torch.float64)
    return k.numpy(), s.numpy()


def channel_params(k: float, s: float, s_in: float, s_out: float, span: int, *,
                   where: str = "", bound: int = 1 << 16) -> tuple[int, int, int]:
    """``(m, sh, b)`` of one channel computing ``q * k * s_in / s_out + s / s_out``.

    ``span`` bounds the output's magnitude (``max(|lo|, |hi|)``): an offset beyond what the
    product can reach saturates the clamp whatever its exact value, so it is capped there; a
    shift whose offset would not fit :data:`_OFFSET_BITS` is lowered (fewer mantissa bits).
    ``bound``: ``|q_in| < bound`` (at most ``2^22``: the product stays under ``2^53``).
    """
    M = s_in * k / s_out
    mag, sh = quantize_multiplier(abs(M), where=where)
    B = s / s_out
    reach = span + 1 + abs(M) * bound
    B = max(-reach, min(reach, B))
    while sh > 1 and abs(B) * 2.0 ** sh > 2.0 ** _OFFSET_BITS:
        sh -= 1
        mag = round(math.ldexp(abs(M), sh))
    m = -mag if M < 0 else mag
    return int(m), int(sh), int(round(math.ldexp(B, sh)))


def affine_requantize(q: torch.Tensor, mult: torch.Tensor, offset: torch.Tensor,
                      shift: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``clamp((q * mult + offset) >> shift, lo, hi)`` in int64 (``offset`` holds ``b`` and
    the rounding half ``1 << (shift - 1)``; all broadcast)."""
    y = torch.bitwise_right_shift(q.to(torch.int64) * mult + offset, shift)
    return y.clamp(lo, hi)


class QAffine(QModule):
    """A batch norm on integers: per channel (axis 1) ``clamp((q * m + off) >> sh, lo, hi)``
    (see the module docstring); with ``fake = True`` the float norm, fake-quantized."""

    def __init__(self, mult, shift, offset, k, s, inp: QParams, out: QParams, lo: int,
                 hi: int) -> None:
        super().__init__(out, lo, hi)
        self.register_buffer("mult", torch.as_tensor(np.asarray(mult), dtype=torch.int64))
        self.register_buffer("shift", torch.as_tensor(np.asarray(shift), dtype=torch.int64))
        self.register_buffer("offset", torch.as_tensor(np.asarray(offset), dtype=torch.int64))
        self.register_buffer("k", torch.as_tensor(np.asarray(k), dtype=torch.float64))
        self.register_buffer("s", torch.as_tensor(np.asarray(s), dtype=torch.float64))
        self.inp = inp

    @classmethod
    def from_norm(cls, bn: nn.modules.batchnorm._BatchNorm, inp: QParams, out: QParams,
                  lo: int, hi: int, *, where: str = "") -> "QAffine":
        """The integer form of ``bn`` reading ``inp`` and writing ``out`` clamped to
        ``[lo, hi]``."""
        k, s = norm_terms(bn)
        span = max(abs(lo), abs(hi))
        params = [channel_params(float(kc), float(sc), inp.scale, out.scale, span, where=where)
                  for kc, sc in zip(k, s)]
        mult = np.array([p[0] for p in params], np.int64)
        shift = np.array([p[1] for p in params], np.int64)
        offset = np.array([p[2] for p in params], np.int64) + (np.int64(1) << (shift - 1))
        return cls(mult, shift, offset, k, s, inp, out, lo, hi)

    def view(self, rank: int) -> tuple[int, ...]:
        """How the per-channel vectors broadcast over a rank-``rank`` input (channels axis 1)."""
        return (1, -1) + (1,) * (rank - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.view(x.dim())
        if self.fake:
            y = x.to(torch.float64) * self.k.view(v) + self.s.view(v)
            return self._fq(y)
        y = affine_requantize(x, self.mult.view(v), self.offset.view(v), self.shift.view(v),
                              self.lo, self.hi)
        return y.to(torch.float64)
