"""The joint problem as a 0/1 linear program, and what it says about unreachable budgets.

:class:`_Model` holds the variables, objective, equalities and cost rows of a
:class:`~pqcompile.solvers.problem.Problem` (see :mod:`pqcompile.solvers.ilp` for the
formulation); :func:`minimum_costs` solves it for the smallest reachable value of each cost, and
:func:`infeasible_error` turns those into the error every solver raises for an unreachable
budget. It lives apart from the ILP solver so that the greedy, SBS and FITCompress solvers can
raise the same error without importing the solver that uses them as its incumbent.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import coo_matrix

from ..budget import COST_KEYS, InfeasibleBudgetError
from ..passes.cost import FLOAT_BITS
from .problem import Layer, Problem, evaluate


@dataclass
class _Factor:
    layer: int
    groups: tuple[int, ...]  # indices into problem.groups
    offset: int
    shape: tuple[int, ...]  # (options, levels of groups[0], levels of groups[1])
    monomials: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def entries(self):
        return itertools.product(*(range(s) for s in self.shape))


class _Model:
    """Variables, objective, equalities and cost rows of one problem."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.gidx = {g.id: i for i, g in enumerate(problem.groups)}
        self.y0 = np.cumsum([0] + [len(g.levels) for g in problem.groups])
        n = int(self.y0[-1])
        self.factors: list[list[_Factor]] = []
        for li, layer in enumerate(problem.layers):
            fs = []
            for groups, monos in _factorize(layer, self.gidx):
                shape = (len(layer.options),) + tuple(len(problem.groups[g].levels)
                                                      for g in groups)
                fs.append(_Factor(li, groups, n, shape, monos))
                n += math.prod(shape)
            self.factors.append(fs)
        self.n = n
        self.objective = np.zeros(n)
        self.cost = {k: np.zeros(n) for k in COST_KEYS}
        fm = problem.float_macs
        self.const = {"bops": float(problem.fixed_bops + problem.float_mac_bops * fm.const),
                      "macs": float(problem.fixed_macs + fm.const),
                      "weight_bytes": 4.0 * problem.params32.const}
        if problem.latency is not None:
            self._latency_costs()
        for gi, g in enumerate(problem.groups):
            self.objective[self.y0[gi]:self.y0[gi + 1]] = g.sensitivity
        for g_id, per in problem.params32.terms:
            gi = self.gidx[g_id]
            for j, kept in enumerate(problem.groups[gi].levels):
                self.cost["weight_bytes"][self.y0[gi] + j] += 4.0 * per * kept
        for g_id, per in fm.terms:
            gi = self.gidx[g_id]
            for j, kept in enumerate(problem.groups[gi].levels):
                self.cost["bops"][self.y0[gi] + j] += problem.float_mac_bops * per * kept
                self.cost["macs"][self.y0[gi] + j] += per * kept
        for layer, fs in zip(problem.layers, self.factors):
            for fi, f in enumerate(fs):
                for v, entry in enumerate(f.entries()):
                    self._entry_costs(layer, f, f.offset + v, entry, fi == 0)
        self._equalities()

    def _latency_costs(self) -> None:
        """The ``latency_ms`` row: each term's table value on the binaries of a factor that
        holds the term's groups, at the entry's levels (constants go to ``const``)."""
        cost, const = np.zeros(self.n), 0.0
        for layer, fs, terms in zip(self.problem.layers, self.factors,
                                    self.problem.latency.layers):
            for term in terms:
                if not term.groups:
                    const += float(term.values[0])
                    continue
                gs = [self.gidx[g] for g in term.groups]
                home = next((f for f in fs if set(gs) <= set(f.groups)), None)
                if home is None:
                    raise ValueError(f"layer {layer.name!r}: a latency term over groups "
                                     f"{term.groups} spans groups of no single factor of its "
                                     "MACs; the latency model does not fit this problem")
                pos = [home.groups.index(g) + 1 for g in gs]
                sizes = [len(self.problem.groups[g].levels) for g in gs]
                for v, entry in enumerate(home.entries()):
                    flat = 0
                    for p, size in zip(pos, sizes):
                        flat = flat * size + entry[p]
                    cost[home.offset + v] += term.values[flat]
        self.cost["latency_ms"], self.const["latency_ms"] = cost, const

    def _entry_costs(self, layer: Layer, f: _Factor, var: int, entry, first: bool) -> None:
        w, a = layer.options[entry[0]]
        level = {g: self.problem.groups[g].levels[j] for g, j in zip(f.groups, entry[1:])}
        pairs = sum(coef * math.prod(level[g] for g in gs) for coef, gs in f.monomials)
        self.cost["bops"][var] = layer.macs_scale * pairs * w * a
        self.cost["macs"][var] = layer.macs_scale * pairs
        self.cost["weight_bytes"][var] = layer.weight_scale * pairs * w / 8
        if first:
            self.objective[var] = layer.sensitivity[entry[0]]

    def option_vars(self, li: int, factor: int = 0) -> list[list[int]]:
        """Variables of layer ``li``'s factor whose entry picks bit option ``b``, by ``b``."""
        f = self.factors[li][factor]
        out: list[list[int]] = [[] for _ in range(f.shape[0])]
        for v, entry in enumerate(f.entries()):
            out[entry[0]].append(f.offset + v)
        return out

    def _equalities(self) -> None:
        rows: list[tuple[dict[int, float], float]] = []
        for gi, g in enumerate(self.problem.groups):
            rows.append(({int(self.y0[gi]) + j: 1.0 for j in range(len(g.levels))}, 1.0))
        for li, fs in enumerate(self.factors):
            if not fs[0].groups:
                rows.append(({v: 1.0 for v in range(fs[0].offset, fs[0].offset
                                                      + fs[0].shape[0])}, 1.0))
            base = self.option_vars(li)
            for fi, f in enumerate(fs):
                marg: dict[tuple[int, int], list[int]] = {}
                for v, entry in enumerate(f.entries()):
                    for k, g in enumerate(f.groups):
                        marg.setdefault((g, entry[k + 1]), []).append(f.offset + v)
                for (g, j), vs in sorted(marg.items()):
                    row = {v: 1.0 for v in vs}
                    row[int(self.y0[g]) + j] = -1.0
                    rows.append((row, 0.0))
                if fi:
                    for b, vs in enumerate(self.option_vars(li, fi)):
                        row = {v: 1.0 for v in vs}
                        row.update({v: -1.0 for v in base[b]})
                        rows.append((row, 0.0))
        # A tensor is quantized once: readers of one activation share its bits, calls of one
        # module share its weight bits.
        for which, sets in ((1, self.problem.activation_sets()),
                            (0, self.problem.weight_sets())):
            for members in sets.values():
                values = sorted({o[which] for li in members
                                 for o in self.problem.layers[li].options})
                for li in members[1:]:
                    for value in values:
                        row: dict[int, float] = {}
                        for lj, sign in ((members[0], 1.0), (li, -1.0)):
                            opts = self.problem.layers[lj].options
                            for b, vs in enumerate(self.option_vars(lj)):
                                if opts[b][which] == value:
                                    row.update({v: sign for v in vs})
                        rows.append((row, 0.0))
        self.eq_rows = rows

    def solve(self, objective: np.ndarray, limits: dict[str, float], options: dict):
        cons = [_constraint(self.eq_rows, self.n, equal=True)]
        ub_rows = []
        for key, limit in sorted(limits.items()):
            # Scaled to O(1) so HiGHS's absolute tolerances are relative to the limit.
            vec = self.cost[key] / limit
            ub_rows.append(({int(v): vec[v] for v in np.flatnonzero(vec)},
                            (limit - self.const[key]) / limit))
        if ub_rows:
            cons.append(_constraint(ub_rows, self.n, equal=False))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unrecognized options",
                                    category=RuntimeWarning)
            return milp(objective, integrality=np.ones(self.n), bounds=(0, 1),
                        constraints=cons, options=options)

    def decode(self, x: np.ndarray) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
        kept = {}
        for gi, g in enumerate(self.problem.groups):
            j = int(np.argmax(x[self.y0[gi]:self.y0[gi] + len(g.levels)]))
            kept[g.id] = g.levels[j]
        bits = {}
        for li, layer in enumerate(self.problem.layers):
            mass = [x[vs].sum() for vs in self.option_vars(li)]
            bits[layer.name] = layer.options[int(np.argmax(mass))]
        return bits, kept


