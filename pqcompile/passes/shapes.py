"""ShapeAnalysis: shapes and dtypes of every node, by running the graph on its example inputs."""

from __future__ import annotations

import torch
from torch.fx.passes.shape_prop import ShapeProp

from ..meta import EXAMPLE_INPUTS, SHAPE
from .base import Pass, PassInfo, PassResult


class ShapeAnalysis(Pass):
    """Writes fx's ``TensorMetadata`` (``SHAPE``) on every node (fx ``ShapeProp``).

    Inputs default to the example inputs recorded at trace time.
    """

    info = PassInfo("ShapeAnalysis", requires=(EXAMPLE_INPUTS,), provides=(SHAPE,))

    def __init__(self, *inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def run(self, gm, ctx):
        inputs = self.inputs or EXAMPLE_INPUTS.get(gm).args
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
        return PassResult(gm, False)


def output_shape(node: torch.fx.Node) -> tuple[int, ...]:
    """Shape of a node's (single tensor) output, from ``SHAPE``."""
    tm = SHAPE.get(node)
    if not hasattr(tm, "shape"):
        raise TypeError(f"node {node.name!r} does not produce a single tensor")
    return tuple(tm.shape)
