"""Ready-made assignments: uniform bits, and a fixed mixed-precision + magnitude-pruning recipe.

They need no data and no search; they are the baselines solvers are compared with, and fixed
workloads for latency and size measurements.

>>> import torch
>>> from torch import nn
>>> from pqcompile.build import analysis
>>> gm = analysis(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)),
...               (torch.randn(1, 3, 8, 8),))
>>> compute_layers(gm)
['_0', '_2']
>>> {n: (b.weight, b.activation) for n, b in uniform(gm, 4, keep_8bit_ends=True).bits.items()}
{'_0': (8, 8), '_2': (8, 8)}
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx
from torch import nn

from .assignment import Assignment
from .meta import CHANNEL_GROUPS, BitWidths, ChannelGroup

_COMPUTE = (nn.Conv2d, nn.Linear)


def compute_layers(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the conv2d and linear nodes that read the model's inputs, in graph order: the
    layers that get bits. (A layer computing from constants alone, such as a position-bias
    MLP over a fixed table, stays in float and is folded into a constant.)"""
    live: set[str] = set()
    layers = []
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a.name in live for a in n.all_input_nodes):
            live.add(n.name)
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _COMPUTE):
                layers.append(n.name)
    return layers


def uniform(gm: torch.fx.GraphModule, bits: int, activation_bits: int | None = None, *,
            keep_8bit_ends: bool = False) -> Assignment:
    """Every layer at ``bits`` (weights) / ``activation_bits`` (default: ``bits``).

    ``keep_8bit_ends``: the first and last layer stay at 8/8, the usual practice.
    """
    layers = compute_layers(gm)
    ends = [layers[0], layers[-1]] if keep_8bit_ends and layers else []
    return Assignment.uniform(layers, bits, activation_bits or bits, keep_8bit=ends)


def l1_scores(gm: torch.fx.GraphModule, group: ChannelGroup) -> np.ndarray:
    """Per-channel L1 norm of the group's producer weights (all ``out`` members summed)."""
    scores = np.zeros(group.size)
    for m in group.members:
        if m.role != "out" or m.module is None:
            continue
        w = gm.get_submodule(m.module).weight.detach().abs()
        rows = w.reshape(w.shape[0], -1).sum(1).double().numpy()
        scores += rows[np.asarray(m.index)].sum(axis=1)
    return scores


def magnitude_masks(gm: torch.fx.GraphModule, keep_ratio: float, multiple: int = 1
                    ) -> dict[int, np.ndarray]:
    """Keep the ``keep_ratio`` channels of largest L1 norm in every prunable group.

    Kept counts are rounded up to a multiple of ``multiple`` (a SIMD width, say) but never
    above the group's size.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    masks = {}
    for g in CHANNEL_GROUPS.get(gm):
        if not g.prunable:
            continue
        keep = int(np.ceil(g.size * keep_ratio / multiple) * multiple)
        keep = min(max(keep, 1), g.size)
        if keep == g.size:
            continue
        order = np.argsort(-l1_scores(gm, g), kind="stable")
        mask = np.zeros(g.size, dtype=bool)
        mask[order[:keep]] = True
        masks[g.id] = mask
    return masks


def mixed_pruned(gm: torch.fx.GraphModule, *, keep_ratio: float = 0.75, low_bits: int = 4,
                 multiple: int = 8) -> Assignment:
    """A fixed mixed recipe: first/last layer 8/8; other layers alternate 8-bit and
    ``low_bits`` weights with 8-bit activations; every prunable group keeps ``keep_ratio`` of
    its channels by L1 magnitude (rounded to ``multiple``)."""
    layers = compute_layers(gm)
    bits = {}
    for i, name in enumerate(layers):
        end = i in (0, len(layers) - 1)
        bits[name] = BitWidths(8 if end or i % 2 else low_bits, 8)
    return Assignment(bits, magnitude_masks(gm, keep_ratio, multiple))