def _constraint(rows, n: int, equal: bool) -> LinearConstraint:
    r, c, v = [], [], []
    for i, (row, _) in enumerate(rows):
        for col, val in sorted(row.items()):
            r.append(i)
            c.append(col)
            v.append(val)
    a = coo_matrix((v, (r, c)), shape=(len(rows), n)).tocsr()
    rhs = np.array([b for _, b in rows], dtype=float)
    return LinearConstraint(a, rhs if equal else -np.inf, rhs)


def _factorize(layer: Layer, gidx: dict[int, int]):
    """Monomials of ``out * in`` grouped into factors of at most two groups."""
    o0, i0 = layer.out_channels.const, layer.in_channels.const
    outs = [(gidx[g], p) for g, p in layer.out_channels.terms]
    ins = [(gidx[g], p) for g, p in layer.in_channels.terms]
    monos = [(o0 * i0, ())] if o0 and i0 else []
    monos += [(o0 * p, (g,)) for g, p in ins if o0]
    monos += [(i0 * p, (g,)) for g, p in outs if i0]
    monos += [(po * pi, (go, gi)) for go, po in outs for gi, pi in ins]
    sets = sorted({tuple(sorted(set(gs))) for _, gs in monos}, key=lambda s: (-len(s), s))
    maximal = [s for s in sets if not any(set(s) < set(t) for t in sets)] or [()]
    factors = {s: [] for s in maximal}
    for coef, gs in monos:
        home = next(s for s in maximal if set(gs) <= set(s))
        factors[home].append((coef, gs))
    return sorted(factors.items())


