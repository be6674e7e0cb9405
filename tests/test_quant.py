"""Quantization: fixed point, weights, observers, calibration errors, BN folding, reference."""

import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.meta import (
    BITS,
    FLOAT_OPS,
    FOLDED_BN,
    FUSED_ACTIVATION,
    QPARAMS,
    REQUANT,
    SHAPE,
    WEIGHT_QUANT,
    BitWidths,
)
from pqcompile.models import resnet20
from pqcompile.passes import ShapeAnalysis
from pqcompile.passes.fold_bn import FoldBatchNorm
from pqcompile.quant import (
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    build_reference,
    fake_quant_view,
    integer_outputs,
    quantize_multiplier,
    quantize_weight,
    requantize,
)
from pqcompile.quant.fixedpoint import shared_shift


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.3, generator=g)
            m.running_var.uniform_(0.3, 3.0, generator=g)
            m.weight.data.uniform_(0.3, 2.0, generator=g)
            m.bias.data.normal_(0, 0.3, generator=g)
    return model.eval()


# --- fixed point ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=2 ** -31, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_is_accurate(M):
    m, sh = quantize_multiplier(M)
    assert 2 ** 30 <= m < 2 ** 31 and 1 <= sh <= 62
    assert abs(m * 2.0 ** -sh - M) <= M * 2 ** -31


def test_tiny_multipliers_saturate_the_shift():
    m, sh = quantize_multiplier(1e-15)  # below 2^-31 the shift stays at 62
    assert sh == 62 and m == round(1e-15 * 2 ** 62)
    assert quantize_multiplier(0.0) == (0, 1)


def test_requantize_rounds_half_up_with_arithmetic_shift():
    m, sh = quantize_multiplier(0.25)  # exact: m * 2^-sh == 0.25
    acc = torch.arange(-12, 13)
    expected = torch.floor(acc.double() * 0.25 + 0.5).clamp(-2, 2).long()
    assert torch.equal(requantize(acc, m, sh, -2, 2), expected)


def test_shared_shift_keeps_both_multipliers():
    mults, sh = shared_shift([0.9, 0.0123])
    assert max(mults) < 2 ** 31
    assert abs(mults[0] * 2.0 ** -sh - 0.9) < 0.9 * 2 ** -30
    assert abs(mults[1] * 2.0 ** -sh - 0.0123) < 2.0 ** -sh


def test_quantize_multiplier_rejects_bad_values():
    with pytest.raises(ValueError, match="layer 'c'"):
        quantize_multiplier(float("nan"), where="layer 'c'")
    with pytest.raises(ValueError, match="too large"):
        quantize_multiplier(2.0 ** 31)


# --- weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quantization_per_channel_narrow_range(bits):
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0  # a zero channel borrows the smallest other scale
    q, wq = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax
    amax = w.reshape(6, -1).abs().amax(1).double()
    nonzero = [c for c in range(6) if c != 2]
    assert np.allclose([wq.scales[c] for c in nonzero], (amax[nonzero] / qmax).numpy())
    assert wq.scales[2] == min(wq.scales[c] for c in nonzero)
    assert torch.all(q[2] == 0)
    # every channel reaches its largest magnitude exactly
    assert all(int(q[c].abs().max()) == qmax for c in nonzero)
    assert float((q.double() * torch.tensor(wq.scales).view(-1, 1, 1, 1) - w).abs().max()) <= \
        max(wq.scales) / 2 + 1e-9


def test_weight_bits_outside_range_are_rejected():
    with pytest.raises(ValueError, match="2..8"):
        quantize_weight(torch.randn(2, 2), 16, where="layer 'fc'")


# --- observers -----------------------------------------------------------------------------


def test_minmax_observer_scales():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([-3.0, 0.5]))
    obs.observe(torch.tensor([2.54]))
    assert obs.scale(8, signed=True) == pytest.approx(3.0 / 127)
    assert obs.scale(8, signed=False) == pytest.approx(2.54 / 255)
    assert obs.scale(4, signed=True) == pytest.approx(3.0 / 7)


