"""FoldBatchNorm: fold inference batch norms into the conv or linear layer before them.

``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` becomes ``W' x + b'`` with
``W'[c] = W[c] * k[c]``, ``b' = (b - mean) * k + beta``, ``k = gamma / sqrt(var + eps)``,
computed in float64 and stored in the layer's dtype. A pair folds when the layer is a
``Conv1d/2d/3d`` followed by ``BatchNorm1d/2d/3d``, or a ``Linear`` with a 2-D output followed
by ``BatchNorm1d``; the layer's output has no other user; the layer module is called once; and
the norm has running statistics. The folded layer is a copy (the original module object is
untouched); the norm node is erased and its annotations carried to the layer node, which
records the norm's name under ``FOLDED_BN``.

A norm *before* a layer (a pre-norm: ``BatchNorm2d`` whose only user is a ``Conv2d`` reading
no padding, or ``BatchNorm1d`` on ``(N, C)`` read by a ``Linear``) folds into that layer's
input side (:func:`fold_before`), so it does not run in float either.

>>> import torch, pqcompile
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
>>> gm = pqcompile.trace(m, (torch.randn(1, 3, 8, 8),))
>>> gm = FoldBatchNorm()(gm).graph_module
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..meta import COST, COST_TOTALS, EXAMPLE_INPUTS, FOLDED_BN, SHAPE
from .base import Pass, PassInfo, PassResult

_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d),
            (nn.Conv3d, nn.BatchNorm3d), (nn.Linear, nn.BatchNorm1d))


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``k = gamma / sqrt(var + eps)`` of an eval-mode batch norm, in float64: it computes
    ``(x - mean) * k + beta``."""
    k = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    return k * bn.weight.detach().to(torch.float64) if bn.weight is not None else k


