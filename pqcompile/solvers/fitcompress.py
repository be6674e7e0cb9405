"""FITCompress: Fisher information and path planning through the joint compression space.

The model is walked from full precision (the highest option of every layer, every channel
kept) towards the budget, one move at a time, choosing each move by the Fisher information
metric (FIT) it costs and by how far the model still is from the target. As implemented:

1. **Empirical Fisher, variance-stopped** (:class:`~pqcompile.criteria.FisherTrace`, on the
   BN-folded FP32 graph): per mini-batch ``N * grad^2`` per weight and bias and per layer input
   activation, averaged until the relative variance of every layer's trace estimate is below
   ``fisher_tol`` (after ``fisher_min_batches``) or ``fisher_max_batches`` batches are read.
   From it, per output row ``r`` of every layer: ``Tr(F_r)`` of the row's weights, the squared
   range ``(2 max |w_r|)^2`` of the row's quantization grid, and the row's importance
   ``sum F_ii theta_i^2`` (weights and bias); per layer its share of ``Tr(F_a)`` of its input
   activation and that input's range ``max - min`` (observed on the start node's fake-quant
   model over the context's calibration batches). A channel's importance is the summed
   ``F theta^2`` of its producer rows (the group's ``out`` members), as
   ``FisherTrace.channel_scores`` scores it (without its factor 1/2).
2. **FIT** of a node: ``sum_l Tr(F_l) Delta_l^2 / 12`` over weights (per row, on its kept rows)
   and input activations, ``Delta = range / (2^b - 1)``, plus ``sum F theta^2`` of the removed
   channels (pruning = quantizing to zero, so the perturbation is the weight itself).
3. **Moves** (:class:`~pqcompile.solvers.greedy.DescentState`, so tied sets move together):
   lower one weight set or one activation set one bit step, or lower one group one keep level,
   removing the currently kept channels with the least ``F theta^2``. A move's path cost is
   ``sqrt(dFIT)``, the Fisher distance ``sqrt(sum F_ii (theta_i - theta'_i)^2)`` with the FIT
   increment as its squared distance. The heuristic is ``h = sqrt(|c - alpha|^2 * sum F_ii
   theta'_i^2)``: ``c`` the child's cost over the FP32 cost, ``alpha`` the limit over the FP32
   cost, for the most violated limit of the node being expanded; ``theta'`` the child's kept
   weights.
4. **Greedy best-first**: of the current node's children that lower that cost, keep the one with
   the least ``g + h``; stop at the first node that meets every limit (the path ends exactly when
   the budget holds; ``info["path"]`` lists each move with its ``g``, ``h``, FIT increment and
   the node's costs).
5. **Refresh**: every ``refresh_every`` moves the Fisher (per-row traces, ranges and
   importances, activation traces and ranges) is re-estimated on the current node's pruned
   fake-quant model (:meth:`SearchContext.fake_quant`) over ``refresh_batches`` batches, since
   the curvature changes as the model is compressed; rows of removed channels keep their last
   values (they no longer count).

Departures from the paper, and details it leaves open:

* The paper prunes unstructured weights; here a pruning move removes one keep level of a
  channel group (real structural pruning), its channels ordered by summed ``F theta^2`` of
  their producer rows (the consumers' input columns are not scored: the usual producer-side
  channel importance, as in ``FisherTrace.channel_scores``).
* The quantization perturbation enters as its expected square, ``Delta^2 / 12`` per weight
  (uniform rounding noise), so quantization and pruning moves are measured in the same units
  (``sum F_ii delta_i^2``); the paper's ``Tr(F) Delta^2`` omits the constant. The weight grid
  of pqcompile is per output channel, so each row has its own range (``2 max |w_r|``, the
  span of the symmetric grid) rather than one range per layer.
* Between refreshes the Fisher is held fixed; a pruning move drops the removed rows from
  their layer's weight term, while the consumers' removed input columns are accounted for at the
  next refresh. A weight tensor called by several layers (a shared module) is counted once.
* "Cost" for ``c`` and ``alpha`` is the limited cost (BOPs for a BOPs budget); with several
  limits, the one most violated (largest cost / limit) at the node being expanded; only moves
  that lower it are expanded, so every step lowers the cost that drives the search.
* The paper ends with one fine-tune; fine-tuning is ``compile``'s own step
  (``finetune=``), not the solver's.
* Channel choice: ``info["channel_scores"]`` ranks each group's channels (removed ones by
  removal order, lowest first, then the kept ones by their last ``F theta^2``), so the kept
  counts keep exactly the channels the path kept, at every level along it.
* Should the moves stall before the budget holds (tied sets blocking every move that lowers
  the driving cost), the node is repaired with :meth:`SearchContext.tighten`
  (``info["repaired"]``); an unreachable budget raises ``InfeasibleBudgetError`` up front.

Knobs: ``fisher_tol``, ``fisher_min_batches``, ``fisher_max_batches`` (the first estimate),
``refresh_every`` (moves between refreshes, 0 = never), ``refresh_batches``; ``seed`` seeds
torch's RNG during the search (a shuffling loader), restored afterwards. Batches are read from
the start of ``context.data``, cycling, so a solve does not depend on what the context has
read before. Cost: one forward+backward per Fisher batch; on the ResNet-20 benchmark (~0.9 s
a batch) at most ~90 s for the first estimate (100 batches), ~4-5 s per refresh (a fake-quant
model, its calibration and 4 batches; a 60x BOPs path is ~40 moves, so ~5 refreshes), while
the planning itself is arithmetic over the problem (~1 s for the whole path).

>>> round(fit_term(2.0, 1.0, 4) / fit_term(2.0, 1.0, 8), 9)  # ((2^8 - 1) / (2^4 - 1))^2
289.0
>>> import torch
>>> from torch import nn
>>> from pqcompile.build import analysis
>>> from pqcompile.solvers.graph import build_problem
>>> from pqcompile.solvers.search import SearchContext
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
>>> data = [(torch.randn(8, 4, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
>>> gm = analysis(model, (data[0][0],))
>>> problem = build_problem(gm, None, None, pin_first_last=False)
>>> ctx = SearchContext(problem, gm, teacher=model, data=data)
>>> limit = problem.reference["bops"] / 40  # 40x fewer BOPs than FP32 (8/8 gives 16x)
>>> s = FITCompressSolver(fisher_min_batches=2, fisher_max_batches=4, refresh_every=2,
...                       refresh_batches=1).solve(problem, {"bops": limit}, context=ctx)
>>> s.feasible, s.costs["bops"] <= limit, s.info["path"][-1]["costs"]["bops"] <= limit
(True, True, True)
>>> s.info["path"][-2]["costs"]["bops"] > limit  # the path stops when the budget holds
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..budget import Budget
from ..meta import CHANNEL_GROUPS
from ..progress import Progress
from .fit_fisher import (
    NOISE,
    _initial_stats,
    _inv_levels2,
    _LayerStats,
    _refresh,
    _Stream,
    fit_term,
)
from .greedy import DescentState
from .ilp_model import infeasible_error, minimum_costs
from .problem import Option, Problem, Solution, problem_costs, resolve_limits
from .search import SearchContext, check_int, check_real

_NAME = "FITCompressSolver"

__all__ = ["FITCompressSolver", "fit_term"]

class _Path:
    """The node being walked (a :class:`DescentState`), its removed channels and the FIT model."""

    def __init__(self, problem: Problem, graph: torch.fx.GraphModule) -> None:
        self.p = problem
        self.state = DescentState(problem)
        self.names = [layer.name for layer in problem.layers]
        index = {name: i for i, name in enumerate(self.names)}
        first: dict[str, int] = {}
        for i, layer in enumerate(problem.layers):
            first.setdefault(layer.weight_key or layer.name, i)
        self.counted = set(first.values())  # one weight term per weight tensor
        groups = CHANNEL_GROUPS.get(graph)
        self.owners: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.producers: dict[int, list[tuple[int, np.ndarray]]] = {}
        for g in problem.groups:
            self.producers[g.id] = []
            for m in groups[g.id].members:
                if m.role == "out" and m.node in index:
                    rows = np.asarray(m.index, dtype=np.int64).reshape(g.size, -1)
                    self.owners.setdefault(index[m.node], []).append((g.id, rows))
                    if index[m.node] in self.counted:
                        self.producers[g.id].append((index[m.node], rows))
        self.removed: dict[int, list[int]] = {g.id: [] for g in problem.groups}
        self.alive = {g.id: np.ones(g.size, dtype=bool) for g in problem.groups}
        self.stats: list[_LayerStats] = []
        self._wsum: dict[int, float] = {}
        self.norm_now = 0.0  # sum F theta^2 of the current node

    # --- the FIT model ----------------------------------------------------------------------

    def row_mask(self, i: int) -> np.ndarray:
        """Kept output rows of layer ``i`` (full-weight indexing) at the current node."""
        mask = np.ones(len(self.stats[i].trace), dtype=bool)
        for gid, rows in self.owners.get(i, ()):
            mask[rows[~self.alive[gid]].ravel()] = False
        return mask

    def set_stats(self, stats: list[_LayerStats]) -> None:
        self.stats = stats
        self._wsum = {}

    def weight_sum(self, i: int) -> float:
        """``sum_r Tr(F_r) range_r^2`` over the kept rows of layer ``i`` (0 if not counted)."""
        if i not in self._wsum:
            s = self.stats[i]
            m = self.row_mask(i)
            self._wsum[i] = float((s.trace[m] * s.range2[m]).sum()) if i in self.counted else 0.0
        return self._wsum[i]

    def weight_fit(self, i: int, bits: int) -> float:
        return self.weight_sum(i) * _inv_levels2(bits) * NOISE

    def activation_fit(self, i: int, bits: int) -> float:
        s = self.stats[i]
        return fit_term(s.act_trace, s.act_range, bits)

    def channel_importance(self, gid: int) -> np.ndarray:
        """Summed ``F theta^2`` of each channel's producer rows."""
        size = len(self.alive[gid])
        out = np.zeros(size)
        for i, rows in self.producers[gid]:
            out += self.stats[i].importance[rows].sum(axis=1)
        return out

    def norm(self) -> float:
        """``sum F theta^2`` over the kept weights of the current node."""
        return float(sum(self.stats[i].importance[self.row_mask(i)].sum() for i in self.counted))

    def to_remove(self, gid: int) -> np.ndarray:
        """The channels the group's next keep level removes: the kept ones with the least
        ``F theta^2`` (ties: lower index first)."""
        g = next(g for g in self.p.groups if g.id == gid)
        level = self.state.level[gid]
        count = g.levels[level] - g.levels[level + 1]
        kept = np.flatnonzero(self.alive[gid])
        order = np.argsort(self.channel_importance(gid)[kept], kind="stable")
        return kept[order[:count]]

    def delta(self, move) -> tuple[float, float]:
        """``(FIT increment, sum F theta'^2 of the child)`` of ``move``."""
        kind, what = move
        norm = self.norm_now
        if kind == "bits":
            d = 0.0
            for i, new in what:
                old = self.state.option[i]
                d += self.weight_fit(i, new[0]) - self.weight_fit(i, old[0])
                d += self.activation_fit(i, new[1]) - self.activation_fit(i, old[1])
            return d, norm
        gid = what.id
        gone = self.to_remove(gid)
        d = 0.0
        for i, rows in self.producers[gid]:
            s, r = self.stats[i], rows[gone].ravel()
            lost = float(s.importance[r].sum())
            d += lost - float((s.trace[r] * s.range2[r]).sum()) * NOISE * _inv_levels2(
                self.state.option[i][0])
            norm -= lost
        return d, norm

    def apply(self, move) -> list[int]:
        """Take ``move``; returns the channels it removed (empty for a bit move)."""
        kind, what = move
        gone: list[int] = []
        if kind == "prune":
            gone = [int(c) for c in self.to_remove(what.id)]
            self.alive[what.id][gone] = False
            self.removed[what.id].extend(gone)
            self._wsum = {}
        self.state.apply(move)
        self.norm_now = self.norm()
        return gone

    def rank_scores(self) -> dict[int, np.ndarray]:
        """Per group: ranks keeping exactly the path's channels at every level along it."""
        out = {}
        for g in self.p.groups:
            kept = np.flatnonzero(self.alive[g.id])
            if self.stats:
                kept = kept[np.argsort(self.channel_importance(g.id)[kept], kind="stable")]
            order = list(self.removed[g.id]) + [int(c) for c in kept]
            scores = np.zeros(g.size)
            scores[np.asarray(order, dtype=np.int64)] = np.arange(1, g.size + 1, dtype=float)
            out[g.id] = scores
        return out

    def bits(self) -> dict[str, Option]:
        return self.state.bits()

    def kept(self) -> dict[int, int]:
        return dict(self.state.kept)


