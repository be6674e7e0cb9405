"""Layer discovery: layers found by what a node computes (pqcompile.passes.layer_discovery).

TF-style same-padding convs (an ``nn.Conv2d`` subclass whose ``forward`` pads and calls
``F.conv2d`` on its own parameters), ``F.conv2d``/``F.linear`` on a module's parameters and
``nn.Conv1d`` become ordinary layers: every one gets bits under a tight BOPs budget, and the
program built for the host equals its integer reference. What cannot become a layer runs in
float, and an unreachable budget says which nodes and why.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pqcompile
from pqcompile.budget import InfeasibleBudgetError
from pqcompile.errors import OptionError, TraceError
from pqcompile.meta import LAYER_DISCOVERY
from pqcompile.passes.layer_discovery import OpaqueLeaf


def same_padding(image: int, k: int, stride: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding (left, right, top, bottom) of a square image."""
    out = math.ceil(image / stride)
    pad = max((out - 1) * stride + k - image, 0)
    return (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)


class Conv2dStaticSamePadding(nn.Conv2d):
    """The EfficientNet-PyTorch port's conv: F.pad, then F.conv2d on its own parameters."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image=16):
        super().__init__(cin, cout, k, stride, bias=bias, groups=groups)
        self.static_padding = same_padding(image, k, stride)

    def forward(self, x):
        x = F.pad(x, self.static_padding)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dZeroPadSame(nn.Conv2d):
    """The other variant: the padding is an nn.ZeroPad2d submodule."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image=16):
        super().__init__(cin, cout, k, stride, bias=bias, groups=groups)
        self.static_padding = nn.ZeroPad2d(same_padding(image, k, stride))

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class TinyEfficientNet(nn.Module):
    """A stem, an MBConv block (expand, depthwise, project, residual), a head."""

    def __init__(self, conv):
        super().__init__()
        self.stem, self.bn0 = conv(3, 16, 3, 2, image=16), nn.BatchNorm2d(16)
        self.expand, self.bn1 = conv(16, 32, 1, image=8), nn.BatchNorm2d(32)
        self.dw, self.bn2 = conv(32, 32, 3, groups=32, image=8), nn.BatchNorm2d(32)
        self.project, self.bn3 = conv(32, 16, 1, image=8), nn.BatchNorm2d(16)
        self.head, self.bn4 = conv(16, 32, 1, image=8), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.expand(x)))
        y = F.relu(self.bn2(self.dw(y)))
        x = self.bn3(self.project(y)) + x
        x = F.relu(self.bn4(self.head(x)))
        return self.fc(x.mean((2, 3)))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return model.eval()


def inputs(shape, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def assert_program_equals_reference(c, xs):
    for x in xs:
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())


def layer_bits(c) -> dict[str, int]:
    return {r["name"]: r["weight_bits"] for r in c.layers}


# --- the TF-style same-padding conv --------------------------------------------------------------


@pytest.mark.parametrize("conv", [Conv2dStaticSamePadding, Conv2dZeroPadSame],
                         ids=["F.pad", "ZeroPad2d"])
def test_same_padding_convs_get_bits_and_compile(conv):
    torch.manual_seed(0)
    model = randomized(TinyEfficientNet(conv))
    snapshot = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    gm = pqcompile.trace(model, (x,))
    convs = [n for n in gm.graph.nodes if n.op == "call_module"
             and type(gm.get_submodule(n.target)) is nn.Conv2d]
    assert len(convs) == 5
    found = LAYER_DISCOVERY.get(gm)
    assert len(found.layers) == 5 and not found.no_bits
    # the pad before each conv stays a node of its own
    for n in convs:
        pad = n.args[0]
        assert (pad.op == "call_function" and pad.target is F.pad) or (
            pad.op == "call_module" and isinstance(gm.get_submodule(pad.target), nn.ZeroPad2d))
    names = [n.name for n in convs]
    if conv is Conv2dStaticSamePadding:  # the parameters' owner is the module path
        assert names == ["stem", "expand", "dw", "project", "head"]
    else:  # the owner also holds the pad: the layer is a child of it
        assert names == ["stem_conv2d", "expand_conv2d", "dw_conv2d", "project_conv2d",
                         "head_conv2d"]

    c = pqcompile.compile(model, (x,), target="host", budget="bops=16x")
    bits = layer_bits(c)
    assert set(bits) == {*names, "fc"}
    assert all(b <= 8 for b in bits.values())      # every conv got bits
    assert c.totals["bop_reduction"] >= 16
    assert c.float_ops == []
    assert_program_equals_reference(c, inputs((2, 3, 16, 16)))
    # the user's model is untouched: same classes, same parameters
    assert type(model.stem) is conv and model.stem.weight.dim() == 4
    for (k, a), (_, b) in zip(model.state_dict().items(), snapshot.state_dict().items()):
        assert torch.equal(a, b), k


