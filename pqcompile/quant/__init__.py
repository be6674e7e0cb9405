"""Quantization: the scheme, calibration and the integer-exact reference.

The scheme (the contract between :func:`build_reference` and :func:`pqcompile.lower.lower`):

* **Weights**: per output channel, symmetric, ``b`` in 2..8 bits, narrow range
  ``q in [-(2^(b-1) - 1), 2^(b-1) - 1]``, ``scale[c] = max |w[c]| / qmax``, ``q = floor(w / s +
  0.5)``; an all-zero channel borrows the smallest other channel scale. Steps never fall
  below 2^-16 of the layer's largest (nor 2^-40), and a channel whose bias would not fit
  int32 gets a larger step (dead channels of real checkpoints; :mod:`.qparams`).
* **Activations**: per tensor, zero point 0. Unsigned ``[0, 2^b - 1]`` where the tensor is known
  non-negative (the output of a folded ReLU/ReLU6; an add, concat or average pool of unsigned
  tensors; a sigmoid, hard-sigmoid, softmax or exp run in float), else symmetric narrow signed
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. ``scale = amax / qmax`` with ``amax`` from the observer.
  A tensor's bits are the activation bits of the conv/linear layers reading it (through max
  pooling and reshapes); tensors no layer reads (add, concat, pool inputs, outputs) use 8 bits.
  The model input is quantized in-graph: ``q = clamp(floor(float64(x) / s + 0.5), lo, hi)``.
* **Bias**: int32, scale ``s_in * s_w[c]``.
* **Requantization**: the int32 accumulator times a per-channel fixed-point multiplier
  ``M = s_in * s_w[c] / s_out = m * 2^-sh`` (``m`` < 2^31, ``1 <= sh <= 62``), in int64:
  ``y = clamp((acc * m + (1 << (sh - 1))) >> sh, lo, hi)``; a folded ReLU/ReLU6 narrows
  ``[lo, hi]`` (ReLU6: ``hi = min(qmax, floor(6 / s_out + 0.5))``).
* **Residual add**: ``(qa * ma + qb * mb + (1 << (sh - 1))) >> sh`` with ``m_i = s_i / s_out``
  over one shared shift. **Concat**: each input requantized to the output scale (copied when
  its parameters equal the output's). **Average pooling / adaptive average pooling / mean**:
  integer window sum (zero padding counted), requantized by ``s_in / (s_out * count)``.
  **Max pooling**, flatten/reshape/view/permute/transpose, Identity and Dropout: on the
  integers. A ReLU/ReLU6 that cannot be folded clamps the integers in place.
* **Linear**: int32 accumulation of ``x @ w.T`` then requantization as a conv.
* **Products of two activations** (``a @ b``: attention's ``q @ k^T`` and ``probs @ v``; a
  ``scaled_dot_product_attention`` call is decomposed into both around a float softmax): int8 or
  uint8 operands, int32 accumulation, one fixed-point multiplier ``s_a * s_b / s_out``
  (:mod:`.matmul`).
* **Float ops** (every other op, and conv/linear layers the assignment leaves out): dequantize
  to float64 (``q * s``), the op, quantize at 8 bits (or the readers' bits) with
  ``clamp(floor(y / s + 0.5), lo, hi)``. The op runs in float64 in both the reference and the
  program (same arithmetic, results equal to ~1e-16), or in float32 where TVM has no float64
  kernel for it (e.g. layer norm) or its module cannot be traced; then a 1-LSB difference is
  possible. They are listed in ``FLOAT_OPS`` / ``LoweringReport.float_ops``, never silently.
* **Outputs**: ``float32(q) * float32(s)``.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> gm = trace(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
>>> ref = build_reference(gm, Assignment.uniform(["_0"], 8, 8), [torch.randn(8, 4)])
>>> q = integer_outputs(ref, torch.zeros(1, 4))[0]  # the output integers, 8-bit signed
>>> q.dtype, bool(q.abs().max() <= 127)
(torch.int64, True)
"""

from .fixedpoint import quantize_multiplier, requantize
from .observers import (
    OBSERVERS,
    AutoObserver,
    MinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from .qparams import quantize_weight
from .reference import build_reference, fake_quant_view, integer_outputs

__all__ = [
    "OBSERVERS", "AutoObserver", "MinMaxObserver", "MseObserver", "Observer", "PercentileObserver",
    "build_reference", "fake_quant_view", "integer_outputs", "make_observer",
    "quantize_multiplier", "quantize_weight", "requantize",
]
