"""``FisherTrace``: FIT sensitivity from the empirical Fisher information (FITCompress).

Units: *estimated increase of the mean loss* (second order, the Fisher standing in for the
Hessian: ``dL ~ 1/2 * sum F_ii delta_i^2``), as :class:`~pqcompile.criteria.HessianTrace`.

* Weights: FIT's ``Tr(F_l) * Delta_l^2`` per output channel, with the channel's own step
  (the weight grid is per channel): ``1/2 * sum_c Tr(F_l,c) * Delta_c^2 / 12``, ``Delta_c =
  max |w_c| / (2^(b-1) - 1)``; ``Delta^2 / 12`` is the variance of uniform rounding noise, the
  factor that puts FIT in the units of the channel scores below. Strictly monotone in bits.
* Activations: ``1/2 * Tr(F_a) * Delta_a^2 / 12`` for the layer's input tensor, ``Delta_a =
  amax / qmax`` from the calibration observer; layers reading one tensor share it equally.
* Channels: ``1/2 * sum F_ii theta_i^2`` over the channel's producer rows *and biases* (pruning
  removes both: it is quantizing them to zero).

Estimation. Per mini-batch of size ``N`` with batch-mean loss and gradient ``g``, ``N * g^2``
estimates the per-sample Fisher diagonal of every parameter (exact for ``N = 1``; for
``N > 1`` the cross terms between samples vanish in expectation at a stationary point). For a
layer's input activation, ``N * sum (dL/da)^2`` over the batch tensor is *exactly* the mean
per-sample trace ``mean_n ||dL_n/da_n||^2`` (samples do not interact in eval mode). Batches are
read once, in order; after each one, every block's trace estimate (the mean of its per-batch
traces) is checked: estimation stops when, for every block, the variance of that mean (sample
variance / number of batches) relative to the mean squared is below ``tol``, after at least
``min_batches``; it also stops at ``max_batches`` or when the data runs out (``converged``
then says whether the tolerance was met).

>>> import torch
>>> from pqcompile.build import analysis
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> gm = analysis(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
...                                   torch.nn.Linear(8, 3)), (torch.randn(1, 4),))
>>> crit = FisherTrace(min_batches=2)
>>> crit.calibrate(gm, [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)])
>>> s = crit.layer_sensitivity(gm, "_0", [(2, 2), (4, 4), (8, 8)])
>>> s[(2, 2)] > s[(4, 4)] > s[(8, 8)] > 0, crit.batches
(True, 4)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from .. import distributed
from ..devices import is_cpu, resolve_device, to_device
from ..meta import ChannelGroup
from ..presets import compute_layers
from ..quant.observers import Observer
from .base import (
    ActivationRanges,
    BitOption,
    LossFn,
    SecondOrderCriterion,
    batch_size,
    check_bit_options,
    combine,
    iterate,
    layer_module,
    loss_grads,
    out_rows,
    readers,
    run_capture,
    weight_scales,
)


class FisherTrace(SecondOrderCriterion):
    """FIT sensitivity from the empirical Fisher with variance-based stopping (module docstring).

    After :meth:`calibrate`: ``fisher[layer]`` (per-weight diagonal, float64, weight's shape),
    ``bias_fisher[layer]``, ``weight_trace`` / ``activation_trace`` (per layer; the activation
    trace is the layer's share), ``batches`` read and ``converged``.
    """

    name = "fisher"
    units = "estimated increase of the mean loss (second order, Fisher for Hessian)"

    def __init__(self, *, loss_fn: LossFn | None = None, tol: float = 1e-3,
                 min_batches: int = 10, max_batches: int = 100,
                 observer: str | Callable[[], Observer] = "minmax", objective: Any = None,
                 seed: int = 0, device: Any = None) -> None:
        super().__init__(loss_fn=loss_fn, tol=tol, observer=observer, objective=objective)
        self.seed = seed
        self.device = resolve_device(device)
        if min_batches < 1 or max_batches < 1:
            raise ValueError(f"min_batches and max_batches must be >= 1, got {min_batches}, "
                             f"{max_batches}")
        self.max_batches = max_batches
        self.min_batches = min(min_batches, max_batches)
        self.fisher: dict[str, torch.Tensor] = {}
        self.bias_fisher: dict[str, torch.Tensor | None] = {}
        self.batches = 0

    def calibrate(self, gm: torch.fx.GraphModule, batches: Iterable[Any] | None = None) -> None:
        work = self._cache.get(gm)
        if not is_cpu(self.device):  # a copy trains there; the cached graph stays on the CPU
            work = copy.deepcopy(work).to(self.device)
        layers = compute_layers(work)
        modules = [layer_module(work, layer) for layer in layers]
        params = [m.weight.requires_grad_(True) for m in modules]
        biases = [m.bias.requires_grad_(True) for m in modules if m.bias is not None]
        shared = readers(work, layers)
        acts = list(shared)
        ranges = ActivationRanges(work, layers, self.observer)
        owners = [(layer, f"weight of layer {layer!r}") for layer in layers] + \
            [(layer, f"bias of layer {layer!r}") for layer, m in zip(layers, modules)
             if m.bias is not None] + \
            [(a, f"input of layer(s) {shared[a]} (node {a!r})") for a in acts]
        diag = [torch.zeros_like(p, dtype=torch.float64) for p in params + biases]
        traces: list[np.ndarray] = []  # per batch: weight blocks, then activation blocks
        self.converged = False
        rank, size = distributed.rank_and_size()
        gen = torch.Generator().manual_seed(self.seed + rank)
        if batches is not None and not isinstance(batches, torch.Tensor):
            batches = _placed(batches, self.device, self.name)
        for inputs, target, teacher in iterate(work, batches, self.name):
            out, values = run_capture(work, inputs, set(acts) | ranges.nodes)
            ranges.update({k: distributed.all_gather(values[k].detach()).cpu()
                           for k in sorted(ranges.nodes)})  # one order on every rank
            loss = self.objective.probe(out, teacher, target, gen)
            tensors = params + biases + [values[a] for a in acts]
            grads = loss_grads(work, self.name, loss, tensors, owners)
            n = batch_size(inputs)
            if size == 1:
                sq = [None if g is None else n * g.detach().to(torch.float64) ** 2
                      for g in grads]
            else:
                sq = _shard_squares(grads, len(params) + len(biases), n, size)
            for d, s in zip(diag, sq):
                if s is not None:
                    d += s
            blocks = sq[:len(params)] + sq[len(params) + len(biases):]
            traces.append(np.array([0.0 if s is None else float(s.sum()) for s in blocks]))
            if len(traces) >= max(self.min_batches, 2) and self._settled(np.stack(traces)):
                self.converged = True
                break
            if len(traces) >= self.max_batches:
                break
        if not traces:
            raise ValueError(f"criterion {self.name!r}: batches is empty; give (inputs, "
                             "target) batches")
        count = len(traces)
        mean = np.stack(traces).mean(axis=0)
        self.fisher = {layer: (d / count).cpu() for layer, d in zip(layers, diag[:len(params)])}
        bias_f = iter(diag[len(params):])
        self.bias_fisher = {layer: (next(bias_f) / count).cpu() if m.bias is not None else None
                            for layer, m in zip(layers, modules)}
        self._set_traces(layers, mean[:len(layers)], shared, mean[len(layers):])
        self.batches, self._ranges = count, ranges

    def _settled(self, traces: np.ndarray) -> bool:
        mean = traces.mean(axis=0)
        var_of_mean = traces.var(axis=0, ddof=1) / len(traces)
        rel = np.where(mean > 0, var_of_mean / np.where(mean > 0, mean, 1.0) ** 2, 0.0)
        return bool((rel < self.tol).all())

    def layer_sensitivity(self, gm: torch.fx.GraphModule, layer: str,
                          bit_options: Iterable[BitOption]) -> dict[BitOption, float]:
        options = check_bit_options(bit_options, f"layer {layer!r}")
        work = self._check(gm)
        w = layer_module(work, layer).weight.detach()
        per_channel = self.fisher[layer].reshape(w.shape[0], -1).sum(1)
        ranges, fa = self._ranges, self.activation_trace[layer]

        def w_term(b: int) -> float:
            return 0.5 * float((per_channel * weight_scales(w, b) ** 2).sum()) / 12.0

        return combine(options, w_term, lambda b: 0.5 * fa * ranges.step(layer, b) ** 2 / 12.0)

    def channel_scores(self, gm: torch.fx.GraphModule, group: ChannelGroup) -> np.ndarray:
        work = self._check(gm)

        def rows(node: str, module: torch.nn.Module) -> np.ndarray | None:
            if node not in self.fisher:
                return None
            w = module.weight.detach().to(torch.float64)
            s = (self.fisher[node] * w ** 2).reshape(w.shape[0], -1).sum(1)
            if module.bias is not None and self.bias_fisher[node] is not None:
                s = s + self.bias_fisher[node] * module.bias.detach().to(torch.float64) ** 2
            return 0.5 * s.numpy()

        return out_rows(work, group, rows)


def _placed(batches: Iterable[Any], device: Any, name: str) -> Iterator[Any]:
    """This rank's shard of every batch (all of it without a process group), on ``device``."""
    for batch in batches:
        yield to_device(distributed.shard(batch, f"criterion {name!r}"), device)


def _shard_squares(grads: Sequence[torch.Tensor | None], n_params: int, n: int, size: int
                   ) -> list[torch.Tensor | None]:
    """What one process computes on the global batch (``N = n * size`` samples), from this
    rank's shard gradients: the parameters' ``N * g^2`` of the averaged gradient (the global
    batch mean's), and the activations' ``N * (n / N)^2 * (dL_shard/da)^2`` summed over the
    ranks (each shard's activations get a gradient from its own samples only)."""
    total = n * size
    out: list[torch.Tensor | None] = []
    for i, g in enumerate(grads):
        if g is None:
            out.append(None)
            continue
        g = g.detach().to(torch.float64)
        if i < n_params:
            mean = distributed.all_reduce(g / size)
            out.append(total * mean ** 2)
        else:  # only the block's sum is used: reduce that
            part = (n * n / total) * (g ** 2).sum()
            out.append(distributed.all_reduce(part.reshape(1)))
    return out

