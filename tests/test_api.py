"""pqcompile.compile end to end: the budget holds on the built model, errors, determinism."""

import numpy as np
import pytest
import torch

import pqcompile
from pqcompile import Budget, InfeasibleBudgetError
from pqcompile.build import analysis
from pqcompile.meta import BITS, COST_TOTALS
from pqcompile.models import resnet20
from pqcompile.passes import CostAnalysis


def _model():
    torch.manual_seed(0)
    return resnet20(num_classes=10, in_channels=1).eval()


def _recomputed_bops(compiled):
    """BOPs of the built graph, recounted from its annotations (not the solver's numbers)."""
    gm = compiled.graph
    for node in gm.graph.nodes:
        if node.name in compiled.assignment.bits:
            assert BITS.get(node) == compiled.assignment.bits[node.name]
    return COST_TOTALS.get(CostAnalysis()(gm).graph_module).bops


@pytest.mark.parametrize("ratio", [30, 60])
def test_budget_is_honoured_by_the_built_model(ratio):
    model, x = _model(), torch.randn(4, 1, 32, 32)
    c = pqcompile.compile(model, (x,), target="host", budget=Budget(bops=f"{ratio}x"))
    fp32_bops = COST_TOTALS.get(analysis(model, (x,))).fp32_bops
    bops = _recomputed_bops(c)
    assert bops <= fp32_bops / ratio
    assert bops == c.totals["bops"] == c.solution.costs["bops"]
    assert c.totals["bop_reduction"] >= ratio
    assert "example inputs" in c.calibration
    np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
    assert "total:" in c.report() and "G BOPs" in c.report()


def test_infeasible_budget_states_the_minimum():
    model, x = _model(), torch.randn(1, 1, 32, 32)
    with pytest.raises(InfeasibleBudgetError, match=r"bops <= .* asked, smallest reachable is") as info:
        pqcompile.compile(model, (x,), target="host", budget=Budget(bops="5000x"))
    assert info.value.minimum["bops"] > COST_TOTALS.get(analysis(model, (x,))).fp32_bops / 5000


def test_same_seed_same_assignment():
    x = torch.randn(2, 1, 32, 32)
    a = pqcompile.compile(_model(), (x,), target="host", budget="bops=150x").assignment
    b = pqcompile.compile(_model(), (x,), target="host", budget="bops=150x").assignment
    assert a == b and a.masks


def test_bad_arguments():
    model, x = _model(), torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="budget is required"):
        pqcompile.compile(model, (x,), target="host")
    with pytest.raises(TypeError, match="budget must be a pqcompile Budget"):
        pqcompile.compile(model, (x,), target="host", budget=60)
    with pytest.raises(ValueError, match="finetune needs data"):
        pqcompile.compile(model, (x,), target="host", budget="bops=8x", finetune={"epochs": 1})
    with pytest.raises(ValueError, match="unknown finetune options"):
        pqcompile.compile(model, (x,), target="host", budget="bops=8x", finetune={"epoch": 1},
                          data=[(x, torch.zeros(1, dtype=torch.long))])
    with pytest.raises(ValueError, match="data is empty"):
        pqcompile.compile(model, (x,), target="host", budget="bops=8x", data=[])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pqcompile.compile(model, (x,), target="host", budget="bops=8x")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
