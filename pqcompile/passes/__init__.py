"""Passes: the pass framework and the analysis and rewrite passes built on it."""

from .base import (GraphDumpInstrument, Pass, PassContext, PassInfo, PassInstrument, PassResult,
                   Pipeline, TimingInstrument, graph_pass, provided_keys)
from .cost import (CostAnalysis, analyze_cost, conv_macs, conv_transpose_macs, linear_macs,
                   matmul_macs, node_macs)
from .fold_bn import FoldBatchNorm
from .groups import ChannelGroupAnalysis, describe_groups, find_group
from .prune import PruneChannels, predicted_macs, zero_channels
from .shapes import ShapeAnalysis, output_shape

__all__ = [
    "CostAnalysis", "analyze_cost", "conv_macs", "conv_transpose_macs", "linear_macs",
    "matmul_macs", "node_macs",
    "GraphDumpInstrument", "Pass", "PassContext", "PassInfo", "PassInstrument", "PassResult",
    "Pipeline", "ShapeAnalysis", "TimingInstrument", "graph_pass", "output_shape",
    "provided_keys",
    "ChannelGroupAnalysis", "FoldBatchNorm", "PruneChannels", "describe_groups", "find_group",
    "predicted_macs",
    "zero_channels", "SensitivityAnalysis", "channel_importance", "layer_sensitivities",
]

# The sensitivity pass runs the criteria (pqcompile.criteria), which themselves run passes of
# this package (FoldBatchNorm): it is loaded on first use so that importing a pass never
# imports the criteria.
_SENSITIVITY = ("SensitivityAnalysis", "channel_importance", "layer_sensitivities")


def __getattr__(name: str):
    if name in _SENSITIVITY:
        from . import sensitivity
        return getattr(sensitivity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