# --- the solver ----------------------------------------------------------------------------------


def _describe(path: _Path, move, gone: list[int], before: list[Option]) -> dict[str, Any]:
    kind, what = move
    if kind == "prune":
        g = what
        level = path.state.level[g.id]
        return {"kind": "prune", "group": g.id, "from": g.levels[level - 1],
                "to": g.levels[level], "removed": gone}
    idx = [i for i, _ in what]
    w_down = all(o[0] < before[i][0] for i, o in what)
    a_down = all(o[1] < before[i][1] for i, o in what)
    label = "weight" if w_down and not a_down else "activation" if a_down and not w_down \
        else "weight+activation"
    return {"kind": label, "layers": [path.names[i] for i in idx],
            "from": [before[i] for i in idx], "to": [o for _, o in what]}


def _child_costs(path: _Path, move) -> dict[str, float]:
    kind, what = move
    bits, kept = path.bits(), path.kept()
    if kind == "bits":
        for i, o in what:
            bits[path.names[i]] = o
    else:
        kept[what.id] = what.levels[path.state.level[what.id] + 1]
    return problem_costs(path.p, bits=bits, kept=kept)


def _max_steps(problem: Problem) -> int:
    steps = sum(len(g.levels) - 1 for g in problem.groups)
    for layer in problem.layers:
        steps += len({o[0] for o in layer.options}) + len({o[1] for o in layer.options}) - 2
    return max(steps, 1)


