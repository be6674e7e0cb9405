"""Weight and bias quantization (see :mod:`pqcompile.quant` for the scheme).

Real checkpoints hold *dead* channels: BatchNorm statistics of 0 or weights of ~1e-9 that the
BN fold (times ``gamma / sqrt(eps)``) turns into a channel whose output is (almost) its bias
alone. Scaled by its own ``max |w[c]|``, such a channel's step collapses (1e-11 and below) and
its bias, stored at scale ``s_in * s_w[c]``, cannot fit int32. The rules that keep every layer
representable:

* **dead channels are exact zeros**: a channel whose ``max |w[c]|`` is below
  ``REL_SCALE_FLOOR`` (2^-16) times the layer's largest is quantized to zeros (as an all-zero
  channel is) and takes the smallest step of the live channels, so no step falls below 2^-16
  of the largest. Its products are at most 2^-16 of the largest channel's on the same input
  tensor, below what an 8-bit output resolves; a live channel of a real network (depthwise
  layers included) is rarely even 2^-10 of the largest;
* **absolute floor**: no step is below ``ABS_SCALE_FLOOR`` (2^-40);
* **bias floor**: a channel's step is raised until its bias fits what int32 leaves beside the
  worst-case sum of products, ``|b[c]| / (s_in * s_w[c]) <= 2^31 - 2 - terms * |x|max *
  |w|max``: no bias is clamped and the accumulator cannot overflow. It binds only where the
  bias dwarfs the weights (a dead channel, whose weights are zeros anyway); a live channel's
  weights then round on the raised step, an effect on the output of at most
  ``terms * |x|max * |b[c]| / (2 * headroom)``, under 1e-4 of the bias for layers of up to
  ~10^4 products per output.

:func:`quantize_layer` applies all three; :func:`quantize_weight` the first two (and any
given per-channel minimum step).

>>> import torch
>>> q, wq = quantize_weight(torch.tensor([[1.0, -0.5], [0.0, 0.0]]), bits=4)
>>> q.tolist(), wq.scales
([[7, -3], [0, 0]], (0.14285714285714285, 0.14285714285714285))
>>> q, wq = quantize_weight(torch.tensor([[1.0, -0.5], [1e-9, 0.0]]), bits=4)
>>> q.tolist(), wq.scales[1] == wq.scales[0]  # a dead channel: exact zeros
([[7, -3], [0, 0]], True)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..meta import QParams, WeightQuant

INT32_MAX = 2 ** 31 - 1
REL_SCALE_FLOOR = 2.0 ** -16  # of the layer's largest channel step
ABS_SCALE_FLOOR = 2.0 ** -40


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _check_bits(bits: int, where: str) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"{where}: weight bits must be in 2..8 for the integer lowering, got "
                         f"{bits}; leave the layer out of the assignment to keep it in float")


def weight_steps(w: torch.Tensor, bits: int, min_scales: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(steps, dead)``: the per-channel steps (float64) of ``w`` at ``bits`` and which
    channels are dead (module docstring). A live channel's step is ``max |w[c]| / qmax``, a dead
    one's the smallest live step (1.0 if none), each at least ``ABS_SCALE_FLOOR`` and
    ``min_scales[c]``."""
    w64 = w.detach().to(torch.float64)
    raw = w64.reshape(w64.shape[0], -1).abs().amax(dim=1) / weight_qmax(bits)
    top = float(raw.max()) if raw.numel() else 0.0
    dead = (raw < top * REL_SCALE_FLOOR) | (raw == 0)
    fill = float(raw[~dead].min()) if bool((~dead).any()) else 1.0
    steps = torch.where(dead, torch.full_like(raw, fill), raw).clamp(min=ABS_SCALE_FLOOR)
    if min_scales is not None:
        steps = torch.maximum(steps, min_scales.to(torch.float64))
    return steps, dead


