"""PruneChannels: remove channel groups physically, leaving a smaller dense graph.

Masks are ``{group id or name: bool array}`` (True = keep) over the groups of
:class:`~pqcompile.passes.groups.ChannelGroupAnalysis`; missing groups keep everything.
Also :func:`zero_channels` (the same decision as zeroed weights in an unpruned copy, the
reference pruning must match) and :func:`predicted_macs` (MACs after pruning, without pruning).

>>> import numpy as np, torch
>>> from torch import nn
>>> from pqcompile import trace, Pipeline
>>> from pqcompile.passes import ShapeAnalysis, ChannelGroupAnalysis
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> model = model.eval()
>>> x = torch.randn(1, 3, 16, 16)
>>> gm = Pipeline([ShapeAnalysis(), ChannelGroupAnalysis()])(trace(model, (x,))).graph_module
>>> masks = {"0:out": np.arange(8) % 2 == 0}
>>> pruned = PruneChannels(masks)(gm).graph_module
>>> pruned.get_submodule("3").in_channels, predicted_macs(gm, masks) == 14 * 14 * 4 * 27 + \\
...     14 * 14 * 4 * 4
(4, True)
>>> zeroed = zero_channels(model, CHANNEL_GROUPS.get(gm), masks)
>>> torch.allclose(zeroed(x), pruned(x), atol=1e-5)
True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedOpError
from ..meta import (
    CHANNEL_GROUPS,
    CHANNEL_IMPORTANCE,
    COST,
    COST_TOTALS,
    EXAMPLE_INPUTS,
    KEPT_CHANNELS,
    NODE_CHANNELS,
    SENSITIVITY,
    SHAPE,
    ChannelGroup,
    KeptChannels,
)
from .base import Pass, PassInfo, PassResult
from .cost import conv_macs, is_matmul, linear_macs, matmul_macs, node_macs
from .opinfo import classify
from .pruneargs import rewrite_shape_args
from .pruneplan import PrunePlan, check_masks, tensor_shape

_AFFINE = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)


class PruneChannels(Pass):
    """Rewrite parameters and shape arguments so the masked channels are gone.

    Works on a deep copy unless ``inplace=True``. Keeps every node's annotations, re-runs
    shape propagation (``SHAPE`` is valid afterwards; a shape the graph computes differently
    than planned raises ``UnsupportedOpError`` naming the node), writes ``KEPT_CHANNELS`` and
    drops the now stale channel groups and costs (run ChannelGroupAnalysis / CostAnalysis
    again on the result).
    """

    info = PassInfo("PruneChannels", requires=(CHANNEL_GROUPS, SHAPE),
                    provides=(SHAPE, KEPT_CHANNELS),
                    invalidates=(CHANNEL_GROUPS, NODE_CHANNELS, COST, COST_TOTALS,
                                 SENSITIVITY, CHANNEL_IMPORTANCE))

    def __init__(self, masks: Mapping, *, inplace: bool = False) -> None:
        if not isinstance(masks, Mapping):
            raise TypeError("PruneChannels takes a dict {group id or name: bool array "
                            f"(True = keep)}}, got {type(masks).__name__}")
        self.masks = dict(masks)
        self.inplace = inplace

    def run(self, gm, ctx):
        plan = PrunePlan(gm, self.masks)
        # The groups are immutable and dropped from the result: share them instead of copying.
        out = gm if self.inplace else copy.deepcopy(gm, {id(plan.groups): plan.groups})
        expected = {n.name: plan.shape(n) for n in gm.graph.nodes}
        kept = {n.name: _kept(plan, n) for n in gm.graph.nodes}
        if plan.masks:
            _prune_modules(out, plan)
            rewrite_shape_args(out, plan)
            out.graph.lint()
            out.recompile()
        _propagate(out, expected)
        for n in out.graph.nodes:
            for key in (NODE_CHANNELS, COST, KEPT_CHANNELS):
                key.clear(n)
            if kept[n.name] is not None:
                KEPT_CHANNELS.set(n, kept[n.name])
        for key in (CHANNEL_GROUPS, COST_TOTALS):
            key.clear(out)
        return PassResult(out, bool(plan.masks))


def _kept(plan: PrunePlan, node: torch.fx.Node) -> KeptChannels | None:
    rec = NODE_CHANNELS.get(node)
    shape = tensor_shape(node)
    if rec.shrink_dim is None or shape is None:
        return None
    keep = plan.keep_along(node, rec.shrink_dim)
    size = shape[rec.shrink_dim]
    idx = np.arange(size) if keep is None else np.flatnonzero(keep)
    idx.setflags(write=False)
    return KeptChannels(rec.shrink_dim, idx, size)


def _propagate(gm: torch.fx.GraphModule, expected: dict) -> None:
    inputs = EXAMPLE_INPUTS.get(gm).args
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise UnsupportedOpError(f"the pruned graph does not run: {type(exc).__name__}: {exc}; "
                                 "a shape argument was not adjusted") from exc
    for n in gm.graph.nodes:
        got = tensor_shape(n)
        if got is not None and expected.get(n.name) not in (None, got):
            raise UnsupportedOpError(
                f"node {n.name!r} ({classify(gm, n).name}) came out with shape {got} after "
                f"pruning, expected {expected[n.name]}: it computes a shape argument in a way "
                "pruning cannot adjust")


def _index(keep: np.ndarray | None) -> torch.Tensor | None:
    return None if keep is None or keep.all() else torch.from_numpy(np.flatnonzero(keep))


def _set(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(m, name, value.contiguous())


def _prune_conv(m: nn.Conv2d, out: torch.Tensor | None, inn: np.ndarray | None) -> None:
    g = m.groups
    ipg = m.in_channels // g
    if out is not None:
        _set(m, "weight", m.weight.data[out])
        if m.bias is not None:
            _set(m, "bias", m.bias.data[out])
        m.out_channels = len(out)
    if inn is None or inn.all():
        return
    if g > 1 and ipg == 1:
        m.groups = m.in_channels = int(inn.sum())  # depthwise: one group per kept channel
        return
    per_group = inn.reshape(g, ipg)
    if (per_group != per_group[0]).any():
        raise RuntimeError(f"grouped conv keeps different input channels per group: {inn}")
    _set(m, "weight", m.weight.data[:, torch.from_numpy(np.flatnonzero(per_group[0]))])
    m.in_channels = g * int(per_group[0].sum())


def _prune_modules(gm: torch.fx.GraphModule, plan: PrunePlan) -> None:
    done: set[str] = set()
    for n in gm.graph.nodes:
        if n.op != "call_module" or n.target in done:
            continue
        old = plan.nodes[n.name]
        m = gm.get_submodule(n.target)
        kind = classify(gm, n).kind
        if kind == "conv":
            _prune_conv(m, _index(plan.keep_along(old, 1)), plan.in_keep.get(n.name))
        elif kind == "linear":
            out = _index(plan.keep_along(old, -1))
            inn = _index(plan.in_keep.get(n.name))
            if out is not None:
                _set(m, "weight", m.weight.data[out])
                if m.bias is not None:
                    _set(m, "bias", m.bias.data[out])
                m.out_features = len(out)
            if inn is not None:
                _set(m, "weight", m.weight.data[:, inn])
                m.in_features = len(inn)
        elif isinstance(m, _AFFINE):
            keep = _index(plan.keep_along(old, 1))
            if keep is None:
                continue
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, name, None) is not None and getattr(m, name).dim() == 1 \
                        and getattr(m, name).numel() > 1:
                    _set(m, name, getattr(m, name).data[keep])
            for attr in ("num_features", "num_parameters"):
                if hasattr(m, attr):
                    setattr(m, attr, len(keep))
        done.add(n.target)


def zero_channels(model: nn.Module, groups: tuple[ChannelGroup, ...],
                  masks: Mapping) -> nn.Module:
    """A copy of ``model`` (the original module or its traced graph) with masked channels zeroed.

    Zeroes every consumer's input columns, the producers' output rows and biases, and the
    affine parameters and running mean of BatchNorm-like layers on the removed channels, so the
    copy computes what the physically pruned model computes.
    """
    checked = check_masks(groups, masks)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for gid, keep in checked.items():
            for mem in groups[gid].members:
                if mem.module is None:
                    continue
                m = out.get_submodule(mem.module)
                idx = torch.from_numpy(np.unique(mem.index[~keep].ravel()))
                _zero(m, mem.role, idx)
    return out


def _zero(m: nn.Module, role: str, idx: torch.Tensor) -> None:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        if role == "out":
            m.weight[idx] = 0
            if m.bias is not None:
                m.bias[idx] = 0
        elif isinstance(m, nn.Linear):
            m.weight[:, idx] = 0
        elif m.in_channels // m.groups > 1:
            m.weight[:, torch.unique(idx % (m.in_channels // m.groups))] = 0
        # A depthwise conv's outputs are zeroed through its "out" member.
    elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        for name in ("weight", "bias", "running_mean"):
            if getattr(m, name, None) is not None:
                getattr(m, name)[idx] = 0


def predicted_macs(gm: torch.fx.GraphModule, masks: Mapping) -> int:
    """MACs of ``gm`` after pruning with ``masks``, from the unpruned shapes (nothing is built).

    Matches ``CostAnalysis`` run on the pruned graph exactly.
    """
    plan = PrunePlan(gm, masks)
    total = 0
    for n in gm.graph.nodes:
        kind = classify(gm, n).kind
        if kind == "conv":
            m = gm.get_submodule(n.target)
            cin = plan.in_count(n, m.in_channels)
            out = plan.shape(n)
            depthwise = m.groups > 1 and m.in_channels == m.groups
            total += conv_macs(out, m.kernel_size, cin, out[1], cin if depthwise else m.groups)
        elif kind == "linear":
            m = gm.get_submodule(n.target)
            total += linear_macs(plan.shape(n), plan.in_count(n, m.in_features))
        elif is_matmul(n):
            a, b = (plan.shape(x) for x in n.args[:2])
            total += matmul_macs(a, b) if a is not None and b is not None else 0
        else:
            total += node_macs(gm, n)
    return int(total)
