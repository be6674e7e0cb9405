"""Integer elementwise ops (pqcompile.quant.lut, pqcompile.lower.lut).

Pointwise ops of one 8-bit tensor (hardswish, hardsigmoid, sigmoid, SiLU, GELU, tanh, ELU,
leaky ReLU, mish, arithmetic with Python numbers) compile for the host as 256-entry tables with
no float op left, and the program equals its integer reference bit for bit, on signed (a conv's
output) and unsigned (after a folded ReLU) inputs; a squeeze-excite block's ``x * sigmoid(s)``
is an integer product with one fixed-point requantization. A table is checked entry by entry
against hand-computed codes; an input wider than 8 bits keeps the op in float; the ONNX export
gathers the same table.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pqcompile.assignment import Assignment
from pqcompile.build import compile_assignment
from pqcompile.meta import FLOAT_OPS, QParams
from pqcompile.export.onnx_export import export_onnx
from pqcompile.quant import build_reference, integer_outputs
from pqcompile.quant.lut import QLut, QMul, make_table

OPS = {
    "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "sigmoid": torch.sigmoid,
    "silu": nn.SiLU(), "gelu": F.gelu, "tanh": nn.Tanh(), "elu": nn.ELU(),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "mish": nn.Mish(),
    "scalar": lambda x: 3.0 - x * 0.5,
}


class Pointwise(nn.Module):
    """``op`` on a signed tensor (a conv's output) and on an unsigned one (after a ReLU)."""

    def __init__(self, op) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.op, self.head = op, nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([self.op(self.c1(x)), self.op(F.relu(self.c2(x)))], 1))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.SiLU()
        self.reduce, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.act(self.conv(x))
        s = self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return self.head(x * torch.sigmoid(s))


def _inputs(n: int, seed: int, shape=(1, 3, 12, 12)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _compile(model, layers):
    torch.manual_seed(0)
    x = _inputs(1, 0)[0]
    return compile_assignment(model.eval(), (x,), Assignment.uniform(layers, 8, 8),
                              target="host", calibration=_inputs(2, 1, (4, 3, 12, 12)))


def _modules(ref, kind) -> list:
    return [m for m in ref.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", list(OPS))
def test_pointwise_op_is_a_table_and_the_program_equals_its_reference(name):
    torch.manual_seed(0)
    c = _compile(Pointwise(OPS[name]), ["c1", "c2", "head"])
    assert c.float_ops == []
    luts = _modules(c.reference, QLut)
    half = 2 if name == "scalar" else 1  # 3 - x * 0.5: two tables a branch
    assert len(luts) == 2 * half
    assert (luts[0].offset, luts[half].offset) == (-128, 0)  # signed, unsigned input
    for x in _inputs(3, 2):
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())


def test_squeeze_excite_multiply_is_integer():
    torch.manual_seed(0)
    model = SqueezeExcite()
    c = _compile(model, ["conv", "reduce", "expand", "head"])
    assert c.float_ops == []
    (mul,) = _modules(c.reference, QMul)
    assert mul.out.signed and 1 <= mul.shift <= 62
    for x in _inputs(3, 2):
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
        with torch.no_grad():  # the quantized model stays near the float one
            y = model(x)
            assert (c.reference(x) - y).norm() / y.norm() < 0.05


def test_hardsigmoid_table_entries_by_hand():
    inp, out = QParams(0.05, 8, True), QParams(1 / 256, 8, False)
    table = make_table(F.hardsigmoid, inp, out, 0, 255)
    assert table.shape == (256,)
    # hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1); code = clamp(floor(256 y + 1/2), 0, 255):
    # q = 30: x = 1.5, y = 0.75 -> 192; q = -30: y = 0.25 -> 64; q = 0: y = 0.5 -> 128;
    # q = 7: x = 0.35, y = 0.5583.., 142.93 -> 143; q = 61: x = 3.05, y = 1 -> 256 -> 255;
    # q = -61: y = 0 -> 0
    for q, want in ((30, 192), (-30, 64), (0, 128), (7, 143), (61, 255), (-61, 0),
                    (127, 255), (-127, 0)):
        assert int(table[q + 128]) == want, q
    assert int(table[0]) == int(table[1])  # code -128 never occurs: it repeats -127
    t = make_table(F.hardsigmoid, QParams(0.05, 8, False), out, 0, 255)  # index = code
    assert [int(t[q]) for q in (0, 7, 30, 255)] == [128, 143, 192, 255]


def test_wider_input_keeps_the_op_in_float():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return F.gelu(self.a(x) + self.b(x))

    from pqcompile import trace

    x = _inputs(1, 0)[0]
    gm = trace(Residual().eval(), (x,))
    a = Assignment.uniform(["a", "b"], 8, 8)
    calib = _inputs(2, 1, (4, 3, 12, 12))
    assert [f.op for f in FLOAT_OPS.get(build_reference(gm, a, calib))] == []
    wide = build_reference(gm, a, calib, residual_bits=12)
    assert [f.op for f in FLOAT_OPS.get(wide)] == ["gelu"]


def test_onnx_export_gathers_the_table():
    torch.manual_seed(0)
    c = _compile(SqueezeExcite(), ["conv", "reduce", "expand", "head"])
    model = export_onnx(c)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gather") == 3 and "Mul" in ops
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    scale = c.lowering.outputs[0].scale
    for x in _inputs(2, 2):
        (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        got = np.round(y.astype(np.float64) / scale).astype(np.int64)
        want = integer_outputs(c.reference, x)[0].numpy()
        assert np.abs(got - want).max() <= 1  # the head's float32 QuantizeLinear rounding


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_zoo_models_compile_without_float_ops(name):
    """Hardswish/hardsigmoid (MobileNetV3), SiLU and the squeeze-excite sigmoid and product
    (EfficientNet): all integer, the program equal to its reference (random weights, 64x64)."""
    import torchvision
    from test_parity import batches, randomize_bn

    from pqcompile import presets
    from pqcompile.build import analysis

    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)())
    x = torch.randn(1, 3, 64, 64)
    c = compile_assignment(model, (x,), presets.uniform(analysis(model, (x,)), 8),
                           target="host", calibration=batches(2, (4, 3, 64, 64), seed=1))
    assert c.float_ops == []
    assert len(_modules(c.reference, QLut)) >= 20 and len(_modules(c.reference, QMul)) >= 9
    for xi in batches(2, (1, 3, 64, 64), seed=5):
        np.testing.assert_array_equal(c(xi.numpy()), c.reference(xi).numpy())
