"""``WeightError``: the data-free quantization criterion (the default when no data is given).

Units: *squared weight perturbation* (the loss curvature taken as 1 everywhere), in the BN-folded
weights that :func:`pqcompile.quant.build_reference` quantizes.

* Weights: ``||Q_b(W) - W||^2`` on the per-channel symmetric narrow-range grid of
  :mod:`pqcompile.quant` (the running max over the requested bits, so fewer bits never look
  cheaper).
* Activations, a proxy (no data: no ranges are known): input noise ``dx`` of variance
  ``Delta_a^2 / 12`` (uniform rounding noise) disturbs the layer output like a weight error of
  ``||W||_F^2 Delta_a^2 / (12 E[x^2])``; with the range assumed to be ``range_to_rms`` times the
  RMS of the input (``amax = k * rms``, ``Delta_a = amax / qmax``) this is
  ``||W||_F^2 * k^2 / (12 * qmax_a^2)``, ``qmax_a`` = 2^(b-1) - 1 (signed input) or 2^b - 1
  (input after a ReLU, as the scheme stores it unsigned). It is the disturbance of *this*
  layer's output, so two layers reading one tensor each count it.
* Channels: pruning is quantizing to zero, so a channel's score is ``||w_c||^2`` summed over the
  group's producer rows (biases are not counted).

>>> import torch
>>> from pqcompile.build import analysis
>>> gm = analysis(torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(1, 4),))
>>> crit = WeightError()
>>> s = crit.layer_sensitivity(gm, "_0", [(2, 8), (4, 8), (8, 8)])
>>> s[(2, 8)] > s[(4, 8)] > s[(8, 8)] > 0, crit.needs_data
(True, False)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.fx

from ..meta import ChannelGroup
from ..presets import compute_layers
from .base import (
    BitOption,
    Criterion,
    PreparedCache,
    activation_qmax,
    check_bit_options,
    combine,
    input_signedness,
    layer_module,
    out_rows,
    weight_error,
)


class WeightError(Criterion):
    """Data-free: weight quantization error plus the activation-noise proxy (module docstring).

    ``range_to_rms``: the assumed ratio of an activation's clipping range to its RMS (4: about
    what min/max calibration gives on batch-normalized activations); only the activation term
    depends on it.
    """

    name = "weight_error"
    needs_data = False
    units = "squared weight perturbation (unit curvature), BN-folded weights"

    def __init__(self, range_to_rms: float = 4.0) -> None:
        if not range_to_rms > 0:
            raise ValueError(f"range_to_rms must be positive, got {range_to_rms}")
        self.range_to_rms = float(range_to_rms)
        self._cache = PreparedCache()
        self._signed: dict[str, bool] = {}
        self._signed_for: torch.fx.GraphModule | None = None

    def _signed_input(self, work: torch.fx.GraphModule, layer: str) -> bool:
        if self._signed_for is not work:
            self._signed = input_signedness(work, compute_layers(work))
            self._signed_for = work
        return self._signed[layer]

    def layer_sensitivity(self, gm: torch.fx.GraphModule, layer: str,
                          bit_options: Iterable[BitOption]) -> dict[BitOption, float]:
        options = check_bit_options(bit_options, f"layer {layer!r}")
        work = self._cache.get(gm)
        w = layer_module(work, layer).weight.detach()
        signed = self._signed_input(work, layer)
        norm2 = float(w.to(torch.float64).pow(2).sum())
        k2 = self.range_to_rms ** 2
        return combine(options, lambda b: weight_error(w, b),
                       lambda b: norm2 * k2 / (12.0 * activation_qmax(b, signed) ** 2))

    def _row_norms(self, node: str, module: torch.nn.Module) -> np.ndarray:
        w = module.weight.detach().to(torch.float64)
        return w.reshape(w.shape[0], -1).pow(2).sum(1).numpy()

    def channel_scores(self, gm: torch.fx.GraphModule, group: ChannelGroup) -> np.ndarray:
        return out_rows(self._cache.get(gm), group, self._row_norms)
