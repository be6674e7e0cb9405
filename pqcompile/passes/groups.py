"""ChannelGroupAnalysis: which channels must be removed together (DepGraph, channel-exact).

Every channel a conv or linear layer produces is an element; rules tie elements that must go
together (a producer's output channel and its consumers' input columns; the operands of a
residual add; a depthwise conv's input and output; channel ``k`` of every group of a grouped
conv; the lines of a channel-shuffle grid; ...) and block elements that must stay (channels
reaching the model output, normalized across, or passing an op the analysis does not know).
Connected elements form one *channel*; channels with the same layout across the same nodes form
one :class:`~pqcompile.meta.ChannelGroup`, the unit a solver decides on.

Channel dims: a conv/BN/pool output carries its channels along dim 1, a linear output along its
last dim; any other node carries them wherever its ops moved them (found by running the op on
labels), e.g. ``H*W`` consecutive features per channel after a flatten.

Grouped convs (``in_channels / groups > 1``): in-channel ``k`` of every group is tied together,
and out-channel ``k`` of every group likewise, so a pruned grouped conv keeps its ``groups``
and stays dense. Depthwise convs (``in/groups == 1``) pass channels through instead: input
channel ``c`` is tied to the outputs of group ``c``, and pruning lowers ``groups``.

>>> import torch
>>> from torch import nn
>>> from pqcompile import trace, Pipeline
>>> from pqcompile.meta import CHANNEL_GROUPS
>>> from pqcompile.passes import ShapeAnalysis
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> gm = trace(model, (torch.randn(1, 3, 16, 16),))
>>> gm = Pipeline([ShapeAnalysis(), ChannelGroupAnalysis()])(gm).graph_module
>>> [(g.name, g.size, g.prunable) for g in CHANNEL_GROUPS.get(gm)]
[('0:out', 8, True), ('3:out', 4, False)]
>>> [(m.node, m.role) for m in CHANNEL_GROUPS.get(gm)[0].members]
[('_0', 'out'), ('_1', 'pass'), ('_2', 'pass'), ('_3', 'in')]
>>> find_group(CHANNEL_GROUPS.get(gm), "3:out").reason
"channels reach the model output (returned by node '_3')"
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..meta import (
    CHANNEL_GROUPS,
    EXAMPLE_INPUTS,
    NODE_CHANNELS,
    SHAPE,
    ChannelGroup,
    ChannelMember,
    NodeChannels,
)
from .base import Pass, PassInfo, PassResult
from .labelprop import propagate
from .labels import LabelState, TInfo
from .opinfo import is_producer


class ChannelGroupAnalysis(Pass):
    """Writes ``meta.CHANNEL_GROUPS`` (graph) and ``meta.NODE_CHANNELS`` (every node).

    Runs the graph once on ``inputs`` (default: the example inputs recorded at trace time).
    ``strict=True`` raises when a rule fails on an unusual call instead of marking the
    channels it touches unprunable (for debugging).
    """

    info = PassInfo("ChannelGroupAnalysis", requires=(SHAPE,),
                    provides=(CHANNEL_GROUPS, NODE_CHANNELS))

    def __init__(self, *inputs: torch.Tensor, strict: bool = False) -> None:
        self.inputs = inputs
        self.strict = strict

    def run(self, gm, ctx):
        inputs = self.inputs or EXAMPLE_INPUTS.get(gm).args
        state = propagate(gm, inputs, self.strict)
        groups, records = build_groups(gm, state)
        CHANNEL_GROUPS.set(gm, groups)
        for n in gm.graph.nodes:
            NODE_CHANNELS.set(n, records.get(n.name, NodeChannels()))
        return PassResult(gm, False)


@dataclass
class _Record:
    node: str
    role: str
    dims: tuple[int, ...]
    labels: np.ndarray  # id + 1 (or 0) per position, row-major over ``dims``
    module: str | None


def _components(state: LabelState) -> np.ndarray:
    n = state.n_ids
    if not state.ties_a:
        return np.arange(n)
    a, b = np.concatenate(state.ties_a), np.concatenate(state.ties_b)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _records(gm: torch.fx.GraphModule, state: LabelState) -> list[_Record]:
    out = []
    for n in gm.graph.nodes:
        module = n.target if n.op == "call_module" else None
        rec = state.inputs.get(n.name)
        if rec is not None:
            out.append(_Record(n.name, "in", (rec.dim,), rec.labels, module))
        info = state.infos.get(n.name)
        if isinstance(info, TInfo):
            role = "out" if is_producer(state.ops[n.name]) else "pass"
            grid = info.lm.reshape([info.lm.shape[d] for d in info.dims]).reshape(-1)
            out.append(_Record(n.name, role, info.dims, grid.numpy(), module))
    return out


def _check_grids(gm, state, records, comp, reason_of, reasons) -> dict[str, int]:
    """Pick each multi-dim grid's shrink dim; block grids that could not stay rectangular."""
    shrink = {}
    for r in records:
        if r.role == "in" or len(r.dims) < 2:
            continue
        info = state.infos[r.node]
        sizes = [info.lm.shape[d] for d in r.dims]
        cg = np.where(r.labels > 0, comp[np.maximum(r.labels - 1, 0)], -1).reshape(sizes)
        varying = [d for ax, d in enumerate(r.dims)
                   if (cg != np.take(cg, [0], axis=ax)).any()]
        if len(varying) > 1:
            reasons.append(f"node {r.node!r} ({state.ops[r.node].name}) lays channels out over "
                           f"dims {r.dims} so that removing some would leave a ragged grid")
            cs = np.unique(cg[cg >= 0])
            reason_of[cs[reason_of[cs] < 0]] = len(reasons) - 1
        shrink[r.node] = varying[0] if len(varying) == 1 else (info.shrink or r.dims[-1])
    return shrink


