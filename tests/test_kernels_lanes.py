"""The channel-lane conv kernel (x86 AVX-512 VNNI, small maps): bit-exact against the integer
conv + requantization, the layers it is chosen for, and a whole model that uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from pqcompile.lower import kernels as K
from pqcompile.lower import kernels_lanes as KL
from pqcompile.lower.build import resolve_target
from pqcompile.lower.tir_macros import NARROW_MIN_SHIFT

HOST = resolve_target("host")
VNNI = K.isa_for(HOST).name == "vnni"
needs_vnni = pytest.mark.skipif(not VNNI, reason="this host has no AVX-512 VNNI")

# (c, h, w, o, k, stride, pad, in, out): channels not a multiple of 4 or 16, rows that end
# inside a tile, stride 2 (phases), no pad, a 5x5 kernel, signed and unsigned data
CASES = [(5, 7, 7, 19, 3, 1, 1, "uint8", "uint8"),
         (8, 9, 6, 32, 3, 2, 1, "int8", "int8"),
         (12, 5, 11, 40, 3, 1, 0, "int8", "uint8"),
         (7, 6, 6, 16, 5, 1, 2, "uint8", "int8"),
         (16, 14, 14, 33, 3, 1, 1, "uint8", "uint8"),
         (9, 15, 13, 48, 3, 2, 1, "uint8", "int8"),
         # 1x1 convs, which the direct kernel reads unpacked: packed here
         (40, 7, 7, 48, 1, 1, 0, "int8", "uint8"),
         (22, 5, 9, 20, 1, 1, 0, "uint8", "int8")]


def _bounds(dtype):
    return (0, 255) if dtype == "uint8" else (-127, 127)


def _case(i, c, h, w, o, k, st, pad, in_dt, out_dt):
    rng = np.random.default_rng(i)
    lo, hi = _bounds(out_dt)
    x = rng.integers(*_bounds(in_dt), (1, c, h, w), endpoint=True).astype(in_dt)
    q = rng.integers(-127, 128, (o, c, k, k)).astype(np.int8)
    b = rng.integers(-2000, 2000, o).astype(np.int32)
    m = rng.integers(1 << 28, 1 << 31, o).astype(np.int32)
    s = rng.integers(*((33, 48) if i % 2 == 0 else (30, 38)), o).astype(np.int32)
    shape = K.ConvShape(c, h, w, o, (k, k), st, (pad, pad), in_dt, out_dt, lo, hi,
                        bool(s.min() >= NARROW_MIN_SHIFT))
    acc = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)),
                                     torch.from_numpy(q.astype(np.float64)), stride=st,
                                     padding=pad).numpy().astype(np.int64) \
        + b.astype(np.int64).reshape(1, -1, 1, 1)
    s64 = s.astype(np.int64).reshape(1, -1, 1, 1)
    want = np.clip((acc * m.astype(np.int64).reshape(1, -1, 1, 1) + (np.int64(1) << (s64 - 1)))
                   >> s64, lo, hi).astype(out_dt)
    isa = KL.lanes_tile(shape)
    params = [KL.pack_lanes_weight(q), *KL.lanes_params(q, b, m, s, shape, isa)]
    return shape, isa, x, params, want


@needs_vnni
def test_lanes_kernel_equals_the_integer_conv():
    cases = [_case(i, *p) for i, p in enumerate(CASES)]
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(x.shape, str(x.dtype)))
          for i, (_, _, x, _, _) in enumerate(cases)]
    ps = [[relax.Var(f"p{i}_{j}", relax.TensorType(a.shape, str(a.dtype)))
           for j, a in enumerate(c[3])] for i, c in enumerate(cases)]
    with bb.function("main"):
        with bb.dataflow():
            outs = []
            for (shape, isa, _, _, want), x, p in zip(cases, xs, ps):
                pack, kernel, scratch = KL.conv2d_lanes_kernel(shape, isa)
                xc = bb.emit(relax.call_tir(bb.add_func(pack.without_attr("global_symbol"),
                                                        "pack"), [x],
                                            relax.TensorType((scratch,), "uint8")))
                outs.append(bb.emit(relax.call_tir(
                    bb.add_func(kernel.without_attr("global_symbol"), "kernel"), [xc, *p],
                    relax.TensorType(want.shape, str(want.dtype)))))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out, params=xs + [v for vs in ps for v in vs])
    vm = relax.VirtualMachine(tvm.compile(bb.get(), HOST), tvm.cpu())
    inputs = [c[2] for c in cases] + [np.ascontiguousarray(a) for c in cases for a in c[3]]
    got = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    for (shape, isa, _, _, want), y, p in zip(cases, got, CASES):
        assert np.unique(want).size > 2, p  # not vacuous
        np.testing.assert_array_equal(y.numpy(), want, err_msg=f"{p} tile {isa.mr}x{isa.nr}")
    # the tiles cover ragged rows: some case's row ends inside its last tile
    assert any(c[0].out_hw[1] % c[1].mr for c in cases)


def test_chosen_for_the_small_maps_of_resnet18():
    """Channel lanes where the direct kernel's grid wastes lanes (28x28 and smaller: 7%,
    12% and 23% junk columns, plus tile padding), the direct kernel on the large maps and
    the 3-channel stem; never off VNNI."""
    vnni = K.Isa("vnni", 16, 4, 3)

    def shape(c, h, o, st):
        return K.ConvShape(c, h, h, o, (3, 3), st, (1, 1), "uint8", "uint8", 0, 255, True)

    chosen = [KL.channel_lanes(shape(c, h, o, st), vnni) for c, h, o, st in
              [(64, 56, 64, 1), (64, 56, 128, 2), (128, 28, 128, 1), (256, 14, 256, 1),
               (256, 14, 512, 2), (512, 7, 512, 1)]]
    assert chosen == [False, False, True, True, True, True]
    stem = K.ConvShape(3, 224, 224, 64, (7, 7), 2, (3, 3), "int8", "uint8", 0, 255, True)
    assert not KL.channel_lanes(stem, vnni)
    assert not KL.channel_lanes(shape(512, 7, 512, 1), K.Isa("sdot", 4, 4, 4))
    # mobilenet_v2's 1x1 convs on 7x7 maps that reduce many channels (960 -> 160, 320), not
    # those that expand few (96 -> 576 on 14x14: the pack and the transpose cost more)
    one = [KL.channel_lanes(K.ConvShape(c, h, h, o, (1, 1), 1, (0, 0), "uint8", "uint8", 0,
                                        255, True), vnni)
           for c, h, o in [(960, 7, 160), (960, 7, 320), (96, 14, 576), (32, 112, 16)]]
    assert one == [True, True, False, False]
    # 7 pixels (a whole 7-pixel row) x 2 channel vectors: 14 of the 15 accumulators
    assert (KL.lanes_tile(shape(512, 7, 512, 1)).mr, KL.lanes_tile(shape(512, 7, 512, 1)).nr) \
        == (7, 2)


def test_weight_layout():
    q = np.arange(20 * 5 * 3 * 3, dtype=np.int64).reshape(20, 5, 3, 3).astype(np.int8)
    w = KL.pack_lanes_weight(q)
    assert w.shape == (2, 2 * 9, 16, 4)
    # channel vector 1, channel block 1, tap (2, 1): lane 3 is output channel 19, word byte
    # 0 input channel 4; padding (output channel 20+, input channel 5+) is zero
    assert w[1, (1 * 3 + 2) * 3 + 1, 3, 0] == q[19, 4, 2, 1]
    assert w[1, (1 * 3 + 2) * 3 + 1, 3, 1] == 0 and w[1, 0, 4, 0] == 0


@needs_vnni
def test_whole_model_with_small_maps_matches_reference():
    """A model whose late convs (14x14 and 7x7 maps, a stride-2 one, 4-bit weights packed
    two to a byte) run on the channel-lane kernel: the artifact equals its integer reference
    exactly."""
    from pqcompile import presets
    from pqcompile.build import analysis, compile_assignment

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 48, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 5)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 14, 14, generator=g)
    gm = analysis(model, (x,))
    compiled = compile_assignment(model, (x,), presets.uniform(gm, 4, 8), target="host",
                                  calibration=[torch.randn(8, 3, 14, 14, generator=g)])
    labels = compiled.lowering.kernels
    assert sum("lanes" in k for k in labels.values()) >= 2, labels
    assert any("packed" in v for v in compiled.lowering.weight_storage.values())
    for t in [x] + [torch.randn(1, 3, 14, 14, generator=g) for _ in range(2)]:
        with torch.inference_mode():
            expected = compiled.reference(t).numpy()
        np.testing.assert_array_equal(np.asarray(compiled.artifact(t.numpy())), expected)
