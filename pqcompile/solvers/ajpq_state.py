"""The AJPQ agents' state: per-layer features in ``[0, 1]``, and how an action picks a level.

Read by :mod:`pqcompile.solvers.ajpq` (whose docstring describes the state); kept apart from
the search loop since it reads only the problem and the analyzed graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.fx
from torch import nn

from ..meta import SHAPE
from .problem import Layer, Problem

LAYER_FEATURES = ("index", "c_in", "c_out", "stride", "kernel", "params", "input_hw",
                  "depthwise", "linear")
LAYER_STATE = LAYER_FEATURES + ("previous_keep",)
CHANNEL_STATE = LAYER_FEATURES + ("kept_out", "kept_in", "previous_weight",
                                  "previous_activation")
_BINARY = ("depthwise", "linear")


def keep_index(action: float, n: int) -> int:
    """The bin of ``action`` in ``[0, 1]`` among ``n`` equal bins (``1.0`` -> the last)."""
    return min(int(float(action) * n), n - 1)


def layer_features(problem: Problem, graph: torch.fx.GraphModule | None) -> np.ndarray:
    """``(layers, len(LAYER_FEATURES))`` features in ``[0, 1]`` (see the module docstring)."""
    nodes = {n.name: n for n in graph.graph.nodes} if graph is not None else {}
    full = {g.id: g.size for g in problem.groups}
    raw = np.array([_raw_features(layer, nodes.get(layer.name), graph, full)
                    for layer in problem.layers], dtype=np.float64)
    n = len(problem.layers)
    raw[:, 0] = np.arange(n) / max(n - 1, 1)
    for j, name in enumerate(LAYER_FEATURES[1:], start=1):
        if name in _BINARY:
            continue
        lo, hi = raw[:, j].min(), raw[:, j].max()
        raw[:, j] = (raw[:, j] - lo) / (hi - lo) if hi > lo else 0.0
    return np.clip(raw, 0.0, 1.0)


def _raw_features(layer: Layer, node: torch.fx.Node | None, graph,
                  full: Mapping[int, int]) -> list[float]:
    """``[index, c_in, c_out, stride, kernel, params, input_hw, depthwise, linear]``, raw."""
    module = graph.get_submodule(node.target) if node is not None and node.op == "call_module" \
        else None
    src = node.args[0] if node is not None and node.args else None
    shape = tuple(SHAPE.get(src).shape) if isinstance(src, torch.fx.Node) \
        and SHAPE.has(src) else ()
    if isinstance(module, nn.Conv2d):
        hw = math.prod(shape[2:]) if len(shape) >= 3 else 1
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return [0, module.in_channels, module.out_channels, max(module.stride),
                math.prod(module.kernel_size), module.weight.numel(), hw, float(depthwise), 0]
    if isinstance(module, nn.Linear):
        tokens = math.prod(shape[1:-1]) if len(shape) >= 2 else 1
        return [0, module.in_features, module.out_features, 1, 1, module.weight.numel(),
                tokens, 0, 1]
    return [0, layer.in_channels.value(full), layer.out_channels.value(full), 1, 1,
            layer.weight_numel, layer.macs_scale, 0, 0]
