"""Softmax over the last dim of an 8-bit tensor in fixed point (pqcompile.quant.softmax).

* the fixed-point codes against the float64 softmax quantized the same way: at most one step
  apart, and equal on all but a small fraction of codes (rows from flat to single spikes);
* a model with a softmax builds with no float op: the host program and ONNX Runtime on the
  exported model (int64 ONNX ops) both equal the integer reference bit for bit;
* rows of 2100 codes (row sums in 64-bit lanes) equal the reference, host and aarch64;
* a softmax over another dim, or of a wider input, stays a float island;
* a softmax of scores plus an attention mask's bias (0 attended, very negative masked) runs
  over the attended positions: the same codes as the float softmax of the sum, masked
  positions exactly 0; an attended bias other than 0 is refused by name.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pqcompile.build import analysis, compile_assignment
from pqcompile.export.onnx_export import export_onnx
from pqcompile.meta import QParams
from pqcompile.presets import uniform
from pqcompile.quant import integer_outputs
from pqcompile.quant.softmax import QSoftmax, make_softmax


def float_codes(q: torch.Tensor, inp: QParams, out: QParams) -> torch.Tensor:
    """The float64 island's codes: ``clamp(floor(softmax(s q) / s_out + 0.5), 0, 255)``."""
    p = torch.softmax(q.to(torch.float64) * inp.scale, dim=-1)
    return torch.floor(p / out.scale + 0.5).clamp(0, 255)


def test_fixed_point_codes_match_the_float_softmax():
    g = torch.Generator().manual_seed(0)
    total = differ = 0
    for in_scale, spread, length in ((0.007, 40, 128), (0.05, 60, 16), (0.2, 127, 7),
                                     (0.02, 3, 64)):
        inp = QParams(in_scale, 8, True)
        q = (torch.randn(64, length, generator=g) * spread).round().clamp(-127, 127)
        p_max = torch.softmax(q * in_scale, -1).max().item()
        out = QParams(p_max / 255, 8, False)
        module = make_softmax(inp, out, 0, 255)
        assert isinstance(module, QSoftmax)
        got, want = module(q), float_codes(q, inp, out)
        assert got.min() >= 0 and got.max() <= 255 and got.max() >= 250
        assert (got - want).abs().max() <= 1
        total, differ = total + got.numel(), differ + int((got != want).sum())
    assert differ / total < 0.01, differ / total
    assert make_softmax(QParams(0.01, 12, True), QParams(1 / 255, 8, False), 0, 255) is None


def test_masked_codes_match_the_float_softmax_of_scores_plus_bias():
    """Rows with their last positions masked (Hugging Face's ``finfo.min`` and the older
    ``-10000``), the masked codes larger than the attended ones (so the row max must be the
    attended codes'), and a row with every position masked (all zeros)."""
    g = torch.Generator().manual_seed(3)
    total = differ = 0
    for in_scale, length, masked_value in ((0.05, 32, torch.finfo(torch.float32).min),
                                           (0.02, 128, -10000.0), (0.2, 9, -1e30)):
        inp = QParams(in_scale, 8, True)
        q = (torch.randn(4, 3, length, generator=g) * 30).round().clamp(-127, 127)
        lengths = torch.randint(1, length + 1, (4,), generator=g)
        lengths[0] = length
        attended = torch.arange(length)[None] < lengths[:, None]  # [4, length]
        q[~attended[:, None, :].expand_as(q)] = 127  # masked codes above every attended one
        bias = torch.where(attended, 0.0, masked_value)[:, None, :]  # [4, 1, length]
        p = torch.softmax(q.to(torch.float64) * in_scale + bias.to(torch.float64), -1)
        out = QParams(p.max().item() / 255, 8, False)
        module = make_softmax(inp, out, 0, 255)
        got = module(q, bias)
        want = torch.floor(p / out.scale + 0.5).clamp(0, 255)
        assert (got[~attended[:, None, :].expand_as(q)] == 0).all()
        assert (got - want).abs().max() <= 1 and got.max() >= 250
        total, differ = total + got.numel(), differ + int((got != want).sum())
        none = module(q[:1], torch.full((1, 1, length), masked_value))
        assert (none == 0).all()
    assert differ / total < 0.01, differ / total
    with pytest.raises(ValueError, match=r"attended position's bias is -3\.0, not 0"):
        module(q, torch.where(torch.arange(9) < 4, -3.0, 0.0)[None, None])


