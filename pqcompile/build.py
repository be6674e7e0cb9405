"""Compile a model for one assignment: prune, fold, quantize, lower, build, package.

:func:`compile_assignment` is the whole lowering path for a *given* assignment (bits per layer,
keep-masks per channel group); ``pqcompile.compile`` adds the search for the assignment.

1. trace, ShapeAnalysis, ChannelGroupAnalysis, CostAnalysis (the FP32 reference costs);
2. PruneChannels: the masked channel groups are removed for real;
3. FoldBatchNorm; the assignment's bits are written on the layers; CostAnalysis again;
4. the integer-exact reference is calibrated on the user's batches;
5. it is lowered to an integer-only Relax program and built into an :class:`Artifact`.

>>> import torch, numpy as np
>>> from torch import nn
>>> from pqcompile.assignment import Assignment
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> x = torch.randn(1, 3, 16, 16)
>>> a = Assignment.uniform(["_0", "_3"], 8, 8)
>>> c = compile_assignment(model.eval(), (x,), a, calibration=[torch.randn(4, 3, 16, 16)])
>>> bool(np.array_equal(c(x.numpy()), c.reference(x).numpy()))
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from .runtime.artifact import Artifact
from .assignment import Assignment
from .fidelity import measure, to_json, warn_if_poor
from .finetune import compressed_graph
from .graph_analysis import analysis
from .lower import LoweringReport, lower
from .meta import (
    BITS,
    CHANNEL_GROUPS,
    COST,
    COST_TOTALS,
    EXAMPLE_INPUTS,
    KEPT_CHANNELS,
    SHAPE,
    CostTotals,
)
from .passes import CostAnalysis
from .passes.cost import activation_products, program_constant_bytes
from .quant import build_reference
from .quant.calibrate import check_batches
from .report import compression_table, write_plots


@dataclass
class Compiled:
    """A compressed, compiled model for one target.

    ``graph``: the pruned, BN-folded float graph the quantization is applied to;
    ``reference``: its integer-exact fake-quant reference (a torch module, the ground truth
    the artifact matches); ``artifact``: the TVM build with its manifest; ``layers`` and
    ``totals``: per-layer and total costs (bits, kept/total channels, MACs, BOPs, bytes).
    """

    graph: torch.fx.GraphModule
    reference: torch.fx.GraphModule
    artifact: Artifact
    lowering: LoweringReport
    assignment: Assignment
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    float_ops: list[tuple[str, str]] = field(default_factory=list)
    program: Any = None  # the lowered Relax IRModule
    params: dict[str, np.ndarray] = field(default_factory=dict)
    _build_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    solution: Any = None  # set by pqcompile.compile: the solver's choice and predicted costs
    budget: Any = None
    calibration: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # compile(): seconds per stage
    tuning: Any = None  # pqcompile.tuning.TuningReport when compile(tune=...) tuned
    candidates: list[dict[str, Any]] = field(default_factory=list)  # what the solver saw
    latency_table: Any = None  # pqcompile.latency.LatencyTable behind a latency budget
    fidelity: dict[str, Any] | None = None  # pqcompile.fidelity.measure on the calibration

    def report(self, plots: str | Path | None = None) -> str:
        """The per-layer table (op, output shape, kept/total channels, w/a bits, MACs, BOPs,
        weight bytes, sensitivity of the chosen bits) with totals and reduction ratios.

        ``plots``: a directory to write the PNG plots to (:func:`pqcompile.report.write_plots`:
        the candidates' accuracy-vs-BOPs Pareto front, per-layer bits and kept channels); the
        text then names the files. ``pqcompile report DIR`` renders the same from a saved
        artifact.
        """
        extra = self.artifact.manifest["extra"]
        text = compression_table(self.layers, self.totals, float_ops=self.float_ops,
                                 solve_notes=extra.get("notes", ()),
                                 calibration=self.calibration, solver=extra.get("solver"),
                                 budget=extra.get("budget"), fidelity=self.fidelity)
        if plots is not None:
            text += "\nplots: " + ", ".join(str(p) for p in self.plots(plots))
        return text

    def export_onnx(self, path: str | Path | None = None, **options: Any) -> Any:
        """The compressed model as an ONNX QDQ graph (:func:`pqcompile.export_onnx`; written to
        ``path`` when given); returns the ``onnx.ModelProto``."""
        from .export.onnx_export import export_onnx

        return export_onnx(self, path, **options)

    def plots(self, directory: str | Path) -> list[Path]:
        """Write the report's PNG plots to ``directory`` (:func:`pqcompile.report.write_plots`)."""
        candidates = self.artifact.manifest["extra"].get("candidates", [])
        return write_plots(self.layers, candidates, self.totals, directory)

    def retarget(self, target: Any) -> Artifact:
        """The same reference lowered and built for another target (no recalibration): the
        integers are the same, the kernels are those of the new target's instruction set."""
        mod, params, _ = lower(self.reference, target=target)
        return Artifact.build(mod, params, target, **self._build_kwargs)

    def __call__(self, *inputs: np.ndarray):
        return self.artifact(*inputs)

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        return self.artifact.save(directory, overwrite=overwrite)


def _layer_rows(gm: torch.fx.GraphModule, fp32: torch.fx.GraphModule,
                assignment: Assignment, sensitivity: Mapping[str, float] | None
                ) -> list[dict[str, Any]]:
    original = {n.name: n for n in fp32.graph.nodes}
    products = activation_products(gm)  # integer products: no bits, not float either
    rows = []
    for node in gm.graph.nodes:
        cost = COST.find(node)
        if cost is None or cost.macs == 0:
            continue
        bits = assignment.bits.get(node.name)
        kept = KEPT_CHANNELS.find(node)
        out_shape = SHAPE.get(node).shape
        before = original.get(node.name)
        total = (SHAPE.get(before).shape[kept.dim] if before is not None and kept is not None
                 else None)
        op = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" \
            else getattr(node.target, "__name__", str(node.target))
        dim = kept.dim if kept is not None else (1 if "conv" in op.lower() else -1)
        rows.append({
            "name": node.name,
            "op": op,
            # a node without bits (but an integer product) runs in a float64 island: costed
            # at what it runs at
            "weight_bits": bits.weight if bits else cost.weight_bits,
            "activation_bits": bits.activation if bits else cost.activation_bits,
            "float": bits is None and node.name not in products,
            "shape": [int(d) for d in out_shape],
            "kept_channels": int(out_shape[dim]) if len(out_shape) else None,
            "total_channels": (int(total) if total is not None else
                               int(out_shape[dim]) if len(out_shape) else None),
            "macs": cost.macs, "bops": cost.bops, "weight_bytes": cost.weight_bytes,
            "fp32_macs": COST.get(before).macs if before is not None else None,
            "sensitivity": (float(sensitivity[node.name]) if sensitivity is not None
                            and node.name in sensitivity else None),
        })
    return rows


def prepare(fp32: torch.fx.GraphModule, assignment: Assignment) -> torch.fx.GraphModule:
    """The analyzed graph pruned by the assignment's masks, BN folded, bits annotated, costed.

    This is the float graph quantization (and fine-tuning) applies to.
    """
    assignment.validate(fp32)
    gm = compressed_graph(fp32, assignment)  # a copy: the caller keeps its graph
    for node in gm.graph.nodes:
        if node.name in assignment.bits:
            BITS.set(node, assignment.bits[node.name])
    return CostAnalysis()(gm).graph_module


def compile_assignment(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                       assignment: Assignment, *, target: Any = "host",
                       calibration: Iterable[torch.Tensor], observer: str = "minmax",
                       residual_bits: int = 8, table_bits: Any = None,
                       **trace_kwargs: Any) -> Compiled:
    """Build ``model`` under ``assignment`` for ``target`` (see the module docstring);
    ``residual_bits``: see :func:`pqcompile.quant.build_reference`; ``table_bits``: the
    embedding tables' stored bits (:func:`pqcompile.quant.tables.set_table_bits`)."""
    from .quant.tables import set_table_bits

    from .frontend.tracer import check_model_and_inputs  # a dict of inputs by parameter name too

    example_inputs = check_model_and_inputs(model, example_inputs)
    fp32 = set_table_bits(analysis(model, example_inputs, **trace_kwargs), table_bits)
    return finish(fp32, prepare(fp32, assignment), assignment, target=target,
                  calibration=calibration, observer=observer, residual_bits=residual_bits)


def finish(fp32: torch.fx.GraphModule, gm: torch.fx.GraphModule, assignment: Assignment, *,
           target: Any, calibration: Iterable[torch.Tensor] | None, observer: Any = "minmax",
           sensitivity: Mapping[str, float] | None = None,
           manifest_extra: Mapping[str, Any] | None = None, tune: int = 0,
           **reference_kwargs: Any) -> Compiled:
    """Quantize the prepared graph ``gm``, lower it and build the artifact for ``target``.

    ``fp32`` is the analyzed, unpruned graph (for the reference costs and the layer table);
    ``sensitivity``: each layer's sensitivity at its chosen bits (the report's column);
    ``manifest_extra``: more entries for the manifest's ``extra`` (JSON-ready);
    ``tune``: MetaSchedule trials for the program's kernels the target's tuning database lacks
    (:func:`pqcompile.tuning.tune`; the build applies the database either way);
    ``reference_kwargs`` go to :func:`pqcompile.quant.build_reference`.
    The reference is measured against ``fp32`` on the calibration inputs
    (:mod:`pqcompile.fidelity`: ``Compiled.fidelity``, the manifest, the report), with a
    :class:`~pqcompile.errors.FidelityWarning` when it is poor.
    """
    reference, fidelity = quantize(fp32, gm, assignment, calibration, observer,
                                   str((manifest_extra or {}).get("calibration", "")),
                                   **reference_kwargs)
    mod, params, report, tuning = lower_program(reference, target, tune)
    return package(fp32, gm, reference, assignment, (mod, params, report), target,
                   sensitivity=sensitivity, manifest_extra=manifest_extra, fidelity=fidelity,
                   tuning=tuning)


def quantize(fp32: torch.fx.GraphModule, gm: torch.fx.GraphModule, assignment: Assignment,
             calibration: Iterable[torch.Tensor] | None, observer: Any = "minmax",
             calibrated_on: str = "", **reference_kwargs: Any) -> tuple[Any, Any]:
    """The calibrated integer-exact reference of ``gm`` and its fidelity against ``fp32`` on
    the calibration inputs (a :class:`~pqcompile.errors.FidelityWarning` when poor;
    ``calibrated_on`` says in it what they were)."""
    if calibration is None:
        raise ValueError("calibration batches are required: pass an iterable of input tensors "
                         "drawn from the data the model will see (e.g. a few training batches)")
    batches = check_batches(gm, calibration)
    reference = build_reference(gm, assignment, batches, observer, **reference_kwargs)
    fidelity = measure(fp32, reference, batches)  # one forward of each: cheap, every build
    warn_if_poor(fidelity, calibrated_on)
    return reference, fidelity


def lower_program(reference: torch.fx.GraphModule, target: Any, tune: int = 0
                  ) -> tuple[Any, dict[str, np.ndarray], LoweringReport, Any]:
    """The reference lowered to an integer Relax program for ``target``: ``(mod, params,
    report, tuning)``; ``tune`` MetaSchedule trials for the kernels the target's tuning
    database lacks (``tuning``: the report, ``None`` without)."""
    mod, params, report = lower(reference, target=target)
    tuning = None
    if tune:
        from .tuning import tune as tune_kernels

        tuning = tune_kernels(mod, target, trials=tune)
    return mod, params, report, tuning


def package(fp32: torch.fx.GraphModule, gm: torch.fx.GraphModule,
            reference: torch.fx.GraphModule, assignment: Assignment, program: tuple,
            target: Any, *, sensitivity: Mapping[str, float] | None = None,
            manifest_extra: Mapping[str, Any] | None = None, fidelity: Any = None,
            tuning: Any = None) -> Compiled:
    """The lowered ``program`` ``(mod, params, report)`` built into an :class:`Artifact`
    (the reference's output on the example inputs as its sample, the layer table and totals
    in its manifest), as a :class:`Compiled`."""
    mod, params, report = program
    example_inputs = EXAMPLE_INPUTS.get(fp32).args
    fp32_totals: CostTotals = COST_TOTALS.get(fp32)
    totals = COST_TOTALS.get(gm)
    with torch.no_grad():
        sample_out = reference(*example_inputs)
    sample_in = [t.detach().numpy().astype(np.float32) if t.is_floating_point()
                 else t.detach().numpy() for t in example_inputs]
    outs = list(sample_out.values()) if isinstance(sample_out, dict) else \
        sample_out if isinstance(sample_out, (tuple, list)) else [sample_out]
    layers = _layer_rows(gm, fp32, assignment, sensitivity)
    constant_bytes = program_constant_bytes(reference)
    summary = {
        # what the artifact stores for parameters: the weights file and the float islands'
        # constants in the library (the cost model's prediction: totals.weight_bytes)
        "macs": totals.macs, "bops": totals.bops,
        "weight_bytes": report.param_bytes + constant_bytes,
        "predicted_weight_bytes": totals.weight_bytes, "constant_bytes": constant_bytes,
        "fp32_macs": fp32_totals.macs, "fp32_bops": fp32_totals.fp32_bops,
        "fp32_weight_bytes": fp32_totals.fp32_weight_bytes,
        "bop_reduction": fp32_totals.fp32_bops / totals.bops if totals.bops else float("inf"),
        "param_bytes": report.param_bytes,
    }
    float_ops = [(f.node, f.op) for f in report.float_ops]
    build_kwargs = dict(
        layers=layers, totals=summary,
        reference_sample=(sample_in, [o.detach().numpy() for o in outs]),
        sample_tolerance=(0.0, 0.0),
        prepare_params=any("packed" in v for v in report.weight_storage.values()),
        output_keys=list(sample_out) if isinstance(sample_out, dict) else None,
        extra={"assignment": assignment.to_json(), "float_ops": float_ops,
               "channel_groups": len(CHANNEL_GROUPS.get(fp32)), "fidelity": to_json(fidelity),
               **(manifest_extra or {})})
    artifact = Artifact.build(mod, params, target, **build_kwargs)
    return Compiled(gm, reference, artifact, report, assignment, layers, summary, float_ops,
                    mod, params, build_kwargs, tuning=tuning, fidelity=fidelity)
