"""Float islands (pqcompile.quant.islands, pqcompile.lower.float_islands) and pre-norm folding.

A conv that stays in float (its weight computed in ``forward()``) with a bias and a keyword
``padding`` builds in float64 and the program equals its integer reference on the host;
islands that translate alike share one Relax function and one TVM check; a batch norm before
an unpadded conv or a linear folds into it (MaxViT's MBConv pre-norm), one before a padded conv
does not. ``x[int]`` and a mask made with ``new_zeros`` and filled in place (swin_t's
shifted-window attention) translate as torch computes them. The slow test builds a MaxViT
(attention, GELU, LayerNorm, einsum, softmax islands).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.maxvit import MaxVit

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.build import compile_assignment
from pqcompile.passes.fold_bn import FoldBatchNorm
from pqcompile.quant import islands
from pqcompile.quant.islands import Slot, make_island
from pqcompile.quant.layernorm import QLayerNorm


class ComputedWeightConv(nn.Module):
    """A conv whose weight is computed in forward(): it stays a float op (layer discovery)."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.keyword = keyword
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        w = self.w * 2.0
        x = F.conv2d(x, w, self.b, padding=1) if self.keyword else \
            F.conv2d(x, w, self.b, 1, 1)
        return self.head(F.relu(x))


def _build(model, x, calib):
    a = Assignment.uniform(["conv", "head"], 8, 8)
    return compile_assignment(model, (x,), a, target="host", calibration=calib)


@pytest.mark.parametrize("keyword", [True, False])
def test_conv_island_with_bias_and_keyword_padding_builds_exactly(keyword):
    torch.manual_seed(0)
    model = ComputedWeightConv(keyword).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 16, 16, generator=g)]
    x = torch.randn(1, 3, 16, 16, generator=g)
    c = _build(model, x, calib)
    assert [(f.node, f.precision) for f in c.lowering.float_ops] == [("conv2d", "float64")]
    for _ in range(3):
        x = torch.randn(1, 3, 16, 16, generator=g)
        ref = c.reference(x).numpy()
        out = c(x.numpy())
        assert out.shape == ref.shape == (1, 4, 16, 16)
        step = c.lowering.outputs[0].scale
        assert np.abs(out.astype(np.float64) - ref).max() <= step * 1.001
    with torch.no_grad():  # and the reference is the model, quantized: close to FP32
        err = (c.reference(x) - model(x)).norm() / model(x).norm()
    assert err < 0.05


def test_keyword_arguments_become_positional_in_the_island():
    w, b = torch.randn(8, 8, 3, 3), torch.randn(8)
    island = make_island(F.conv2d, "call_function", (Slot(0), "\0const0", "\0const1"),
                         {"padding": 1}, [(1, 8, 16, 16)], {"const0": w, "const1": b})
    assert island.precision == "float64"
    conv = next(n for n in island.fn.graph.nodes if n.op == "call_function")
    assert conv.kwargs == {} and conv.args[3:] == ([1, 1], 1)
    x = torch.randn(1, 8, 16, 16, dtype=torch.float64)
    want = F.conv2d(x, w.double(), b.double(), padding=1)
    assert torch.equal(island.fn(x), want)
    # keyword-only arguments stay keywords (GELU's approximate)
    gelu = make_island(F.gelu, "call_function", (Slot(0),), {"approximate": "tanh"}, [(2, 5)])
    node = next(n for n in gelu.fn.graph.nodes if n.op == "call_function")
    assert node.kwargs == {"approximate": "tanh"}