def build_groups(gm: torch.fx.GraphModule, state: LabelState
                 ) -> tuple[tuple[ChannelGroup, ...], dict[str, NodeChannels]]:
    """Turn propagation results into ordered channel groups and per-node records."""
    comp = _components(state)
    reasons = [r for _, r in state.blocks]
    reason_of = np.full(comp.max(initial=-1) + 1, -1, np.int64)
    for i, (ids, _) in enumerate(state.blocks):
        cs = np.unique(comp[ids])
        reason_of[cs[reason_of[cs] < 0]] = i
    records = _records(gm, state)
    shrink = _check_grids(gm, state, records, comp, reason_of, reasons)

    # Positions of every channel (component) in every record, in record order.
    members: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for ri, r in enumerate(records):
        pos = np.flatnonzero(r.labels > 0)
        if not pos.size:
            continue
        cs = comp[r.labels[pos] - 1]
        order = np.argsort(cs, kind="stable")
        cs, pos = cs[order], pos[order]
        cuts = np.flatnonzero(np.diff(cs)) + 1
        for c, p in zip(cs[np.r_[0, cuts]], np.split(pos, cuts)):
            members[int(c)].append((ri, p))

    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for c, lst in members.items():
        by_sig[(tuple((ri, len(p)) for ri, p in lst), int(reason_of[c]))].append(c)
    order = sorted(by_sig, key=lambda s: (s[0][0][0], min(members[c][0][1][0]
                                                          for c in by_sig[s])))
    group_of = np.full(len(reason_of), -1, np.int64)
    groups, names = [], set()
    for gid, sig in enumerate(order):
        cs = sorted(by_sig[sig], key=lambda c: members[c][0][1][0])
        group_of[cs] = gid
        mems = []
        for j, (ri, _) in enumerate(sig[0]):
            r = records[ri]
            index = np.stack([members[c][j][1] for c in cs])
            index.setflags(write=False)
            dim = r.dims[0] if len(r.dims) == 1 else r.dims
            mems.append(ChannelMember(r.node, r.role, dim, index, r.module))
        name = _name(gm, mems, names)
        reason = reasons[sig[1]] if sig[1] >= 0 else None
        groups.append(ChannelGroup(gid, name, len(cs), tuple(mems), reason is None, reason))
    return tuple(groups), _node_records(gm, state, records, comp, group_of, shrink)


def _name(gm, members: list[ChannelMember], taken: set[str]) -> str:
    first = next((m for m in members if m.role == "out"), members[0])
    base = f"{first.module or first.node}:{first.role}"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}#{k}"
    taken.add(name)
    return name


def _groups_in(labels: np.ndarray, comp: np.ndarray, group_of: np.ndarray) -> tuple[int, ...]:
    lab = labels[labels > 0]
    g = group_of[comp[lab - 1]] if lab.size else np.zeros(0, np.int64)
    return tuple(int(x) for x in np.unique(g[g >= 0]))


def _node_records(gm, state, records, comp, group_of, shrink) -> dict[str, NodeChannels]:
    outs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    ins: dict[str, tuple[int, int]] = {}
    for r in records:
        groups = _groups_in(r.labels, comp, group_of)
        if r.role == "in":
            ins[r.node] = (groups, r.dims[0])
        else:
            outs[r.node] = (r.dims, groups)
    result = {}
    for n in gm.graph.nodes:
        dims, out_groups = outs.get(n.name, ((), ()))
        info = state.infos.get(n.name)
        if isinstance(info, (tuple, list)):
            labels = [i.lm.reshape(-1).numpy() for i in info if isinstance(i, TInfo)]
            if labels:
                out_groups = _groups_in(np.concatenate(labels), comp, group_of)
        if n.name in ins:
            in_groups, in_dim = ins[n.name]
        else:
            in_dim = None
            in_groups = tuple(sorted({g for a in n.all_input_nodes
                                      for g in result[a.name].out_groups}))
        s = shrink.get(n.name, dims[0] if len(dims) == 1 else None)
        result[n.name] = NodeChannels(dims, s, out_groups, in_groups, in_dim)
    return result


def find_group(groups: tuple[ChannelGroup, ...], key: int | str) -> ChannelGroup:
    """The group with id or name ``key``; ``ValueError`` listing some valid names otherwise."""
    for g in groups:
        if key == g.id or key == g.name:
            if isinstance(key, bool):
                break
            return g
    shown = ", ".join(repr(g.name) for g in groups[:8])
    raise ValueError(f"no channel group {key!r}: groups are ids 0..{len(groups) - 1} or names "
                     f"such as {shown}{', ...' if len(groups) > 8 else ''}")


def describe_groups(groups: tuple[ChannelGroup, ...]) -> str:
    """A readable table: id, name, size, prunable or why not."""
    lines = []
    for g in groups:
        state = "prunable" if g.prunable else f"unprunable: {g.reason}"
        lines.append(f"{g.id:4d}  {g.name:40s} {g.size:6d}  {state}")
    return "\n".join(lines)
