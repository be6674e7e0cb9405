"""The ILP's objective, shifted and scaled so HiGHS's gaps and tolerances are relative.

HiGHS stops when the primal-dual gap is below an absolute (1e-6) or a relative bound, and
treats reduced costs below ~1e-7 as zero. Sensitivities have no fixed unit (a Fisher trace of
a model fine-tuned to ~100% train accuracy sums to ~1e-7, a weight error to ~1e3), so the raw
objective made "optimal" mean anything from "exact" to "any feasible point" (277x fewer BOPs
for a 60x budget). :func:`normalized_objective` makes the problem HiGHS sees the same for
sensitivities scaled by any positive factor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .problem import Problem, Solution


def normalized_objective(problem: Problem, model: Any,
                         incumbent: Solution | None = None) -> tuple[np.ndarray, float]:
    """The objective HiGHS minimizes, and the scale it was divided by.

    Each layer's and group's sensitivities are shifted by their smallest value (exactly one
    option and one level is picked, so the optimum does not move) and divided by the shifted
    objective of ``incumbent`` (else by the largest shifted coefficient): the incumbent scores
    1 and the optimum lies in [0, 1], so HiGHS's absolute and relative gaps and tolerances
    mean the same for sensitivities of 1e-8 and of 1e8. Without it, objectives near 1e-7 fall
    below HiGHS's absolute gap (1e-6) and any feasible point is accepted as optimal.
    """
    objective = model.objective.copy()
    shift = 0.0
    for li, layer in enumerate(problem.layers):
        low = min(layer.sensitivity)
        shift += low
        for vs in model.option_vars(li):
            objective[vs] -= low
    for gi, g in enumerate(problem.groups):
        low = min(g.sensitivity)
        shift += low
        objective[model.y0[gi]:model.y0[gi + 1]] -= low
    scale = incumbent.objective - shift if incumbent is not None else 0.0
    if not scale > 0:
        scale = float(np.abs(objective).max()) if objective.size else 0.0
    scale = scale if scale > 0 else 1.0
    return objective / scale, scale
