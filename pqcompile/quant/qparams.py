"""Weight and bias quantization (see :mod:`pqcompile.quant` for the scheme).

>>> import torch
>>> q, wq = quantize_weight(torch.tensor([[1.0, -0.5], [0.0, 0.0]]), bits=4)
>>> q.tolist(), wq.scales
([[7, -3], [0, 0]], (0.14285714285714285, 0.14285714285714285))
"""

from __future__ import annotations

import numpy as np
import torch

from ..meta import WeightQuant

INT32_MAX = 2 ** 31 - 1


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_weight(w: torch.Tensor, bits: int, *, where: str = "weight"
                    ) -> tuple[torch.Tensor, WeightQuant]:
    """Per-output-channel (dim 0) symmetric narrow-range quantization.

    ``scale[c] = max |w[c]| / (2^(b-1) - 1)``; an all-zero channel takes the smallest scale of
    the other channels (1.0 if every channel is zero) so its bias keeps their precision.
    Returns the int8 tensor of ``q`` and the :class:`~pqcompile.meta.WeightQuant` record.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"{where}: weight bits must be in 2..8 for the integer lowering, got "
                         f"{bits}; leave the layer out of the assignment to keep it in float")
    w64 = w.detach().to(torch.float64)
    if not torch.isfinite(w64).all():
        raise ValueError(f"{where}: weight has inf or nan values")
    qmax = weight_qmax(bits)
    amax = w64.reshape(w64.shape[0], -1).abs().amax(dim=1)
    scales = amax / qmax
    nonzero = scales > 0
    fill = float(scales[nonzero].min()) if bool(nonzero.any()) else 1.0
    scales = torch.where(nonzero, scales, torch.full_like(scales, fill))
    view = (-1,) + (1,) * (w64.dim() - 1)
    q = torch.clamp(torch.floor(w64 / scales.view(view) + 0.5), -qmax, qmax).to(torch.int8)
    return q, WeightQuant(bits, tuple(float(s) for s in scales))


def quantize_bias(b: torch.Tensor | None, in_scale: float, w_scales: tuple[float, ...], *,
                  where: str = "bias") -> torch.Tensor:
    """int32-valued bias with scale ``in_scale * w_scales[c]`` (int64 tensor), zeros if None."""
    n = len(w_scales)
    if b is None:
        return torch.zeros(n, dtype=torch.int64)
    s = in_scale * torch.tensor(w_scales, dtype=torch.float64)
    q = torch.floor(b.detach().to(torch.float64) / s + 0.5)
    if bool((q.abs() > INT32_MAX).any()):
        c = int(q.abs().argmax())
        raise ValueError(f"{where}: bias of channel {c} ({float(b[c]):.4g}) does not fit int32 "
                         f"at scale {float(s[c]):.3g}; its input scale is too small: recalibrate")
    return q.to(torch.int64)


def check_accumulator(where: str, terms: int, x_absmax: int, w_absmax: int,
                      bias: torch.Tensor) -> None:
    """Raise if an int32 accumulator of ``terms`` products could overflow."""
    bias_max = int(bias.abs().max()) if bias.numel() else 0
    bound = terms * x_absmax * w_absmax + bias_max
    if bound > INT32_MAX:
        raise ValueError(f"{where}: the int32 accumulator could overflow ({terms} products of "
                         f"|x| <= {x_absmax} and |w| <= {w_absmax}, bias up to {bias_max}); "
                         "lower the activation or weight bits")


def fake_quant(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(x / scale), lo, hi) * scale`` in float (the standard fake-quant view)."""
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def as_numpy_int(t: torch.Tensor, dtype: str) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)
