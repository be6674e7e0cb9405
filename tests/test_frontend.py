"""Frontend: tracing, the user's model left untouched, and clear errors on bad input."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import pqcompile
from pqcompile.errors import ExampleInputError, TraceError
from pqcompile.meta import EXAMPLE_INPUTS


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return self.fc(x)
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.branchy = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.branchy(self.stem(x)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_trace_resnet18_matches_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    before = _state(model)
    x = torch.randn(1, 3, 64, 64)
    gm = pqcompile.trace(model, (x,))
    assert model.training, "trace must not switch the user's model to eval mode"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.eval()(x))
    convs = [n for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    assert len(convs) == 20
    assert torch.equal(EXAMPLE_INPUTS.get(gm).args[0], x)
    # Parameters are copies: changing the graph never reaches the model.
    gm.get_submodule("conv1").weight.data.zero_()
    assert torch.equal(model.conv1.weight, before["conv1.weight"])


def test_bare_layer_is_kept_as_module_node():
    gm = pqcompile.trace(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


@pytest.mark.parametrize("bad", [None, lambda x: x, "resnet18", torch.randn(3)])
def test_not_a_module(bad):
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        pqcompile.trace(bad, (torch.randn(1, 3),))


@pytest.mark.parametrize("bad", [(), [], "x", (torch.randn(1, 4), 3), None])
def test_bad_example_inputs_container(bad):
    with pytest.raises(ExampleInputError, match="example_inputs"):
        pqcompile.trace(nn.Linear(4, 2), bad)


def test_wrong_example_input_shape_names_the_node():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with pytest.raises(ExampleInputError) as info:
        pqcompile.trace(model, (torch.randn(1, 3, 10, 10),))
    msg = str(info.value)
    assert "node '_3' (call_module 3: Linear(in_features=288" in msg
    assert "input shapes [(1, 512)]" in msg and "While executing" not in msg


def test_too_many_example_inputs():
    with pytest.raises(ExampleInputError, match="2 example inputs given but forward"):
        pqcompile.trace(nn.Linear(4, 2), (torch.randn(1, 4), torch.randn(1, 4)))


def test_untraceable_submodule_names_module_line_and_way_out():
    model = Outer()
    with pytest.raises(TraceError) as info:
        pqcompile.trace(model, (torch.randn(1, 4),))
    msg = str(info.value)
    assert "'branchy'" in msg and "DataDependent" in msg
    assert "test_frontend.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=['branchy']" in msg and "fallback='leaf'" in msg


def test_untraceable_top_level_forward():
    with pytest.raises(TraceError, match="top-level DataDependent.forward"):
        pqcompile.trace(DataDependent(), (torch.randn(1, 4),))


@pytest.mark.parametrize("how", ["leaf_modules", "fallback"])
def test_untraceable_ways_out(how):
    torch.manual_seed(0)
    model = Outer()
    snapshot = copy.deepcopy(model)
    kwargs = {"leaf_modules": ["branchy"]} if how == "leaf_modules" else {"fallback": "leaf"}
    gm = pqcompile.trace(model, (torch.randn(1, 4),), **kwargs)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["stem", "branchy", "head"]
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), snapshot(x))
    assert gm.meta["pqc.leaf_modules"] == ["branchy"]


def test_leaf_module_by_class_and_unknown_path():
    gm = pqcompile.trace(Outer(), (torch.randn(1, 4),), leaf_modules=[DataDependent])
    assert "branchy" in [n.target for n in gm.graph.nodes]
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        pqcompile.trace(Outer(), (torch.randn(1, 4),), leaf_modules=["nope"])
    with pytest.raises(ValueError, match="fallback must be one of"):
        pqcompile.trace(Outer(), (torch.randn(1, 4),), fallback="export")
