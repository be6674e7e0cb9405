"""From an analyzed graph to a :class:`~pqcompile.solvers.problem.Problem`, and back.

:func:`build_problem` reads the channel groups, shapes and FP32 costs of a graph (trace +
ShapeAnalysis + ChannelGroupAnalysis + CostAnalysis) and the sensitivities of a criterion;
:func:`to_assignment` turns a solution's kept counts into keep-masks by channel scores.

>>> import torch
>>> from torch import nn
>>> from pqcompile.build import analysis
>>> from pqcompile.solvers.problem import evaluate
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
>>> gm = analysis(model, (torch.randn(1, 3, 8, 8),))
>>> p = build_problem(gm, None, None, pin_first_last=False)
>>> [(l.name, l.out_channels, l.in_channels) for l in p.layers]
[('_0', Affine(const=0, terms=((0, 1),)), Affine(const=3, terms=())), \
('_2', Affine(const=4, terms=()), Affine(const=0, terms=((0, 1),)))]
>>> p.groups[0].levels
(8, 6, 4, 2)
>>> s = evaluate(p, {"_0": (8, 8), "_2": (4, 8)}, {0: 4})
>>> s.costs["macs"] == 6 * 6 * 4 * 27 + 6 * 6 * 4 * 4
True
>>> int(to_assignment(s, gm).masks[0].sum())
4
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch.fx

from ..assignment import Assignment
from ..meta import CHANNEL_GROUPS, COST, COST_TOTALS, SHAPE, BitWidths, ChannelGroup
from ..passes.cost import PER_CHANNEL_WORDS, activation_products
from ..passes.layer_discovery import why_no_bits
from ..presets import compute_layers, l1_scores
from ..quant.matmul import PRODUCT_BITS
from ..quant.plan import activation_sources
from .graph_counts import _Counter, _followable, _layer_shape, _owners, _Params
from .problem import (
    DEFAULT_BIT_OPTIONS,
    DEFAULT_KEEP_FRACTIONS,
    Group,
    Layer,
    Option,
    Problem,
    Solution,
    keep_count,
)


def to_assignment(solution: Solution, gm: torch.fx.GraphModule,
                  channel_scores: Callable | Mapping | None = None) -> Assignment:
    """Bits and keep-masks: each group keeps its ``kept`` highest-scoring channels.

    ``channel_scores``: ``{group id: per-channel scores}`` or ``criterion(gm, group)``;
    default: the L1 norm of the producers' weights (``presets.l1_scores``).
    """
    groups = CHANNEL_GROUPS.get(gm)
    masks = {}
    for gid, kept in solution.kept.items():
        g = groups[gid]
        if kept >= g.size:
            continue
        scores = _scores(channel_scores, gm, g)
        mask = np.zeros(g.size, dtype=bool)
        mask[np.argsort(-scores, kind="stable")[:kept]] = True
        masks[gid] = mask
    return Assignment({n: BitWidths(*b) for n, b in solution.bits.items()}, masks)


def _scores(criterion: Callable | Mapping | None, gm, group: ChannelGroup) -> np.ndarray:
    if criterion is None:
        scores = l1_scores(gm, group)
    elif isinstance(criterion, Mapping):
        if group.id not in criterion:
            raise ValueError(f"no channel scores for group {group.id} {group.name!r}; give "
                             "scores for every prunable group or a criterion(gm, group)")
        scores = criterion[group.id]
    elif hasattr(criterion, "channel_scores"):  # a criterion object (pqcompile.criteria)
        scores = criterion.channel_scores(gm, group)
    elif callable(criterion):
        scores = criterion(gm, group)
    else:
        raise TypeError("channel scores must be {group id: scores}, a criterion(gm, group) or "
                        f"None, got {type(criterion).__name__}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (group.size,) or not np.isfinite(scores).all() or (scores < 0).any():
        raise ValueError(f"channel scores of group {group.id} {group.name!r} must be "
                         f"{group.size} finite values >= 0, got shape {scores.shape}")
    return scores


def weight_noise_sensitivity(gm: torch.fx.GraphModule, name: str,
                             options: Sequence[Option]) -> dict[Option, float]:
    """A data-free stand-in criterion: relative weight quantization noise
    ``||Q_w(W) - W||^2 / ||W||^2`` (per-channel symmetric) plus the relative noise of a uniform
    ``a``-bit activation quantizer, ``4^-a / 3``. Use a Hessian or Fisher criterion for real
    searches; this one only orders bit widths sensibly."""
    w = gm.get_submodule(_node(gm, name).target).weight.detach().double()
    rows = w.reshape(w.shape[0], -1)
    peak = rows.abs().amax(1, keepdim=True).clamp_min(1e-12)
    power = float((rows ** 2).sum()) or 1.0
    out = {}
    for wb, ab in options:
        step = peak / (2 ** (wb - 1) - 1)
        noise = float(((rows / step).round().clamp(-(2 ** (wb - 1) - 1), 2 ** (wb - 1) - 1)
                       * step - rows).pow(2).sum())
        out[(wb, ab)] = noise / power + 4.0 ** -ab / 3
    return out


def _node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise ValueError(f"no node {name!r} in the graph")


# --- building from an analyzed graph ------------------------------------------------------------


def build_problem(gm: torch.fx.GraphModule,
                  sensitivities: Mapping[str, Mapping[Option, float]] | None,
                  prune_sensitivities: Mapping[int, Any] | Callable | None, *,
                  bit_options: Sequence[Option] = DEFAULT_BIT_OPTIONS,
                  layer_options: Mapping[str, Sequence[Option]] | None = None,
                  keep_levels: Sequence[float] = DEFAULT_KEEP_FRACTIONS, multiple: int = 1,
                  pin_first_last: bool = True) -> Problem:
    """The problem of ``gm`` (traced + ShapeAnalysis + ChannelGroupAnalysis + CostAnalysis).

    ``sensitivities[layer][(w, a)]``: the loss increase of each bit option (>= 0), or a
    criterion with ``layer_sensitivity(gm, layer, options)`` (``None``: the data-free
    :func:`weight_noise_sensitivity`). ``prune_sensitivities``: per-channel importance
    ``{group id: scores}``, ``criterion(gm, group)`` or a criterion with
    ``channel_scores(gm, group)`` (``None``: L1 norm normalized to sum 1 per group); a keep
    level costs the summed importance of the channels it removes, least important first. Both
    are added in one objective, so give them on one scale. ``layer_options`` overrides
    ``bit_options`` per layer; ``pin_first_last`` puts the first and last layer at 8/8. Keep
    levels are fractions of each group, rounded up so that the layers keep a multiple of
    ``multiple`` channels (an element spanning several channels, such as an attention head,
    rounds to fewer elements: :func:`_granule`); a group smaller than that stays whole. Groups
    touching
    nodes whose cost the model cannot follow (functional convs, other parametrized modules, a
    matmul carrying anything but one group's heads) stay whole.
    """
    first_node = next(iter(gm.graph.nodes))
    for key in (SHAPE, COST):
        key.get(first_node)  # fails naming the pass to run
    for key in (CHANNEL_GROUPS, COST_TOTALS):
        key.get(gm)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int (a SIMD width), got {multiple!r}")
    fractions = sorted({float(f) for f in keep_levels} | {1.0}, reverse=True)
    if not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"keep levels are fractions in (0, 1], got {list(keep_levels)}")
    names = compute_layers(gm)
    if not names:
        raise ValueError("the graph has no conv2d or linear layer to assign bits to")
    nodes = {n.name: n for n in gm.graph.nodes}
    owners = _owners(gm)
    products = activation_products(gm)  # integer activation products, at 8 x 8 bits a MAC
    decided = [g for g in CHANNEL_GROUPS.get(gm)
               if g.prunable and _followable(gm, g, nodes, set(names), owners, products)
               and len({keep_count(g.size, f, _granule(g, multiple)) for f in fractions}) > 1]
    groups = tuple(_group(gm, g, fractions, multiple, prune_sensitivities) for g in decided)
    options = _option_table(names, bit_options, layer_options, pin_first_last)
    unknown = sorted(set(sensitivities if isinstance(sensitivities, Mapping) else ())
                     - set(names))
    if unknown:
        raise ValueError(f"sensitivities name unknown layers {unknown[:5]}; layers are "
                         f"conv2d/linear node names such as {names[:4]}")

    counter = _Counter(gm, nodes, {g.id for g in decided}, owners)
    counter.products = products
    full = {g.id: g.size for g in decided}
    layers, seen, params = [], set(), _Params()
    sources = activation_sources(gm, list(names))
    for name in names:
        n = nodes[name]
        m = gm.get_submodule(n.target)
        first = n.target not in seen  # a module called twice stores its weights once
        seen.add(n.target)
        out, cin, mscale, ksize = _layer_shape(n, m, counter)
        if first:  # int32 bias, multiplier and shift per kept output channel
            params.add(out, words=PER_CHANNEL_WORDS)
        sens = _layer_sensitivity(sensitivities, gm, name, options[name])
        layer = Layer(name, COST.get(n).macs, m.weight.numel(), out, cin, mscale,
                      ksize if first else 0, options[name], sens, sources[name],
                      str(n.target))
        pairs = out.value(full) * cin.value(full)
        if mscale * pairs != layer.fp32_macs or ksize * pairs != layer.weight_numel:
            raise ValueError(f"layer {name!r}: the cost model predicts {mscale * pairs} MACs, "
                             f"CostAnalysis counts {layer.fp32_macs}; cannot model this layer")
        layers.append(layer)
    layer_set = set(names)
    fixed_macs, fixed_bops, scaled_macs = params.add_rest(gm, layer_set, nodes, counter)
    totals = COST_TOTALS.get(gm)
    reference = {"bops": totals.fp32_bops, "macs": totals.macs,
                 "weight_bytes": totals.fp32_weight_bytes}
    float_nodes = tuple((n.name, COST.get(n).macs, why_no_bits(gm, n)) for n in gm.graph.nodes
                        if n.name not in layer_set and n.name not in products
                        and COST.get(n).macs)
    return Problem(tuple(layers), groups, params.affine(), fixed_macs, fixed_bops, reference,
                   tuple(fractions), multiple, scaled_macs, float_nodes=float_nodes,
                   float_mac_bops=PRODUCT_BITS * PRODUCT_BITS)


def _granule(g: ChannelGroup, multiple: int) -> int:
    """``multiple`` channels in units of the group's elements: an element spanning ``w``
    channels of the layers (an attention head: its head dim) needs ``multiple / gcd(multiple,
    w)`` of them (1 for a head of 16 channels and ``multiple`` 4)."""
    widths = [int(np.asarray(m.index).shape[1]) for m in g.members if m.role in ("in", "out")]
    width = math.gcd(*widths) if widths else 1
    return multiple // math.gcd(multiple, width)


def _group(gm, g: ChannelGroup, fractions, multiple: int, criterion) -> Group:
    granule = _granule(g, multiple)
    levels = tuple(dict.fromkeys(keep_count(g.size, f, granule) for f in fractions))
    order = np.sort(_importance(criterion, gm, g))
    return Group(g.id, g.name, g.size, levels,
                 tuple(float(order[:g.size - k].sum()) for k in levels), granule)


def _option_table(names, bit_options, layer_options, pin_first_last) -> dict[str, tuple]:
    default = _options(bit_options, "bit_options")
    extra = sorted(set(layer_options or {}) - set(names))
    if extra:
        raise ValueError(f"layer_options names unknown layers {extra[:5]}; layers are "
                         f"{names[:4]}")
    table = {n: _options(layer_options[n], f"layer_options[{n!r}]")
             if n in (layer_options or {}) else default for n in names}
    if pin_first_last:
        table[names[0]] = table[names[-1]] = ((8, 8),)
    return table


def _options(options: Sequence[Option], what: str) -> tuple[Option, ...]:
    out = []
    for o in options:
        if (not isinstance(o, Sequence) or len(o) != 2
                or not all(isinstance(b, int) and 1 <= b <= 32 for b in o)):
            raise ValueError(f"{what}: each option is a (weight bits, activation bits) pair of "
                             f"ints in 1..32, got {o!r}")
        out.append((int(o[0]), int(o[1])))
    if not out:
        raise ValueError(f"{what} is empty: give at least one (weight, activation) pair")
    return tuple(sorted(set(out), reverse=True))


def _layer_sensitivity(table, gm, name: str, opts: tuple[Option, ...]) -> tuple[float, ...]:
    if table is None:
        row = weight_noise_sensitivity(gm, name, opts)
    elif hasattr(table, "layer_sensitivity"):  # a criterion object (pqcompile.criteria)
        row = table.layer_sensitivity(gm, name, opts)
    elif isinstance(table, Mapping):
        row = table.get(name)
    else:
        raise TypeError("sensitivities must be {layer: {(w, a): float}}, a criterion with "
                        f"layer_sensitivity(gm, layer, options) or None, got {type(table)}")
    if row is None:
        raise ValueError(f"no sensitivities for layer {name!r}: give sensitivities[{name!r}]"
                         f"[(w, a)] for its options {list(opts)}")
    out = []
    for o in opts:
        value = row.get(o)
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"sensitivities[{name!r}][{o}] must be a finite float >= 0, got "
                             f"{value!r}")
        out.append(float(value))
    return tuple(out)


def _importance(criterion, gm, group: ChannelGroup) -> np.ndarray:
    if criterion is None:
        scores = l1_scores(gm, group)
        return scores / scores.sum() if scores.sum() > 0 else np.full(group.size, 1 / group.size)
    return _scores(criterion, gm, group)
