"""Masks checked and turned into kept positions per node: shared by pruning, zeroing and MACs.

>>> import numpy as np, torch
>>> from torch import nn
>>> from pqcompile import trace, Pipeline
>>> from pqcompile.passes import ShapeAnalysis, ChannelGroupAnalysis
>>> gm = trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(16, 2)),
...            (torch.randn(1, 3, 2, 2),))
>>> gm = Pipeline([ShapeAnalysis(), ChannelGroupAnalysis()])(gm).graph_module
>>> plan = PrunePlan(gm, {0: np.array([True, False, True, True])})
>>> [plan.shape(n) for n in gm.graph.nodes if n.op == "call_module"]
[(1, 3, 2, 2), (1, 12), (1, 2)]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.fx

from ..meta import CHANNEL_GROUPS, NODE_CHANNELS, SHAPE, ChannelGroup
from .groups import find_group


def _as_bool(mask: Any, group: ChannelGroup) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype != bool:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise TypeError(f"mask for group {group.id} {group.name!r} must be booleans "
                            f"(True = keep), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    if arr.shape != (group.size,):
        raise ValueError(f"mask for group {group.id} {group.name!r} has shape {arr.shape}; the "
                         f"group has {group.size} channels, so give a bool array of that length")
    return arr


def check_masks(groups: tuple[ChannelGroup, ...], masks: Mapping) -> dict[int, np.ndarray]:
    """Validate ``masks`` (group id or name -> bool array, True = keep) against ``groups``.

    Returns the masks that remove something, by group id. A mask keeping every channel is a
    no-op (also on an unprunable group); one removing channels of an unprunable group, or all
    channels of a group, raises ``ValueError``.
    """
    if not isinstance(masks, Mapping):
        raise TypeError("masks must be a dict {group id or name: bool array (True = keep)}, "
                        f"got {type(masks).__name__}")
    out: dict[int, np.ndarray] = {}
    seen: set[int] = set()
    for key, mask in masks.items():
        g = find_group(groups, key)
        arr = _as_bool(mask, g)
        if g.id in seen:
            raise ValueError(f"group {g.id} {g.name!r} has two masks (by id and by name)")
        seen.add(g.id)
        if arr.all():
            continue
        if not g.prunable:
            raise ValueError(f"group {g.id} {g.name!r} cannot be pruned: {g.reason}")
        if not arr.any():
            raise ValueError(f"mask for group {g.id} {g.name!r} removes all {g.size} channels; "
                             "keep at least one")
        out[g.id] = arr
    return out


def tensor_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    tm = SHAPE.find(node)
    return tuple(tm.shape) if hasattr(tm, "shape") else None


class PrunePlan:
    """Kept positions of every node under ``masks``, from the unpruned graph's annotations.

    ``shape(node)`` is the node's output shape after pruning; ``keep_along(node, dim)`` the
    bool mask over ``dim`` of its output (``None`` where nothing along it is removed);
    ``in_keep[name]`` the kept input columns of a conv/linear.
    """

    def __init__(self, gm: torch.fx.GraphModule, masks: Mapping) -> None:
        self.gm = gm
        self.groups = CHANNEL_GROUPS.get(gm)
        self.masks = check_masks(self.groups, masks)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.out_keep: dict[str, np.ndarray] = {}
        self.in_keep: dict[str, np.ndarray] = {}
        for gid, keep in self.masks.items():
            for m in self.groups[gid].members:
                table = self.in_keep if m.role == "in" else self.out_keep
                if m.node not in table:
                    table[m.node] = np.ones(self._positions(m), bool)
                table[m.node][m.index[~keep].ravel()] = False

    def _positions(self, member) -> int:
        node = self.nodes[member.node]
        if member.role == "in":
            return tensor_shape(node.args[0])[member.dim]
        shape = tensor_shape(node)
        return int(np.prod([shape[d] for d in NODE_CHANNELS.get(node).dims]))

    def keep_along(self, node: torch.fx.Node, dim: int) -> np.ndarray | None:
        keep = self.out_keep.get(node.name)
        shape = tensor_shape(node)
        if keep is None or shape is None or keep.all():
            return None
        rec = NODE_CHANNELS.get(node)
        dim %= len(shape)
        if rec.dims == (dim,):
            return keep
        if len(rec.dims) < 2 or dim != rec.shrink_dim:
            return None
        grid = keep.reshape([shape[d] for d in rec.dims])
        axis = rec.dims.index(dim)
        others = tuple(a for a in range(grid.ndim) if a != axis)
        lines = grid.any(axis=others)
        if (grid != np.expand_dims(lines, others)).any():
            raise RuntimeError(f"node {node.name!r}: pruning would leave a ragged channel grid; "
                               "this is a bug in channel-group analysis")
        return lines

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        """Output shape of ``node`` after pruning (``None`` if it is not a single tensor)."""
        shape = tensor_shape(node)
        if shape is None or node.name not in self.out_keep:
            return shape
        new = list(shape)
        for d in set(NODE_CHANNELS.get(node).dims):
            keep = self.keep_along(node, d)
            if keep is not None:
                new[d] = int(keep.sum())
        return tuple(new)

    def in_count(self, node: torch.fx.Node, total: int) -> int:
        keep = self.in_keep.get(node.name)
        return total if keep is None else int(keep.sum())
