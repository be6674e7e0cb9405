"""The problem's counts as affine forms of the decided channel groups' kept counts.

:func:`pqcompile.solvers.graph.build_problem` reads them here: a layer's kept output and input
channels (:class:`_Counter`, :func:`_layer_shape`), what the program stores beside the layers'
weights (:class:`_Params`: per-channel words, tables, float islands), the MACs of integer
activation products that scale with a group's kept heads (:func:`_scaling_group`), and whether
pruning a group leaves every cost it touches linear in its kept count (:func:`_followable`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch.fx
from torch import nn

from ..assignment import Assignment
from ..meta import CHANNEL_GROUPS, COST, EMBEDDING_BITS, SHAPE, ChannelGroup
from ..passes.cost import (
    AFFINE_CHANNEL_WORDS,
    FLOAT_BITS,
    ISLAND_BITS,
    folded_bn,
    is_matmul,
    table_bytes,
)
from ..passes.stored import stored_extras
from ..quant.matmul import PRODUCT_BITS
from .problem import Affine


_AFFINE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.PReLU)


class _Counter:
    """Kept channels of a node's output or input as an :class:`Affine` of the decided groups;
    the channels of groups held whole are constants."""

    def __init__(self, gm, nodes, decided: set[int], owners: Mapping[str, set[int]]) -> None:
        self.nodes, self.decided, self.owners = nodes, decided, owners
        self.groups = {g.id: g for g in CHANNEL_GROUPS.get(gm)}
        self.products: set[str] = set()  # integer activation products (set by build_problem)
        self.members: dict[tuple[str, bool], list] = {}
        for g in self.groups.values():
            for m in g.members:
                self.members.setdefault((m.node, m.role == "in"), []).append((g, m))

    def __call__(self, name: str, role: str, total: int, dim: int) -> Affine:
        const, terms = total, {}
        rank = len(SHAPE.get(self.nodes[name]).shape)
        for g, m in self.members.get((name, role == "in"), ()):
            if m.dim not in (dim, dim - rank):
                raise ValueError(f"node {name!r}: channels of group {g.name!r} lie along dim "
                                 f"{m.dim}, the cost model expects dim {dim}")
            if g.id in self.decided:
                per = int(np.asarray(m.index).shape[1])
                const -= g.size * per
                terms[g.id] = terms.get(g.id, 0) + per
        return Affine(const, tuple(sorted(terms.items())))


def _layer_shape(n: torch.fx.Node, m: nn.Module, counter: _Counter):
    """``(out, in, macs_scale, kernel numel)`` with ``MACs = macs_scale * out * in``."""
    shape = tuple(SHAPE.get(n).shape)
    if isinstance(m, nn.Conv2d):
        out = counter(n.name, "out", shape[1], 1)
        ksize = math.prod(m.kernel_size)
        if m.groups > 1 and m.in_channels == m.groups:
            cin = Affine(1)  # depthwise: pruning removes whole conv groups
        else:
            cin = _divide(counter(n.name, "in", m.in_channels, 1), m.groups, n.name)
        return out, cin, shape[0] * math.prod(shape[2:]) * ksize, ksize
    out = counter(n.name, "out", shape[-1], len(shape) - 1)
    return out, counter(n.name, "in", m.in_features, len(shape) - 1), math.prod(shape[:-1]), 1


class _Params:
    """Accumulates what the program stores beside the layers' weights, in 32-bit words, as an
    affine form of kept counts (:mod:`pqcompile.passes.cost`: per-channel words, int8 tables,
    float64 island constants; :mod:`pqcompile.passes.stored`: constants folded into the ops
    that read them, lookup tables, shared islands)."""

    def __init__(self) -> None:
        self.const, self.terms = 0, {}

    def add(self, numel_or_count: int | Affine, words: float = 1) -> None:
        if isinstance(numel_or_count, Affine):
            self.const += numel_or_count.const * words
            for g, per in numel_or_count.terms:
                self.terms[g] = self.terms.get(g, 0) + per * words
        else:
            self.const += int(numel_or_count) * words

    def add_module(self, m: nn.Module, channels: Affine, exclude: str = "",
                   words: float = 1) -> None:
        # What PruneChannels slices: 1-D per-channel parameters; the rest keeps its size.
        for pname, p in m.named_parameters():
            if pname == exclude:
                continue
            self.add(channels if p.dim() == 1 and p.numel() > 1 else p.numel(), words)

    def add_rest(self, gm, layer_names, nodes, counter: _Counter) -> tuple[int, int, Affine]:
        """Parameters and MACs of every node outside the layers; returns those MACs: the fixed
        ones and their BOPs (integer activation products at 8 x 8 bits, float MACs at 32 x 32),
        and those of the integer products whose heads a decided group prunes (per kept head)."""
        macs, bops, seen, scaled = 0, 0, {nodes[n].target for n in layer_names}, {}
        # folded constants, lookup tables, shared islands (pqcompile.passes.stored)
        extras = stored_extras(gm, Assignment.uniform(sorted(layer_names), 8, 8))
        for n in gm.graph.nodes:
            if n.name in layer_names:
                continue
            self.add(1, extras.node_bytes(n.name) / 4)
            cost = COST.get(n)
            g = _scaling_group(n, counter) if cost.macs else None
            if g is not None:
                scaled[g.id] = scaled.get(g.id, 0) + cost.macs // g.size
            else:
                width = PRODUCT_BITS if n.name in counter.products else FLOAT_BITS
                macs, bops = macs + cost.macs, bops + cost.macs * width * width
            island = ISLAND_BITS / 32  # words per element of a float island's constant
            if n.op == "call_module" and n.target not in seen:
                seen.add(n.target)
                m = gm.get_submodule(n.target)
                if n.name in extras.folded or n.name in extras.shared:
                    continue  # computed once from constants, or another island's copy
                if isinstance(m, nn.Embedding) and m.max_norm is None:
                    self.add(1, table_bytes(m.num_embeddings, m.embedding_dim,
                                            EMBEDDING_BITS.find(n)) / 4)
                elif folded_bn(gm, n):
                    continue  # folded into the layer before it: its per-channel words
                elif isinstance(m, nn.modules.batchnorm._BatchNorm) and \
                        m.track_running_stats and SHAPE.find(n) is not None:
                    # an integer per-channel affine map (pqcompile.quant.affine)
                    self.add(counter(n.name, "out", SHAPE.get(n).shape[1], 1),
                             AFFINE_CHANNEL_WORDS)
                elif isinstance(m, _AFFINE_MODULES) and SHAPE.find(n) is not None:
                    self.add_module(m, counter(n.name, "out", SHAPE.get(n).shape[1], 1),
                                    words=island)
                else:
                    self.add(cost.params, island)
        return int(macs), int(bops), Affine(0, tuple(sorted(scaled.items())))

    def affine(self) -> Affine:
        return Affine(self.const, tuple(sorted(self.terms.items())))


def _groups_at(n: torch.fx.Node, owners: Mapping[str, set[int]]) -> set[int]:
    """Groups whose channels a node's output or inputs carry."""
    return set().union(*(owners.get(x.name, set()) for x in (n, *n.all_input_nodes)))