def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` (float64 arithmetic)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} has no running statistics "
                         "(track_running_stats=False); it cannot be folded")
    out = copy.deepcopy(layer)
    w = layer.weight.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    k = bn_scale(bn)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(k)
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None \
        else torch.zeros_like(mean)
    dtype = layer.weight.dtype
    out.weight = nn.Parameter((w * k.view((-1,) + (1,) * (w.dim() - 1))).to(dtype),
                              requires_grad=layer.weight.requires_grad)
    out.bias = nn.Parameter(((b - mean) * k + beta).to(dtype),
                            requires_grad=layer.weight.requires_grad)
    return out


def fold_before(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` computing ``layer(bn(x))`` (float64 arithmetic): the norm is the
    per-input-channel map ``x * k + s``, so ``W'[o, i] = W[o, i] * k[i]`` and
    ``b'[o] = b[o] + sum_i,taps W[o, i] * s[i]``. Exact only where the layer reads no padding
    (a zero of the padded ``x`` is not a zero of ``bn(x)``): the caller checks."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} has no running statistics "
                         "(track_running_stats=False); it cannot be folded")
    out = copy.deepcopy(layer)
    w = layer.weight.detach().to(torch.float64)
    k = bn_scale(bn)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(k)
    shift = beta - bn.running_mean.detach().to(torch.float64) * k
    groups = getattr(layer, "groups", 1)
    per_group = w.shape[1]  # input channels each output channel reads
    index = (torch.arange(w.shape[0]) // (w.shape[0] // groups))[:, None] * per_group \
        + torch.arange(per_group)[None, :]  # (out, in of its group) -> input channel
    view = index.shape + (1,) * (w.dim() - 2)
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None \
        else torch.zeros(w.shape[0], dtype=torch.float64)
    b = b + (w * shift[index].reshape(view)).flatten(1).sum(1)
    dtype = layer.weight.dtype
    out.weight = nn.Parameter((w * k[index].reshape(view)).to(dtype),
                              requires_grad=layer.weight.requires_grad)
    out.bias = nn.Parameter(b.to(dtype), requires_grad=layer.weight.requires_grad)
    return out


class FoldBatchNorm(Pass):
    """Folds conv->BN and linear->BN1d pairs (see the module docstring for the conditions)."""

    info = PassInfo("FoldBatchNorm", requires=(EXAMPLE_INPUTS,), provides=(FOLDED_BN,),
                    invalidates=(COST, COST_TOTALS))

    def run(self, gm, ctx):
        modules = dict(gm.named_modules())
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        folded = []
        for bn_node in list(gm.graph.nodes):
            layer_node = self._pair(gm, modules, calls, bn_node)
            if layer_node is None:
                layer_node = self._next_layer(gm, modules, calls, bn_node)
                if layer_node is not None:
                    self._fold_forward(gm, modules, bn_node, layer_node)
                    folded.append(bn_node.target)
                continue
            bn = modules[bn_node.target]
            new = fold_into(modules[layer_node.target], bn)
            self._set(gm, layer_node.target, new)
            modules[layer_node.target] = new
            for key, value in bn_node.meta.items():
                if key not in layer_node.meta or key == SHAPE.name:
                    layer_node.meta[key] = value
            FOLDED_BN.set(layer_node, bn_node.name)
            bn_node.replace_all_uses_with(layer_node)
            gm.graph.erase_node(bn_node)
            folded.append(bn_node.target)
        for target in folded:
            if calls[target] == 1:
                self._delete(gm, target)
        gm.graph.lint()
        gm.recompile()
        ctx.results["folded_bn"] = len(folded)
        return PassResult(gm, bool(folded))

    @staticmethod
    def _pair(gm, modules, calls, bn_node) -> torch.fx.Node | None:
        if bn_node.op != "call_module" or len(bn_node.args) != 1:
            return None
        bn = modules[bn_node.target]
        layer_node = bn_node.args[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or \
                not isinstance(layer_node, torch.fx.Node) or layer_node.op != "call_module":
            return None
        layer = modules[layer_node.target]
        if not any(type(layer) is lt and type(bn) is bt for lt, bt in _CONV_BN):
            return None
        if len(layer_node.users) != 1 or calls[layer_node.target] != 1 or \
                bn.running_mean is None or bn.num_features != layer.weight.shape[0]:
            return None
        if isinstance(layer, nn.Linear):
            shape = _output_rank(gm, layer_node)
            if shape != 2:  # BatchNorm1d on (N, L, C) normalizes L, not the features
                return None
        return layer_node

    @staticmethod
    def _next_layer(gm, modules, calls, bn_node) -> torch.fx.Node | None:
        """The conv or linear layer reading a pre-norm (``bn`` then a layer, as in MaxViT's
        MBConv blocks), when it reads no padding and is the norm's only user."""
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs or \
                len(bn_node.users) != 1:
            return None
        bn = modules[bn_node.target]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or \
                bn.running_mean is None:
            return None
        layer_node = next(iter(bn_node.users))
        if layer_node.op != "call_module" or layer_node.args != (bn_node,) or \
                layer_node.kwargs or calls[layer_node.target] != 1:
            return None
        layer = modules[layer_node.target]
        if not any(type(layer) is lt and type(bn) is bt for lt, bt in _CONV_BN):
            return None
        if isinstance(layer, nn.Linear):
            if layer.in_features != bn.num_features or _output_rank(gm, bn_node) != 2:
                return None
        elif layer.in_channels != bn.num_features or _reads_padding(layer):
            return None
        return layer_node

    def _fold_forward(self, gm, modules, bn_node, layer_node) -> None:
        new = fold_before(modules[layer_node.target], modules[bn_node.target])
        self._set(gm, layer_node.target, new)
        modules[layer_node.target] = new
        FOLDED_BN.set(layer_node, bn_node.name)
        bn_node.replace_all_uses_with(bn_node.args[0])
        gm.graph.erase_node(bn_node)

    @staticmethod
    def _set(gm, target: str, module: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, module)

    @staticmethod
    def _delete(gm, target: str) -> None:
        parent, _, name = target.rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, name)


def _reads_padding(conv: nn.Module) -> bool:
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "same" and any(k > 1 for k in conv.kernel_size)
    return any(pad)


def _output_rank(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int | None:
    if not SHAPE.has(node):
        with torch.no_grad():
            ShapeProp(gm).propagate(*EXAMPLE_INPUTS.get(gm).args)
    tm = SHAPE.find(node)
    return len(tm.shape) if hasattr(tm, "shape") else None