def quantize_weight(w: torch.Tensor, bits: int, *, where: str = "weight",
                    min_scales: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, WeightQuant]:
    """Per-output-channel (dim 0) symmetric narrow-range quantization.

    ``scale[c] = max |w[c]| / (2^(b-1) - 1)``, dead channels zeros at the smallest live step,
    floors and ``min_scales[c]`` (float64, when given) as the module docstring says. Returns
    the int8 tensor of ``q`` and the :class:`~pqcompile.meta.WeightQuant` record.
    """
    _check_bits(bits, where)
    w64 = w.detach().to(torch.float64)
    if not torch.isfinite(w64).all():
        raise ValueError(f"{where}: weight has inf or nan values")
    qmax = weight_qmax(bits)
    scales, dead = weight_steps(w64, bits, min_scales)
    view = (-1,) + (1,) * (w64.dim() - 1)
    q = torch.clamp(torch.floor(w64 / scales.view(view) + 0.5), -qmax, qmax)
    q = torch.where(dead.view(view), torch.zeros_like(q), q).to(torch.int8)
    return q, WeightQuant(bits, tuple(float(s) for s in scales))


def quantize_bias(b: torch.Tensor | None, in_scale: float, w_scales: tuple[float, ...], *,
                  where: str = "bias") -> torch.Tensor:
    """int32-valued bias with scale ``in_scale * w_scales[c]`` (int64 tensor), zeros if None.

    Raises when a bias does not fit int32 at the scales given; :func:`quantize_layer` chooses
    weight scales for which it always does.
    """
    n = len(w_scales)
    if b is None:
        return torch.zeros(n, dtype=torch.int64)
    s = in_scale * torch.tensor(w_scales, dtype=torch.float64)
    q = torch.floor(b.detach().to(torch.float64) / s + 0.5)
    if not bool(torch.isfinite(q).all()):
        raise ValueError(f"{where}: bias has inf or nan values")
    if bool((q.abs() > INT32_MAX).any()):
        c = int(q.abs().argmax())
        raise ValueError(
            f"{where}: bias of channel {c} ({float(b[c]):.4g}) does not fit int32 at scale "
            f"{float(s[c]):.3g} (input scale {in_scale:.3g} times weight scale "
            f"{w_scales[c]:.3g}): that channel's weight scale is too small for its bias; "
            "quantize the layer with quantize_layer, which raises it")
    return q.to(torch.int64)


def quantize_layer(w: torch.Tensor, b: torch.Tensor | None, bits: int, inp: QParams, *,
                   where: str = "layer") -> tuple[torch.Tensor, WeightQuant, torch.Tensor]:
    """Weights, weight scales and int32 bias of one conv/linear layer reading ``inp``.

    The weight steps follow the three rules of the module docstring, so the bias always fits
    int32 beside the worst-case sum of products; the one error left is an accumulator that
    the products alone could overflow (too many terms at these bits).
    """
    _check_bits(bits, where)
    terms = int(np.prod(w.shape[1:]))
    x_absmax, w_absmax = max(-inp.qmin, inp.qmax), weight_qmax(bits)
    headroom = INT32_MAX - terms * x_absmax * w_absmax - 1
    if headroom <= 0:
        raise ValueError(f"{where}: the int32 accumulator could overflow ({terms} products of "
                         f"|x| <= {x_absmax} and |w| <= {w_absmax}, before any bias); lower "
                         "the activation or weight bits")
    min_scales = None
    if b is not None:
        b64 = b.detach().to(torch.float64)
        if not bool(torch.isfinite(b64).all()):
            raise ValueError(f"{where}: bias has inf or nan values")
        min_scales = b64.abs() / (inp.scale * headroom)
        # one ulp of slack so that the rounded bias stays within the headroom
        min_scales = torch.nextafter(min_scales, torch.full_like(min_scales, math.inf))
    wint, wq = quantize_weight(w, bits, where=where, min_scales=min_scales)
    bias = quantize_bias(b, inp.scale, wq.scales, where=where)
    check_accumulator(where, terms, x_absmax, w_absmax, bias)
    return wint, wq, bias


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
