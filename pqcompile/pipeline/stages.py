"""The stages of ``pqcompile.compile``, each a :class:`~pqcompile.passes.Pass` on the graph
with the :class:`~pqcompile.pipeline.context.CompileContext` as its pass context.

trace (a source pass: it makes the graph) -> shapes -> groups -> costs (the FP32 analysis)
-> sensitivity (criterion scores and the solver's problem) -> latency (the measured table,
for latency budgets) -> solve (the solver; its bits and keep-masks become the graph's
``pqc.bits`` / ``pqc.keep_masks`` annotations) -> weight-rounding (GPTQ, with
``weight_rounding="gptq"``: :mod:`.rounding`) -> fine-tune (QAT, with ``finetune=``) ->
prune -> fold (batch norms; bits written, costs again) -> quantize (calibration, the
integer-exact reference) -> lower (the integer Relax program) -> build (the artifact).

Every stage after solve reads the assignment from the graph's annotations
(:func:`graph_assignment`), so a pass inserted after solve can change what is built. A stage
that does not apply to the arguments (fine-tune without ``finetune``, latency without a
latency budget) passes the graph through.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..assignment import Assignment, check_graph_and_assignment
from ..build import lower_program, package, quantize
from ..candidates import public, solver_candidates
from ..finetune import qat_finetune
from ..frontend.tracer import trace
from ..latency import attach_latency, measure_latency
from ..meta import (BITS, CHANNEL_GROUPS, CHANNEL_IMPORTANCE, COST, COST_TOTALS,
                    EXAMPLE_INPUTS, FOLDED_BN, KEEP_MASKS, KEPT_CHANNELS, LAYER_DISCOVERY,
                    NODE_CHANNELS, REFERENCE, SENSITIVITY, SENSITIVITY_INFO, SHAPE, SOURCE_MODEL)
from ..passes import (ChannelGroupAnalysis, CostAnalysis, FoldBatchNorm, PruneChannels,
                      ShapeAnalysis)
from ..passes.base import Pass, PassInfo, PassResult, provided_keys
from ..passes.sensitivity import SensitivityAnalysis, channel_importance, layer_sensitivities
from ..progress import Tracked
from ..quant.residual import choose_residual_bits, residual_count, residual_note
from ..quant.tables import set_table_bits, table_notes
from ..solvers import build_problem, resolve_limits, to_assignment
from ..solvers.search import SearchContext, needs_context
from ..solvers.verdict import solution_notes, warn_budget
from ..devices import place_criteria
from ..distributed import builds_here
from .checks import batch_inputs, read_batches
from .context import CompileContext


class Stage(Pass):
    """A stage of the compile pipeline: ``run`` gets the :class:`CompileContext`.

    ``applies(ctx)``: whether the stage does anything for these arguments (the progress
    lines number only those that do); ``detail(ctx)``: the text its progress line shows.
    ``builds``: a stage of the build, which under ``torch.distributed`` only rank 0 runs
    (:mod:`pqcompile.distributed`: the other ranks train, then return ``None``).
    """

    builds = False

    def applies(self, ctx: CompileContext) -> bool:
        return True

    def detail(self, ctx: CompileContext) -> str:
        return ""

    def run(self, gm, ctx):
        if not isinstance(ctx, CompileContext):
            raise TypeError(f"stage {self.info.name} runs in a compile context: build it with "
                            "pqcompile.pipeline.compile_context(model, example_inputs, ...)")
        if not self.applies(ctx) or (self.builds and not builds_here()):
            return PassResult(gm, False)
        return self.stage(gm, ctx)

    def stage(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        raise NotImplementedError


def graph_assignment(gm: torch.fx.GraphModule) -> Assignment:
    """The assignment the graph's annotations hold: every node's ``pqc.bits`` and the graph's
    ``pqc.keep_masks`` (what the solve stage wrote, and any pass after it changed)."""
    bits = {n.name: BITS.get(n) for n in gm.graph.nodes if BITS.find(n) is not None}
    return Assignment(bits, dict(KEEP_MASKS.find(gm) or {}))


class Trace(Stage):
    info = PassInfo("trace", provides=(EXAMPLE_INPUTS, SOURCE_MODEL, LAYER_DISCOVERY))
    source = True

    def detail(self, ctx):
        return "torch.export" if ctx.frontend == "export" else ""

    def stage(self, gm, ctx):
        torch.manual_seed(ctx.seed)  # every stage after draws from the seeded generator
        return PassResult(trace(ctx.model, ctx.example_inputs, leaf_modules=ctx.leaf_modules,
                                frontend=ctx.frontend), True)


class Analysis(Stage):
    """One analysis pass as a named stage (same requires/provides)."""

    def __init__(self, name: str, analysis: Pass) -> None:
        self.analysis = analysis
        self.info = PassInfo(name, analysis.info.requires, analysis.info.provides,
                             analysis.info.invalidates)

    def stage(self, gm, ctx):
        result = self.analysis(gm)
        if self.info.name == "costs":  # the FP32 graph every later stage compares with
            ctx.fp32 = set_table_bits(result.graph_module, ctx.table_bits)
        return result


class Sensitivity(Stage):
    info = PassInfo("sensitivity", requires=(CHANNEL_GROUPS, COST),
                    provides=(SENSITIVITY, SENSITIVITY_INFO, CHANNEL_IMPORTANCE))

    def detail(self, ctx):
        return f"{min(ctx.sensitivity_batches, _length(ctx.data))} batches" \
            if ctx.data is not None else "data-free"

    def stage(self, gm, ctx):
        batches = read_batches(ctx.data, ctx.sensitivity_batches, gm)
        scored = place_criteria(SensitivityAnalysis(
            ctx.criterion, Tracked(batches, "sensitivity", ctx.progress) if batches else None,
            channel_criterion=ctx.channel_criterion, bit_options=ctx.bit_options,
            objective=ctx.objective), ctx.device)(gm).graph_module
        ctx.importance = channel_importance(scored)
        ctx.problem = build_problem(scored, layer_sensitivities(scored), ctx.importance,
                                    bit_options=ctx.bit_options, keep_levels=ctx.keep_levels,
                                    multiple=ctx.multiple)
        return PassResult(scored, False)


class Latency(Stage):
    info = PassInfo("latency", requires=(COST,))

    def applies(self, ctx):
        return ctx.timed

    def detail(self, ctx):
        return "given" if ctx.latency_table is not None else \
            f"measured {'here' if ctx.latency_rpc is None else f'on {ctx.latency_rpc}'}"

    def stage(self, gm, ctx):
        if ctx.latency_table is None:
            ctx.latency_table = measure_latency(ctx.problem, gm, ctx.spec, rpc=ctx.latency_rpc,
                                                progress=ctx.progress)
        ctx.problem = attach_latency(ctx.problem, ctx.latency_table)
        return PassResult(gm, False)


class Solve(Stage):
    """The solver under the budget, the candidates it saw (measured on the validation
    batches with data), then its choice written on the graph: ``pqc.bits`` on each layer,
    ``pqc.keep_masks`` (by channel group) on the graph."""

    info = PassInfo("solve", requires=(SENSITIVITY, CHANNEL_GROUPS), provides=(BITS, KEEP_MASKS))

    def detail(self, ctx):
        return getattr(ctx.chosen, "name", str(ctx.solver))

    def stage(self, gm, ctx):
        ctx.teacher = copy.deepcopy(ctx.model).eval()  # the user's model keeps mode, weights
        if ctx.data is not None:
            ctx.search = SearchContext(ctx.problem, gm, teacher=ctx.teacher, data=ctx.data,
                                       held_out=ctx.validation, channel_scores=ctx.importance,
                                       seed=ctx.seed, progress=ctx.progress,
                                       objective=ctx.objective, **_on(ctx.device))
        if needs_context(ctx.chosen):
            solution = ctx.chosen.solve(ctx.problem, ctx.budget, context=ctx.search)
        else:
            solution = ctx.chosen.solve(ctx.problem, ctx.budget)
        # A searching solver may say which channels its kept counts keep (e.g. SBS's gates).
        scores = {**(ctx.importance or {}), **dict(solution.info.get("channel_scores", {}))}
        assignment = to_assignment(solution, gm, scores or None)
        ctx.solution = solution
        ctx.limits = resolve_limits(ctx.problem, ctx.budget,
                                    latency=ctx.budget.latency_ms is not None)
        ctx.candidates = solver_candidates(ctx.problem, ctx.chosen, ctx.limits, solution,
                                           ctx.search, measure=ctx.pareto_points,
                                           progress=ctx.progress)
        ctx.notes = solution_notes(solution) + ctx.candidates.notes
        for node in gm.graph.nodes:
            if node.name in assignment.bits:
                BITS.set(node, assignment.bits[node.name])
        KEEP_MASKS.set(gm, dict(assignment.masks))
        ctx.assignment = assignment
        return PassResult(gm, False)


class FineTune(Stage):
    """QAT fine-tuning of the float graph under the graph's assignment (``finetune=``); the
    trained graph comes out pruned, folded, with bits and costs (prune and fold pass it)."""

    info = PassInfo("fine-tune", requires=(BITS, KEEP_MASKS))

    def applies(self, ctx):
        return bool(ctx.finetune is not None)

    def stage(self, gm, ctx):
        ctx.assignment = assignment = graph_assignment(gm)
        opts = dict(ctx.finetune)
        tuned, amax = qat_finetune(gm, assignment, ctx.data, seed=ctx.seed,
                                   distill_from=ctx.teacher if opts.pop("distill", True)
                                   else None, progress=ctx.progress, observer=ctx.observer,
                                   calibration_batches=ctx.calibration_batches,
                                   objective=ctx.objective, **_on(ctx.device), **opts)
        for node in tuned.graph.nodes:
            if node.name in assignment.bits:
                BITS.set(node, assignment.bits[node.name])
        KEEP_MASKS.set(tuned, dict(assignment.masks))
        ctx.reference_kwargs["activation_amax"] = amax
        ctx.finetuned = True
        return CostAnalysis()(tuned)


class Prune(Stage):
    """The channel groups the keep-masks drop removed for real, on a copy of the graph."""

    builds = True

    info = PassInfo("prune", requires=(BITS, KEEP_MASKS), provides=(SHAPE, KEPT_CHANNELS),
                    invalidates=(CHANNEL_GROUPS, NODE_CHANNELS, COST, COST_TOTALS,
                                 SENSITIVITY, CHANNEL_IMPORTANCE))

    def applies(self, ctx):  # fine-tuning and GPTQ prune and fold (their graphs come out so)
        return ctx.finetune is None and ctx.weight_rounding is None

    def stage(self, gm, ctx):
        ctx.assignment = assignment = graph_assignment(gm)
        check_graph_and_assignment(gm, assignment, "the prune stage")
        assignment.validate(gm)
        work = copy.deepcopy(gm).eval()  # the FP32 graph stays as it is (ctx.fp32)
        if assignment.masks:
            if CHANNEL_GROUPS.name not in provided_keys(work):
                work = ChannelGroupAnalysis()(ShapeAnalysis()(work).graph_module).graph_module
            work = PruneChannels(assignment.masks)(work).graph_module
        return PassResult(work, True)


class Fold(Stage):
    """Batch norms folded into the layers before them, shapes again, bits on the layers,
    costs of the compressed graph."""

    builds = True

    info = PassInfo("fold", requires=(EXAMPLE_INPUTS, BITS),
                    provides=(FOLDED_BN, SHAPE, COST, COST_TOTALS))

    def applies(self, ctx):  # fine-tuning and GPTQ prune and fold (their graphs come out so)
        return ctx.finetune is None and ctx.weight_rounding is None

    def stage(self, gm, ctx):
        ctx.assignment = assignment = graph_assignment(gm)
        work = ShapeAnalysis()(FoldBatchNorm()(gm).graph_module).graph_module
        for node in work.graph.nodes:
            if node.name in assignment.bits:
                BITS.set(node, assignment.bits[node.name])
        return CostAnalysis()(work)


class Quantize(Stage):
    """Calibration on the data's first batches (or the example inputs) and the
    integer-exact reference; the graph that comes out is the reference."""

    builds = True

    info = PassInfo("quantize", requires=(BITS, COST_TOTALS), provides=(REFERENCE,))

    def detail(self, ctx):
        return ctx.observer if isinstance(ctx.observer, str) else ""

    def stage(self, gm, ctx):
        ctx.assignment = assignment = graph_assignment(gm)
        ctx.prepared = gm
        batches = read_batches(ctx.data, ctx.calibration_batches, ctx.fp32)
        n_inputs = len(ctx.example_inputs)  # a batch's first n items are the inputs
        ctx.calibration = [batch_inputs(b) if n_inputs == 1 else tuple(b[:n_inputs])
                           for b in batches] if batches else [tuple(ctx.example_inputs)]
        ctx.calibrated_on = (f"{len(ctx.calibration)} batches of data" if batches
                             else "the example inputs (no data given)")
        if ctx.example_note:
            ctx.calibrated_on += f"; {ctx.example_note}"
        bits = ctx.residual_bits
        if bits == "auto":
            bits, measured = choose_residual_bits(ctx.fp32, gm, assignment, ctx.calibration,
                                                  ctx.observer, **ctx.reference_kwargs)
            ctx.notes.append(residual_note(bits, residual_count(gm, assignment), measured))
        elif bits != 8:
            ctx.notes.append(residual_note(bits, residual_count(gm, assignment)))
        ctx.reference_kwargs["residual_bits"] = bits
        ctx.notes.extend(table_notes(gm))  # embedding tables stored below 8 bits
        ctx.reference, ctx.fidelity = quantize(ctx.fp32, gm, assignment, ctx.calibration,
                                               ctx.observer, ctx.calibrated_on,
                                               **ctx.reference_kwargs)
        REFERENCE.set(ctx.reference, True)
        return PassResult(ctx.reference, True)


class Lower(Stage):
    """The reference as an integer-only Relax program (``ctx.program``), tuned with
    ``tune=``."""

    builds = True

    info = PassInfo("lower", requires=(REFERENCE,))

    def detail(self, ctx):
        return f"{ctx.target}, tuning {ctx.tune} trials" if ctx.tune else str(ctx.target)

    def stage(self, gm, ctx):
        mod, params, report, ctx.tuning = lower_program(gm, ctx.target, ctx.tune)
        ctx.program = (mod, params, report)
        return PassResult(gm, False)


class Build(Stage):
    """The program built for the target and packaged (library, weights, manifest) as the
    :class:`~pqcompile.build.Compiled` ``compile()`` returns (``ctx.compiled``)."""

    builds = True

    info = PassInfo("build", requires=(REFERENCE,))

    def detail(self, ctx):
        return str(ctx.target)

    def stage(self, gm, ctx):
        if ctx.program is None:
            raise TypeError("the build stage needs the lower stage's program: put 'lower' "
                            "before 'build'")
        solution, assignment = ctx.solution, ctx.assignment
        sensitivity = {lay.name: lay.option_sensitivity(option) for lay in ctx.problem.layers
                       if (option := _option(assignment, solution, lay.name)) in lay.options}
        extra = {"candidates": public(ctx.candidates), "solver": solution.solver
                 or str(ctx.solver), "budget": str(ctx.budget),
                 "calibration": ctx.calibrated_on, "notes": ctx.notes}
        if ctx.problem.latency is not None:
            extra["latency"] = {"predicted_ms": solution.costs["latency_ms"],
                                "unpruned_ms": ctx.problem.reference["latency_ms"],
                                "measured": ctx.problem.latency.source}
        compiled = package(ctx.fp32, ctx.prepared, gm, assignment, ctx.program, ctx.target,
                           sensitivity=sensitivity, manifest_extra=extra,
                           fidelity=ctx.fidelity, tuning=ctx.tuning)
        warn_budget(compiled.totals, solution, ctx.limits)
        compiled.solution = solution
        compiled.candidates = ctx.candidates
        compiled.budget = ctx.budget
        compiled.calibration = ctx.calibrated_on
        compiled.latency_table = ctx.latency_table
        ctx.compiled = compiled
        return PassResult(gm, False)


def _option(assignment: Assignment, solution: Any, name: str) -> tuple[int, ...]:
    """A layer's bits as built: the assignment's (a pass after solve may have changed them),
    else the solver's (a layer the assignment leaves out)."""
    bits = assignment.bits.get(name)
    return (bits.weight, bits.activation) if bits is not None else tuple(solution.bits[name])


def _on(device: Any) -> dict[str, Any]:
    """``device=`` for the training-side calls, only when one was given (the CPU default
    path calls them as before)."""
    return {} if device is None else {"device": device}


def _length(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return 1 << 30


def default_stages() -> list[Stage]:
    """Fresh instances of the default pipeline's stages, in order."""
    from .rounding import RoundWeights  # it subclasses Stage: imported once this module is

    return [Trace(), Analysis("shapes", ShapeAnalysis()),
            Analysis("groups", ChannelGroupAnalysis()), Analysis("costs", CostAnalysis()),
            Sensitivity(), Latency(), Solve(), RoundWeights(), FineTune(), Prune(), Fold(),
            Quantize(), Lower(), Build()]
