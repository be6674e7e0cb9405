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

import itertools
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from ..meta import CHANNEL_GROUPS
from ..presets import l1_scores
from ..progress import Progress
from .filter_property import feature_rank, filter_property
from .picpq_space import _meets, _Space, bit_rule, snap_down
from .problem import Option, Problem, Solution, problem_costs, resolve_limits
from .search import check_int, check_real

_NAME = "PICPQSolver"

__all__ = ["PICPQSolver", "bit_rule", "feature_rank", "filter_property", "snap_down"]


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
    # compile()'s bit options when none are given: every weight width the lowering stores, so
    # the stage maxima (8, 6, 4) and the penalty rule's Bmax - 1 (7, 5, 3) are not snapped away
    default_bit_options = tuple(itertools.product((2, 3, 4, 5, 6, 7, 8), (4, 8)))

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
        batches = [context.inputs(b)
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
                                           calibration_batches=min(len(tune_batches), 2),
                                           objective=context.objective)
                model = fake_quant_model(tuned, assignment, amax)
            else:
                model = context.fake_quant(assignment)
            loss, acc = context.measure(model)
        context.record(bits, kept, accuracy=acc, loss=loss)
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
        tune_batches = list(itertools.islice(iter(context.data), self.finetune_steps))
        if context.objective.kind == "cross_entropy":  # labels: the teacher's where absent
            tune_batches = [(*inputs, target) for inputs, target in
                            (context.split(b) for b in tune_batches)]
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
