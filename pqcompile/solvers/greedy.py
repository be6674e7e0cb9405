"""A greedy descent: from the highest setting, take the cheapest move until the budget holds.

A move lowers one module's weight bits one step (every call of it moves together), one
activation tensor's bits one step (every layer reading it moves together, keeping its weight
bits or the next lower available), or one group one keep level. The move taken is the one
with the smallest sensitivity increase per unit of cost saved, where savings count only on the
limits still exceeded, each relative to its limit. It is fast and never better than the ILP's
optimum: the baseline the exact solver is measured against. A ``latency_ms`` limit is read from
the problem's latency model; measured latency need not fall with every keep level, so the
descent can stop short of a reachable latency budget (the error says so; the ILP is exact).

>>> from pqcompile.solvers.problem import Affine, Group, Layer, Problem
>>> layer = Layer("fc", 64, 64, Affine(0, ((0, 1),)), Affine(8), 1, 1, ((8, 8), (4, 8)),
...               (0.0, 1.0), "x")
>>> p = Problem((layer,), (Group(0, "g", 8, (8, 4), (0.0, 0.5)),), Affine(0), 0, 0,
...             {"bops": 64 * 1024, "macs": 64, "weight_bytes": 256})
>>> s = GreedySolver().solve(p, {"bops": 64 * 64 // 2})
>>> s.bits["fc"], s.kept[0], s.objective
((8, 8), 4, 0.5)
"""

from __future__ import annotations

import time

from ..budget import InfeasibleBudgetError
from .ilp_model import infeasible_error
from .problem import (
    Option,
    Problem,
    Solution,
    evaluate,
    layer_costs,
    layer_latency,
    resolve_limits,
)

_KEYS = ("bops", "macs", "weight_bytes")


class GreedySolver:
    """Best sensitivity-per-cost-saved first; raises ``InfeasibleBudgetError`` like the ILP."""

    name = "greedy"
    bounds_latency = True  # reads the problem's latency model for a latency_ms limit

    def solve(self, problem: Problem, budget, *, start=None) -> Solution:
        """``start``: ``(bits, kept)`` to descend from instead of the highest setting (a
        repair: a start that already meets the budget comes back unchanged)."""
        limits = resolve_limits(problem, budget, latency=self.bounds_latency)
        t0 = time.perf_counter()
        state = DescentState(problem)
        if start is not None:
            state.reset(*start)
        steps = 0
        while not all(state.totals[k] <= v for k, v in limits.items()):
            best = None
            for move in state.moves():
                d_sens, saved = state.delta(move, limits)
                if saved <= 0:
                    continue
                ratio = d_sens / saved
                if best is None or ratio < best[0]:
                    best = (ratio, move)
            if best is None:
                error = infeasible_error(problem, limits)
                if all(error.minimum[k] <= v for k, v in limits.items()) and len(limits) == 1:
                    raise InfeasibleBudgetError(
                        f"the greedy descent stopped at {_fmt_costs(state.totals, limits)}: no "
                        f"single move lowers it further, though the search space reaches "
                        f"{_fmt_costs(error.minimum, limits)} (measured latency need not fall "
                        "with every keep level); use the exact 'ilp' solver",
                        error.minimum, limits)
                raise error
            state.apply(best[1])
            steps += 1
        info = {"steps": steps, "seconds": time.perf_counter() - t0}
        return evaluate(problem, state.bits(), state.kept, limits, solver=self.name, info=info)


def _fmt_costs(costs, limits) -> str:
    return ", ".join(f"{k} {costs[k]:.4g}" for k in sorted(limits))


