"""The compiled program computes what its reference computes, on ops that used to run as float
islands or drift from it: pads (constant, reflect, replicate, circular) and nearest resampling
as integer data movement, and weights of 3, 5 and 6 bits."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.errors import UnsupportedOpError
from pqcompile.lower import build, lower, run
from pqcompile.meta import QPARAMS, BitWidths
from pqcompile.quant import build_reference, integer_outputs
from pqcompile.quant.movement import gather_index


def _compiled(model, shape, bits, *, seed=0, target="host"):
    """Reference and program of ``model`` (layers -> (weight, activation) bits) on ``target``."""
    torch.manual_seed(seed)
    model = model.eval()
    gm = pqcompile.trace(model, (torch.randn(*shape),))
    a = Assignment({k: BitWidths(*v) for k, v in bits.items()})
    ref = build_reference(gm, a, [torch.randn(4, *shape[1:]) for _ in range(2)])
    mod, params, report = lower(ref, target=target)
    return model, ref, params, report, build(mod, target)


def _assert_program_equals_reference(ref, params, report, ex, shape, seeds=(0, 1)):
    """Bit for bit: the output integers and the float32 outputs."""
    for seed in seeds:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        got = run(ex, params, [x])
        got = got if isinstance(got, (list, tuple)) else [got]
        want = [q.numpy() for q in integer_outputs(ref, x)]
        for r, g in zip(want, report.output_integers(got)):
            assert r.shape == g.shape and np.array_equal(r, g)
        ys = ref(x)
        for y_ref, y_got in zip(ys if isinstance(ys, (list, tuple)) else [ys], got):
            assert np.array_equal(y_ref.numpy(), y_got)


# --- pads --------------------------------------------------------------------------------------


class Pads(nn.Module):
    """TF-style "same" padding before a strided conv, and every pad mode between layers."""

    def __init__(self, value=0.25):
        super().__init__()
        self.same = nn.ZeroPad2d((0, 1, 0, 1))
        self.c1 = nn.Conv2d(3, 8, 3, stride=2)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.refl = nn.ReflectionPad2d((1, 2, 2, 1))
        self.c3 = nn.Conv2d(8, 4, 1)
        self.value = value

    def forward(self, x):                                   # (1, 3, 11, 13)
        y = self.c1(self.same(x))                           # (1, 8, 5, 6)
        y = F.pad(y, (2, 1, 1, 0), value=self.value)        # constant, non-zero: (1, 8, 6, 9)
        y = self.c2(nn.functional.relu(y))                  # (1, 8, 4, 7)
        y = F.pad(self.refl(y), (1, 1, 0, 2), mode="replicate")   # (1, 8, 9, 12)
        y = F.pad(y, (2, 1, 0, 0), mode="circular")         # (1, 8, 9, 15)
        return self.c3(F.pad(y, (-1, 0, 1, -2)))           # crop and pad: (1, 4, 8, 14)


PAD_BITS = {"c1": (8, 8), "c2": (8, 8), "c3": (8, 8)}


def test_pads_lower_as_integer_ops_and_equal_the_reference():
    shape = (1, 3, 11, 13)
    torch.manual_seed(0)  # the weights: not whatever state earlier tests left
    model, ref, params, report, ex = _compiled(Pads(), shape, PAD_BITS)
    assert report.float_ops == ()  # no float island: pads run on the integers
    kinds = {n.name: type(ref.get_submodule(n.target)).__name__ for n in ref.graph.nodes
             if n.op == "call_module"}
    assert [kinds[k] for k in ("same", "pad", "refl", "pad_1", "pad_2", "pad_3")] == \
        ["QPad", "QPad", "QGather", "QGather", "QGather", "QPad"]
    _assert_program_equals_reference(ref, params, report, ex, shape)
    # the constant's code: 0.25 at the scale of the (signed) conv output it pads
    node = next(n for n in ref.graph.nodes if n.name == "pad")
    qp = QPARAMS.get(node)
    assert ref.get_submodule(node.target).code == int(np.floor(0.25 / qp.scale + 0.5)) != 0
    with torch.no_grad():  # within quantization error of the float model
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
        err = (ref(x) - model(x)).abs().max().item()
        assert err < 0.1 * model(x).abs().max().item()


def test_pad_values_outside_the_tensor_range_are_refused_and_inf_clamps():
    class MaxPoolSame(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.c = nn.Conv2d(2, 4, 1)
            self.value = value

        def forward(self, x):
            return F.max_pool2d(F.pad(self.c(x), (0, 1, 0, 1), value=self.value), 2)

    shape = (1, 2, 5, 5)
    model, ref, params, report, ex = _compiled(MaxPoolSame(-float("inf")), shape,
                                               {"c": (8, 8)})
    assert report.float_ops == ()
    _assert_program_equals_reference(ref, params, report, ex, shape)
    x = torch.randn(*shape)
    with torch.no_grad():  # -inf pads with the smallest code: the pool never picks it
        assert (ref(x) - model(x)).abs().max().item() < 0.05
    gm = pqcompile.trace(MaxPoolSame(1e6).eval(), (torch.randn(*shape),))
    with pytest.raises(UnsupportedOpError, match=r"node 'pad' .*pads with 1000000.0, outside"):
        build_reference(gm, Assignment({"c": BitWidths(8, 8)}), [torch.randn(4, 2, 5, 5)])


# --- nearest resampling --------------------------------------------------------------------------


@pytest.mark.parametrize("make, size", [
    (lambda: nn.Upsample(scale_factor=2, mode="nearest"), (5, 7)),
    (lambda: nn.Upsample(size=(11, 9), mode="nearest"), (5, 7)),   # non-integer, odd
    (lambda: nn.Upsample(size=(3, 5), mode="nearest"), (7, 9)),    # down
    (lambda: nn.Upsample(scale_factor=1.7, mode="nearest"), (5, 7)),
    (lambda: nn.Upsample(scale_factor=(2.5, 1.3), mode="nearest-exact"), (5, 7)),
    (lambda: nn.UpsamplingNearest2d(size=(13, 10)), (6, 3)),
])
def test_nearest_upsample_equals_reference_and_tracks_torch(make, size):
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.up = make()
            self.d = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            c = self.c(x)
            u = self.up(c)
            return self.d(u), u, c

    shape = (1, 3, *size)
    model, ref, params, report, ex = _compiled(Up(), shape, {"c": (8, 8), "d": (8, 8)})
    assert report.float_ops == ()
    _assert_program_equals_reference(ref, params, report, ex, shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, u_ref, c_ref = ref(x)
        _, u_float, c_float = model(x)
        # the reference resamples as torch's FP32 kernel does, position for position ...
        assert torch.equal(u_ref, make()(c_ref))
        # ... so it tracks torch FP32 within the quantization error of the tensor it resamples
        assert u_ref.shape == u_float.shape
        assert (u_ref - u_float).abs().max() <= (c_ref - c_float).abs().max()


def test_gather_index_is_torch_nearest_index():
    # torch's legacy nearest: floor(dst * (in / out)) with a float32 scale
    for n_in, n_out in ((5, 11), (7, 3), (3, 8), (10, 17)):
        scale = np.float32(n_in) / np.float32(n_out)
        want = tuple(min(int(np.floor(np.float32(i) * scale)), n_in - 1) for i in range(n_out))
        got = gather_index(lambda c: F.interpolate(c, size=(n_out,), mode="nearest"),
                           (1, 1, n_in), 1)
        assert got == [(2, want)]
    # nearest-exact: floor((dst + 0.5) * scale)
    got = gather_index(lambda c: F.interpolate(c, size=(7,), mode="nearest-exact"), (1, 4, 5), 1)
    assert got == [(2, (0, 1, 1, 2, 3, 3, 4))]
    # bilinear is not a gather
    assert gather_index(lambda c: F.interpolate(c, size=(7,), mode="linear"), (1, 4, 5), 1) \
        is None


# --- weights of 3, 5 and 6 bits ---------------------------------------------------------------


class FineBits(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)     # 3-bit weights
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)    # 5-bit weights (depthwise)
        self.c3 = nn.Conv2d(24, 20, 1)                          # 6-bit weights
        self.fc = nn.Linear(20, 7)                              # 5-bit weights

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))))
        y = F.relu(self.c3(F.relu(self.dw(y))))
        return self.fc(y.mean((2, 3)))


FINE_BITS = {"c1": (8, 8), "c2": (3, 8), "dw": (5, 8), "c3": (6, 8), "fc": (5, 8)}


def test_3_5_6_bit_weights_compile_packed_and_equal_the_reference():
    from pqcompile.build import compile_assignment

    torch.manual_seed(0)
    model, shape = FineBits().eval(), (1, 3, 12, 12)
    a = Assignment({k: BitWidths(*v) for k, v in FINE_BITS.items()})
    c = compile_assignment(model, (torch.randn(*shape),), a, target="host",
                           calibration=[torch.randn(4, *shape[1:]) for _ in range(2)])
    assert c.float_ops == []
    assert c.lowering.weight_storage["c2"] == "int3 packed 8 per 3 bytes"
    assert c.lowering.weight_storage["c3"] == "int6 packed 4 per 3 bytes"
    assert c.lowering.weight_storage["dw"] == c.lowering.weight_storage["fc"] == \
        "int5 packed 8 per 5 bytes"
    assert set(c.lowering.kernels) >= {"c2", "dw", "c3", "fc"}  # the hand-scheduled kernels
    for seed in range(3):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
    # the cost model counts bits / 8 bytes a weight (and an int32 bias, multiplier and shift an
    # output channel), as the portable program stores them: whole packing groups, so at most one group's padding (< 5 bytes) more
    _, params, report = lower(c.reference)
    for row in c.layers:
        m = model.get_submodule(row["name"])
        stored = report.weight_bytes[row["name"]]
        assert stored == params[f"{row['name']}.weight"].nbytes
        assert 0 <= stored - m.weight.numel() * row["weight_bits"] / 8 < 5
        assert row["weight_bytes"] == m.weight.numel() * row["weight_bits"] / 8 + \
            3 * 4 * m.weight.shape[0]


def test_picpq_searches_the_finer_weight_widths_by_default():
    from pqcompile.api import _check_bit_options
    from pqcompile.solvers import get_solver
    from pqcompile.solvers.picpq_space import snap_down

    options = _check_bit_options(None, get_solver("picpq").default_bit_options)
    weights = sorted({w for w, _ in options})
    assert {(3, 8), (5, 8), (6, 8), (8, 8)} <= set(options) and weights == list(range(2, 9))
    # PIC-PQ's stage maxima 8, 6, 4 and the penalty rule's Bmax - 1 keep their widths
    assert [snap_down(b, weights) for b in (8, 7, 6, 5, 4, 3)] == [8, 7, 6, 5, 4, 3]
    assert _check_bit_options(None) == _check_bit_options(None, None)  # others: unchanged


def test_stochastic_depth_outside_training_is_the_identity():
    from torchvision.ops import StochasticDepth

    model = nn.Sequential(nn.Conv2d(3, 4, 3), StochasticDepth(0.2, "row"), nn.Conv2d(4, 2, 1))
    _, ref, params, report, ex = _compiled(model, (1, 3, 8, 8), {"_0": (8, 8), "_2": (8, 8)})
    assert report.float_ops == ()
    _assert_program_equals_reference(ref, params, report, ex, (1, 3, 8, 8))
