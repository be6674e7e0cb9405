"""PIC-PQ's search space: an importance order over the channels becomes a global pruning
(kept channels per group, snapped to the problem's keep levels) and the bits of every layer by
the maximum-bitwidth and penalty-factor rule.

:class:`~pqcompile.solvers.picpq.PICPQSolver` evolves the per-group affine transforms that
make the order; everything here is deterministic given them.

>>> bit_rule(8, 1.0, 1.0), bit_rule(8, 0.5, 1.0), snap_down(5, (2, 4, 8))
(8, 6, 4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch.fx
from torch import nn

from ..meta import CHANNEL_GROUPS
from .problem import Option, Problem

__all__ = ["bit_rule", "snap_down", "tie_bits"]


# --- the bits rule ------------------------------------------------------------------------------


def bit_rule(bmax: int, kept_fraction: float, penalty: float) -> int:
    """``Bmax`` if nothing was pruned (``kept_fraction >= 1``), else ``Bmax - ceil(p / s)``
    with ``s`` the kept fraction of the weight's L1 norm (unsnapped; may go below 1)."""
    if kept_fraction >= 1.0:
        return int(bmax)
    if kept_fraction <= 0.0:
        return -(2 ** 31)
    return int(bmax) - math.ceil(penalty / kept_fraction - 1e-9)


def snap_down(bits: int, choices: Sequence[int]) -> int:
    """The largest of ``choices`` not above ``bits`` (the smallest choice where none is)."""
    below = [c for c in choices if c <= bits]
    return max(below) if below else min(choices)


def _nearest(value: int, choices: Sequence[int]) -> int:
    return min(sorted(choices), key=lambda c: abs(c - value))


# --- the search space -------------------------------------------------------------------------


@dataclass
class _GroupSpace:
    size: int
    levels: tuple[int, ...]
    scores: np.ndarray  # normalized FP (+ tie-break), >= 0: the channel scores
    removal: np.ndarray  # channel indices, least important first
    quota: int  # channels the global ranking may remove
    sigma: float  # shift mutation scale

    def snap_up(self, kept: int) -> int:
        return min(k for k in self.levels if k >= kept)

    def keep_mask(self, kept: int) -> np.ndarray:
        mask = np.zeros(self.size, dtype=bool)
        mask[np.argsort(-self.scores, kind="stable")[:kept]] = True
        return mask


@dataclass
class _LayerSpace:
    l1: np.ndarray  # |W| summed over the kernel, as (output positions, input positions)
    rows: dict[int, np.ndarray]  # group index -> per channel, the output positions it owns
    cols: dict[int, np.ndarray]  # group index -> per channel, the input positions it owns
    weight_bits: tuple[int, ...]
    bmax: int


def _l1_matrix(m: nn.Module) -> np.ndarray:
    """``|W|`` as an ``(out, in)`` matrix over the layer's full input channels (a grouped or
    depthwise conv gets zeros where a conv group does not read an input channel)."""
    w = m.weight.detach().abs().double()
    if isinstance(m, nn.Linear):
        return w.numpy()
    w = w.reshape(w.shape[0], w.shape[1], -1).sum(-1).numpy()
    g = m.groups
    if g == 1:
        return w
    out_pg, in_pg = m.out_channels // g, m.in_channels // g
    full = np.zeros((m.out_channels, m.in_channels))
    for k in range(g):
        full[k * out_pg:(k + 1) * out_pg, k * in_pg:(k + 1) * in_pg] = w[k * out_pg:(k + 1)
                                                                            * out_pg]
    return full


