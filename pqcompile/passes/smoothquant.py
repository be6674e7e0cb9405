"""SmoothQuant-style scale migration: activation outliers moved into the next linears' weights.

A producer ``P`` (an affine ``nn.LayerNorm`` or an ``nn.Linear``) whose output is read by
``nn.Linear`` layers only (through Dropout/Identity) computes ``y = P(x)``; dividing ``P``'s
per-channel weight and bias by ``s`` and multiplying the readers' input columns by ``s`` gives
the same outputs in FP32, while the tensor that is quantized, ``y / s``, has its outlier
channels shrunk. ``s_j = max|y_j|^alpha / max_k |W_kj|^(1 - alpha)`` (Xiao et al.,
SmoothQuant), from the calibration batches; ``alpha = 0.5`` by default.

The rewrite is only equivalent when *every* reader of ``y`` is a linear layer: in a post-LN
transformer (BERT, MiniLM) each LayerNorm's output also feeds the residual sum, so no
LayerNorm qualifies there (:func:`smooth_quant` names each skipped producer and its other
reader); the 16-bit residual sums of :func:`pqcompile.quant.build_reference` address that
case instead.

>>> import torch
>>> from pqcompile import trace
>>> m = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)).eval()
>>> x = torch.randn(8, 4) * torch.tensor([1.0, 1.0, 1.0, 30.0])
>>> r = smooth_quant(trace(m, (x,)), [(x,)])
>>> r.pairs, torch.allclose(r.graph_module(x), m(x), atol=1e-5)
({'_0': ('_1',)}, True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
from torch import nn

_PASS = (nn.Dropout, nn.Identity)


@dataclass
class SmoothResult:
    """The rewritten copy, each smoothed producer with its readers, and why others were not."""

    graph_module: torch.fx.GraphModule
    pairs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _module(gm: torch.fx.GraphModule, n: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _readers(gm: torch.fx.GraphModule, n: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes reading ``n``'s value, looking through Dropout/Identity."""
    out = []
    for u in n.users:
        if isinstance(_module(gm, u), _PASS):
            out += _readers(gm, u)
        else:
            out.append(u)
    return out


def _candidates(gm: torch.fx.GraphModule, skipped: dict[str, str]
                ) -> dict[str, list[torch.fx.Node]]:
    found = {}
    for n in gm.graph.nodes:
        m = _module(gm, n)
        if not ((isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.weight is not None
                 and len(m.normalized_shape) == 1) or isinstance(m, nn.Linear)):
            continue
        readers = _readers(gm, n)
        others = [r for r in readers if not (isinstance(_module(gm, r), nn.Linear) and
                                             r.args[0] is not None)]
        if others:
            if isinstance(m, nn.LayerNorm):
                skipped[n.name] = f"also read by {others[0].name!r} ({others[0].op} " \
                    f"{getattr(others[0].target, '__name__', others[0].target)})"
            continue
        if readers:
            found[n.name] = readers
    return found


def smooth_quant(gm: torch.fx.GraphModule, batches: Iterable[Any], alpha: float = 0.5
                 ) -> SmoothResult:
    """A copy of ``gm`` with the scale migration applied wherever it is exact (see above);
    ``batches``: calibration inputs (tuples of the model's inputs) for the activation maxima."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    work = copy.deepcopy(gm)
    result = SmoothResult(work)
    found = _candidates(work, result.skipped)
    amax: dict[str, torch.Tensor] = {}
    nodes = {n.name: n for n in work.graph.nodes}

    class _Max(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in found:
                v = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
                amax[n.name] = torch.maximum(amax[n.name], v) if n.name in amax else v
            return out

    with torch.no_grad():
        for b in batches:
            _Max(work).run(*(b if isinstance(b, (tuple, list)) else (b,)))
    with torch.no_grad():
        for name, readers in found.items():
            prod = work.get_submodule(nodes[name].target)
            linears = [work.get_submodule(r.target) for r in readers]
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
            s = (amax[name].clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha))
            s = s.clamp(min=1e-5)
            if isinstance(prod, nn.LayerNorm):
                prod.weight.div_(s)
                if prod.bias is not None:
                    prod.bias.div_(s)
            else:
                prod.weight.div_(s[:, None])
                if prod.bias is not None:
                    prod.bias.div_(s)
            for lin in linears:
                lin.weight.mul_(s[None, :])
            result.pairs[name] = tuple(r.name for r in readers)
            result.scales[name] = s
    return result