def test_percentile_observer_scale():
    x = torch.arange(10001, dtype=torch.float64) / 100  # 0.00 .. 100.00
    obs = PercentileObserver(99.99)
    obs.observe(x[:5000])
    obs.observe(-x[5000:])  # signed clipping looks at |x|
    # numpy's linear quantile of 0..100 in 0.01 steps at 99.99 % is 99.99
    assert obs.amax(8, signed=True) == pytest.approx(99.99)
    assert obs.scale(8, signed=True) == pytest.approx(99.99 / 127)


def test_mse_observer_clips_an_outlier_to_the_exact_grid():
    # 100 000 values exactly on the grid of amax = 0.5 at 8 bits, plus one outlier at 1.0:
    # ratio 0.5 represents every inlier exactly and only pays for the outlier.
    grid = torch.arange(-127, 128, dtype=torch.float64) * (0.5 / 127)
    x = torch.cat([grid.repeat(400), torch.tensor([1.0])])
    obs = MseObserver()
    obs.observe(x)
    assert obs.amax(8, signed=True) == pytest.approx(0.5)
    assert obs.scale(8, signed=True) == pytest.approx(0.5 / 127)
    minmax = MinMaxObserver()
    minmax.observe(x)
    assert minmax.scale(8, signed=True) == pytest.approx(1.0 / 127)


def test_sample_observers_bound_memory():
    obs = PercentileObserver(100.0, max_samples=1000)
    for _ in range(5):
        obs.observe(torch.randn(10_000))
    assert sum(s.size for s in obs.samples) <= 1000 and obs.seen == 50_000


# --- calibration errors --------------------------------------------------------------------


def _small():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = pqcompile.trace(model, (torch.randn(1, 3, 8, 8),))
    return gm, Assignment.uniform(["_0", "_3"], 8, 8)


@pytest.mark.parametrize("batches, message", [
    ([], r"calib_batches is empty.*\(N, 3, 8, 8\)"),
    ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 9, 8)],
     r"calibration batch 2: input 0 has shape \(2, 3, 9, 8\), expected \(N, 3, 8, 8\)"),
    ([torch.randn(2, 3, 8, 8), torch.zeros(0, 3, 8, 8)], r"calibration batch 1"),
    ([torch.ones(1, 3, 8, 8, dtype=torch.int64)], r"batch 0: input 0 has dtype torch.int64"),
    ([(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))], r"batch 0 has 2 inputs"),
])
def test_calibration_errors_name_the_batch(batches, message):
    gm, a = _small()
    with pytest.raises(ValueError, match=message):
        build_reference(gm, a, batches)


def test_calibration_rejects_a_bare_tensor_and_unknown_observer():
    gm, a = _small()
    with pytest.raises(TypeError, match="not a single tensor"):
        build_reference(gm, a, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown observer 'kl'"):
        build_reference(gm, a, [torch.randn(2, 3, 8, 8)], observer="kl")


def test_observer_choice_changes_scales():
    gm, a = _small()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    scales = {}
    for name in ("minmax", "percentile", "mse"):
        ref = build_reference(gm, a, batches, observer=name)
        scales[name] = QPARAMS.get(next(n for n in ref.graph.nodes if n.name == "_0")).scale
    assert scales["percentile"] <= scales["minmax"] and scales["mse"] <= scales["minmax"]


def test_activation_bits_conflict_through_pass_through_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(nn.functional.max_pool2d(x, 1))

    gm = pqcompile.trace(M(), (torch.randn(1, 3, 4, 4),))
    a = Assignment({"a": BitWidths(8, 4), "b": BitWidths(8, 8)})
    with pytest.raises(ValueError, match=r"read the tensor of node 'x' \(directly or through "
                                         r"\['max_pool2d'\]\).*equal activation bits"):
        build_reference(gm, a, [torch.randn(1, 3, 4, 4)])


# --- FoldBatchNorm -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_fold_batchnorm_is_exact_in_float64(name):
    model = resnet20() if name == "resnet20" else torchvision.models.resnet18()
    model = randomize_bn(model).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = ShapeAnalysis()(pqcompile.trace(model, (x,))).graph_module
    bn_shapes = {n.name: tuple(SHAPE.get(n).shape) for n in gm.graph.nodes
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)}
    ctx = pqcompile.PassContext()
    out = FoldBatchNorm()(gm, ctx).graph_module
    assert ctx.results["folded_bn"] == len(bn_shapes) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    with torch.no_grad():
        ref, got = model(x), out(x)
    assert float((got - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max()))
    folded = {FOLDED_BN.get(n): n for n in out.graph.nodes if FOLDED_BN.has(n)}
    assert set(folded) == set(bn_shapes)
    # the layer node now produces what the norm produced and carries its shape record
    assert all(tuple(SHAPE.get(n).shape) == bn_shapes[bn] for bn, n in folded.items())


