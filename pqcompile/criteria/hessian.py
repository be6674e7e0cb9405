"""``HessianTrace``: HAWQ-V3 sensitivity from Hutchinson estimates of Hessian traces.

Units: *estimated increase of the mean loss* (second order, ``dL ~ 1/2 * sum h_i delta_i^2``
with the layer's average curvature ``h = Tr(H_l) / n_l``), the units of every data-driven
criterion here. It is HAWQ-V3's ``Omega_l = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` times 1/2
(the ranking is HAWQ-V3's).

* Weights: ``1/2 * Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` (BN-folded weights, grid of
  :mod:`pqcompile.quant`; running max over the requested bits).
* Activations: ``1/2 * Tr(H_a) * Delta_a^2 / 12``: ``H_a`` is the Hessian of the mean loss w.r.t.
  the layer's input tensor (its trace over a batch tensor is the mean per-sample trace, since
  samples do not interact in eval mode), ``Delta_a = amax / qmax`` with ``amax`` from the
  calibration observer at the node pqcompile.quant observes, and ``Delta_a^2 / 12`` the
  variance of uniform rounding noise. Layers reading one tensor share its term equally.
* Channels: ``1/2 * Tr(H_l) / n_l * ||w_c||^2`` (pruning = quantizing to zero).

Hutchinson: ``Tr(H_l) = E[v^T H_l v]`` for Rademacher ``v``, ``H_l v`` by double backprop. Each
iteration draws one ``v`` per block (a layer's weight, a layer's input) on one batch, and each
block gets its own second backprop, as PyHessian/MQBench's per-layer traces, so no other block's
curvature enters its estimate. Iterations cycle through the batches, weighted by batch size. The
running mean of every block stops when its relative change is below ``tol`` (after
``min_iters``), or after ``max_iters``. Deterministic for a seed. A negative trace (a saddle
direction) counts as zero curvature.

>>> import torch
>>> from pqcompile.build import analysis
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> gm = analysis(model, (torch.randn(1, 4),))
>>> crit = HessianTrace(max_iters=20)
>>> crit.calibrate(gm, [(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
>>> s = crit.layer_sensitivity(gm, "_2", [(2, 8), (8, 8)])
>>> s[(2, 8)] > s[(8, 8)] > 0
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.fx

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
    weight_error,
)


def _rademacher(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t.dtype)


class HessianTrace(SecondOrderCriterion):
    """HAWQ-V3 sensitivity from Hutchinson trace estimates (module docstring).

    ``loss_fn(output, target)`` must return the batch mean (default: cross entropy);
    ``activations=False`` skips the activation term (weights only, as HAWQ-V3).
    After :meth:`calibrate`, ``weight_trace``, ``activation_trace`` (per layer, its share),
    ``iterations`` and ``converged`` hold the estimates.
    """

    name = "hessian"

    def __init__(self, *, loss_fn: LossFn | None = None, tol: float = 1e-3,
                 min_iters: int = 10, max_iters: int = 100, seed: int = 0,
                 observer: str | Callable[[], Observer] = "minmax",
                 activations: bool = True, objective: Any = None) -> None:
        super().__init__(loss_fn=loss_fn, tol=tol, observer=observer, objective=objective)
        if min_iters < 1 or max_iters < 1:
            raise ValueError(f"min_iters and max_iters must be >= 1, got {min_iters}, "
                             f"{max_iters}")
        self.max_iters = max_iters
        self.min_iters = min(min_iters, max_iters)
        self.seed, self.activations = seed, activations
        self.iterations = 0

    def calibrate(self, gm: torch.fx.GraphModule, batches: Iterable[Any] | None = None) -> None:
        work = self._cache.get(gm)
        layers = compute_layers(work)
        data = list(iterate(work, batches, self.name))
        if not data:
            raise ValueError(f"criterion {self.name!r}: batches is empty; give at least one "
                             "(inputs, target) batch")
        self._ranges = ActivationRanges(work, layers, self.observer)
        with torch.no_grad():
            for inputs, _, _ in data:
                self._ranges.update(run_capture(work, inputs, self._ranges.nodes)[1])
        weights = [layer_module(work, layer).weight.requires_grad_(True) for layer in layers]
        shared = readers(work, layers) if self.activations else {}
        acts = list(shared)
        means, iters, converged = self._hutchinson(work, data, weights, acts)
        self._set_traces(layers, means[:len(layers)], shared, means[len(layers):])
        self.iterations, self.converged = iters, converged

    def _hutchinson(self, work, data, weights, acts) -> tuple[np.ndarray, int, bool]:
        gen = torch.Generator().manual_seed(self.seed)
        sums = np.zeros(len(weights) + len(acts))
        total, prev = 0.0, None
        layers = compute_layers(work)
        owners = [(layer, f"weight of layer {layer!r}") for layer in layers] + \
            [(a, f"input node {a!r}") for a in acts]
        for it in range(self.max_iters):
            inputs, target, teacher = data[it % len(data)]
            out, values = run_capture(work, inputs, acts)
            loss = self.objective.loss(out, teacher, target)
            tensors = list(weights) + [values[a] for a in acts]
            grads = loss_grads(work, self.name, loss, tensors, owners, create_graph=True)
            vs = [_rademacher(t, gen) for t in tensors]
            est = self._quadratic_forms(tensors, grads, vs)
            n = batch_size(inputs)
            sums += n * est
            total += n
            mean = sums / total
            if prev is not None and it + 1 >= self.min_iters:
                change = np.abs(mean - prev) / np.maximum(np.abs(mean), 1e-30)
                if bool((change < self.tol).all()):
                    return mean, it + 1, True
            prev = mean
        return sums / total, self.max_iters, False

    @staticmethod
    def _quadratic_forms(tensors, grads, vs) -> np.ndarray:
        """``v_l^T H_ll v_l`` per block: one backprop of ``g_l . v_l`` w.r.t. block ``l`` each.

        A single backprop of ``sum_l g_l . v_l`` would serve all blocks at once, but then every
        other block's ``H_lj v_j`` enters block ``l``'s estimate as zero-mean noise: on a
        ResNet-20 that was measured at 1 to 60 times the trace (10 draws) against 4 to 15 %
        blockwise, so the blockwise cost (one backprop per block) is paid.
        """
        out = np.zeros(len(tensors))
        for i, (t, g, v) in enumerate(zip(tensors, grads, vs)):
            if g is not None and g.requires_grad:  # else g is constant in t: no curvature
                hv = torch.autograd.grad(g, t, grad_outputs=v, retain_graph=True,
                                         allow_unused=True)[0]
                out[i] = 0.0 if hv is None else float((hv * v).sum())
        return out

    def layer_sensitivity(self, gm: torch.fx.GraphModule, layer: str,
                          bit_options: Iterable[BitOption]) -> dict[BitOption, float]:
        options = check_bit_options(bit_options, f"layer {layer!r}")
        work = self._check(gm)
        w = layer_module(work, layer).weight.detach()
        h = max(self.weight_trace[layer], 0.0) / w.numel()
        ha = max(self.activation_trace[layer], 0.0)
        ranges = self._ranges
        return combine(options, lambda b: 0.5 * h * weight_error(w, b),
                       lambda b: 0.5 * ha * ranges.step(layer, b) ** 2 / 12.0)

    def channel_scores(self, gm: torch.fx.GraphModule, group: ChannelGroup) -> np.ndarray:
        work = self._check(gm)

        def rows(node: str, module: torch.nn.Module) -> np.ndarray | None:
            if node not in self.weight_trace:
                return None
            w = module.weight.detach().to(torch.float64)
            h = max(self.weight_trace[node], 0.0) / w.numel()
            return 0.5 * h * w.reshape(w.shape[0], -1).pow(2).sum(1).numpy()

        return out_rows(work, group, rows)
