"""Sensitivity criteria: how much a layer's bits or a channel's removal costs the model.

A criterion is an object with ``name``, ``needs_data``, ``units``, ``calibrate(gm, batches)``
(a no-op for data-free criteria), ``layer_sensitivity(gm, layer, bit_options) ->
{(w_bits, a_bits): value}`` and ``channel_scores(gm, group) -> np.ndarray`` (one score per
channel, the *prune sensitivity*: pruning a channel is quantizing it to zero bits). Values are
``>= 0``, additive over layers and channels, and never smaller at fewer bits. Every criterion
scores the BN-folded weights (what the integer program runs) on an eval-mode copy.

==================  ======  ===============================================================
criterion           data    units of both bit sensitivities and channel scores
==================  ======  ===============================================================
``weight_error``    no      squared weight perturbation (unit curvature); the default for
                            bits when no data is given
``magnitude``       no      the same (p = 2, default): ``||w_c||^2``; the default for
                            channels when no data is given
``l1``              no      channels only: ``sum |w_c|`` (its own units)
``hessian``         yes     estimated increase of the mean loss (HAWQ-V3, Hutchinson)
``fisher``          yes     estimated increase of the mean loss (FIT, empirical Fisher)
``taylor``          yes     channels only: first-order loss change per sample
``channel_fisher``  yes     channels only: estimated increase of the mean loss
==================  ======  ===============================================================

So ``hessian``, ``fisher`` and ``channel_fisher`` trade bits against channels on one scale (an
estimated loss increase); ``weight_error`` and ``magnitude`` (p = 2) on another, data-free one.
Activation bits enter as the expected uniform rounding noise ``Delta_a^2 / 12`` of the layer's
input, weighted by the curvature w.r.t. that input (data) or by ``||W||^2`` over an assumed
range-to-RMS ratio (data-free); see each criterion's module.

>>> import torch
>>> from pqcompile.build import analysis
>>> gm = analysis(torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(1, 4),))
>>> crit = get_criterion("weight_error")
>>> crit.needs_data, sorted(crit.layer_sensitivity(gm, "_0", [(4, 8), (8, 8)]))
(False, [(4, 8), (8, 8)])
>>> default_criterion(data=False).name, default_criterion(data=True).name
('weight_error', 'fisher')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Criterion, SecondOrderCriterion, prepare
from .channel import L1, ChannelFisher, Taylor
from .fisher import FisherTrace
from .hessian import HessianTrace
from .magnitude import Magnitude
from .weight_error import WeightError

CRITERIA: dict[str, Callable[..., Criterion]] = {
    "weight_error": WeightError,
    "magnitude": Magnitude,
    "l1": L1,
    "hessian": HessianTrace,
    "fisher": FisherTrace,
    "taylor": Taylor,
    "channel_fisher": ChannelFisher,
}


def get_criterion(spec: str | Criterion, **kwargs: Any) -> Criterion:
    """A criterion from a name in :data:`CRITERIA` (``kwargs`` go to its constructor), or
    ``spec`` itself when it already is one."""
    if isinstance(spec, Criterion):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} apply to a criterion name, not to the "
                            f"ready-made criterion {spec.name!r}")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"criterion must be a name or a Criterion, got {type(spec).__name__}")
    if spec not in CRITERIA:
        raise ValueError(f"unknown criterion {spec!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[spec](**kwargs)


def default_criterion(data: bool) -> Criterion:
    """``fisher`` when data is given (one pass over the data scores bits and channels),
    else the data-free ``weight_error``."""
    return FisherTrace() if data else WeightError()


__all__ = [
    "CRITERIA", "L1", "ChannelFisher", "Criterion", "FisherTrace", "HessianTrace", "Magnitude",
    "SecondOrderCriterion", "Taylor", "WeightError", "default_criterion", "get_criterion",
    "prepare",
]
