"""PIC-PQ: a physics-inspired criterion for joint pruning and quantization, searched by evolution.

The algorithm as implemented over the shared problem (kept counts from each group's levels, bits
from each layer's options, one cost model and budget):

1. **Filter property (FP).** For every prunable group, the average matrix rank of each
   channel's output feature maps (HRank), over ``rank_batches`` training batches of the FP32
   graph, taken at the group's *producers* (the conv/linear layers writing its channels, before
   BN and activation); a group with several producers (a residual sum) averages them, a
   producer writing several positions per channel (a depthwise multiplier) averages those.
   ``torch.linalg.matrix_rank`` of each ``H x W`` map in float32 (its default tolerance), then
   the mean over images. Where there is no map (a Linear output ``(B, C)`` or a token sequence
   ``(B, N, C)``, or a map with ``min(H, W) == 1``) the rank is not a per-channel quantity, so
   the property falls back to the channel's *standard deviation* over all samples (and tokens):
   like the rank, it measures how much information the channel carries, and it is zero for a
   dead or constant channel. FP is normalized per group (divided by its maximum), and a
   ``1e-6`` tie-break by the context's channel criterion (the problem's channel scores; else the
   producers' L1 norm) orders channels of equal rank, which are common on small maps.
2. **Importance** ``I = a_l * FP_i + b_l`` per group ``l`` (Hooke's law: ``a_l > 0`` a
   deformation scale, ``b_l`` a relative shift). ``a_l > 0`` keeps the order inside a group, so
   ``info["channel_scores"]`` is the normalized FP itself: a group keeps its highest-FP channels.
3. **Candidate** for ``(a, b)``: rank all channels of all groups by ``I`` (ties by group, then
   in-group order) and remove the lowest ``n`` globally, each group keeping at least
   ``min_keep`` (10%) of its channels and at least its lowest level; each group's remaining count
   is snapped *up* to its next keep level. Bits by the rule below. ``n`` is found by
   **bisection**: the smallest ``n`` whose pruning + bits meet every budget limit (costs are
   monotone in ``n``: kept counts and bits only go down as ``n`` grows). If even the largest
   ``n`` misses the budget, the candidate is repaired by :meth:`SearchContext.tighten`
   (greedy, least sensitivity per cost first) and ``info["repaired"]`` says so; a budget no
   assignment meets raises ``InfeasibleBudgetError`` (checked before the search).
4. **Bits rule.** ``Bmax_l`` by stage: the compute layers in graph order split into
   ``len(stage_bits)`` equal stages (default first/middle/last third at 8, 6, 4 bits), snapped
   down to the layer's nearest weight-bit option (a pinned layer keeps its pin). ``b_l = Bmax_l``
   when nothing of the layer's weight was pruned, else ``b_l = Bmax_l - ceil(p / s_l)`` with
   ``s_l = ||W_l pruned||_1 / ||W_l||_1`` (rows of pruned outputs and columns of pruned inputs
   removed) and penalty ``p`` (default 1/6), snapped *down* to a weight-bit option (the rule is
   an upper bound; the lowest option where none is below). Activations take the same bits where
   the layer has that option, else the nearest activation option (ties to the lower). Tied
   sets take their maximum: calls of one module share weight bits, readers of one tensor share
   activation bits.
5. **Regularized evolution** over ``{(a_l, b_l)}`` (Real et al. 2019, as the public PIC-PQ code
   inherits it from LeGR): the identity ``(1, 0)`` and ``population - 1`` random members
   (``a = exp(N(0, scale_sigma))``, ``b = N(0, sigma_l)`` with ``sigma_l`` the standard
   deviation of group ``l``'s normalized FP, as the public code scales shifts by the spread of
   each layer's ranks; a group whose FP has no spread (below 1e-3, e.g. every map full rank)
   takes the spread of all groups' FP pooled, else 0.1, so its shift can still move); each of
   ``cycles`` cycles samples ``tournament`` members (without replacement), mutates the fittest on ``max(1, round(mutate_fraction *
   groups))`` groups (``a *= exp(N(0, scale_sigma * step))``, ``b += N(0, sigma_l)``, with
   the public code's decaying ``step = 1 - cycle / (1.25 * cycles)``), evaluates the child and
   removes the oldest member. **Fitness** = mean cross entropy on the context's held-out batches
   of the candidate's fake-quant model (pruned, BN folded, calibrated), after
   ``finetune_steps`` QAT steps (distilled from the teacher) when that is > 0; a candidate
   (bits, kept) reached by several transforms is measured once. The best candidate ever
   evaluated is the answer (``info["fitness_history"]``: the best fitness after the initial
   population and after each cycle).

Departures from the paper and filled-in details (and why):

* Search size: population 16 and tournament 4 (paper 64 and 16) and 40 cycles, fitness after 0
  fine-tune steps (paper: 50 steps of the FP32 pruned model): sized for a 3-5 minute search on
  two CPU cores (ResNet-20 at batch 128: about 3.5 s per candidate, 56 candidates).
  HRank over ``rank_batches`` (2) batches (the public code uses 6). The fine-tune batches are the *first* ``finetune_steps`` batches of the data,
  the same for every candidate, so candidates compete on equal terms and a search is
  reproducible on a reused context.
* The candidate's fitness is measured with its bits (fake quantization), not on the FP32
  pruned model: the bits follow from the pruning, so the quantized model is what is selected.
* Pruning acts on the problem's channel groups (a residual's channels are pruned together and
  its producers' FP averaged; the public code sums chained ranks) and snaps to the keep levels.
* Bits are snapped to the layer's options (the paper's bits are free integers), and weight and
  activation ties are enforced by the maximum of the set.
* The budget may limit BOPs, MACs and/or weight bytes (the paper targets BOPs); the bisection
  meets every limit.
* ``s_l`` uses the graph's (unfolded) weights, as the public code does.
* The rank is taken at the producers' outputs, as the public ResNet code hooks ``conv1`` /
  ``conv2`` (HRank itself hooks the ReLU outputs). Pre-activation maps are often full rank on
  small images (every channel equal); the tie-break criterion then orders a group's channels
  and the evolved shifts ``b_l`` alone rank the groups.

Knobs: ``population``, ``tournament``, ``cycles``, ``mutate_fraction``, ``scale_sigma``,
``finetune_steps``, ``lr``, ``penalty``, ``stage_bits``, ``min_keep``, ``rank_batches``,
``seed``.

>>> bit_rule(8, 0.5, 1 / 6), bit_rule(8, 1 / 12, 1 / 6), bit_rule(8, 1.0, 1 / 6)
(7, 6, 8)
>>> snap_down(7, (2, 4, 8)), snap_down(1, (2, 4, 8))
(4, 2)
>>> maps = torch.zeros(1, 2, 4, 4)
>>> maps[0, 0] = torch.eye(4)
>>> maps[0, 1, 0] = 1.0
>>> feature_rank(maps).tolist()
[4.0, 1.0]
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from ..meta import CHANNEL_GROUPS, ChannelGroup
from ..presets import l1_scores
from ..progress import Progress
from .problem import Option, Problem, Solution, problem_costs, resolve_limits
from .search import check_int, check_real

_NAME = "PICPQSolver"

__all__ = ["PICPQSolver", "bit_rule", "feature_rank", "filter_property", "snap_down"]


# --- the filter property ------------------------------------------------------------------------


def feature_rank(maps: torch.Tensor) -> torch.Tensor:
    """Per-channel matrix rank of ``(B, C, H, W)`` feature maps, averaged over the batch
    (HRank; float32 ranks with ``torch.linalg.matrix_rank``'s default tolerance)."""
    if maps.dim() != 4:
        raise ValueError(f"feature_rank takes (B, C, H, W) maps, got shape {tuple(maps.shape)}")
    return torch.linalg.matrix_rank(maps.detach().float()).double().mean(0)


def _channel_property(out: torch.Tensor, dim: int) -> tuple[np.ndarray, float]:
    """``(sum over samples of the per-sample property, samples)`` of each channel along
    ``dim``: HRank for a ``(B, C, H, W)`` map, else the channel's standard deviation."""
    dim = dim % out.dim()
    if out.dim() == 4 and dim == 1 and min(out.shape[2:]) > 1:
        return (feature_rank(out) * out.shape[0]).numpy(), float(out.shape[0])
    flat = out.detach().double().movedim(dim, -1).reshape(-1, out.shape[dim])
    return flat.std(0, correction=0).numpy(), 1.0


class _Capture(torch.fx.Interpreter):
    """Runs the graph, accumulating the property of the watched nodes' outputs."""

    def __init__(self, gm: torch.fx.GraphModule, watch: Mapping[str, int]) -> None:
        super().__init__(gm)
        self.watch = dict(watch)
        self.total: dict[str, np.ndarray] = {}
        self.count: dict[str, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.watch:
            value, count = _channel_property(out, self.watch[n.name])
            self.total[n.name] = self.total.get(n.name, 0.0) + value
            self.count[n.name] = self.count.get(n.name, 0.0) + count
        return out


def filter_property(gm: torch.fx.GraphModule, groups: Sequence[ChannelGroup],
                    batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[int, np.ndarray]:
    """``{group id: FP per channel}``: the mean over ``batches`` of each channel's property at
    the group's producers (HRank of ``H x W`` maps, else the standard deviation), averaged
    over the producers and over the positions a channel owns. ``gm`` is not changed."""
    if not batches:
        raise ValueError("filter_property needs at least one batch of inputs")
    watch: dict[str, int] = {}
    for g in groups:
        for m in g.members:
            if m.role == "out":
                if not isinstance(m.dim, int):
                    raise ValueError(f"group {g.id} {g.name!r}: producer {m.node!r} spreads its "
                                     "channels over several dims; no per-channel property")
                watch[m.node] = m.dim
    work = copy.deepcopy(gm).eval() if gm.training else gm
    capture = _Capture(work, watch)
    with torch.no_grad():
        for inputs in batches:
            capture.run(*inputs)
    out = {}
    for g in groups:
        parts = [capture.total[m.node][np.asarray(m.index)].mean(axis=1)
                 / capture.count[m.node] for m in g.members if m.role == "out"]
        if not parts:
            raise ValueError(f"group {g.id} {g.name!r} has no producing layer to measure")
        out[g.id] = np.mean(parts, axis=0)
    return out


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


# --- the solver -------------------------------------------------------------------------------


@dataclass
class _Member:
    a: np.ndarray
    b: np.ndarray
    loss: float
    accuracy: float


class PICPQSolver:
    """PIC-PQ: evolved per-group affine transforms of the HRank filter property decide a global
    pruning; a penalty rule on the kept weight mass decides the bits (module docstring)."""

    name = "picpq"
    needs_context = True

    def __init__(self, *, seed: int = 0, population: int = 16, tournament: int = 4,
                 cycles: int = 40, mutate_fraction: float = 0.1, scale_sigma: float = 1.0,
                 finetune_steps: int = 0, lr: float = 0.01, penalty: float = 1 / 6,
                 stage_bits: Sequence[int] = (8, 6, 4), min_keep: float = 0.1,
                 rank_batches: int = 2) -> None:
        for opt, v, low in (("seed", seed, 0), ("population", population, 2),
                            ("tournament", tournament, 1), ("cycles", cycles, 0),
                            ("finetune_steps", finetune_steps, 0),
                            ("rank_batches", rank_batches, 1)):
            check_int(_NAME, opt, v, low)
        if tournament > population:
            raise ValueError(f"tournament must be at most population ({population}), got "
                             f"{tournament}")
        for opt, v in (("mutate_fraction", mutate_fraction), ("scale_sigma", scale_sigma),
                       ("lr", lr), ("penalty", penalty)):
            check_real(_NAME, opt, v, 0.0)
        check_real(_NAME, "mutate_fraction", mutate_fraction, 0.0, 1.0)
        check_real(_NAME, "min_keep", min_keep, 0.0, 1.0, low_open=False, high_open=True)
        stage_bits = tuple(stage_bits) if isinstance(stage_bits, Sequence) else ()
        if not stage_bits or not all(isinstance(b, int) and not isinstance(b, bool)
                                     and 1 <= b <= 32 for b in stage_bits):
            raise ValueError(f"stage_bits must be a non-empty sequence of ints in 1..32 "
                             f"(Bmax per stage, first to last), got {stage_bits!r}")
        self.seed, self.population, self.tournament, self.cycles = seed, population, \
            tournament, cycles
        self.mutate_fraction, self.scale_sigma = float(mutate_fraction), float(scale_sigma)
        self.finetune_steps, self.lr, self.penalty = finetune_steps, float(lr), float(penalty)
        self.stage_bits, self.min_keep, self.rank_batches = stage_bits, float(min_keep), \
            rank_batches

    # --- building blocks ---

    def space(self, problem: Problem, context) -> _Space:
        """The search space of ``problem``: FP measured on the context's model and data."""
        groups = CHANNEL_GROUPS.get(context.graph)
        chosen = [groups[g.id] for g in problem.groups]
        batches = [context.split(b)[0]
                   for b in itertools.islice(iter(context.data), self.rank_batches)]
        fp = filter_property(context.graph, chosen, batches) if chosen else {}
        scores, normalized = {}, {}
        for g in chosen:
            prop = np.clip(fp[g.id], 0.0, None)
            prop = prop / prop.max() if prop.max() > 0 else prop
            normalized[g.id] = prop
            given = (context.channel_scores or {}).get(g.id)
            tie = np.asarray(given, dtype=np.float64).reshape(-1) if given is not None \
                else l1_scores(context.graph, g)
            tie = np.clip(np.nan_to_num(tie), 0.0, None)
            tie = tie / tie.max() if tie.max() > 0 else tie
            scores[g.id] = prop + 1e-6 * tie
        return _Space(problem, context.graph, normalized, scores, min_keep=self.min_keep,
                      stage_bits=self.stage_bits, penalty=self.penalty)

    def target(self, space: _Space, a: np.ndarray, b: np.ndarray,
               limits: Mapping[str, float], context
               ) -> tuple[dict[str, Option], dict[int, int], int, bool]:
        """``(bits, kept, n, repaired)``: the fewest removed channels ``n`` (bisection) whose
        pruning + bits meet ``limits``; at the most pruning, repaired by ``context.tighten``
        (raises ``InfeasibleBudgetError`` when nothing meets them)."""
        order = space.order(a, b)
        problem = space.problem

        def ok(n: int) -> bool:
            bits, kept = space.candidate(order, n)
            return _meets(problem_costs(problem, bits=bits, kept=kept), limits)

        lo, hi = 0, len(order)
        if not ok(hi):
            bits, kept = space.candidate(order, hi)
            bits, kept = context.tighten(bits, kept, dict(limits))
            return bits, kept, hi, True
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid + 1
        bits, kept = space.candidate(order, lo)
        return bits, kept, lo, False

    def _fitness(self, context, space: _Space, bits, kept, tune_batches) -> tuple[float, float]:
        scores = {g.id: gs.scores for g, gs in zip(space.problem.groups, space.groups)}
        assignment = context.assignment(bits, kept, scores)
        with torch.random.fork_rng(devices=[]):
            if self.finetune_steps:
                from ..finetune import fake_quant_model, qat_finetune
                tuned, amax = qat_finetune(context.graph, assignment, tune_batches, lr=self.lr,
                                           seed=context.seed, distill_from=context.teacher,
                                           progress=False, max_batches=len(tune_batches),
                                           calibration_batches=min(len(tune_batches), 2))
                model = fake_quant_model(tuned, assignment, amax)
            else:
                model = context.fake_quant(assignment)
            loss, acc = context.measure(model)
        return (loss if math.isfinite(loss) else math.inf), acc

    # --- the search ---

    def solve(self, problem: Problem, budget, *, context) -> Solution:
        limits = resolve_limits(problem, budget)
        if context is None:
            raise ValueError("picpq searches on the model and data: pass context= (a "
                             "SearchContext); pqcompile.compile does this when given data=")
        t0 = time.perf_counter()
        space = self.space(problem, context)
        rank_seconds = time.perf_counter() - t0
        n_groups = len(space.groups)
        rng = np.random.default_rng(self.seed)
        tune_batches = [(*inputs, target) for inputs, target in
                        (context.split(b) for b in
                         itertools.islice(iter(context.data), self.finetune_steps))]
        # Fails early (InfeasibleBudgetError) when no assignment meets the budget at all.
        self.target(space, np.ones(n_groups), np.zeros(n_groups), limits, context)

        cache: dict[tuple, tuple[float, float]] = {}

        def evaluate(a: np.ndarray, b: np.ndarray) -> _Member:
            bits, kept, _, _ = self.target(space, a, b, limits, context)
            key = (tuple(sorted(bits.items())), tuple(sorted(kept.items())))
            if key not in cache:
                cache[key] = self._fitness(context, space, bits, kept, tune_batches)
            loss, acc = cache[key]
            return _Member(a.copy(), b.copy(), loss, acc)

        sigma = np.array([gs.sigma for gs in space.groups])
        searching = n_groups > 0
        size = self.population if searching else 1
        cycles = self.cycles if searching else 0
        bar = Progress(size + cycles, "picpq", bool(getattr(context, "progress", False)))
        population: deque[_Member] = deque()
        for i in range(size):
            if i == 0:
                a, b = np.ones(n_groups), np.zeros(n_groups)
            else:
                a = np.exp(rng.normal(0.0, self.scale_sigma, n_groups))
                b = rng.normal(0.0, sigma)
            population.append(evaluate(a, b))
            bar.update(i + 1, loss=min(m.loss for m in population))
        best = min(population, key=lambda m: m.loss)
        history = [best.loss]
        mean_history = [float(np.mean([m.loss for m in population]))]
        n_mutate = max(1, round(self.mutate_fraction * n_groups)) if n_groups else 0
        for cycle in range(cycles):
            step = 1.0 - cycle / (1.25 * cycles)
            picks = rng.choice(len(population), size=self.tournament, replace=False)
            parent = min((population[int(j)] for j in picks), key=lambda m: m.loss)
            a, b = parent.a.copy(), parent.b.copy()
            for k in rng.choice(n_groups, size=n_mutate, replace=False):
                a[k] *= math.exp(rng.normal(0.0, self.scale_sigma * step))
                b[k] += rng.normal(0.0, sigma[k])
            child = evaluate(a, b)
            population.popleft()
            population.append(child)
            if child.loss < best.loss:
                best = child
            history.append(best.loss)
            mean_history.append(float(np.mean([m.loss for m in population])))
            bar.update(size + cycle + 1, loss=best.loss)

        bits, kept, n, repaired = self.target(space, best.a, best.b, limits, context)
        ids = [g.id for g in problem.groups]
        info = {
            "channel_scores": {g: gs.scores.copy() for g, gs in zip(ids, space.groups)},
            "best_transform": {g: (float(a_), float(b_))
                               for g, a_, b_ in zip(ids, best.a, best.b)},
            "best_loss": best.loss, "best_accuracy": best.accuracy,
            "fitness_history": history, "population_mean_history": mean_history,
            "evaluations": size + cycles, "distinct_candidates": len(cache),
            "pruned_channels": n, "removable_channels": int(sum(gs.quota
                                                                for gs in space.groups)),
            "weight_fractions": dict(zip((lay.name for lay in problem.layers),
                                         space.weight_fractions(kept))),
            "bmax": {lay.name: s.bmax for lay, s in zip(problem.layers, space.layers)},
            "repaired": repaired, "rank_seconds": rank_seconds,
            "seconds": time.perf_counter() - t0,
        }
        return context.solution(bits, kept, budget, solver=self.name, info=info)
