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
('met', 'bops 900 <= 1,000')
>>> budget_verdict({"bops": 1100.0}, {"bops": 1000.0}).describe()
'OVER BUDGET: bops 1,100 > 1,000 (1.1x over)'
>>> budget_verdict({"bops": 400.0}, {"bops": 1000.0}).describe()
'far below budget: bops 400 <= 1,000 (2.5x below)'
"""

from __future__ import annotations

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
        return "; ".join(parts)


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
