"""FITCompress's Fisher statistics: the variance-stopped start on the FP32 graph and the
refreshes on the compressed model along the path, as per-row arrays of the full weights, and
the FIT of a quantized tensor (:func:`fit_term`).

Used by :class:`~pqcompile.solvers.fitcompress.FITCompressSolver`; a row is one output channel
of a layer's unpruned weight, so statistics of pruned rows stay where they were.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..criteria import FisherTrace
from .search import SearchContext

if TYPE_CHECKING:
    from .fitcompress import _Path

NOISE = 1.0 / 12.0  # E[(round error)^2] / Delta^2 of uniform rounding


def fit_term(trace: float, value_range: float, bits: int) -> float:
    """FIT of one quantized tensor: ``trace * Delta^2 / 12``, ``Delta = value_range /
    (2^bits - 1)`` (``trace``: the Fisher trace of the tensor's values)."""
    return float(trace) * (float(value_range) / (2 ** int(bits) - 1)) ** 2 * NOISE


def _inv_levels2(bits: int) -> float:
    return 1.0 / (2 ** int(bits) - 1) ** 2


@dataclass
class _LayerStats:
    """Fisher statistics of one layer, per output row of the full (unpruned) weight."""

    trace: np.ndarray  # Tr(F) of each row's weights
    range2: np.ndarray  # squared range of each row's grid, (2 max |w_r|)^2
    importance: np.ndarray  # sum F theta^2 over each row's weights and bias
    act_trace: float = 0.0  # the layer's share of Tr(F) of its input activation
    act_range: float = 0.0  # max - min of its input


class _Stream:
    """Batches from the start of ``data``, cycling; counts what was read."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data, self.read = data, 0
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.data)
            try:
                batch = next(self._it)
                self.read += 1
                return batch
            except StopIteration:
                self._it = None
        raise ValueError("data yields no batches")

    def take(self, n: int) -> Iterator[Any]:
        """Up to ``n`` batches, read lazily (a consumer stopping early reads no more)."""
        for _ in range(n):
            yield self.next()


def _wrapped(fq: torch.fx.GraphModule, names: list[str]) -> dict[str, torch.nn.Module]:
    out = {}
    for name in names:
        try:
            out[name] = fq.get_submodule(f"pqc_wq_{name}")
        except AttributeError as exc:
            raise RuntimeError(f"the fake-quant model has no quantized layer {name!r}; the "
                               "context's graph does not match the problem") from exc
    return out


def _capture_inputs(modules: Mapping[str, torch.nn.Module]):
    """Forward pre-hooks storing each layer's input tensor in the returned dict."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name, _module, args):
        seen[name] = args[0]

    handles = [m.register_forward_pre_hook(functools.partial(hook, name))
               for name, m in modules.items()]
    return seen, handles


def _row_stats(fisher: torch.Tensor, bias_fisher: torch.Tensor | None, layer: torch.nn.Module
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output row: ``Tr F``, ``(2 max |w|)^2`` and ``sum F theta^2`` (weights + bias)."""
    w = layer.weight.detach().to(torch.float64)
    rows = w.shape[0]
    f = fisher.to(torch.float64).reshape(rows, -1)
    trace = f.sum(1)
    range2 = (2.0 * w.reshape(rows, -1).abs().amax(1)) ** 2
    importance = (f * w.reshape(rows, -1) ** 2).sum(1)
    if layer.bias is not None and bias_fisher is not None:
        importance = importance + bias_fisher.to(torch.float64) * \
            layer.bias.detach().to(torch.float64) ** 2
    return trace.numpy(), range2.numpy(), importance.numpy()


def _input_ranges(fq: torch.fx.GraphModule, names: list[str], inputs: Iterable[tuple]
                  ) -> dict[str, float]:
    """``max - min`` of each layer's input over ``inputs`` (no gradients)."""
    modules = _wrapped(fq, names)
    lo = {n: math.inf for n in names}
    hi = {n: -math.inf for n in names}
    seen, handles = _capture_inputs(modules)
    try:
        fq.eval()
        with torch.no_grad():
            for x in inputs:
                seen.clear()
                fq(*x)
                for n, v in seen.items():
                    lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    finally:
        for h in handles:
            h.remove()
    return {n: max(hi[n] - lo[n], 0.0) if math.isfinite(hi[n]) else 0.0 for n in names}


def _initial_stats(context: SearchContext, path: _Path, stream: _Stream, *, tol: float,
                   min_batches: int, max_batches: int) -> FisherTrace:
    """The variance-stopped estimate (FisherTrace on the FP32 graph) as per-row statistics."""
    crit = FisherTrace(tol=tol, min_batches=min_batches, max_batches=max_batches,
                       objective=context.objective, seed=context.seed)
    crit.calibrate(context.graph, stream.take(max_batches))
    fq = context.fake_quant(context.assignment(path.bits(), path.kept()))
    modules = _wrapped(fq, path.names)
    ranges = _input_ranges(fq, path.names, context.calibration)
    stats = []
    for name in path.names:
        trace, range2, imp = _row_stats(crit.fisher[name], crit.bias_fisher[name],
                                        modules[name].layer)
        stats.append(_LayerStats(trace, range2, imp, float(crit.activation_trace[name]),
                                 ranges[name]))
    path.set_stats(stats)
    path.norm_now = path.norm()
    return crit


def _refresh(context: SearchContext, path: _Path, stream: _Stream, batches: int) -> None:
    """Re-estimate the Fisher on the current node's fake-quant model (pruned, quantized)."""
    assignment = context.assignment(path.bits(), path.kept(), path.rank_scores())
    fq = context.fake_quant(assignment).eval()
    modules = _wrapped(fq, path.names)
    layers: dict[int, torch.nn.Module] = {}
    for m in modules.values():
        layers.setdefault(id(m.layer), m.layer)
    params = [p.requires_grad_(True) for layer in layers.values()
              for p in (layer.weight, layer.bias) if p is not None]
    diag = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    act = {name: 0.0 for name in path.names}
    lo = {n: math.inf for n in path.names}
    hi = {n: -math.inf for n in path.names}
    seen, handles = _capture_inputs(modules)
    generator = torch.Generator().manual_seed(context.seed)  # the probe's draws
    try:
        for batch in stream.take(batches):
            seen.clear()
            inputs = context.inputs(batch)
            loss = context.probe(fq(*inputs), batch, generator)
            tensors: dict[int, torch.Tensor] = {}
            for v in seen.values():
                if v.requires_grad:
                    tensors.setdefault(id(v), v)
            wanted = params + list(tensors.values())
            grads = torch.autograd.grad(loss, wanted, allow_unused=True)
            n = int(inputs[0].shape[0])
            sq = {id(t): None if g is None else n * g.detach().to(torch.float64) ** 2
                  for t, g in zip(wanted, grads)}
            for p in params:
                if sq[id(p)] is not None:
                    diag[id(p)] += sq[id(p)]
            readers: dict[int, int] = {}
            for v in seen.values():
                readers[id(v)] = readers.get(id(v), 0) + 1
            for name, v in seen.items():
                s = sq.get(id(v))
                if s is not None:
                    act[name] += float(s.sum()) / readers[id(v)]
                lo[name] = min(lo[name], float(v.detach().min()))
                hi[name] = max(hi[name], float(v.detach().max()))
    finally:
        for h in handles:
            h.remove()
    for i, name in enumerate(path.names):
        layer = modules[name].layer
        bias = diag[id(layer.bias)] / batches if layer.bias is not None else None
        trace, range2, imp = _row_stats(diag[id(layer.weight)] / batches, bias, layer)
        rows = np.flatnonzero(path.row_mask(i))
        if len(rows) != len(trace):
            raise RuntimeError(f"layer {name!r}: the pruned model has {len(trace)} output rows, "
                               f"the path keeps {len(rows)}; the channel groups do not match")
        s = path.stats[i]
        s.trace[rows], s.range2[rows], s.importance[rows] = trace, range2, imp
        s.act_trace = act[name] / batches
        if math.isfinite(hi[name]):
            s.act_range = max(hi[name] - lo[name], 0.0)
    path.set_stats(path.stats)
    path.norm_now = path.norm()