def _owners(gm: torch.fx.GraphModule) -> dict[str, set[int]]:
    """Node name -> ids of the channel groups with a member there."""
    owners: dict[str, set[int]] = {}
    for g in CHANNEL_GROUPS.get(gm):
        for m in g.members:
            owners.setdefault(m.node, set()).add(g.id)
    return owners


def _scaling_group(n: torch.fx.Node, counter: _Counter) -> ChannelGroup | None:
    """The decided group an integer activation product's MACs are linear in (its operands
    carry that group's channels or heads and no other decided group's), if there is one."""
    if not is_matmul(n) or n.name not in counter.products:
        return None
    gs = _groups_at(n, counter.owners) & counter.decided
    if len(gs) != 1:
        return None
    g = counter.groups[gs.pop()]
    return g if COST.get(n).macs % g.size == 0 else None


def _followable(gm, group: ChannelGroup, nodes, layer_names: set[str],
                owners: Mapping[str, set[int]], products: set[str]) -> bool:
    """Whether every node the group touches has a cost the model follows under pruning (an
    integer activation product whose operands carry this group alone: its MACs are then
    linear in the kept count; a matmul with a constant operand runs in float: held whole)."""
    def linear(n: torch.fx.Node) -> bool:
        return is_matmul(n) and n.name in products and _groups_at(n, owners) == {group.id} and \
            COST.get(n).macs % group.size == 0

    for m in group.members:
        n = nodes[m.node]
        if any(is_matmul(u) and COST.get(u).macs and not linear(u) for u in n.users):
            return False
        if m.node in layer_names:
            continue
        cost = COST.get(n)
        if cost.macs and not linear(n):
            return False
        if cost.params and not (n.op == "call_module"
                                and isinstance(gm.get_submodule(n.target), _AFFINE_MODULES)):
            return False
    return True


def _divide(a: Affine, groups: int, name: str) -> Affine:
    if a.const % groups or any(per % groups for _, per in a.terms):
        raise ValueError(f"grouped conv {name!r}: its input channel groups do not split evenly "
                         f"over its {groups} conv groups")
    return Affine(a.const // groups, tuple((g, per // groups) for g, per in a.terms))