class FITCompressSolver:
    """FIT-guided greedy best-first path from full precision to the budget (module docstring).

    ``fisher_tol`` / ``fisher_min_batches`` / ``fisher_max_batches``: the variance-stopped first
    Fisher estimate; ``refresh_every``: moves between Fisher refreshes on the current node's
    fake-quant model (0 = never); ``refresh_batches``: batches per refresh; ``seed``: torch's RNG
    during the search (restored afterwards).
    """

    name = "fitcompress"
    needs_context = True

    def __init__(self, *, seed: int = 0, fisher_tol: float = 1e-3, fisher_min_batches: int = 10,
                 fisher_max_batches: int = 100, refresh_every: int = 8,
                 refresh_batches: int = 4) -> None:
        check_int(_NAME, "seed", seed)
        check_real(_NAME, "fisher_tol", fisher_tol, 0.0, low_open=False)
        for what, v, low in (("fisher_min_batches", fisher_min_batches, 1),
                             ("fisher_max_batches", fisher_max_batches, 1),
                             ("refresh_every", refresh_every, 0),
                             ("refresh_batches", refresh_batches, 1)):
            check_int(_NAME, what, v, low)
        if fisher_min_batches > fisher_max_batches:
            raise ValueError(f"fisher_min_batches ({fisher_min_batches}) must not exceed "
                             f"fisher_max_batches ({fisher_max_batches})")
        self.seed, self.fisher_tol = seed, float(fisher_tol)
        self.fisher_min_batches, self.fisher_max_batches = fisher_min_batches, fisher_max_batches
        self.refresh_every, self.refresh_batches = refresh_every, refresh_batches

    def solve(self, problem: Problem, budget: Budget | Mapping[str, float], *,
              context: SearchContext | None = None) -> Solution:
        if context is None:
            raise ValueError("fitcompress searches with the model and data: call "
                             "solve(problem, budget, context=SearchContext(...)) (compile does)")
        if [lay.name for lay in context.problem.layers] != [lay.name for lay in problem.layers]:
            raise ValueError("the context was built for another problem: its layers differ")
        limits = resolve_limits(problem, budget)
        lows = minimum_costs(problem, sorted(limits))
        if any(lows[k] > v for k, v in limits.items()):
            raise infeasible_error(problem, limits)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._search(problem, budget, limits, context)

    def _search(self, problem: Problem, budget, limits: dict[str, float],
                context: SearchContext) -> Solution:
        t0 = time.perf_counter()
        path, stream = _Path(problem, context.graph), _Stream(context.data)
        start = dict(path.state.totals)
        ref = {k: float(problem.reference.get(k) or start[k]) for k in limits}

        def holds() -> bool:
            return all(path.state.totals[k] <= v for k, v in limits.items())

        info: dict[str, Any] = {"path": [], "refreshes": 0, "fisher_batches": 0,
                                "fisher_converged": None, "refresh_batches": 0,
                                "start_costs": start, "repaired": False}
        if not holds():
            crit = _initial_stats(context, path, stream, tol=self.fisher_tol,
                                  min_batches=self.fisher_min_batches,
                                  max_batches=self.fisher_max_batches)
            info["fisher_batches"], info["fisher_converged"] = crit.batches, crit.converged
        info["fisher_seconds"] = time.perf_counter() - t0
        bar = Progress(_max_steps(problem), self.name, context.progress)
        g = 0.0
        while not holds():
            key = max(limits, key=lambda k: path.state.totals[k] / limits[k])
            alpha = limits[key] / ref[key]
            best = None
            for move in path.state.moves():
                after = _child_costs(path, move)
                if after[key] >= path.state.totals[key]:
                    continue
                d_fit, norm = path.delta(move)
                g_child = g + math.sqrt(max(d_fit, 0.0))
                h_child = abs(after[key] / ref[key] - alpha) * math.sqrt(max(norm, 0.0))
                if best is None or g_child + h_child < best[0]:
                    best = (g_child + h_child, g_child, h_child, d_fit, move)
            if best is None:
                break
            _, g, h, d_fit, move = best
            before = list(path.state.option)
            gone = path.apply(move)
            entry = _describe(path, move, gone, before)
            entry.update(g=g, h=h, fit=d_fit, key=key, costs=dict(path.state.totals))
            info["path"].append(entry)
            context.record(path.bits(), path.kept())
            steps = len(info["path"])
            bar.update(steps, g=g)
            if self.refresh_every and steps % self.refresh_every == 0 and not holds():
                _refresh(context, path, stream, self.refresh_batches)
                info["refreshes"] += 1
                info["refresh_batches"] += self.refresh_batches
        bits, kept = path.bits(), path.kept()
        if not holds():  # the moves stalled: repair (raises when the budget is unreachable)
            bits, kept = context.tighten(bits, kept, limits)
            info["repaired"] = True
        info.update(channel_scores=path.rank_scores(), batches=stream.read,
                    moves=len(info["path"]), seconds=time.perf_counter() - t0,
                    fit_distance=g)
        return context.solution(bits, kept, budget, solver=self.name, info=info)
