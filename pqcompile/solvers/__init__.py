"""Solvers: choose bits per layer and keep levels per channel group under a budget.

Every solver takes the pure-data :class:`~pqcompile.solvers.problem.Problem` and a
:class:`~pqcompile.budget.Budget` (or absolute limits) and returns a
:class:`~pqcompile.solvers.problem.Solution`; solvers are registered by name so new ones
plug in with :func:`register_solver`.

>>> sorted(list_solvers())
['ajpq', 'fitcompress', 'greedy', 'ilp', 'picpq', 'prune8', 'sbs', 'uniform4', 'uniform8']
>>> get_solver("ilp", time_limit=10).name
'ilp'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..budget import Budget
from .graph import build_problem, to_assignment, weight_noise_sensitivity
from .greedy import GreedySolver
from .ilp import ILPSolver, infeasible_error, minimum_costs
from .problem import (
    Affine,
    Group,
    LatencyModel,
    LatencyTerm,
    Layer,
    Problem,
    Solution,
    evaluate,
    keep_count,
    layer_latency,
    problem_costs,
    resolve_limits,
    with_latency_model,
)
from .uniform import PruneUniformSolver, UniformSolver


class Solver(Protocol):
    name: str

    def solve(self, problem: Problem, budget: Budget | Mapping[str, float]) -> Solution: ...


# A solver that bounds ``latency_ms`` (reads the problem's latency model) sets
# ``bounds_latency = True`` and calls ``resolve_limits(problem, budget, latency=True)``.
# A searching solver also sets ``needs_context = True`` and takes ``solve(problem, budget, *,
# context: SearchContext)`` (pqcompile.solvers.search).


_REGISTRY: dict[str, Callable[..., Solver]] = {}


def register_solver(name: str, factory: Callable[..., Solver], *,
                    overwrite: bool = False) -> None:
    """Make ``get_solver(name, **options)`` call ``factory(**options)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a solver name is a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"solver {name!r} is already registered; pass overwrite=True to "
                         "replace it")
    _REGISTRY[name] = factory


def list_solvers() -> list[str]:
    return sorted(_REGISTRY)


def get_solver(name: str, **options: Any) -> Solver:
    """A solver by name, built with ``options`` (e.g. ``time_limit`` for ``"ilp"``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; registered solvers: "
                         f"{', '.join(list_solvers())}")
    return _REGISTRY[name](**options)


def _searching(module: str, cls: str) -> Callable[..., Solver]:
    """A factory importing a searching solver's module on first use (they pull in training)."""
    def factory(**options: Any) -> Solver:
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(**options)
    return factory


register_solver("ilp", ILPSolver)
register_solver("greedy", GreedySolver)
register_solver("uniform4", lambda **kw: UniformSolver(4, 4, name="uniform4", **kw))
register_solver("uniform8", lambda **kw: UniformSolver(8, 8, name="uniform8", **kw))
register_solver("prune8", lambda **kw: PruneUniformSolver(8, name="prune8", **kw))
# The seed methods: they search with the model and data (see solvers/search.py).
register_solver("sbs", _searching("sbs", "SBSSolver"))
register_solver("ajpq", _searching("ajpq", "AJPQSolver"))
register_solver("fitcompress", _searching("fitcompress", "FITCompressSolver"))
register_solver("picpq", _searching("picpq", "PICPQSolver"))

__all__ = [
    "Affine", "GreedySolver", "Group", "ILPSolver", "LatencyModel", "LatencyTerm", "Layer",
    "Problem", "PruneUniformSolver", "Solution", "Solver", "UniformSolver", "build_problem",
    "evaluate", "get_solver", "infeasible_error", "keep_count", "layer_latency", "list_solvers",
    "minimum_costs", "problem_costs", "register_solver", "resolve_limits", "to_assignment",
    "weight_noise_sensitivity", "with_latency_model",
]
