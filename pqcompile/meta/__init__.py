"""The only module where annotation keys are spelled (the records they hold: ``records.py``;
the key type, :class:`MetaKey`: ``key.py``).

Analysis passes write typed records into ``node.meta`` (per node) or ``graph_module.meta``
(per graph); later passes read them back through the same key object, so a missing annotation
fails with a message that names the node and the pass to run, never with a bare ``KeyError``.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.passes import ShapeAnalysis
>>> gm = trace(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
>>> gm = ShapeAnalysis()(gm).graph_module
>>> [tuple(SHAPE.get(n).shape) for n in gm.graph.nodes if n.op == "call_module"]
[(1, 2)]
"""

from __future__ import annotations

from typing import Any

from .key import MetaKey, all_keys
from .records import (  # noqa: F401  (re-exported: the records are part of this module's API)
    BitWidths,
    ChannelGroup,
    ChannelMember,
    CostTotals,
    DiscoveredLayer,
    ExampleInputs,
    FixedPoint,
    FloatOp,
    KeptChannels,
    LayerDiscovery,
    NodeChannels,
    NodeCost,
    QParams,
    Requant,
    SensitivityInfo,
    WeightQuant,
)


# --- graph, shapes, bits, costs ---------------------------------------------------------------

EXAMPLE_INPUTS: MetaKey[ExampleInputs] = MetaKey(
    "pqc.example_inputs", "pqcompile.trace", "the example inputs given at trace time", "graph")

SOURCE_MODEL: MetaKey[str] = MetaKey(
    "pqc.source_model", "pqcompile.trace", "class name of the traced model", "graph")

# fx's own key, so the records interoperate with torch.fx tooling (ShapeProp writes it).
SHAPE: MetaKey[Any] = MetaKey(
    "tensor_meta", "ShapeAnalysis", "shape and dtype of the node's output")

BITS: MetaKey[BitWidths] = MetaKey(
    "pqc.bits", "a solver or set_bits", "weight and activation bit widths of a layer")

COST: MetaKey[NodeCost] = MetaKey(
    "pqc.cost", "CostAnalysis", "MACs, params, BOPs and bytes of the node")

COST_TOTALS: MetaKey[CostTotals] = MetaKey(
    "pqc.cost_totals", "CostAnalysis", "graph totals of MACs, BOPs and bytes", "graph")


# --- layer discovery ---------------------------------------------------------------------------

LAYER_DISCOVERY: MetaKey[LayerDiscovery] = MetaKey(
    "pqc.layer_discovery", "pqcompile.trace (passes.layer_discovery)",
    "layers found by what nodes compute, and why others run in float", "graph")


# --- channel groups ----------------------------------------------------------------------------

CHANNEL_GROUPS: MetaKey[tuple[ChannelGroup, ...]] = MetaKey(
    "pqc.channel_groups", "ChannelGroupAnalysis",
    "channels that must be pruned together, in a deterministic order", "graph")

NODE_CHANNELS: MetaKey[NodeChannels] = MetaKey(
    "pqc.node_channels", "ChannelGroupAnalysis",
    "channel dims of the node's output and the groups governing its output and input")

KEPT_CHANNELS: MetaKey[KeptChannels] = MetaKey(
    "pqc.kept_channels", "PruneChannels", "original channel positions kept by pruning")


# --- quantization ------------------------------------------------------------------------------

FOLDED_BN: MetaKey[str] = MetaKey(
    "pqc.folded_bn", "FoldBatchNorm", "name of the batch-norm node folded into this layer")

QPARAMS: MetaKey[QParams] = MetaKey(
    "pqc.qparams", "build_reference", "scale, bits and signedness of the node's output tensor")

WEIGHT_QUANT: MetaKey[WeightQuant] = MetaKey(
    "pqc.weight_quant", "build_reference", "bits and per-channel scales of the layer's weight")

REQUANT: MetaKey[Requant] = MetaKey(
    "pqc.requant", "build_reference", "fixed-point multipliers and clamp bounds of an integer op")

EMBEDDING_BITS: MetaKey[int] = MetaKey(
    "pqc.embedding_bits", "pqcompile.quant.tables.set_table_bits",
    "bits an nn.Embedding table is stored at (8, or 4/2: packed rows, a multiplier per row)")

FUSED_ACTIVATION: MetaKey[str] = MetaKey(
    "pqc.fused_activation", "build_reference", "name of the ReLU/ReLU6 node folded into the clamp")

FLOAT_OPS: MetaKey[tuple[FloatOp, ...]] = MetaKey(
    "pqc.float_ops", "build_reference", "ops that run in float in the quantized program", "graph")


# --- sensitivity -------------------------------------------------------------------------------

SENSITIVITY: MetaKey[dict[tuple[int, int], float]] = MetaKey(
    "pqc.sensitivity", "SensitivityAnalysis",
    "cost of each (weight bits, activation bits) option of a conv/linear layer, >= 0")

CHANNEL_IMPORTANCE: MetaKey[dict[int, Any]] = MetaKey(
    "pqc.channel_importance", "SensitivityAnalysis",
    "per-channel prune sensitivity (a float64 array) of every prunable group, by group id",
    "graph")

SENSITIVITY_INFO: MetaKey[SensitivityInfo] = MetaKey(
    "pqc.sensitivity_info", "SensitivityAnalysis",
    "criteria, units and bit options behind the sensitivity annotations", "graph")


# --- compile pipeline ----------------------------------------------------------------------------

KEEP_MASKS: MetaKey[dict[int, Any]] = MetaKey(
    "pqc.keep_masks", "the compile pipeline's solve stage",
    "the solver's keep-mask (1-D bool array, True = keep) of each channel group it prunes, by "
    "group id; with the layers' pqc.bits, the assignment the later stages build", "graph")

REFERENCE: MetaKey[bool] = MetaKey(
    "pqc.integer_reference", "the compile pipeline's quantize stage",
    "the graph is the calibrated integer-exact reference the lowering takes", "graph")
