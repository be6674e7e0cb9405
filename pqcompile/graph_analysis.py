"""The analyzed FP32 graph every stage starts from: traced, with shapes, groups and costs.

Kept apart from :mod:`pqcompile.build` so that the report, the coverage check and the solvers
can analyze a model without importing the lowering path (``pqcompile.build.analysis`` is the
same function).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from .frontend.tracer import trace
from .passes import ChannelGroupAnalysis, CostAnalysis, Pipeline, ShapeAnalysis


def analysis(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
             **trace_kwargs: Any) -> torch.fx.GraphModule:
    """Traced graph with shapes, channel groups and FP32 costs."""
    gm = trace(model, example_inputs, **trace_kwargs)
    pipe = Pipeline([ShapeAnalysis(), ChannelGroupAnalysis(), CostAnalysis()], name="analysis")
    return pipe(gm).graph_module