class Attend(nn.Module):
    def __init__(self, dim: int = -1, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.dim = nn.Linear(16, width), nn.Linear(width, 8), dim

    def forward(self, x):
        return self.b(torch.softmax(self.a(x), self.dim))


def build(model):
    g = torch.Generator().manual_seed(1)
    draw = lambda: torch.randn(2, 12, 16, generator=g)  # noqa: E731
    example = draw()
    c = compile_assignment(model, (example,), uniform(analysis(model, (example,)), 8),
                           target="host", calibration=[draw() for _ in range(3)])
    return c, draw


def test_softmax_model_program_and_onnx_equal_reference():
    c, draw = build(Attend())
    assert list(c.float_ops) == []  # the softmax too
    assert any(isinstance(m, QSoftmax) for m in c.reference.modules())
    session = ort.InferenceSession(export_onnx(c).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    scale = c.lowering.outputs[0].scale
    for _ in range(2):
        x = draw()
        with torch.no_grad():
            want = c.reference(x).numpy()
        np.testing.assert_array_equal(c(x.numpy()), want)
        got = session.run(None, {name: x.numpy()})[0]
        codes = integer_outputs(c.reference, x)[0].numpy()
        np.testing.assert_array_equal(np.round(got / scale), codes)


def test_long_rows_sum_in_64_bit_lanes(sysroot):
    """Rows of 2100 codes (the kernel sums them in int64 lanes from 2048: ``N 2^20`` could
    pass 2^31; 131 blocks of 16 and 4 more): program == reference, host and aarch64."""
    c, draw = build(Attend(width=2100))
    assert list(c.float_ops) == []
    x = draw()
    with torch.no_grad():
        want = c.reference(x).numpy()
    np.testing.assert_array_equal(c(x.numpy()), want)
    np.testing.assert_array_equal(c.retarget("arm").run_emulated(x.numpy()), want)


def test_softmax_over_another_dim_stays_a_float_island():
    c, draw = build(Attend(dim=1))
    assert [op for _, op in c.float_ops] == ["softmax"]
    x = draw()
    with torch.no_grad():
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())


class RowMasked(nn.Module):
    """Two heads' scores plus a per-row 0/1 mask's bias (``[B, 1, S, S]``: each query row its
    own attended keys, broadcast over the heads), softmax, then the probabilities' product."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, mask):
        b, s, _ = x.shape
        heads = lambda t: t.view(b, s, 2, 4).transpose(1, 2)  # noqa: E731
        scores = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2)
        bias = (1.0 - mask[:, None].to(torch.float32)) * -10000.0
        return torch.softmax(scores + bias, dim=-1) @ heads(self.v(x))


@pytest.mark.parametrize("seq", [6, 21])
def test_per_row_mask_reads_through_broadcast_strides(seq, sysroot):
    """The kernel reads the mask's bias in its own shape ``[B, 1, S, S]`` (not expanded to
    the scores' ``[B, 2, S, S]``): batch and query row strides, head stride 0. Rows with one
    attended key, with all of them and with none (all zeros) equal the reference, on the
    host and on aarch64; rows of only the scalar rest (6) and of a 16-lane block and 5 more
    (21, the key in the block or past it)."""
    g = torch.Generator().manual_seed(4)

    def draw():
        mask = (torch.rand(2, seq, seq, generator=g) < 0.5).to(torch.int64)
        mask[0, 0] = 0  # a row with nothing attended
        mask[0, 1] = 1
        mask[1, 2] = torch.eye(seq, dtype=torch.int64)[4]  # a single key
        mask[1, 3] = torch.eye(seq, dtype=torch.int64)[seq - 1]
        return torch.randn(2, seq, 8, generator=g), mask

    model, example = RowMasked(), draw()
    c = compile_assignment(model, example, uniform(analysis(model, example), 8),
                           target="host", calibration=[draw() for _ in range(3)])
    assert [op for _, op in c.float_ops] == []
    assert "softmax masked" in c.lowering.kernels.values()
    for _ in range(3):
        x, mask = draw()
        with torch.no_grad():
            want = c.reference(x, mask).numpy()
        np.testing.assert_array_equal(c(x.numpy(), mask.numpy()), want)
    x, mask = draw()
    with torch.no_grad():
        want = c.reference(x, mask).numpy()
    np.testing.assert_array_equal(
        c.retarget("arm").run_emulated(x.numpy(), mask.numpy()), want)
