"""compile() as its pipeline: registered, printable, editable stages; compile() equal to the
explicit pipeline run and to the stages' functions called by hand; the torch.export frontend."""

import numpy as np
import pytest
import torch
from torch import nn

import pqcompile
from pqcompile.build import analysis, finish, prepare
from pqcompile.candidates import public, solver_candidates
from pqcompile.errors import OptionError, PipelineError
from pqcompile.meta import BITS
from pqcompile.passes import SensitivityAnalysis
from pqcompile.passes.sensitivity import channel_importance, layer_sensitivities
from pqcompile.pipeline import compile_context, get_pipeline
from pqcompile.solvers import build_problem, get_solver, resolve_limits, to_assignment
from pqcompile.solvers.problem import DEFAULT_BIT_OPTIONS, DEFAULT_KEEP_FRACTIONS
from pqcompile.solvers.verdict import solution_notes

STAGES = ["trace", "shapes", "groups", "costs", "sensitivity", "latency", "solve",
          "weight-rounding", "fine-tune", "prune", "fold", "quantize", "lower", "build"]
FILES = ("lib.so", "weights.bin", "sample.bin", "manifest.json", "runner.py")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 10)).eval(), torch.randn(1, 3, 8, 8)


def test_default_pipeline_is_registered_printable_and_edited_by_name():
    pipe = pqcompile.get_pipeline("default")
    assert pipe.names == STAGES and "default" in pqcompile.list_pipelines()
    text = str(pipe)
    assert "solve" in text and "provides pqc.bits, pqc.keep_masks" in text

    @pqcompile.graph_pass(requires=(BITS,))
    def look(gm, ctx):
        pass

    edited = pipe.insert_after("solve", look)
    assert edited.names == STAGES[:7] + ["look"] + STAGES[7:] and pipe.names == STAGES
    assert pipe.insert_before("prune", look).names.index("look") == STAGES.index("prune")
    assert pipe.remove("latency").names == [s for s in STAGES if s != "latency"]
    assert pipe.replace("latency", pqcompile.graph_pass(lambda gm, ctx: None, name="noop")
                        ).names[5] == "noop"
    with pytest.raises(PipelineError, match="requires pqc.bits"):
        pipe.insert_before("solve", look)  # no pass before solve provides bits
    with pytest.raises(PipelineError, match="no pass 'slove'.*'solve'"):
        pipe.insert_after("slove", look)
    with pytest.raises(OptionError, match="unknown pipeline 'defualt'"):
        pqcompile.get_pipeline("defualt")


def test_compile_rejects_bad_passes_before_any_stage():
    model, x = _model()
    with pytest.raises(OptionError, match="'after:solve' or|'before:STAGE' or 'after:STAGE'"):
        pqcompile.compile(model, (x,), target="host", budget="bops=40x",
                          passes={"solve": get_pipeline().passes[0]})
    with pytest.raises(OptionError, match="not a Pass"):
        pqcompile.compile(model, (x,), target="host", budget="bops=40x",
                          passes={"after:solve": print})
    with pytest.raises(PipelineError, match="shapes requires pqc.example_inputs"):
        get_pipeline().remove("trace")  # the edit itself is checked


def test_compile_equals_the_explicit_pipeline_and_the_stages_by_hand(tmp_path):
    """Every artifact file byte for byte: library, weights, sample, manifest, runner."""
    model, x = _model()
    budget = pqcompile.Budget(bops="40x")
    compiled = pqcompile.compile(model, (x,), target="host", budget=budget)
    assert list(compiled.timings) == [s for s in STAGES
                                      if s not in ("latency", "weight-rounding", "fine-tune")]

    ctx = compile_context(model, (x,), target="host", budget=budget)
    get_pipeline("default")(None, ctx)
    explicit = ctx.compiled

    # the same stages as plain function calls, the order compile() ran them in before
    torch.manual_seed(0)
    fp32 = analysis(model, (x,))
    scored = SensitivityAnalysis(None, None, bit_options=DEFAULT_BIT_OPTIONS)(fp32).graph_module
    importance = channel_importance(scored)
    problem = build_problem(scored, layer_sensitivities(scored), importance,
                            bit_options=DEFAULT_BIT_OPTIONS, keep_levels=DEFAULT_KEEP_FRACTIONS,
                            multiple=4)
    solver = get_solver("ilp")
    solution = solver.solve(problem, budget)
    assignment = to_assignment(solution, scored, importance or None)
    limits = resolve_limits(problem, budget, latency=False)
    candidates = solver_candidates(problem, solver, limits, solution, None, measure=4)
    extra = {"candidates": public(candidates), "solver": solution.solver, "budget": str(budget),
             "calibration": "the example inputs (no data given)",
             "notes": solution_notes(solution) + candidates.notes}
    sensitivity = {lay.name: lay.option_sensitivity(solution.bits[lay.name])
                   for lay in problem.layers}
    by_hand = finish(fp32, prepare(fp32, assignment), assignment, target="host",
                     calibration=[(x,)], sensitivity=sensitivity, manifest_extra=extra)

    assert compiled.assignment == explicit.assignment == by_hand.assignment
    dirs = [c.save(tmp_path / name) for c, name in
            ((compiled, "compile"), (explicit, "explicit"), (by_hand, "by_hand"))]
    for name in FILES:
        data = [(d / name).read_bytes() for d in dirs]
        assert data[0] == data[1] == data[2], name


class ShapeBranch(nn.Module):
    """forward branches on an input's shape: symbolic tracing cannot take ``if`` on a proxy."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.body(x)
        if x.shape[-1] > 6:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_export_frontend_compiles_what_symbolic_trace_cannot():
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    gm = pqcompile.trace(model, (x,), frontend="export")
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["body.0", "body.1", "body.2", "fc"]  # the layers, as fx names them
    assert gm.meta["pqc.shape_specialized"]
    torch.testing.assert_close(gm(x), model(x))
    compiled = pqcompile.compile(model, (x,), target="host", budget="bops=8x",
                                 frontend="export")
    assert set(compiled.assignment.bits) == {"body_0", "fc"}
    out = compiled(x.numpy())
    np.testing.assert_array_equal(out, compiled.reference(x).numpy())
    fx_compiled = pqcompile.compile(model, (x,), target="host", budget="bops=8x")
    assert fx_compiled.assignment == compiled.assignment  # the same graph, the same choice
    np.testing.assert_array_equal(fx_compiled(x.numpy()), out)


def test_unknown_frontend_is_an_option_error():
    model, x = _model()
    with pytest.raises(OptionError, match="frontend must be one of"):
        pqcompile.compile(model, (x,), target="host", budget="bops=40x", frontend="onnx")
