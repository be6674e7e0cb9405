"""Whether costs meet a budget: met, over it, or far below it.

One rule for every place that judges a result against its limits (a solver's
:class:`~pqcompile.solvers.problem.Solution`, ``compile()``'s warning, the report's header, the
CLI's exit status), so they never disagree:

* ``"over"``: some cost exceeds its limit;
* ``"far below"``: every limited cost is more than :data:`FAR_BELOW` times below its limit. The
  binding limit is slack by that much, which usually means accuracy was given away for nothing
  (a solver that stopped early, an objective too flat to tell points apart); a budget with
  several limits counts as met while any one of them is within that factor;
* ``"met"``: otherwise.

>>> v = budget_verdict({"bops": 900.0}, {"bops": 1000.0})
>>> v.status, v.describe()
('met', 'under budget: bops 900 <= 1,000')
>>> budget_verdict({"bops": 1100.0}, {"bops": 1000.0}).describe()
'OVER BUDGET: bops 1,100 > 1,000 (1.1x over)'
>>> budget_verdict({"bops": 400.0}, {"bops": 1000.0}).describe()
'far below budget: bops 400 <= 1,000 (2.5x below)'
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

FAR_BELOW = 2.0  # every limited cost this many times below its limit: flagged


@dataclass(frozen=True)
class BudgetVerdict:
    """``status``: ``"met"``, ``"over"`` or ``"far below"``; ``costs`` and ``limits`` of the
    limited keys; ``slack``: the smallest ``limit / cost`` over them (> 1 means under)."""

    status: str
    costs: Mapping[str, float]
    limits: Mapping[str, float]
    slack: float

    @property
    def over(self) -> dict[str, tuple[float, float]]:
        """``{key: (cost, limit)}`` of the limits exceeded."""
        return {k: (self.costs[k], v) for k, v in self.limits.items() if self.costs[k] > v}

    def describe(self) -> str:
        """One line: the verdict and each limited cost against its limit."""
        if self.status == "over":
            parts = [f"{k} {_fmt(c, k)} > {_fmt(v, k)} ({c / v:.3g}x over)"
                     for k, (c, v) in sorted(self.over.items())]
            return "OVER BUDGET: " + "; ".join(parts)
        parts = [f"{k} {_fmt(self.costs[k], k)} <= {_fmt(v, k)}"
                 for k, v in sorted(self.limits.items())]
        if self.status == "far below":
            return f"far below budget: {'; '.join(parts)} ({self.slack:.3g}x below)"
        return "under budget: " + "; ".join(parts)


def budget_verdict(costs: Mapping[str, float], limits: Mapping[str, float]) -> BudgetVerdict:
    """The verdict of ``costs`` against the absolute ``limits`` (keys missing from ``costs``,
    such as ``latency_ms`` for a model without a latency table, are left out)."""
    limits = {k: float(v) for k, v in limits.items() if k in costs}
    costs = {k: float(costs[k]) for k in limits}
    if not limits:
        return BudgetVerdict("met", costs, limits, float("inf"))
    slack = min(v / costs[k] if costs[k] > 0 else float("inf") for k, v in limits.items())
    if any(costs[k] > v for k, v in limits.items()):
        status = "over"
    elif slack > FAR_BELOW:
        status = "far below"
    else:
        status = "met"
    return BudgetVerdict(status, costs, limits, slack)


def _fmt(v: float, key: str) -> str:
    if key == "latency_ms":
        return f"{v:.4g} ms"
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.2f}"


def built_costs(totals: Mapping[str, float], solution=None) -> dict[str, float]:
    """The costs a budget is judged on: the built model's ``totals`` (bops, macs,
    weight_bytes) and, for a latency budget, the solution's predicted ``latency_ms``."""
    costs = {k: float(totals[k]) for k in ("bops", "macs", "weight_bytes") if k in totals}
    if solution is not None and "latency_ms" in solution.costs:
        costs["latency_ms"] = float(solution.costs["latency_ms"])
    return costs


def warn_budget(totals: Mapping[str, float], solution, limits: Mapping[str, float],
                stacklevel: int = 3) -> BudgetVerdict:
    """Judge the built model against ``limits``; a
    :class:`~pqcompile.errors.BudgetWarning` when it is over a limit or far below all."""
    from ..errors import BudgetWarning

    verdict = budget_verdict(built_costs(totals, solution), limits)
    who = f"solver {solution.solver!r}" if getattr(solution, "solver", "") else "the solver"
    if verdict.status == "over":
        warnings.warn(BudgetWarning(
            f"the compressed model is {verdict.describe()}: {who} does not search for the "
            "budget (uniform baselines) or could not meet it; use solver='ilp', or relax the "
            "budget"), stacklevel=stacklevel)
    elif verdict.status == "far below":
        warnings.warn(BudgetWarning(
            f"the compressed model is {verdict.describe()}: {who} gave away more than the "
            "budget asked, which usually costs accuracy; check the sensitivities (a criterion "
            "that scores every option alike), or use solver='ilp'"), stacklevel=stacklevel)
    return verdict


def solution_notes(solution) -> list[str]:
    """Lines for the report about how ``solution`` was reached (a solver's fallback)."""
    info = getattr(solution, "info", {}) or {}
    if info.get("fallback"):
        return [f"solver {solution.solver}: the {info['fallback']} incumbent is used "
                f"({info.get('reason', '')})"]
    return []


def totals_verdict(budget, totals: Mapping[str, float], solution=None) -> BudgetVerdict:
    """The built model's ``totals`` against ``budget`` (a :class:`~pqcompile.budget.Budget` or
    its text form), its ratios resolved against the FP32 totals in ``totals``. A latency limit
    is judged on ``solution``'s predicted ``latency_ms`` when it is absolute and ``solution``
    has one, else left out (a ratio needs the latency table's unpruned total)."""
    from ..budget import Budget

    asked = (Budget.parse(budget) if isinstance(budget, str) else budget).items()
    latency = asked.pop("latency_ms", None)
    reference = {"bops": totals.get("fp32_bops"), "macs": totals.get("fp32_macs"),
                 "weight_bytes": totals.get("fp32_weight_bytes")}
    limits = Budget(**asked).resolve({k: v for k, v in reference.items() if v}) \
        if asked else {}
    if latency is not None and not isinstance(latency, str):
        limits["latency_ms"] = float(latency)
    return budget_verdict(built_costs(totals, solution), limits)


def budget_line(solver: str | None, budget: str | None, totals: Mapping[str, float]) -> str:
    """The report's header line: the solver, the budget, and the built model's ``totals``
    against the budget's limits (:func:`totals_verdict`: under, ``OVER BUDGET`` or far
    below)."""
    head = f"solver {solver or '?'}, budget {budget or '?'}"
    if not budget:
        return head
    try:
        verdict = totals_verdict(budget, totals)
    except (ValueError, TypeError) as exc:
        return f"{head} (not checked: {exc})"
    text = f"{head}: {verdict.describe()}" if verdict.limits else head
    if "latency_ms" in budget and "latency_ms" not in verdict.limits:
        text += " (latency_ms: the solver's prediction, not judged here)"
    return text