# --- functional conv / linear on a module's own parameters --------------------------------------


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8, generator=g) * 0.1)
        self.shared = nn.Parameter(torch.randn(8, 8, 3, 3, generator=g) * 0.1)
        self.proj = nn.Parameter(torch.randn(6, 8, generator=g) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.relu(F.conv2d(x, self.shared, None, 1, 1))        # one weight, called twice
        x = F.relu(F.conv2d(x, self.shared, None, 1, 1))
        return F.linear(x.mean((2, 3)), self.proj)


def test_functional_conv_and_linear_on_own_parameters():
    model = FunctionalNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = pqcompile.trace(model, (x,))
    calls = [(n.name, n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == [("w1_conv2d", "w1_conv2d"), ("shared_conv2d", "shared_conv2d"),
                     ("shared_conv2d_1", "shared_conv2d"), ("proj_linear", "proj_linear")]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert sorted(k for k, _ in gm.named_parameters()) == [
        "proj_linear.weight", "shared_conv2d.weight", "w1_conv2d.bias", "w1_conv2d.weight"]

    c = pqcompile.compile(model, (x,), target="host", budget="bops=12x")
    bits = layer_bits(c)
    assert set(bits) == {"w1_conv2d", "shared_conv2d", "shared_conv2d_1", "proj_linear"}
    assert all(b <= 8 for b in bits.values())
    assert bits["shared_conv2d"] == bits["shared_conv2d_1"]  # one module, one weight width
    assert_program_equals_reference(c, inputs((2, 3, 8, 8)))


# --- nn.Conv1d ------------------------------------------------------------------------------


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.b = nn.Conv1d(16, 16, 3, stride=2, dilation=2, padding=2, groups=4)
        self.tap = nn.Parameter(torch.randn(8, 16, 3) * 0.2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x)))
        x = F.relu(self.b(x))
        x = F.conv1d(x, self.tap, padding=1)
        return self.fc(x.mean(-1))


def test_conv1d_gets_bits_and_compiles():
    torch.manual_seed(0)
    model = randomized(Conv1dNet())
    x = torch.randn(2, 4, 32)
    gm = pqcompile.trace(model, (x,))
    ops = [(n.op, n.target if n.op != "call_function" else n.target.__name__)
           for n in gm.graph.nodes][1:-1]
    # one unsqueeze in, the BatchNorm and ReLUs moved inside, one squeeze out
    assert ops == [("call_method", "unsqueeze"), ("call_module", "a"), ("call_module", "bn"),
                   ("call_function", "relu"), ("call_module", "b"), ("call_function", "relu"),
                   ("call_module", "tap_conv1d"), ("call_method", "squeeze"),
                   ("call_method", "mean"), ("call_module", "fc")]
    assert type(gm.get_submodule("bn")) is nn.BatchNorm2d
    assert gm.get_submodule("b").kernel_size == (1, 3)
    assert gm.get_submodule("b").dilation == (1, 2)

    c = pqcompile.compile(model, (x,), target="host", budget="bops=12x")
    bits = layer_bits(c)
    assert set(bits) == {"a", "b", "tap_conv1d", "fc"}
    assert all(b <= 8 for b in bits.values())
    assert c.float_ops == []
    assert_program_equals_reference(c, inputs((2, 4, 32)))


# --- what cannot become a layer --------------------------------------------------------------


class Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.std = nn.Parameter(torch.randn(4, 8, 3, 3) * 0.1)

    def forward(self, x):
        x = F.relu(self.up(F.relu(self.a(x))))
        w = self.std - self.std.mean((1, 2, 3), keepdim=True)   # weight standardization
        return F.conv2d(x, w, padding=1)


def test_unreachable_budget_names_the_float_nodes_and_why():
    model = Upsampler().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = pqcompile.trace(model, (x,))
    assert type(gm.get_submodule("up")) is nn.ConvTranspose2d  # kept as it is, in float
    with pytest.raises(InfeasibleBudgetError) as info:
        pqcompile.compile(model, (x,), target="host", budget="bops=16x")
    msg = str(info.value)
    # a: 64*8*27 = 13824 MACs; up: 64*8*8*4 = 16384; conv2d: 256*4*72 = 73728; of 103936
    assert "87% of the MACs are in 2 node(s) that get no bits" in msg
    assert "they alone cap the BOP reduction at 1.2x" in msg
    assert "node 'conv2d', 71% of the MACs: conv2d whose weight is computed in forward() by " \
           "node 'sub'" in msg
    assert "node 'up', 16% of the MACs: ConvTranspose2d has no integer lowering" in msg
    assert "give those nodes bits" in msg
    assert info.value.minimum["bops"] == (13824 + 16384 + 73728) * 1024 - 13824 * (1024 - 64)


# --- leaf modules -----------------------------------------------------------------------------


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class GatedNet(nn.Module):
    def __init__(self, gate: nn.Module):
        super().__init__()
        self.stem = Conv2dStaticSamePadding(3, 4, 3, image=8)
        self.conv = nn.Conv2d(4, 32, 3, padding=1)
        self.gate = gate
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        return self.fc(self.gate(x).mean((2, 3)))


def test_leaf_modules_through_compile():
    x = torch.randn(2, 3, 8, 8)
    model = GatedNet(Gate()).eval()
    with pytest.raises(TraceError, match=r"leaf_modules=\['gate'\] \(an argument of "
                                         r"pqcompile.compile and trace\)"):
        pqcompile.compile(model, (x,), target="host", budget="bops=4x")
    with pytest.raises(OptionError, match=r"no submodule 'gates'; did you mean 'gate'\?"):
        pqcompile.compile(model, (x,), target="host", budget="bops=4x", leaf_modules=["gates"])
    with pytest.raises(OptionError, match=r"a list of module paths or classes, e.g. \['gate'\]"):
        pqcompile.compile(model, (x,), target="host", budget="bops=4x", leaf_modules="gate")

    # a leaf layer subclass runs in float, whole; the rest gets bits
    model = GatedNet(nn.Identity()).eval()
    c = pqcompile.compile(model, (x,), target="host", budget="bops=4x", leaf_modules=["stem"])
    assert set(layer_bits(c)) == {"stem", "conv", "fc"}
    assert layer_bits(c)["stem"] == 32 and layer_bits(c)["conv"] <= 8
    assert [node for node, _ in c.float_ops] == ["stem"]
    assert_program_equals_reference(c, inputs((2, 3, 8, 8)))
    with torch.no_grad():  # the float leaf computes what the model's module computes
        ref = c.reference(x)
        assert float((ref - model(x)).abs().max()) < 0.1 * float(model(x).abs().max())


def test_leaf_layer_subclass_is_kept_opaque():
    """A leaf that is an nn.Conv2d by type but pads first must not pass for a plain conv."""
    model = GatedNet(Gate()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = pqcompile.trace(model, (x,), leaf_modules=["stem", "gate"])
    leaf = gm.get_submodule("stem")
    assert isinstance(leaf, OpaqueLeaf) and type(leaf.module) is Conv2dStaticSamePadding
    assert "runs in float as a leaf" in LAYER_DISCOVERY.get(gm).no_bits["stem"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
