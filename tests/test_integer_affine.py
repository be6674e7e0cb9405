"""Unfolded batch norms as integer per-channel affine maps (pqcompile.quant.affine).

Pre-activation blocks (BN -> ReLU -> padded conv, DenseNet's norm after a concatenation) compile
with no float op, the program equals the integer reference bit for bit, the per-channel
multiplier and offset are checked against a hand computation, and the ONNX export computes the
same integers with integer ops.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import pqcompile
from pqcompile import presets
from pqcompile.assignment import Assignment
from pqcompile.build import analysis, compile_assignment
from pqcompile.meta import BITS, COST, COST_TOTALS, BitWidths, QParams
from pqcompile.export.onnx_export import export_onnx
from pqcompile.passes import CostAnalysis, ShapeAnalysis
from pqcompile.quant import build_reference, integer_outputs
from pqcompile.quant.affine import QAffine, channel_params
from pqcompile.quant.qmodules import Dequantize


def _random_stats(*norms: nn.Module) -> None:
    with torch.no_grad():
        for bn in norms:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()  # some negative: the multiplier carries the sign
            bn.bias.normal_()


class PreActivation(nn.Module):
    """BN -> ReLU -> conv with padding (cannot fold: a padded zero is no zero after a BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(self.stem(x) * 1.0)))