def test_identical_islands_are_checked_once_and_share_a_function():
    before = len(islands._CHECKED)
    for _ in range(3):
        make_island(nn.GELU(), "call_module", (Slot(0),), {}, [(1, 7, 3, 3)])
    assert len(islands._CHECKED) == before + 1

    class TwoGelus(nn.Module):  # layer norms over two dims: a GELU of one tensor is a table,
        def __init__(self):  # a layer norm over the last dim runs in fixed point
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.g1, self.g2 = nn.LayerNorm((6, 6)), nn.LayerNorm((6, 6))

        def forward(self, x):
            return self.g2(self.b(self.g1(self.a(x)))) + x[:, :1]

    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    c = compile_assignment(TwoGelus().eval(), (x,), Assignment.uniform(["a", "b"], 8, 8),
                           calibration=[torch.randn(2, 3, 6, 6)])
    names = [gv.name_hint for gv in c.program.functions if gv.name_hint.startswith("float_")]
    assert len(c.lowering.float_ops) >= 2 and names == ["float_g1"]
    assert np.array_equal(c(x.numpy()), c.reference(x).numpy())


def _random_stats(bn):
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()


def test_pre_norm_folds_into_unpadded_conv_and_linear():
    class PreNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(8)
            self.conv = nn.Conv2d(8, 6, 1, groups=2, stride=2)
            self.bn_pad = nn.BatchNorm2d(6)
            self.padded = nn.Conv2d(6, 4, 3, padding=1)
            self.bn1d = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.padded(self.bn_pad(torch.relu(self.conv(self.bn(x)))))
            return self.fc(self.bn1d(y.mean((2, 3))))

    torch.manual_seed(0)
    m = PreNorm()
    for bn in (m.bn, m.bn_pad, m.bn1d):
        _random_stats(bn)
    m.eval()
    x = torch.randn(2, 8, 8, 8)
    gm = FoldBatchNorm()(pqcompile.trace(m, (x,))).graph_module
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv", "bn_pad", "padded", "fc"]  # a zero pad is no zero after a BN
    with torch.no_grad():
        assert torch.allclose(gm(x), m(x), rtol=1e-5, atol=1e-5)
    assert m.conv.bias is not None and isinstance(m.bn, nn.BatchNorm2d)  # model untouched


def tiny_maxvit() -> nn.Module:
    torch.manual_seed(0)
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=4, block_channels=[8, 16],
                  block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0,
                  num_classes=10).eval()


@pytest.mark.slow
def test_maxvit_program_equals_reference():
    model = tiny_maxvit()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=g)
    c = pqcompile.compile(model, (x,), target="host", budget="bops=8x")
    ops = [op for _, op in c.float_ops]
    # (its GELUs on 8-bit tensors are tables, not islands)
    # (its softmaxes of one 8-bit tensor run in fixed point, pqcompile.quant.softmax, and its
    # layer norms over the last dim, pqcompile.quant.layernorm)
    assert "BatchNorm2d" not in ops and "LayerNorm" not in ops and "einsum" in ops
    assert any(isinstance(m, QLayerNorm) for m in c.reference.modules())
    step = c.lowering.outputs[0].scale
    for _ in range(2):
        x = torch.randn(1, 3, 32, 32, generator=g)
        ref = c.reference(x).numpy()
        assert np.abs(c(x.numpy()).astype(np.float64) - ref).max() <= step * 1.001


def test_integer_index_of_a_tensor_keeps_its_meaning_in_tvm():
    """``x[1]`` drops the first axis (TVM's frontend returned ``x`` itself for an int index)."""
    import operator

    from pqcompile.lower.float_islands import translate_island

    island = make_island(operator.getitem, "call_function", (Slot(0), 1), {}, [(3, 4, 5)])
    assert island.precision == "float64"
    fn = translate_island(island.fn, [(3, 4, 5)])
    assert [int(d) for d in fn.ret_ty.shape] == [4, 5]
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    assert torch.equal(island.fn(x), x[1])


def masked_scores(x):
    """Swin's shifted-window mask: a tensor made from shapes alone, filled in place."""
    mask = x.new_zeros(x.shape[-2:])
    mask[:2, 1:] = -100.0
    return (x + mask).softmax(-1)


def test_a_tensor_made_from_shapes_and_filled_in_place_is_a_constant():
    island = make_island(masked_scores, "call_function", (Slot(0),), {}, [(2, 4, 4)])
    assert island.precision == "float64"
    assert not any(n.op == "call_method" and n.target == "new_zeros"
                   for n in island.fn.graph.nodes)
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    assert torch.equal(island.fn(x), masked_scores(x))
