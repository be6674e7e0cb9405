"""The weight-rounding stage of ``pqcompile.compile`` (``weight_rounding="gptq"``): after the
solver's assignment, before fine-tuning, the assigned layers' weights are rounded by GPTQ
(:mod:`pqcompile.quant.gptq`) on the calibration batches, in the pruned, BN-folded graph.

The graph that comes out is pruned and folded, with bits, keep-masks and costs (as the
fine-tune stage's), so the prune and fold stages do not apply; fine-tuning, when asked for,
starts from the rounded weights, and the quantize stage stores GPTQ's integers.
"""

from __future__ import annotations

from ..fakequant import compressed_graph
from ..meta import BITS, KEEP_MASKS
from ..passes import CostAnalysis
from ..passes.base import PassInfo
from ..quant.gptq import gptq_round, stored_mismatches
from .checks import batch_inputs, read_batches
from .stages import Stage, graph_assignment


class RoundWeights(Stage):
    """GPTQ rounding of the assigned conv/linear weights (``weight_rounding=``); its per-layer
    results are ``ctx.rounding`` (``{node: LayerRounding}``) and a note in the report."""

    info = PassInfo("weight-rounding", requires=(BITS, KEEP_MASKS))

    def applies(self, ctx):
        return ctx.weight_rounding is not None

    def detail(self, ctx):
        return f"gptq, {_batches(ctx)} batches"

    def stage(self, gm, ctx):
        ctx.assignment = assignment = graph_assignment(gm)
        work = compressed_graph(gm, assignment)
        n_inputs = len(ctx.example_inputs)
        batches = read_batches(ctx.data, _batches(ctx), gm)
        inputs = [(batch_inputs(b),) if n_inputs == 1 else tuple(b[:n_inputs])
                  for b in batches]
        rounded, ctx.rounding = gptq_round(work, assignment, inputs, ctx.weight_rounding)
        for node in rounded.graph.nodes:
            if node.name in assignment.bits:
                BITS.set(node, assignment.bits[node.name])
        KEEP_MASKS.set(rounded, dict(assignment.masks))
        ctx.notes.append(rounding_note(ctx.rounding, len(assignment.bits),
                                       stored_mismatches(rounded, ctx.rounding)))
        return CostAnalysis()(rounded)


def _batches(ctx) -> int:
    return ctx.weight_rounding.batches or ctx.calibration_batches


def rounding_note(rounding, layers: int, mismatches) -> str:
    """The report's line on GPTQ: how many layers, the calibration output error against
    nearest rounding, pinned channels, and any channel the scheme would store otherwise."""
    near = sum(r.error_nearest for r in rounding.values())
    gptq = sum(r.error_gptq for r in rounding.values())
    ratio = f"{gptq / near:.3f}" if near > 0 else "n/a"
    text = (f"weights of {len(rounding)} of {layers} layers rounded by GPTQ: summed output "
            f"error on the calibration batches {ratio} x nearest rounding's; "
            f"{sum(r.pinned for r in rounding.values())} channels' largest weights pinned to "
            "the grid's end")
    if mismatches:
        text += (f"; the bias floor re-rounds {sum(mismatches.values())} channels of "
                 f"{sorted(mismatches)}")
    return text