class ConcatNorm(nn.Module):
    """A dense block's tail: concatenation, then a norm (no conv before it to fold into)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(9)
        self.head = nn.Conv2d(9, 4, 1)

    def forward(self, x):
        y = self.bn(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(torch.relu(y)), y


def _compile(model, layers):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 10, 10, generator=g)
    return compile_assignment(model, (x,), Assignment.uniform(layers, 8, 8), target="host",
                              calibration=[torch.randn(32, 3, 10, 10, generator=g)]), g


def _affine_nodes(c):
    return {n.name: c.reference.get_submodule(n.target) for n in c.reference.graph.nodes
            if n.op == "call_module" and isinstance(c.reference.get_submodule(n.target),
                                                    QAffine)}


@pytest.mark.parametrize("model_cls, layers", [(PreActivation, ["stem", "conv"]),
                                               (ConcatNorm, ["a", "b", "head"])])
def test_block_compiles_without_float_ops_and_equals_the_reference(model_cls, layers):
    torch.manual_seed(0)
    model = model_cls()
    _random_stats(model.bn)
    model.eval()
    c, g = _compile(model, layers)
    assert c.lowering.float_ops == ()
    affine = _affine_nodes(c)
    assert list(affine) == ["bn"]
    # the ReLU after the norm is its clamp (unsigned output) unless the norm has other readers
    fused = model_cls is PreActivation
    assert (affine["bn"].lo, affine["bn"].out.signed) == ((0, False) if fused else (-127, True))
    assert bool((affine["bn"].mult < 0).any())  # negative gammas
    for _ in range(3):
        x = torch.randn(1, 3, 10, 10, generator=g)
        ours = c(x.numpy())
        ours = ours if isinstance(ours, (list, tuple)) else [ours]
        ref = c.reference(x)
        ref = ref if isinstance(ref, (list, tuple)) else [ref]
        for o, r in zip(ours, ref):
            assert np.array_equal(np.asarray(o), r.numpy())
        with torch.no_grad():  # and it is the model, quantized
            want = model(x)
            want = want if isinstance(want, tuple) else (want,)
            for r, w in zip(ref, want):
                assert float((r - w).norm() / w.norm()) < 0.06


def test_channel_multiplier_against_a_hand_computation():
    bn = nn.BatchNorm2d(2, eps=0.0)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
        bn.running_mean.copy_(torch.tensor([2.0, 0.0]))
        bn.weight.copy_(torch.tensor([-1.5, 1.0]))
        bn.bias.copy_(torch.tensor([0.25, 0.0]))
    bn.eval()
    # channel 0: k = -1.5 / 2 = -0.75, s = 0.25 + 2 * 0.75 = 1.75; s_in 0.1, s_out 0.05:
    # M = 0.1 * -0.75 / 0.05 = -1.5 = -(0.75 * 2^31) * 2^-30, B = 1.75 / 0.05 = 35
    m = QAffine.from_norm(bn, QParams(0.1, 8, True), QParams(0.05, 8, True), -127, 127)
    assert (int(m.mult[0]), int(m.shift[0])) == (-1610612736, 30)
    assert int(m.offset[0]) == 35 * 2 ** 30 + 2 ** 29
    assert channel_params(-0.75, 1.75, 0.1, 0.05, 127) == (-1610612736, 30, 35 * 2 ** 30)
    # q = 3: 3 * 0.1 * -0.75 + 1.75 = 1.525 = 30.5 steps, rounded half up: 31
    # q = 100: -7.5 + 1.75 = -5.75 = -115 steps; channel 1 (M = 2, B = 0) clamps 200 to 127
    x = torch.tensor([3.0, 100.0, -4.0]).view(3, 1, 1, 1).expand(3, 2, 1, 1)
    y = m(x)
    assert y[:, 0].flatten().tolist() == [31.0, -115.0, 41.0]  # -4: 6 + 35 = 41
    assert y[:, 1].flatten().tolist() == [6.0, 127.0, -8.0]


def test_onnx_export_computes_the_affine_with_integer_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6))
    _random_stats(model[0], model[2])
    model.eval()
    x = torch.randn(4, 6, 5, 5)
    gm = pqcompile.trace(model, (x,))
    ref = build_reference(gm, Assignment.uniform([], 8, 8), [torch.randn(8, 6, 5, 5)])
    onnx_model = export_onnx(ref)
    ops = [n.op_type for n in onnx_model.graph.node]
    assert ops.count("BitShift") == 2 and "BatchNormalization" not in ops
    sess = ort.InferenceSession(onnx_model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    step = next(m.out.scale for m in ref.modules() if isinstance(m, Dequantize))
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 3
        ours = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        want = integer_outputs(ref, x)[0].numpy()
        assert np.array_equal(np.round(ours / step).astype(np.int64), want)
        assert len(np.unique(want)) > 20  # values, not a saturated clamp


def test_costs_per_channel_words_and_no_macs():
    torch.manual_seed(0)
    model = PreActivation().eval()
    gm = pqcompile.trace(model, (torch.randn(1, 3, 10, 10),))
    gm = ShapeAnalysis()(gm).graph_module
    for n in gm.graph.nodes:  # bits on the layers: the graph is costed as the program
        if n.name in ("stem", "conv"):
            BITS.set(n, BitWidths(8, 8))
    gm = CostAnalysis()(gm).graph_module
    bn = next(n for n in gm.graph.nodes if n.name == "bn")
    cost = COST.get(bn)
    # 8 channels x (int32 multiplier + int32 shift + int64 offset) = 8 x 16 bytes
    assert (cost.macs, cost.bops, cost.weight_bytes) == (0, 0, 128)
    stem = 8 * 3 * 9 + 8 * 12  # int8 weights + int32 bias, multiplier, shift
    conv = 6 * 8 * 9 + 6 * 12
    table = 256  # stem(x) * 1.0: a pointwise op of one tensor, a 256-entry int8 table
    assert COST_TOTALS.get(gm).weight_bytes == stem + conv + 128 + table


def test_densenet121_has_no_float_norms_and_equals_the_reference():
    """DenseNet's pre-activation norms (after each concatenation) were 62 float islands;
    all are integer affine maps now: the program has no float op and equals the reference."""
    torch.manual_seed(0)
    model = torchvision.models.densenet121().eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    _random_stats(*norms)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 64, 64, generator=g)
    gm = analysis(model, (x,))
    a = presets.uniform(gm, 8)
    c = compile_assignment(model, (x,), a, target="host",
                           calibration=[torch.randn(4, 3, 64, 64, generator=g)])
    assert c.lowering.float_ops == ()
    # 58 dense layers' norm1 + 3 transitions' norm + norm5 (norm0 folds into conv0)
    assert len(_affine_nodes(c)) == 58 + 3 + 1
    for _ in range(2):
        x = torch.randn(1, 3, 64, 64, generator=g)
        assert np.array_equal(c(x.numpy()), c.reference(x).numpy())
