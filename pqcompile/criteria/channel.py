"""Channel-group importance: ``L1`` (data-free), ``Taylor`` and ``ChannelFisher`` (data).

Scores are per channel of a :class:`~pqcompile.meta.ChannelGroup`, summed over the group's
producers (its ``out`` members: the conv/linear outputs, BN folded in). Zeroing a channel in
every producer output zeroes it everywhere in the group (ReLU, pooling and adds keep zeros), which
is what pruning computes; for a residual group the per-producer sum is the usual first-order
approximation (each producer's map is scored as if removed alone).

* ``L1``: ``sum |w|`` of the channel's producer rows (Li et al. 2017; BN-folded weights).
  Units: weight magnitude.
* ``Taylor`` (Molchanov et al. 2017): ``mean_n |sum_{positions} a_n * dL_n/da_n|``, the
  first-order change of sample ``n``'s loss when the channel's activation ``a`` is zeroed,
  averaged over samples. Units: loss (first order); per-sample gradients come exactly from the
  batch-mean loss, ``dL_n/da_n = N * dL/da_n``, as samples do not interact in eval mode.
* ``ChannelFisher`` (Theune et al. 2018, "Fisher pruning"):
  ``1/2 * mean_n (sum_{positions} a_n * dL_n/da_n)^2``, the second-order loss increase with the
  empirical Fisher for the Hessian. Units: *estimated increase of the mean loss*, the units of
  :class:`~pqcompile.criteria.HessianTrace` and :class:`~pqcompile.criteria.FisherTrace`, so it
  trades off directly against their bit sensitivities.

``Taylor`` and ``ChannelFisher`` score channels only; their :meth:`calibrate` reads the groups
from ``CHANNEL_GROUPS`` (run ChannelGroupAnalysis first). ``dL_n/da`` is the gradient of the
objective's probe (:meth:`pqcompile.objective.Objective.probe`): for the default distillation
objective, whose gradient is zero at the float model, a Gauss-Newton probe, so
``ChannelFisher`` estimates the Gauss-Newton second-order increase and ``Taylor`` its
square-root scale; with ``loss_fn`` (a label loss), the loss itself, as in the papers.

>>> import torch
>>> from pqcompile.build import analysis
>>> from pqcompile.meta import CHANNEL_GROUPS
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> gm = analysis(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
...                                   torch.nn.Flatten(), torch.nn.Linear(16, 3)),
...               (torch.randn(1, 1, 4, 4),))
>>> taylor = Taylor()
>>> taylor.calibrate(gm, [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))])
>>> taylor.channel_scores(gm, CHANNEL_GROUPS.get(gm)[0]).shape
(4,)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.fx

from ..meta import CHANNEL_GROUPS, ChannelGroup
from .base import (
    Criterion,
    LossFn,
    PreparedCache,
    batch_size,
    iterate,
    loss_grads,
    make_objective,
    run_capture,
)
from .magnitude import Magnitude


class L1(Magnitude):
    """``sum |w|`` of each channel's producer rows (data-free, BN-folded weights)."""

    name = "l1"

    def __init__(self) -> None:
        super().__init__(p=1.0)