def _stage_bmax(i: int, n: int, stage_bits: Sequence[int]) -> int:
    return stage_bits[min(len(stage_bits) - 1, i * len(stage_bits) // max(n, 1))]


_FLAT = 1e-3  # a normalized-FP spread below this is "no spread"
_FALLBACK_SIGMA = 0.1


class _Space:
    """The problem with its graph facts: per group the FP order and limits, per layer the L1
    matrix and Bmax; turns ``(a, b, n)`` into ``(bits, kept)``."""

    def __init__(self, problem: Problem, gm: torch.fx.GraphModule,
                 fp: Mapping[int, np.ndarray], scores: Mapping[int, np.ndarray], *,
                 min_keep: float, stage_bits: Sequence[int], penalty: float) -> None:
        self.problem, self.penalty = problem, penalty
        self.groups: list[_GroupSpace] = []
        pooled = np.concatenate([np.asarray(fp[g.id], dtype=np.float64)
                                 for g in problem.groups]) if problem.groups else np.zeros(1)
        fallback = float(np.std(pooled)) if np.std(pooled) > _FLAT else _FALLBACK_SIGMA
        for g in problem.groups:
            s = np.asarray(scores[g.id], dtype=np.float64)
            floor = max(g.levels[-1], math.ceil(min_keep * g.size - 1e-9), 1)
            removal = np.argsort(-s, kind="stable")[::-1].copy()
            spread = float(np.std(fp[g.id]))
            self.groups.append(_GroupSpace(g.size, g.levels, s, removal, g.size - floor,
                                           spread if spread > _FLAT else fallback))
        self.layers = self._layers(gm, stage_bits)

    def _layers(self, gm, stage_bits) -> list[_LayerSpace]:
        index = {g.id: i for i, g in enumerate(self.problem.groups)}
        all_groups = CHANNEL_GROUPS.get(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        out = []
        n = len(self.problem.layers)
        for i, layer in enumerate(self.problem.layers):
            m = gm.get_submodule(nodes[layer.name].target)
            rows, cols = {}, {}
            for g in self.problem.groups:
                for mem in all_groups[g.id].members:
                    if mem.node != layer.name:
                        continue
                    idx = np.asarray(mem.index)
                    (rows if mem.role == "out" else cols)[index[g.id]] = idx
            wbits = tuple(sorted({o[0] for o in layer.options}))
            bmax = snap_down(_stage_bmax(i, n, stage_bits), wbits)
            out.append(_LayerSpace(_l1_matrix(m), rows, cols, wbits, bmax))
        return out

    # --- candidates ---

    def order(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Group indices of the removable channels, in global removal order (lowest I first)."""
        imp, grp, pos = [], [], []
        for k, gs in enumerate(self.groups):
            p = np.arange(gs.quota)
            imp.append(a[k] * gs.scores[gs.removal[:gs.quota]] + b[k])
            grp.append(np.full(gs.quota, k))
            pos.append(p)
        if not imp:
            return np.zeros(0, dtype=int)
        imp_, grp_, pos_ = (np.concatenate(x) for x in (imp, grp, pos))
        return grp_[np.lexsort((pos_, grp_, imp_))]

    def kept(self, order: np.ndarray, n: int) -> dict[int, int]:
        removed = np.bincount(order[:n], minlength=len(self.groups))
        return {g.id: gs.snap_up(gs.size - int(r))
                for g, gs, r in zip(self.problem.groups, self.groups, removed)}

    def weight_fractions(self, kept: Mapping[int, int]) -> list[float]:
        """``s_l = ||W_l pruned||_1 / ||W_l||_1`` per layer (1.0 where nothing was removed)."""
        masks = {k: gs.keep_mask(kept[g.id]) if kept[g.id] < gs.size else None
                 for k, (g, gs) in enumerate(zip(self.problem.groups, self.groups))}
        out = []
        for lay in self.layers:
            rkeep = np.ones(lay.l1.shape[0], dtype=bool)
            ckeep = np.ones(lay.l1.shape[1], dtype=bool)
            for which, keep in ((lay.rows, rkeep), (lay.cols, ckeep)):
                for k, idx in which.items():
                    if masks[k] is not None:
                        keep[np.unique(idx[~masks[k]].ravel())] = False
            if rkeep.all() and ckeep.all():
                out.append(1.0)
                continue
            total = float(lay.l1.sum())
            kept_l1 = float(lay.l1[rkeep][:, ckeep].sum())
            out.append(min(kept_l1 / total, 1.0 - 1e-12) if total > 0 else 1.0 - 1e-12)
        return out

    def bits(self, kept: Mapping[int, int]) -> dict[str, Option]:
        """The bits rule for a pruning, with weight and activation ties."""
        wanted = [snap_down(bit_rule(lay.bmax, s, self.penalty), lay.weight_bits)
                  for lay, s in zip(self.layers, self.weight_fractions(kept))]
        return tie_bits(self.problem, wanted)

    def candidate(self, order: np.ndarray, n: int) -> tuple[dict[str, Option], dict[int, int]]:
        kept = self.kept(order, n)
        return self.bits(kept), kept


def _tie(bits: list[int], layers, sets, which: int) -> None:
    """Give every tied set one value of its ``which`` bits (0 weights, 1 activations): the
    smallest common option at or above its members' maximum, else the largest common one."""
    for members in sets.values():
        common = set.intersection(*({o[which] for o in layers[i].options} for i in members))
        want = max(bits[i] for i in members)
        above = [c for c in common if c >= want]
        value = min(above) if above else max(common, default=want)
        for i in members:
            bits[i] = value


def tie_bits(problem: Problem, weight_bits: Sequence[int]) -> dict[str, Option]:
    """Options from wanted weight bits: weight sets take their maximum, activations the same
    bits as the weights or the nearest option (ties to the lower), activation sets their
    maximum; raises ``ValueError`` where a layer's options cannot honor a tie."""
    layers = problem.layers
    w = [int(b) for b in weight_bits]
    _tie(w, layers, problem.weight_sets(), 0)
    a = []
    for i, layer in enumerate(layers):
        acts = [o[1] for o in layer.options if o[0] == w[i]]
        a.append(w[i] if w[i] in acts else _nearest(w[i], acts) if acts else w[i])
    _tie(a, layers, problem.activation_sets(), 1)
    bits = {}
    weight_tied = {i for m in problem.weight_sets().values() for i in m}
    for i, layer in enumerate(layers):
        option = (w[i], a[i])
        if option not in layer.options:
            fit = [o for o in layer.options if o[1] == a[i]]
            if not fit or i in weight_tied:
                raise ValueError(f"layer {layer.name!r}: no bit option {option} honors its "
                                 f"weight and activation ties (options {layer.options}); give "
                                 "tied layers common options or use the 'ilp' solver")
            option = min(fit, key=lambda o: (abs(o[0] - w[i]), o[0]))
        bits[layer.name] = option
    return bits


def _meets(costs: Mapping[str, float], limits: Mapping[str, float]) -> bool:
    return all(costs[k] <= v for k, v in limits.items())
