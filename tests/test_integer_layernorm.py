"""Layer norm over the last dim of an integer tensor in fixed point (pqcompile.quant.layernorm).

* the integer square root is exact (``math.isqrt``) on the normalized range, edges included;
* the fixed-point codes against the float64 layer norm quantized the same way: at most one step
  apart, and equal on all but a tiny fraction (8-bit and 16-bit inputs, a constant row);
* a model with layer norms builds with no float op: its program (the kernel of
  pqcompile/lower/kernels_layernorm.py) and ONNX Runtime on the exported model (int64 ONNX
  ops) both equal the integer reference bit for bit; on aarch64 too (rows of 16-lane blocks
  and a scalar rest);
* the kernel's 32-bit clamp (``narrow``) only where every channel's shifted sum fits, and the
  64-bit one equal to the reference where it does not.
"""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tvm
from torch import nn

from pqcompile.build import analysis, compile_assignment
from pqcompile.export.onnx_export import export_onnx
from pqcompile.lower.build import resolve_target
from pqcompile.lower.kernels_layernorm import layer_norm_kernel, narrow_affine
from pqcompile.meta import QParams
from pqcompile.presets import uniform
from pqcompile.quant import integer_outputs
from pqcompile.quant.layernorm import NEWTON_STEPS, POWERS_OF_4, QLayerNorm, make_layer_norm


def test_integer_square_root_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randint(1, 2 ** 62 - 1, (4000,), generator=g),
                   torch.tensor([1, 2, 3, 4, 2 ** 60 + 1, 2 ** 62 - 1, (2 ** 31 - 1) ** 2,
                                 (2 ** 31 - 1) ** 2 - 1, 3 ** 39])])
    e = (w[:, None] >= torch.tensor(POWERS_OF_4)).sum(-1)
    wn = w << (2 * (31 - e))
    assert int(wn.min()) >= 2 ** 60 and int(wn.max()) < 2 ** 62
    x = torch.full_like(wn, 1 << 31)
    for _ in range(NEWTON_STEPS):
        x = (x + torch.div(wn, x, rounding_mode="floor")) >> 1
    x = x - (x * x > wn).to(torch.int64)
    assert x.tolist() == [math.isqrt(int(v)) for v in wn]


def _norm(dim: int, eps: float) -> nn.LayerNorm:
    torch.manual_seed(0)
    ln = nn.LayerNorm(dim, eps=eps)
    with torch.no_grad():
        ln.weight.uniform_(-2, 2)
        ln.bias.uniform_(-1, 1)
    return ln


def test_fixed_point_codes_match_the_float_layer_norm():
    g = torch.Generator().manual_seed(1)
    total = differ = 0
    for bits, s_in, dim, eps in ((8, 0.05, 384, 1e-12), (16, 0.001, 384, 1e-12),
                                 (8, 0.2, 32, 1e-5), (12, 0.01, 64, 1e-2)):
        ln, hi = _norm(dim, eps), 2 ** (bits - 1) - 1
        q = (torch.randn(64, dim, generator=g) * hi / 6).round().clamp(-hi, hi)
        q[0] = 3  # a constant row: the output is the bias
        q[1, 5] = hi  # an outlier
        y = ln.double()(q.double() * s_in).detach()
        out = QParams(float(y.abs().max()) / 127, 8, True)
        module = make_layer_norm(ln, QParams(s_in, bits, True), out, -127, 127)
        assert isinstance(module, QLayerNorm)
        got, want = module(q), torch.floor(y / out.scale + 0.5).clamp(-127, 127)
        assert (got - want).abs().max() <= 1 and got.abs().max() >= 120
        total, differ = total + got.numel(), differ + int((got != want).sum())
    assert differ / total < 1e-3, differ / total
    # an output scale no fixed-point multiplier reaches: the norm stays a float island
    tiny = QParams(1e-16, 8, True)
    assert make_layer_norm(_norm(8, 1e-5), QParams(0.01, 8, True), tiny, -127, 127) is None