class DescentState:
    """Current bits and levels, with per-layer costs kept up to date."""

    def __init__(self, problem: Problem) -> None:
        self.p = problem
        self.kept = {g.id: g.size for g in problem.groups}
        self.level = {g.id: 0 for g in problem.groups}
        layers = problem.layers
        # Singletons included: every layer moves through its activation and its weight set.
        self.sets = [_all_sets(problem, lambda lay: lay.weight_key or lay.name),
                     _all_sets(problem, lambda lay: lay.activation_key)]
        self.tied = [{i for m in sets if len(m) > 1 for i in m} for sets in self.sets]
        top: list[dict[int, int]] = [{}, {}]
        for which in (0, 1):
            for members in self.sets[which]:
                common = set.intersection(*({o[which] for o in layers[i].options}
                                            for i in members))
                if not common:
                    raise ValueError(f"layers {[layers[i].name for i in members]} must share "
                                     f"{('weight', 'activation')[which]} bits but have no "
                                     "option in common; give them a common option")
                top[which].update({i: max(common) for i in members})
        self.option: list[Option] = []
        for i, layer in enumerate(layers):
            fit = [o for o in layer.options if o[1] == top[1][i]
                   and (o[0] == top[0][i] or i not in self.tied[0])]
            if not fit:
                raise ValueError(f"layer {layer.name!r}: no option meets both its activation "
                                 "and weight ties at the start; use the 'ilp' solver")
            self.option.append(max(fit))
        self.users = {g.id: [i for i, layer in enumerate(problem.layers) if g.id in layer.groups]
                      for g in problem.groups}
        # Per kept channel of a group: FP32 parameters and float MACs outside the layers (a
        # move changes one group, so its effect on them is one product, not a sum over all).
        self.per32 = _per_group(problem.params32)
        self.per_fm = _per_group(problem.float_macs)
        self._recost()

    def reset(self, bits, kept) -> None:
        """Start from ``bits`` per layer and ``kept`` per group (values from the problem)."""
        p = self.p
        for i, layer in enumerate(p.layers):
            option = tuple(bits[layer.name])
            if option not in layer.options:
                raise ValueError(f"layer {layer.name!r}: start bits {option} are not among "
                                 f"its options {layer.options}")
            self.option[i] = option
        for g in p.groups:
            k = int(kept.get(g.id, g.size))
            if k not in g.levels:
                raise ValueError(f"group {g.id} {g.name!r}: start kept count {k} is not "
                                 f"among its levels {g.levels}")
            self.level[g.id], self.kept[g.id] = g.levels.index(k), k
        self._recost()

    def _cost(self, i: int, option: Option, kept) -> tuple[float, ...]:
        """``(bops, macs, weight bits, latency ms)`` of layer ``i`` (latency 0 without a
        latency model)."""
        ms = layer_latency(self.p, i, kept) if self.p.latency is not None else 0.0
        return (*layer_costs(self.p.layers[i], option, kept), ms)

    def _bits_cost(self, i: int, option: Option) -> tuple[float, ...]:
        """``_cost`` of layer ``i`` at new bits and the current kept counts (from its cached
        MACs: bits change neither them nor the latency)."""
        layer, old = self.p.layers[i], self.layer_cost[i]
        macs = old[1]
        pairs = macs // layer.macs_scale if layer.macs_scale else 0
        return (macs * option[0] * option[1], macs, layer.weight_scale * pairs * option[0],
                old[3])

    def _recost(self) -> None:
        p = self.p
        self.layer_cost = [self._cost(i, self.option[i], self.kept)
                           for i in range(len(p.layers))]
        fm = p.float_macs.value(self.kept)
        self.totals = {
            "bops": p.fixed_bops + p.float_mac_bops * fm + sum(c[0] for c in self.layer_cost),
            "macs": p.fixed_macs + fm + sum(c[1] for c in self.layer_cost),
            "weight_bytes": (32 * p.params32.value(self.kept)
                             + sum(c[2] for c in self.layer_cost)) / 8}
        if p.latency is not None:
            self.totals["latency_ms"] = sum(c[3] for c in self.layer_cost)

    def bits(self) -> dict[str, Option]:
        return {layer.name: self.option[i] for i, layer in enumerate(self.p.layers)}

    def moves(self):
        for which in (0, 1):
            for members in self.sets[which]:
                move = self._lower(members, which)
                if move is not None:
                    yield move
        for g in self.p.groups:
            if self.level[g.id] + 1 < len(g.levels):
                yield ("prune", g)

    def _lower(self, members: tuple[int, ...], which: int):
        """Lower weight (0) or activation (1) bits of a tied set one step, keeping the other
        bits or taking the next lower where needed (unless that breaks another tie)."""
        layers, other = self.p.layers, 1 - which
        current = self.option[members[0]][which]
        lower = [o[which] for o in layers[members[0]].options if o[which] < current]
        if not lower:
            return None
        value, change = max(lower), []
        for i in members:
            keep = self.option[i][other]
            fit = [o for o in layers[i].options if o[which] == value and o[other] <= keep]
            if not fit:
                return None
            best = max(fit, key=lambda o: o[other])
            if best[other] != keep and i in self.tied[other]:
                return None
            change.append((i, best))
        return ("bits", tuple(change))

    def _effect(self, move):
        """New per-layer costs, the new kept map, the sensitivity change of ``move`` and the
        group it prunes (``None`` for a bits move)."""
        kind, what = move
        if kind == "bits":
            new = {i: self._bits_cost(i, o) for i, o in what}
            d_sens = sum(self.p.layers[i].option_sensitivity(o)
                         - self.p.layers[i].option_sensitivity(self.option[i]) for i, o in what)
            return new, self.kept, d_sens, None
        g, j = what, self.level[what.id]
        kept = dict(self.kept)
        kept[g.id] = g.levels[j + 1]
        new = {i: self._cost(i, self.option[i], kept) for i in self.users[g.id]}
        return new, kept, g.sensitivity[j + 1] - g.sensitivity[j], g.id

    def _totals(self, new, kept, group: int | None) -> dict[str, float]:
        out = dict(self.totals)
        for i, c in new.items():
            old = self.layer_cost[i]
            out["bops"] += c[0] - old[0]
            out["macs"] += c[1] - old[1]
            out["weight_bytes"] += (c[2] - old[2]) / 8
            if "latency_ms" in out:
                out["latency_ms"] += c[3] - old[3]
        if group is not None:  # a prune move: only this group's kept count changed
            step = kept[group] - self.kept[group]
            out["weight_bytes"] += 4 * self.per32.get(group, 0) * step
            fm = self.per_fm.get(group, 0) * step
            out["bops"] += self.p.float_mac_bops * fm
            out["macs"] += fm
        return out

    def delta(self, move, limits) -> tuple[float, float]:
        new, kept, d_sens, group = self._effect(move)
        after = self._totals(new, kept, group)
        saved = sum((self.totals[k] - after[k]) / v for k, v in limits.items()
                    if self.totals[k] > v)
        return d_sens, saved

    def apply(self, move) -> None:
        new, kept, _, group = self._effect(move)
        self.totals = self._totals(new, kept, group)
        for i, c in new.items():
            self.layer_cost[i] = c
        kind, what = move
        if kind == "bits":
            for i, o in what:
                self.option[i] = o
        else:
            self.level[what.id] += 1
            self.kept = kept


def _per_group(form) -> dict[int, int]:
    """An :class:`~pqcompile.solvers.problem.Affine`'s coefficient per group."""
    out: dict[int, int] = {}
    for g, per in form.terms:
        out[g] = out.get(g, 0) + per
    return out


def _all_sets(problem: Problem, key) -> list[tuple[int, ...]]:
    sets: dict[str, list[int]] = {}
    for i, layer in enumerate(problem.layers):
        sets.setdefault(key(layer), []).append(i)
    return [tuple(v) for v in sets.values()]
