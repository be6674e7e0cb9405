"""Lowering: packing, parameter sizes, every integer op against the reference, build helpers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from tvm import relax

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.lower import build, lower, pack, resolve_target, run, unpack
from pqcompile.lower.packing import emit_unpack, packed_size
from pqcompile.meta import BitWidths
from pqcompile.quant import build_reference, integer_outputs

# --- packing -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([2, 3, 4, 5, 6, 7]), st.integers(0, 37),
       st.randoms(use_true_random=False))
def test_pack_unpack_round_trip(bits, n, rnd):
    lim = 2 ** (bits - 1)
    q = np.array([rnd.randint(-lim, lim - 1) for _ in range(n)], dtype=np.int8)
    p = pack(q, bits)
    # whole groups of lcm(bits, 8) bits: n * bits / 8 bytes up to the last group's padding
    group_bytes = bits * 8 // np.gcd(bits, 8) // 8
    assert p.dtype == np.uint8 and p.size == packed_size(n, bits) == \
        -(-n * bits // (8 * group_bytes)) * group_bytes
    assert np.array_equal(unpack(p, bits, n), q)


def test_pack_layout_and_range_check():
    # element j*k+i sits in bits [i*b, (i+1)*b) of byte j, two's complement
    assert pack(np.array([1, -1, 0], np.int8), 4).tolist() == [0xF1, 0x00]
    assert pack(np.array([1, -1, 0, -2, 1], np.int8), 2).tolist() == [0b10001101, 0b01]
    with pytest.raises(ValueError, match="4-bit range"):
        pack(np.array([8], np.int8), 4)
    # 3 bits: one little-endian bit stream, 8 values in 3 bytes
    assert pack(np.array([1, -1, 0, 3, -4, 2, 0, 1], np.int8), 3).tolist() == \
        [0b00111001, 0b01000110, 0b00100001]
    with pytest.raises(ValueError, match="store other widths as int8"):
        pack(np.array([1], np.int8), 8)


def test_in_graph_unpack_matches_numpy():
    rng = np.random.default_rng(0)
    # odd element counts: padding is dropped
    cases = {2: (3, 5, 7), 3: (5, 3, 3), 4: (5, 3, 3), 5: (7, 3), 6: (3, 3, 3), 7: (2, 9)}
    bb = relax.BlockBuilder()
    arrays, params = [], []
    for bits, shape in cases.items():
        q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=shape).astype(np.int8)
        arrays.append(pack(q, bits))
        params.append(relax.Var(f"p{bits}", relax.TensorType(arrays[-1].shape, "uint8")))
        cases[bits] = (shape, q)
    with bb.function("main", params):
        with bb.dataflow():
            outs = [emit_unpack(bb, p, bits, cases[bits][0]) for p, bits in zip(params, cases)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    got = run(build(bb.get(), opt_level=0), {}, arrays)
    for (bits, (_, q)), g in zip(cases.items(), got):
        assert g.dtype == np.int8 and np.array_equal(g, q)


def test_param_bytes_follow_weight_bits():
    torch.manual_seed(0)
    gm = pqcompile.trace(nn.Conv2d(64, 64, 3, padding=1), (torch.randn(1, 64, 8, 8),))
    batches = [torch.randn(2, 64, 8, 8)]
    sizes, storage = {}, {}
    for bits in (8, 6, 5, 4, 3, 2):
        ref = build_reference(gm, Assignment({"_0": BitWidths(bits, 8)}), batches)
        _, params, report = lower(ref)
        sizes[bits] = params["_0.weight"].nbytes
        storage[bits] = report.weight_storage["_0"]
        assert report.param_bytes == sum(a.nbytes for a in params.values())
        assert list(params) == list(report.param_names)
    n = 64 * 64 * 9
    assert sizes == {b: n * b // 8 for b in (8, 6, 5, 4, 3, 2)}  # n divides into whole groups
    assert storage == {8: "int8", 6: "int6 packed 4 per 3 bytes", 5: "int5 packed 8 per 5 bytes",
                       4: "int4 packed 2 per byte", 3: "int3 packed 8 per 3 bytes",
                       2: "int2 packed 4 per byte"}


# --- every op against the reference --------------------------------------------------------


class Zoo(nn.Module):
    """One of each op the lowering handles, plus a few float ops; three outputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2)
        self.g = nn.Conv2d(24, 16, 3, padding=1, groups=2)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 6)
        self.head = nn.Linear(24, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):                                        # (2, 4, 16, 16)
        y = self.c1(x)                                           # strided, dilated: (2, 8, 8, 8)
        a = F.avg_pool2d(y, 3, 2, 1)                             # window sum, padding counted
        m = F.max_pool2d(torch.relu(y), 2)                       # y has 2 users: relu is a clamp
        z = F.relu6(torch.cat([a, m, a], 1))                     # signed + unsigned; relu6 folded
        h = self.g(self.drop(z))                                 # grouped conv
        g = F.adaptive_avg_pool2d(h, 2) + h.mean((2, 3), keepdim=True)  # 2x2 windows; broadcast
        t = self.ln(g.flatten(2).transpose(1, 2))                # float op: (2, 4, 16)
        t = self.fc(t)                                           # linear on 3-D input: (2, 4, 6)
        v = F.gelu(t).permute(0, 2, 1).reshape(t.size(0), -1)   # table, permute, reshape
        return self.head(v), t.mean(-1), F.max_pool2d(y + y, 3, 2, 1, ceil_mode=True)