class Normed(nn.Module):
    """Two layer norms over the last dim (one on a residual sum), distinct affine weights."""

    def __init__(self, dim: int = 48) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, dim), nn.Linear(dim, dim)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim, eps=1e-12)
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        h = self.n1(self.a(x))
        return self.n2(h + self.b(h))


def test_layer_norm_model_program_and_onnx_equal_reference():
    g = torch.Generator().manual_seed(1)
    draw = lambda: torch.randn(1, 24, 16, generator=g) * 3
    model, example = Normed().eval(), draw()
    c = compile_assignment(model, (example,), uniform(analysis(model, (example,)), 8),
                           target="host", calibration=[draw() for _ in range(3)])
    assert list(c.float_ops) == []
    assert sum(isinstance(m, QLayerNorm) for m in c.reference.modules()) == 2
    assert {v for k, v in c.lowering.kernels.items() if k.startswith("n")} == {"layer_norm"}
    session = ort.InferenceSession(export_onnx(c).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    name, scale = session.get_inputs()[0].name, c.lowering.outputs[0].scale
    for _ in range(3):
        x = draw()
        with torch.no_grad():
            want = c.reference(x).numpy()
        np.testing.assert_array_equal(c(x.numpy()), want)
        codes = integer_outputs(c.reference, x)[0].numpy()
        assert np.unique(codes).size > 50
        got = session.run(None, {name: x.numpy()})[0]
        np.testing.assert_array_equal(np.round(got / scale), codes)


@pytest.mark.parametrize("dim", [40, 7])
def test_layer_norm_kernel_on_aarch64_equals_reference(dim, sysroot):
    """Rows of two 16-lane blocks and 8 more (40), and of only the scalar rest (7)."""
    g = torch.Generator().manual_seed(2)
    draw = lambda: torch.randn(1, 5, 16, generator=g) * 3
    model, example = Normed(dim).eval(), draw()
    c = compile_assignment(model, (example,), uniform(analysis(model, (example,)), 8),
                           target="host", calibration=[draw() for _ in range(3)])
    arm = c.retarget("arm-dotprod")
    for _ in range(2):
        x = draw()
        with torch.no_grad():
            want = c.reference(x).numpy()
        np.testing.assert_array_equal(arm.run_emulated(x.numpy()), want)


def test_narrow_clamp_only_where_the_shifted_sums_fit():
    """A norm whose output scale makes the shifted sums pass 2^30 (``gamma / s_out`` large)
    keeps the 64-bit clamp; both clamps equal the reference on its codes, the 16-bit input's
    extremes included."""
    g = torch.Generator().manual_seed(3)
    ln = _norm(64, 1e-5)
    q = (torch.randn(32, 64, generator=g) * 3000).round().clamp(-32767, 32767)
    q[0, 0], q[1] = 32767, 5
    kept = make_layer_norm(ln, QParams(0.001, 16, True), QParams(0.05, 8, True), -127, 127)
    wide = make_layer_norm(ln, QParams(0.001, 16, True), QParams(1e-8, 8, True), -127, 127)
    assert narrow_affine(kept) and not narrow_affine(wide)
    target = resolve_target("host")
    for module, modes in ((kept, (True, False)), (wide, (False,))):
        with torch.no_grad():
            want = module(q).numpy().astype(np.int8)
        for narrow in modes:
            kernel = layer_norm_kernel((32, 64), "int16", "int8", int(module.eps_codes),
                                       module.lo, module.hi, narrow)
            f = tvm.compile(kernel, target)
            args = [q.numpy().astype(np.int16), module.mult.numpy().astype(np.int32),
                    module.shift.numpy().astype(np.int32), module.offset.numpy(),
                    np.zeros((32, 64), np.int8)]
            out = [tvm.runtime.tensor(a) for a in args]
            f(*out)
            np.testing.assert_array_equal(out[-1].numpy(), want)
        assert np.unique(want).size > 20 if module is kept else (want == 127).any()
