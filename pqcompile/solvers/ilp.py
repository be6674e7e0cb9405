"""An exact integer linear program over bits and keep levels (scipy's HiGHS MILP).

BOPs of a layer are ``macs_scale * out(k) * in(k) * w * a``: a product of the bit choice and up
to two group levels. Expanding ``out * in`` gives monomials in at most two kept counts; each
layer gets one binary per (bit option, levels of the groups of a monomial), so every cost is a
linear function of binaries and exact. Their marginals are tied to one-hot level binaries
``y[g, j]`` per group, and a layer's several factors (a concat input) agree on its bit option.
Layers reading one tensor get equal activation bits; calls of one module equal weight bits.
The objective is the summed sensitivity (bit options + keep levels), shifted and scaled by the
greedy descent's (:mod:`pqcompile.solvers.objective_scale`), whose assignment is also the
answer when HiGHS finds nothing as good in its time limit; every budget limit is one row. A latency model (:class:`~pqcompile.solvers.problem.LatencyModel`) is a sum of tables over
the levels of at most two groups of a layer, each within one of the layer's factors (a layer's
latency depends on its kept output and input channels, as its MACs do): each table value goes
on the factor's binaries of that level combination, so the latency row is exact too.
After solving, the costs are
recomputed in integers and the solve is repeated with a tighter row if HiGHS's tolerances let
a limit slip.

>>> from pqcompile.solvers.problem import Affine, Group, Layer, Problem
>>> layer = Layer("fc", 64, 64, Affine(0, ((0, 1),)), Affine(8), 1, 1, ((8, 8), (4, 8)),
...               (0.0, 1.0), "x")
>>> p = Problem((layer,), (Group(0, "g", 8, (8, 4), (0.0, 0.5)),), Affine(0), 0, 0,
...             {"bops": 64 * 1024, "macs": 64, "weight_bytes": 256})
>>> s = ILPSolver().solve(p, {"bops": 64 * 64 // 2})
>>> s.bits["fc"], s.kept[0], s.objective
((8, 8), 4, 0.5)
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

from ..budget import InfeasibleBudgetError
from ..errors import SolverTimeoutError
from .greedy import GreedySolver
from .ilp_model import _Model, infeasible_error, minimum_costs
from .objective_scale import normalized_objective
from .problem import Problem, Solution, evaluate, resolve_limits

__all__ = ["ILPSolver", "infeasible_error", "minimum_costs"]  # the latter two from ilp_model


class ILPSolver:
    """Exact joint solver: minimum summed sensitivity under every budget limit.

    ``time_limit`` (s) bounds HiGHS's search and ``mip_rel_gap`` its optimality gap; ``seed``
    and ``threads=1`` make HiGHS deterministic. The greedy descent
    (:class:`~pqcompile.solvers.greedy.GreedySolver`) runs first (``incumbent=True``): its
    assignment normalizes the objective (:func:`normalized_objective`: the gap means the same
    whatever the sensitivities' magnitude) and is the answer when HiGHS finds nothing as good
    within the time limit (``info["fallback"]`` says why). ``solve`` raises
    :class:`~pqcompile.budget.InfeasibleBudgetError` with the smallest reachable value of each
    limited cost when nothing meets the budget, :class:`~pqcompile.errors.SolverTimeoutError`
    when HiGHS ran out of time and the descent found nothing either. It bounds ``latency_ms``
    on a problem with a latency model (:func:`pqcompile.latency.attach_latency`).
    """

    name = "ilp"
    bounds_latency = True  # reads the problem's latency model for a latency_ms limit

    def __init__(self, *, time_limit: float = 60.0, mip_rel_gap: float = 1e-6, seed: int = 0,
                 threads: int = 1, incumbent: bool = True) -> None:
        if not time_limit > 0 or not 0 <= mip_rel_gap < 1:
            raise ValueError(f"time_limit must be > 0 and mip_rel_gap in [0, 1), got "
                             f"{time_limit!r} and {mip_rel_gap!r}")
        self.options = {"time_limit": float(time_limit), "mip_rel_gap": float(mip_rel_gap),
                        "random_seed": int(seed), "threads": int(threads), "presolve": True,
                        "disp": False}
        self.incumbent = bool(incumbent)

    def with_time_limit(self, seconds: float) -> ILPSolver:
        """The same solver with HiGHS bounded to ``seconds`` (at most its own limit)."""
        out = copy.copy(self)
        out.options = dict(self.options, time_limit=max(min(float(seconds),
                                                             self.options["time_limit"]), 1e-3))
        return out

    def solve(self, problem: Problem, budget) -> Solution:
        limits = resolve_limits(problem, budget, latency=self.bounds_latency)
        start = time.perf_counter()
        greedy, greedy_error = self._greedy(problem, limits) if self.incumbent else (None, None)
        if greedy_error is not None and any(greedy_error.minimum.get(k, 0.0) > v
                                            for k, v in limits.items()):
            raise greedy_error  # a limit below its smallest reachable value: nothing to search
        model = _Model(problem)
        objective, scale = normalized_objective(problem, model, greedy)
        rows = dict(limits)
        deadline = time.perf_counter() + self.options["time_limit"]  # HiGHS's, over retries
        for _ in range(4):
            options = dict(self.options, time_limit=max(deadline - time.perf_counter(), 1e-3))
            res = model.solve(objective, rows, options)
            info = {"variables": model.n, "constraints": len(model.eq_rows) + len(rows),
                    "seconds": time.perf_counter() - start, "status": res.message,
                    "mip_gap": getattr(res, "mip_gap", None), "objective_scale": scale}
            if res.x is None:
                if res.status == 2:
                    raise infeasible_error(problem, limits, model)
                if greedy is not None:
                    return _fallback(greedy, info, f"HiGHS found no assignment within "
                                     f"{self.options['time_limit']:g} s ({res.message})")
                raise SolverTimeoutError(
                    f"the ILP found no assignment within {self.options['time_limit']:g} s "
                    f"({res.message}) and the greedy descent none either"
                    + (f" ({greedy_error})" if greedy_error else "") + "; raise time_limit "
                    "(solver_options={'time_limit': ...}) or relax the budget")
            bits, kept = model.decode(res.x)
            sol = evaluate(problem, bits, kept, limits, solver=self.name, info=info)
            if sol.feasible:
                if greedy is not None and greedy.objective < sol.objective:
                    return _fallback(greedy, info, f"HiGHS stopped ({res.message}) at a worse "
                                     f"objective {sol.objective:.6g} than the greedy "
                                     f"descent's {greedy.objective:.6g}")
                return sol
            for key, limit in limits.items():  # a tolerance let a limit slip: tighten the row
                if sol.costs[key] > limit:
                    rows[key] -= sol.costs[key] - limit + 1e-6 * limit
        if greedy is not None:
            return _fallback(greedy, info, "HiGHS's solutions kept exceeding the budget by "
                             "rounding")
        raise RuntimeError("the ILP's solutions kept exceeding the budget by rounding; this is a"
                           " bug: report the problem")

    def _greedy(self, problem: Problem, limits: dict[str, float]):
        """The greedy descent's solution, or the error it raised."""
        try:
            return GreedySolver().solve(problem, limits), None
        except InfeasibleBudgetError as exc:
            return None, exc


def _fallback(greedy: Solution, info: dict, reason: str) -> Solution:
    """The greedy incumbent, with the ILP's figures and why it was returned."""
    return replace(greedy, solver="ilp", info={**info, "fallback": "greedy", "reason": reason,
                                               "greedy": dict(greedy.info)})