class _ActivationScores(Criterion):
    """Accumulates per-sample ``theta_n,c = sum_{positions} a_n * dL_n/da_n`` per channel."""

    needs_data = True
    scores_layers = False

    def __init__(self, *, loss_fn: LossFn | None = None, max_batches: int | None = None,
                 objective: Any = None, seed: int = 0) -> None:
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.objective = make_objective(loss_fn, objective)
        self.seed = seed
        self.max_batches = max_batches
        self._cache = PreparedCache()
        self._abs: dict[int, np.ndarray] = {}
        self._sq: dict[int, np.ndarray] = {}
        self.samples = 0

    def calibrate(self, gm: torch.fx.GraphModule, batches: Iterable[Any] | None = None) -> None:
        groups = CHANNEL_GROUPS.get(gm)
        work = self._cache.get(gm)
        present = {n.name for n in work.graph.nodes}
        members: dict[int, list[tuple[str, int, np.ndarray]]] = {}
        for g in groups:
            for m in g.members:
                if m.role != "out" or m.node not in present:
                    continue
                if not isinstance(m.dim, int):
                    raise TypeError(f"group {g.name!r}: producer {m.node!r} carries its channels "
                                    f"along dims {m.dim}; activation scores need one int dim")
                index = np.array(m.index, np.int64)  # a writable copy, for torch indexing
                members.setdefault(g.id, []).append((m.node, m.dim, index))
        nodes = sorted({node for ms in members.values() for node, _, _ in ms})
        abs_sum = {gid: np.zeros(groups[gid].size) for gid in members}
        sq_sum = {gid: np.zeros(groups[gid].size) for gid in members}
        count = 0
        gen = torch.Generator().manual_seed(self.seed)
        for b, (inputs, target, teacher) in enumerate(iterate(work, batches, self.name)):
            if self.max_batches is not None and b >= self.max_batches:
                break
            out, values = run_capture(work, inputs, nodes)
            grads = loss_grads(work, self.name, self.objective.probe(out, teacher, target, gen),
                               [values[n] for n in nodes],
                               [(n, f"output of layer {n!r}") for n in nodes])
            n = batch_size(inputs)
            prods = {name: None if g is None else (values[name].detach() * g * n)
                     for name, g in zip(nodes, grads)}
            for gid, ms in members.items():
                theta = torch.zeros(n, groups[gid].size, dtype=torch.float64)
                for node, dim, index in ms:
                    p = prods[node]
                    if p is None:
                        continue
                    other = [d for d in range(p.dim()) if d not in (0, dim % p.dim())]
                    per = p.sum(dim=other).to(torch.float64) if other else p.to(torch.float64)
                    theta += per[:, torch.as_tensor(index)].sum(-1)
                abs_sum[gid] += theta.abs().sum(0).numpy()
                sq_sum[gid] += (theta ** 2).sum(0).numpy()
            count += n
        if not count:
            raise ValueError(f"criterion {self.name!r}: batches is empty; give (inputs, target) "
                             "batches")
        self._abs = {gid: v / count for gid, v in abs_sum.items()}
        self._sq = {gid: v / count for gid, v in sq_sum.items()}
        self.samples = count

    def _stats(self, gm: torch.fx.GraphModule, group: ChannelGroup) -> int:
        if not self.samples:
            raise ValueError(f"criterion {self.name!r} has no statistics yet: call "
                             "calibrate(gm, batches) first, with (inputs, target) batches")
        if not self._cache.holds(gm):
            raise ValueError(f"criterion {self.name!r} was calibrated on another graph, or the "
                             "graph's weights changed since: call calibrate(gm, batches) again")
        if group.id not in self._abs:
            raise ValueError(f"group {group.name!r} has no producer (conv/linear output) to "
                             f"score in this graph")
        return group.id


class Taylor(_ActivationScores):
    """First-order Taylor importance ``mean_n |sum a * dL_n/da|`` per channel (loss units)."""

    name = "taylor"
    units = "loss change (first order) per sample"

    def channel_scores(self, gm: torch.fx.GraphModule, group: ChannelGroup) -> np.ndarray:
        return self._abs[self._stats(gm, group)].copy()


class ChannelFisher(_ActivationScores):
    """Fisher pruning ``1/2 mean_n (sum a * dL_n/da)^2`` per channel (mean-loss increase)."""

    name = "channel_fisher"
    units = "estimated increase of the mean loss (second order, Fisher for Hessian)"

    def channel_scores(self, gm: torch.fx.GraphModule, group: ChannelGroup) -> np.ndarray:
        return 0.5 * self._sq[self._stats(gm, group)]
