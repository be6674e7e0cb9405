"""PIC-PQ's filter property (FP): how much information each output channel carries, measured
on real inputs at the channel group's producing layers.

For an ``H x W`` feature map it is HRank's average matrix rank; for any other output (a
Linear's features, a token sequence) the channel's standard deviation over the batch, the
closest cheap measure of the same thing. :class:`~pqcompile.solvers.picpq.PICPQSolver` turns
it into importance ``a_l FP + b_l``.

>>> import torch
>>> feature_rank(torch.eye(4).repeat(2, 3, 1, 1)).tolist()
[4.0, 4.0, 4.0]
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from ..meta import ChannelGroup

__all__ = ["feature_rank", "filter_property"]


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
