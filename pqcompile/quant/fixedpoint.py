"""Fixed-point multipliers: the integer arithmetic shared by the reference and the program.

A real multiplier ``M > 0`` becomes an int32 mantissa ``m`` and a right shift ``sh`` with
``M ~ m * 2^-sh``; requantizing an accumulator is then, in int64,
``y = clamp((acc * m + (1 << (sh - 1))) >> sh, lo, hi)``: round half up, arithmetic shift.

>>> m, sh = quantize_multiplier(0.75)
>>> (m, sh)
(1610612736, 31)
>>> import torch
>>> requantize(torch.tensor([10, -10, 3]), m, sh, -127, 127).tolist()
[8, -7, 2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MANTISSA_BITS = 31  # m < 2^31 fits int32; |acc| < 2^31 keeps acc * m + round < 2^63
MAX_SHIFT = 62


def quantize_multiplier(M: float, *, where: str = "") -> tuple[int, int]:
    """``(m, sh)`` with ``m < 2^31`` and ``1 <= sh <= 62`` such that ``M ~ m * 2^-sh``.

    Multipliers too small for a 62-bit shift lose mantissa bits (down to 0); multipliers of
    ``2^30`` or more cannot be represented and raise ``ValueError`` naming ``where``.
    """
    if not (M >= 0 and math.isfinite(M)):
        raise ValueError(f"{where or 'requantization'}: multiplier {M!r} is not a finite "
                         "non-negative number; check the scales recorded by calibration")
    if M == 0:
        return 0, 1
    frac, exp = math.frexp(M)  # M = frac * 2^exp, frac in [0.5, 1)
    m = round(frac * (1 << MANTISSA_BITS))
    if m == 1 << MANTISSA_BITS:
        m //= 2
        exp += 1
    sh = MANTISSA_BITS - exp
    if sh > MAX_SHIFT:
        m, sh = round(math.ldexp(M, MAX_SHIFT)), MAX_SHIFT
    if sh < 1:
        raise ValueError(
            f"{where or 'requantization'}: multiplier {M:.3g} is too large for a fixed-point "
            "right shift (needs M < 2^30); an output scale is far smaller than its input "
            "scales: recalibrate or raise the output bits")
    return int(m), int(sh)


def quantize_multipliers(M: Sequence[float] | np.ndarray, *, where: str = ""
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel :func:`quantize_multiplier`: int64 arrays ``(m, sh)``."""
    pairs = [quantize_multiplier(float(v), where=where) for v in np.ravel(M)]
    return (np.array([p[0] for p in pairs], dtype=np.int64),
            np.array([p[1] for p in pairs], dtype=np.int64))


def shared_shift(Ms: Sequence[float], *, where: str = "") -> tuple[list[int], int]:
    """Mantissas of several multipliers over one common shift (residual add).

    The shift is that of the largest multiplier, so every mantissa stays below 2^31 and the
    smaller multipliers keep ``31 - log2(Mmax / Mi)`` significant bits.
    """
    shifts = [quantize_multiplier(M, where=where)[1] for M in Ms]
    sh = min(shifts)
    mults = [round(math.ldexp(M, sh)) for M in Ms]
    if max(mults) >= 1 << MANTISSA_BITS:  # only when rounding carried into bit 31
        sh -= 1
        mults = [round(math.ldexp(M, sh)) for M in Ms]
    if sh < 1:
        raise ValueError(f"{where or 'requantization'}: multipliers {Ms} are too large for a "
                         "fixed-point right shift")
    return [int(m) for m in mults], int(sh)


def _as_long(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v), dtype=torch.int64)


def requantize(acc: torch.Tensor, m, sh, lo: int, hi: int) -> torch.Tensor:
    """``clamp((acc * m + (1 << (sh - 1))) >> sh, lo, hi)`` in int64 (``m``, ``sh`` broadcast)."""
    acc = acc.to(torch.int64)
    m, sh = _as_long(m), _as_long(sh)
    y = torch.bitwise_right_shift(acc * m + torch.bitwise_left_shift(torch.ones_like(sh), sh - 1),
                                  sh)
    return y.clamp(lo, hi)


def rescale_sum(terms: Sequence[torch.Tensor], mults: Sequence[int], sh: int, lo: int,
                hi: int) -> torch.Tensor:
    """``clamp((sum_i q_i * m_i + (1 << (sh - 1))) >> sh, lo, hi)`` in int64 (residual add)."""
    acc = sum(t.to(torch.int64) * int(m) for t, m in zip(terms, mults))
    return torch.bitwise_right_shift(acc + (1 << (sh - 1)), sh).clamp(lo, hi)
