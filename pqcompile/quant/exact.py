"""Exact ops on integer model inputs, and float regions that absorb what they produce.

Integer inputs (token ids, attention masks, position ids) are not quantized. The ops computed
from them alone (``mask`` nodes: comparisons, casts, arithmetic building an additive attention
bias, indexing, expand, sums) run as they are written, in the dtype torch gives them, on both
sides: :class:`MaskOp` holds the op as a one-node ``GraphModule`` that the reference runs in
torch and the compiled program translates with TVM's fx frontend. Integer and boolean
arithmetic is exact, and so is what a mask bias computes in float32 (``(1 - m) * finfo.min``
with ``m`` in {0, 1}).

A float op reading such a value gets it cast to float64 (exact), not dequantized. A value
like an additive mask bias must never be quantized itself (``-3.4e38`` would take the whole
scale); so a float op that reads one, and whose only reader is another float op, is computed
inside that reader's island (a *region*: e.g. ``softmax(scores + bias)``, or mean pooling
``sum(x * mask) / count``), and only the region's result is quantized.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx
from torch import nn


class MaskOp(nn.Module):
    """One op on integer-derived tensors, run exactly as written (no quantization)."""

    def __init__(self, fn: torch.fx.GraphModule, op: str) -> None:
        super().__init__()
        self.fn, self.op = fn, op
        self.fake = False  # the fake-quant view computes it the same way

    def forward(self, *xs: torch.Tensor) -> Any:
        return self.fn(*xs)


def _copy_into(root: nn.Module, graph: torch.fx.Graph, src: torch.fx.GraphModule,
               n: torch.fx.Node, env: Callable[[torch.fx.Node], Any]) -> torch.fx.Node:
    """Copy node ``n`` of ``src`` into ``graph`` (args through ``env``); a module call brings
    its module along under a fresh attribute name of ``root``."""
    node = graph.node_copy(n, env)
    if n.op == "call_module":
        name = n.target.replace(".", "_")
        while hasattr(root, name):
            name += "_"
        root.add_module(name, src.get_submodule(n.target))
        node.target = name
    return node


def subgraph(src: torch.fx.GraphModule, nodes: list[torch.fx.Node],
             is_input: Callable[[torch.fx.Node], bool], values: dict[str, Any],
             cls_name: str) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    """``nodes`` (in graph order, the last one the result) as a ``GraphModule`` whose inputs
    are the tensors they read from outside (``is_input``); other outside values come from
    ``values`` (tensors as buffers, Python values as they are). Returns it and its inputs."""
    root, graph = nn.Module(), torch.fx.Graph()
    names = {x.name for x in nodes}
    inputs: list[torch.fx.Node] = []
    for n in nodes:  # the placeholders first, in the order the nodes read them
        for a in n.all_input_nodes:
            if a.name not in names and a not in inputs and is_input(a):
                inputs.append(a)
    inside = {a.name: graph.placeholder(f"in{i}") for i, a in enumerate(inputs)}

    def env(a: torch.fx.Node) -> Any:
        if a.name in inside:
            return inside[a.name]
        v = values[a.name]
        if isinstance(v, torch.Tensor):
            name = f"const{len(list(root.buffers()))}"
            root.register_buffer(name, v.clone())
            inside[a.name] = graph.get_attr(name)
            return inside[a.name]
        return v

    for n in nodes:
        inside[n.name] = _copy_into(root, graph, src, n, env)
    graph.output(inside[nodes[-1].name])
    return torch.fx.GraphModule(root, graph, cls_name), inputs


def region_nodes(gm: torch.fx.GraphModule, n: torch.fx.Node, inlined: set[str]
                 ) -> list[torch.fx.Node]:
    """``n`` and the inlined float ops it reads, transitively, in graph order."""
    found: dict[str, torch.fx.Node] = {}

    def visit(x: torch.fx.Node) -> None:
        for a in x.all_input_nodes:
            if a.name in inlined and a.name not in found:
                visit(a)
        found[x.name] = x

    visit(n)
    order = {x.name: i for i, x in enumerate(gm.graph.nodes)}
    return sorted(found.values(), key=lambda x: order[x.name])
