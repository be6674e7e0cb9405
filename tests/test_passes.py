"""Pass framework: requires/provides checking, Pipeline order errors, instruments."""

import pytest
import torch
from torch import nn

import pqcompile
from pqcompile.errors import MissingAnnotationError, PipelineError
from pqcompile.meta import COST, SHAPE, MetaKey
from pqcompile.passes import (CostAnalysis, GraphDumpInstrument, PassContext, PassResult,
                              ShapeAnalysis, TimingInstrument, graph_pass, provided_keys)

RELU_COUNT = MetaKey("test.relu_count", "count_relus", "number of ReLU nodes", "graph")


@graph_pass(requires=(SHAPE,), provides=(RELU_COUNT,))
def count_relus(gm, ctx):
    RELU_COUNT.set(gm, sum(isinstance(gm.get_submodule(n.target), nn.ReLU)
                           for n in gm.graph.nodes if n.op == "call_module"))


@graph_pass(provides=(), invalidates=(SHAPE,))
def relu_to_gelu(gm, ctx):
    """A rewrite: every ReLU module node becomes a torch.nn.functional.gelu call."""
    changed = False
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU):
            with gm.graph.inserting_after(n):
                new = gm.graph.call_function(torch.nn.functional.gelu, n.args)
            new.meta.update(n.meta)  # carry annotations forward
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
            changed = True
    gm.recompile()
    return changed


def _gm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU())
    return pqcompile.trace(model, (torch.randn(1, 3, 8, 8),))


def test_pipeline_runs_in_order_and_tracks_keys():
    gm = _gm()
    result = pqcompile.Pipeline([ShapeAnalysis(), count_relus, CostAnalysis()])(gm)
    assert isinstance(result, PassResult) and result.modified is False
    assert RELU_COUNT.get(result.graph_module) == 2
    assert {"tensor_meta", "pqc.cost", "test.relu_count"} <= provided_keys(result.graph_module)


def test_pipeline_rejects_bad_order_when_built():
    with pytest.raises(PipelineError, match="count_relus requires tensor_meta.*ShapeAnalysis"):
        pqcompile.Pipeline([count_relus, ShapeAnalysis()])
    with pytest.raises(PipelineError, match=r"CostAnalysis requires tensor_meta.*relu_to_gelu"):
        pqcompile.Pipeline([ShapeAnalysis(), relu_to_gelu, CostAnalysis()])
    # Re-running the analysis after the rewrite is a valid order.
    pqcompile.Pipeline([ShapeAnalysis(), relu_to_gelu, ShapeAnalysis(), CostAnalysis()])


def test_pipeline_rejects_non_pass():
    with pytest.raises(TypeError, match="item 1 is function.*graph_pass"):
        pqcompile.Pipeline([ShapeAnalysis(), lambda gm, ctx: None])


def test_single_pass_checks_requires_at_run_time():
    with pytest.raises(PipelineError, match="requires tensor_meta.*run ShapeAnalysis first"):
        CostAnalysis()(_gm())
    with pytest.raises(TypeError, match="call pqcompile.trace"):
        ShapeAnalysis()(nn.Linear(2, 2))


def test_missing_annotation_names_node_and_pass():
    gm = _gm()
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    with pytest.raises(MissingAnnotationError, match=r"node '_0'.*pqc.cost.*run CostAnalysis"):
        COST.get(node)


def test_rewrite_carries_meta_and_stays_correct():
    gm = _gm()
    x = torch.randn(2, 3, 8, 8)
    pipe = pqcompile.Pipeline([ShapeAnalysis(), relu_to_gelu])
    result = pipe(gm)
    assert result.modified
    gelus = [n for n in result.graph_module.graph.nodes
             if n.target is torch.nn.functional.gelu]
    assert len(gelus) == 2 and all(SHAPE.has(n) for n in gelus)
    g = result.graph_module
    model = nn.Sequential(g.get_submodule("0"), nn.GELU(), g.get_submodule("2"), nn.GELU())
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_instruments_time_and_dump(tmp_path):
    timing = TimingInstrument()
    ctx = PassContext(instruments=[timing, GraphDumpInstrument(tmp_path)])
    pqcompile.Pipeline([ShapeAnalysis(), count_relus, CostAnalysis()])(_gm(), ctx)
    assert [name for name, _ in timing.timings] == ["ShapeAnalysis", "count_relus",
                                                    "CostAnalysis", "pipeline"]
    seconds = [s for _, s in timing.timings]
    assert min(seconds) >= 0 and seconds[-1] >= sum(seconds[:-1])
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["001_ShapeAnalysis.txt", "002_count_relus.txt", "003_CostAnalysis.txt"]
    assert "pqc.cost" in (tmp_path / "003_CostAnalysis.txt").read_text()
    assert "CostAnalysis" in timing.summary()