def test_fold_batchnorm_conditions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.shared, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.fc, self.bn1d = nn.Linear(4, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y) + y.mean()        # the conv output has another user: not folded
            z = self.bn2(self.shared(z)) + self.shared(z)  # module called twice: not folded
            return self.bn1d(self.fc(z.mean((2, 3))))      # linear -> BN1d: folded

    model = randomize_bn(M()).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    gm = FoldBatchNorm()(pqcompile.trace(model, (x,))).graph_module
    kinds = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
             if n.op == "call_module"}
    assert kinds == {"Conv2d", "BatchNorm2d", "Linear"}
    assert torch.allclose(gm(x), model(x), atol=1e-12)
    assert model.fc.bias is not None and isinstance(model.bn1d, nn.BatchNorm1d)  # untouched


# --- reference -----------------------------------------------------------------------------


def test_reference_records_and_signedness():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 1),
                          nn.Sigmoid(), nn.Conv2d(4, 4, 1))
    gm = pqcompile.trace(model, (torch.randn(1, 3, 8, 8),))
    a = Assignment({"_0": BitWidths(4, 8), "_2": BitWidths(2, 6)})
    ref = build_reference(gm, a, [torch.randn(4, 3, 8, 8)])
    nodes = {n.name: n for n in ref.graph.nodes}
    q0, q2 = QPARAMS.get(nodes["_0"]), QPARAMS.get(nodes["_2"])
    assert (q0.bits, q0.signed) == (6, False)    # read by _2 at 6 bits, after a ReLU6
    assert (q2.bits, q2.signed) == (8, True)     # read only by a table (the sigmoid)
    assert QPARAMS.get(nodes["_3"]).signed is False  # sigmoid output: a table, non-negative
    assert FUSED_ACTIVATION.get(nodes["_0"]) == "_1" and BITS.get(nodes["_2"]) == BitWidths(2, 6)
    assert WEIGHT_QUANT.get(nodes["_0"]).bits == 4 and len(WEIGHT_QUANT.get(nodes["_0"]).scales) == 8
    req = REQUANT.get(nodes["_0"])
    assert req.lo == 0 and req.hi == min(63, math.floor(6 / q0.scale + 0.5))
    assert [(f.node, f.op) for f in FLOAT_OPS.get(ref)] == [
        ("_4", "Conv2d (not in the assignment)")]


def test_fake_quant_view_within_one_lsb_of_integer_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    gm = pqcompile.trace(conv, (torch.randn(2, 8, 12, 12),))
    for bits in (BitWidths(8, 8), BitWidths(4, 4), BitWidths(2, 8)):
        ref = build_reference(gm, Assignment({"_0": bits}), [torch.randn(8, 8, 12, 12)])
        fq = fake_quant_view(ref)
        out = QPARAMS.get(next(n for n in ref.graph.nodes if n.name == "_0"))
        for _ in range(3):
            x = torch.randn(2, 8, 12, 12)
            q_int = integer_outputs(ref, x)[0]
            q_fq = torch.round(fq(x).double() / out.scale).long()
            assert int((q_int - q_fq).abs().max()) <= 1
            assert float((q_int != q_fq).double().mean()) < 0.05


def test_reference_rejects_unpruned_masks():
    gm, _ = _small()
    a = Assignment.uniform(["_0", "_3"], 8, 8)
    a = Assignment(a.bits, {0: np.array([True, False, True, True])})
    with pytest.raises(ValueError, match="run PruneChannels"):
        build_reference(gm, a, [torch.randn(1, 3, 8, 8)])


def test_ops_nobody_can_run_are_reported_at_build_time():
    class M(nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x) + 1

    gm = pqcompile.trace(M(), (torch.randn(1, 4),))
    with pytest.raises(pqcompile.UnsupportedOpError,
                       match=r"node 'special_bessel_j0' \(special_bessel_j0\) has no integer "
                             r"lowering and cannot run in float"):
        build_reference(gm, Assignment(), [torch.randn(2, 4)])
