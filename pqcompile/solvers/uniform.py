"""Uniform baselines: the peers a search is compared with.

``UniformSolver(4, 4)``: every layer at w4/a4, first and last layer at 8/8, no pruning;
``PruneUniformSolver()``: every prunable group at one keep fraction (the largest of the
problem's keep fractions that meets the budget), all layers at 8/8. They do not search, so
they never raise on an unreachable budget: ``Solution.feasible`` says whether it holds.

>>> from pqcompile.solvers.problem import Affine, Group, Layer, Problem
>>> layer = Layer("fc", 64, 64, Affine(0, ((0, 1),)), Affine(8), 1, 1, ((8, 8), (4, 4)),
...               (0.0, 1.0), "x")
>>> p = Problem((layer,), (Group(0, "g", 8, (8, 4), (0.0, 0.5)),), Affine(0), 0, 0,
...             {"bops": 64 * 1024, "macs": 64, "weight_bytes": 256}, (1.0, 0.5))
>>> s = UniformSolver(4, 4, ends_8bit=False).solve(p, {"bops": 2048})
>>> s.bits["fc"], s.costs["bops"], s.feasible
((4, 4), 1024, True)
>>> PruneUniformSolver().solve(p, {"bops": 2048}).kept
{0: 4}
"""

from __future__ import annotations

from .problem import Problem, Solution, evaluate, keep_count, resolve_limits


class UniformSolver:
    """All layers at ``weight``/``activation`` bits (first/last at 8/8 if ``ends_8bit``)."""

    def __init__(self, weight: int, activation: int | None = None, *,
                 ends_8bit: bool = True, name: str | None = None) -> None:
        activation = weight if activation is None else activation
        for what, b in (("weight", weight), ("activation", activation)):
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 32:
                raise ValueError(f"uniform {what} bits must be an int in 1..32, got {b!r}")
        self.weight, self.activation, self.ends_8bit = weight, activation, ends_8bit
        self.name = name or f"uniform{weight}" + (f"a{activation}"
                                                   if activation != weight else "")

    def solve(self, problem: Problem, budget) -> Solution:
        limits = resolve_limits(problem, budget)
        last = len(problem.layers) - 1
        bits = {layer.name: (8, 8) if self.ends_8bit and i in (0, last)
                else (self.weight, self.activation) for i, layer in enumerate(problem.layers)}
        sol = evaluate(problem, bits, {}, limits, solver=self.name)
        return _note(sol)


class PruneUniformSolver:
    """Structured pruning alone: one keep fraction for every group, then ``bits``/``bits``."""

    def __init__(self, bits: int = 8, *, name: str | None = None) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
            raise ValueError(f"bits must be an int in 1..32, got {bits!r}")
        self.bits = bits
        self.name = name or f"prune{bits}"

    def solve(self, problem: Problem, budget) -> Solution:
        limits = resolve_limits(problem, budget)
        bits = {layer.name: (self.bits, self.bits) for layer in problem.layers}
        sol = None
        for fraction in sorted(problem.keep_fractions, reverse=True):
            kept = {g.id: keep_count(g.size, fraction, g.granule)
                    for g in problem.groups}
            sol = evaluate(problem, bits, kept, limits, solver=self.name,
                           info={"keep_fraction": fraction})
            if sol.feasible:
                break
        return _note(sol)


def _note(sol: Solution) -> Solution:
    info = dict(sol.info, budget_met=sol.feasible)
    return Solution(sol.bits, sol.kept, sol.objective, sol.costs, sol.solver, sol.feasible, info)