ZOO_BITS = {"c1": (8, 8), "g": (4, 4), "fc": (2, 8), "head": (4, 4)}


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(1)
    model = Zoo().eval()
    gm = pqcompile.trace(model, (torch.randn(2, 4, 16, 16),))
    a = Assignment({k: BitWidths(*v) for k, v in ZOO_BITS.items()})
    ref = build_reference(gm, a, [torch.randn(4, 4, 16, 16) for _ in range(3)])
    mod, params, report = lower(ref)
    return model, ref, mod, params, report, build(mod)


def test_every_op_matches_the_reference_exactly(zoo):
    model, ref, _, params, report, ex = zoo
    # the layer norm runs in fixed point (pqcompile.quant.layernorm), the GELU as a table of its
    # input's codes: no float op
    assert list(report.float_ops) == []
    assert report.kernels["ln"] == "layer_norm"
    worst = 0
    for seed in range(3):
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
        got = run(ex, params, [x])
        assert [g.shape for g in got] == [tuple(t.shape) for t in model(x)]
        q_ref = [q.numpy() for q in integer_outputs(ref, x)]
        q_got = report.output_integers(got)
        for r, g, y_ref, y_got in zip(q_ref, q_got, ref(x), got):
            worst = max(worst, int(np.abs(r - g).max()))
            if np.array_equal(r, g):  # same integers: the same float32 products
                assert np.array_equal(y_ref.numpy(), y_got)
    print(f"\nzoo: max |LSB| difference = {worst}")
    assert worst <= 1


def test_program_is_integer_only_outside_float_islands(zoo):
    _, _, mod, params, report, _ = zoo
    text = mod["main"].script()
    assert 'out_dtype="int32"' in text and "float64" in text  # float64: quantize/dequantize
    # int64: the layer norm's per-channel offsets (its multipliers and shifts are int32)
    assert {str(a.dtype) for a in params.values()} <= {"int8", "uint8", "int32", "int64"}
    assert str(params["ln.offset"].dtype) == "int64"
    assert [gv.name_hint for gv in mod.functions if "float_" in gv.name_hint] == []
    assert "gelu.table" in params
    assert report.inputs == (("x", (2, 4, 16, 16)),)
    assert len(report.outputs) == 3


def test_lower_rejects_a_float_graph():
    gm = pqcompile.trace(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),))
    with pytest.raises(TypeError, match="build_reference"):
        lower(gm)


# --- build helpers -------------------------------------------------------------------------


def test_resolve_target_accepts_names_dicts_and_targets():
    host = resolve_target("host")
    assert host.kind.name == "llvm"
    assert resolve_target({"kind": "llvm"}).kind.name == "llvm"
    assert resolve_target(host) is host
    assert resolve_target("arm").attrs["mtriple"].startswith("aarch64")
    with pytest.raises(TypeError, match="target name"):
        resolve_target(3)


def test_build_opt_level_is_checked():
    with pytest.raises(ValueError, match="opt_level"):
        build(tvm.IRModule(), opt_level=5)
