"""``Magnitude``: data-free channel importance, ``sum |w|^p`` of a channel's producer rows.

The default channel criterion when no data is given. Weights are the BN-folded ones (a conv's
raw weights before a BN are scale-free, the folded ones are what runs). With ``p = 2`` (the
default) a channel's score is ``||w_c||^2``, the error of quantizing it to zero: the same units
as :class:`~pqcompile.criteria.WeightError`'s layer sensitivities, which this criterion also
answers (it *is* that criterion with a choice of norm for channels). ``p = 1`` is the classic
L1-norm filter ranking (:class:`~pqcompile.criteria.L1`), in its own units.

>>> import torch
>>> from pqcompile.build import analysis
>>> from pqcompile.meta import CHANNEL_GROUPS
>>> gm = analysis(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.ReLU(),
...                                   torch.nn.Conv2d(3, 2, 1)), (torch.randn(1, 1, 4, 4),))
>>> gm.get_submodule("0").weight.data = torch.tensor([1.0, -3.0, 2.0]).view(3, 1, 1, 1)
>>> Magnitude().channel_scores(gm, CHANNEL_GROUPS.get(gm)[0]).tolist()
[1.0, 9.0, 4.0]
"""

from __future__ import annotations

import numpy as np
import torch

from .weight_error import WeightError


class Magnitude(WeightError):
    """``sum |w|^p`` per channel over the group's producer rows (data-free)."""

    name = "magnitude"
    needs_data = False

    def __init__(self, p: float = 2.0, range_to_rms: float = 4.0) -> None:
        if not p > 0:
            raise ValueError(f"Magnitude: the norm exponent p must be positive, got {p}")
        super().__init__(range_to_rms)
        self.p = float(p)
        self.units = ("squared weight perturbation (unit curvature), BN-folded weights"
                      if self.p == 2 else f"sum of |w|^{self.p:g} of the channel's weights")

    def _row_norms(self, node: str, module: torch.nn.Module) -> np.ndarray:
        w = module.weight.detach().to(torch.float64)
        return w.reshape(w.shape[0], -1).abs().pow(self.p).sum(1).numpy()
