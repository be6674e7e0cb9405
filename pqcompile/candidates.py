"""The candidates a solver saw, for the report's accuracy-vs-BOPs Pareto plot.

A candidate is a plain dict (it goes into the artifact manifest as JSON)::

    {"bops": ..., "macs": ..., "weight_bytes": ..., "bop_reduction": FP32 BOPs / bops,
     "objective": the problem's summed sensitivity (the predicted loss every solver shares),
     "accuracy": held-out accuracy or None, "loss": held-out loss or None,
     "source": "search" | "sweep" | "chosen"}

Searching solvers record what they measured (AJPQ's episodes, PIC-PQ's population) or walked
(FITCompress's path) through :meth:`pqcompile.solvers.search.SearchContext.record`. Solvers
that decide from the problem alone (ILP, greedy, uniform) see one candidate per budget, so the
front is traced by solving the same problem at budgets around the user's
(:func:`budget_sweep`); with data, :func:`measure_front` measures the front's accuracy the way
the searching solvers do (fake-quant model, held-out batches).

>>> from pqcompile.solvers import Affine, Group, Layer, Problem, get_solver
>>> layer = Layer("fc", 64, 64, Affine(8), Affine(8), 1, 1, ((4, 8), (8, 8)), (1.0, 0.0), "x")
>>> problem = Problem((layer,), (), Affine(0), 0, 0, {"bops": 64 * 1024, "macs": 64})
>>> front = budget_sweep(problem, get_solver("ilp"), {"bops": 4096})
>>> sorted({c["bops"] for c in front})
[2048, 4096]
>>> [c["bops"] for c in pareto_front(front, "objective")]
[2048, 4096]
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .budget import InfeasibleBudgetError
from .errors import SolverTimeoutError
from .progress import Progress
from .solvers.ilp import ILPSolver
from .solvers.problem import evaluate, needs_context

__all__ = ["SWEEP_FACTORS", "SWEEP_SECONDS", "Candidates", "budget_sweep", "candidate",
           "measure_front", "pareto_front", "solver_candidates"]

# Limits of the sweep relative to the user's: tighter and looser, one candidate each.
SWEEP_FACTORS = (0.5, 0.65, 0.8, 1.0, 1.25, 1.6, 2.0, 3.0)
# Seconds for the whole sweep: an ILP on a large graph (densenet201: ~200 layers, ~190k
# binaries) takes tens of seconds a budget; what does not fit is skipped and noted.
SWEEP_SECONDS = 60.0


def candidate(problem: Any, bits: Mapping[str, Any], kept: Mapping[int, int], *,
              source: str, accuracy: float | None = None, loss: float | None = None
              ) -> dict[str, Any]:
    """The record of one assignment: costs and predicted objective from ``problem``."""
    s = evaluate(problem, bits, kept)
    return _record(problem, s, source, accuracy, loss)


def _record(problem: Any, solution: Any, source: str, accuracy: float | None,
            loss: float | None) -> dict[str, Any]:
    costs = solution.costs
    ref = problem.reference.get("bops")
    return {"bops": int(costs["bops"]), "macs": int(costs.get("macs", 0)),
            "weight_bytes": float(costs.get("weight_bytes", 0.0)),
            "bop_reduction": ref / costs["bops"] if ref and costs["bops"] else None,
            "objective": float(solution.objective),
            "accuracy": None if accuracy is None else float(accuracy),
            "loss": None if loss is None or not math.isfinite(loss) else float(loss),
            "source": source, "_solution": solution}


class Candidates(list):
    """A list of candidate records with ``notes``: what the sweep left out and why (the report
    prints them)."""

    def __init__(self, items: Iterable[dict[str, Any]] = (), notes: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.notes = list(notes)


def budget_sweep(problem: Any, solver: Any, limits: Mapping[str, float],
                 factors: Sequence[float] = SWEEP_FACTORS, *, solution: Any = None,
                 seconds: float | None = SWEEP_SECONDS) -> Candidates:
    """``solver`` on ``problem`` at each limit scaled by ``factors`` (unreachable ones left
    out): the front a solver that decides from the problem alone would trace, by factor.

    ``solution``: ``solver``'s answer at the limits themselves, reused for factor 1.
    ``seconds``: the time for the whole sweep (``None``: unbounded). Factors are solved
    nearest to 1 first, a solver with ``with_time_limit`` (the ILP) bounded to what is left;
    the factors left when time runs out are skipped and named in ``.notes``."""
    start = time.perf_counter()
    order = sorted(range(len(factors)), key=lambda i: abs(math.log(factors[i])))
    found: dict[int, Any] = {}
    skipped, failed = [], []
    for i in order:
        f = factors[i]
        if f == 1.0 and solution is not None:
            found[i] = solution
            continue
        left = None if seconds is None else seconds - (time.perf_counter() - start)
        if left is not None and left <= 0:
            skipped.append(f)
            continue
        bounded = solver.with_time_limit(left) if left is not None \
            and hasattr(solver, "with_time_limit") else solver
        try:
            found[i] = bounded.solve(problem, {k: v * f for k, v in limits.items()})
        except InfeasibleBudgetError:
            continue
        except SolverTimeoutError:
            failed.append(f)
    out, seen = Candidates(), set()
    for i in sorted(found):
        s = found[i]
        key = (tuple(sorted(s.bits.items())), tuple(sorted(s.kept.items())))
        if key not in seen:
            seen.add(key)
            out.append(_record(problem, s, "sweep", None, None))
    name = getattr(solver, "name", type(solver).__name__)
    fell = [factors[i] for i in sorted(found) if found[i] is not solution
            and found[i].info.get("fallback")]
    if fell:  # the ILP out of time: its greedy incumbent stands for it at these budgets
        out.notes.append(f"pareto front: at {', '.join(f'x{f:g}' for f in fell)} {name} "
                         "returned its fallback incumbent (out of time)")
    for what, fs in (("skipped: the sweep's time budget of "
                      f"{seconds if seconds is not None else 0:g} s ran out", skipped),
                     ("no assignment found in time", failed)):
        if fs:
            out.notes.append(f"pareto front: {name} at {len(factors) - len(skipped + failed)} of "
                             f"{len(factors)} budgets; {', '.join(f'x{f:g}' for f in fs)} "
                             f"{what}")
    return out


def pareto_front(candidates: Iterable[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """The candidates no other beats on both BOPs (fewer) and ``key`` (``"accuracy"``: higher;
    ``"objective"``/``"loss"``: lower), by increasing BOPs; those without ``key`` left out."""
    sign = -1.0 if key == "accuracy" else 1.0
    scored = sorted((c for c in candidates if c.get(key) is not None),
                    key=lambda c: (c["bops"], sign * c[key]))
    front: list[Mapping[str, Any]] = []
    for c in scored:
        if not front or sign * c[key] < sign * front[-1][key]:
            front.append(c)
    return front


def measure_front(candidates: list[dict[str, Any]], context: Any, limit: int,
                  progress: bool = False) -> None:
    """Measure the held-out loss (the compile objective) and, for a classifier, accuracy
    (fake-quant model, as the searching solvers do: ``context.measure``) of up to ``limit``
    candidates of the predicted front, spread over it, in place. A model whose outputs are not
    class logits keeps ``accuracy`` None: its front is the measured loss."""
    todo = [c for c in pareto_front(candidates, "objective")
            if c.get("accuracy") is None and c.get("loss") is None]
    if len(todo) > limit:
        step = (len(todo) - 1) / max(limit - 1, 1)
        todo = [todo[round(i * step)] for i in range(limit)]
    bar = Progress(len(todo), "pareto", enabled=progress)
    for i, c in enumerate(todo):
        s = c["_solution"]
        assignment = context.assignment(s.bits, s.kept)
        loss, score = (float(v) for v in context.measure(context.fake_quant(assignment)))
        c["loss"] = loss if math.isfinite(loss) else None
        c["accuracy"] = score if getattr(context, "metric", "accuracy") == "accuracy" else None
        bar.update(i + 1, loss=loss)


def solver_candidates(problem: Any, solver: Any, limits: Mapping[str, float], solution: Any,
                      context: Any = None, *, measure: int = 0, progress: bool = False,
                      seconds: float | None = SWEEP_SECONDS) -> Candidates:
    """What ``solver`` saw on its way to ``solution``, plus the chosen one (``source``
    ``"chosen"``): the candidates it recorded on ``context``, else (a solver deciding from the
    problem alone, or a search that measures no discrete candidates) the sweep of budgets
    around ``limits`` by that solver (by the ILP for a searching one). With a ``context``, the
    chosen one and up to ``measure`` candidates of the predicted front get measured accuracy.
    ``seconds`` bounds the sweep (:func:`budget_sweep`; ``.notes`` says what it skipped)."""
    seen = Candidates(context.candidates if context is not None else ())
    if not seen:
        searching = needs_context(solver)
        seen = budget_sweep(problem, ILPSolver() if searching else solver, limits,
                            solution=None if searching else solution, seconds=seconds)
    if context is not None and measure:
        measure_front(seen, context, measure, progress)
    chosen = _record(problem, solution, "chosen", None, None)
    for c in seen:
        if (c["accuracy"] is not None or c["loss"] is not None) \
                and _same(c["_solution"], solution):
            chosen["accuracy"], chosen["loss"] = c["accuracy"], c["loss"]
    if context is not None and chosen["accuracy"] is None and chosen["loss"] is None:
        measure_front([chosen], context, 1)
    return Candidates(seen + [chosen], seen.notes)


def _same(a: Any, b: Any) -> bool:
    return dict(a.bits) == dict(b.bits) and dict(a.kept) == dict(b.kept)


def public(candidates: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The JSON-ready records (internal fields dropped)."""
    return [{k: v for k, v in c.items() if not k.startswith("_")} for c in candidates]