def minimum_costs(problem: Problem, keys, model: _Model | None = None) -> dict[str, float]:
    """The smallest value of each cost in ``keys`` reachable in the search space (exact)."""
    model = model or _Model(problem)
    out = {}
    options = {"time_limit": 60.0, "mip_rel_gap": 0.0, "random_seed": 0, "threads": 1,
               "disp": False}
    for key in keys:
        scale = float(model.cost[key].max()) or 1.0
        res = model.solve(model.cost[key] / scale, {}, dict(options))
        if res.x is None:
            raise RuntimeError(f"the search space has no assignment at all ({res.message}): "
                               "activation ties and pinned layers contradict each other")
        bits, kept = model.decode(res.x)
        out[key] = evaluate(problem, bits, kept).costs[key]
    return out


def _fmt(v: float, key: str = "") -> str:
    if key == "latency_ms":
        return f"{v:.4g} ms"
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.2f}"


def infeasible_error(problem: Problem, limits: dict[str, float],
                     model: _Model | None = None) -> InfeasibleBudgetError:
    """The error for an unreachable budget, naming the smallest reachable value of each cost."""
    lows = minimum_costs(problem, sorted(limits), model)
    parts = []
    for key in sorted(limits):
        ref = problem.reference.get(key)
        against = "the unpruned latency table" if key == "latency_ms" else "FP32"
        ratio = f" ({ref / lows[key]:.1f}x below {against})" if ref and lows[key] else ""
        parts.append(f"{key} <= {_fmt(limits[key], key)} asked, smallest reachable is "
                     f"{_fmt(lows[key], key)}{ratio}")
    alone = all(lows[k] <= limits[k] for k in limits)
    hint = ("each limit is reachable alone but not all together; relax one" if alone else
            "relax the budget, or widen the search space (lower bit options, lower keep "
            "levels, fewer pinned layers)")
    float_part = _float_nodes_message(problem, limits)
    if float_part and not alone:
        hint = ("give those nodes bits (each says why it has none), or relax the budget, or "
                "widen the search space (lower bit options, lower keep levels)")
    return InfeasibleBudgetError("no assignment meets the budget: " + "; ".join(parts)
                                 + float_part + f"; {hint}", lows, limits)


def _float_nodes_message(problem: Problem, limits: dict[str, float], shown: int = 3) -> str:
    """Where a bops or macs limit meets MACs that no bits can reduce: the share of the MACs in
    nodes outside the layers (they run in float, at ``FLOAT_BITS`` squared a MAC), the
    reduction they alone
    allow, and the largest of them with the reason each gets no bits."""
    if not problem.float_nodes or not {"bops", "macs"} & set(limits):
        return ""
    total = float(problem.reference.get("macs") or 0)
    macs = sum(m for _, m, _ in problem.float_nodes)
    if not total or not macs:
        return ""
    largest = sorted(problem.float_nodes, key=lambda t: -t[1])
    named = "; ".join(f"node {name!r}, {m / total:.0%} of the MACs: {why}"
                      for name, m, why in largest[:shown])
    more = f"; and {len(largest) - shown} more" if len(largest) > shown else ""
    cap = ""
    if "bops" in limits and problem.reference.get("bops"):
        cap = (f"; they alone cap the BOP reduction at "
               f"{problem.reference['bops'] / (macs * FLOAT_BITS * FLOAT_BITS):.1f}x")
    width = FLOAT_BITS
    return (f". {macs / total:.0%} of the MACs are in {len(largest)} node(s) that get no bits "
            f"and count at {width}x{width} bits (float MACs){cap}: {named}{more}")
