"""The conv kernel with output channels in the vector lanes (x86 AVX-512 VNNI, small maps).

The direct kernel (:func:`~pqcompile.lower.kernels.conv2d_kernel`) puts 16 output pixels of
the padded grid in a vector's lanes: on a small map most of them are junk (7x7 outputs on a
9-column grid: 63 grid positions, 4 vectors, 64 lanes computed for 49 outputs, 77% useful;
14x14: 87%). Late layers have few pixels and many channels, so here the lanes are 16 output
channels instead: each step broadcasts one pixel's 4-channel input word (``vpbroadcastd``)
against a vector of 16 channels' weight words (``vpdpbusd``), and no lane is junk where the
output channels are a multiple of 16. A tile is ``MR`` consecutive output pixels of one row
x ``NR`` channel vectors; the pixels past the row's end (its last tile) read grid positions
inside the scratch and are not stored.

The input pack is the direct kernel's (the same padded, channel-interleaved, phase-split
scratch; a 1x1 conv, which the direct kernel reads unpacked, gets its channel-interleaving
copy), the weights are packed once as ``[O/16][C/4 * KH * KW][16][4]`` (the linear
kernel's layout: :func:`~pqcompile.lower.kernels_linear.pack_linear_weight`), and the
epilogue is :func:`~pqcompile.lower.tir_macros.requant_macro`'s with per-lane constants, its
bytes written to the NCHW output channel by channel (a small transpose per tile). Same
integers as the reference: the offset of a signed input is taken out of the bias as in the
direct kernel.
"""

from __future__ import annotations

import functools

import numpy as np

from .kernel_types import KERNEL_ATTR, ConvShape, Isa, choose_tile, grid_vectors, parallel_worth
from .kernels import conv2d_kernel
from .kernels_linear import linear_params
from .tir_macros import dot4_macro, requant_macro, requant_terms, splat

#: Accumulator vectors of a tile (the tile stays under the 1 KiB TVM keeps on the stack).
MAX_TILE = 15
#: Each output byte's share of the epilogue's transpose, in dot-product lanes, and each
#: input byte's share of the pack a 1x1 conv needs here (the direct 1x1 kernel reads the
#: NCHW input as it is): fitted to single-threaded timings of both kernels on 14 layers of
#: resnet18 and mobilenet_v2 (1x1 and 3x3, 56x56 to 7x7), which they then all rank right.
STORE_LANES = 12
PACK_LANES = 1


def _packless(shape: ConvShape) -> bool:
    """The direct kernel's 1x1 conv, which has no pack."""
    return shape.kernel == (1, 1) and shape.stride == 1 and shape.padding == (0, 0)


def lanes_tile(shape: ConvShape) -> Isa:
    """``Isa("vnni", 16, MR, NR)``: ``MR`` pixels of a row x ``NR`` channel vectors, the
    fewest computed lanes weighted by operand loads per dot product (``(MR + NR) / (MR
    NR)``, as :func:`~pqcompile.lower.kernel_types.choose_tile` weighs them)."""
    _, ow = shape.out_hw
    ov = -(-shape.out_channels // 16)
    best, best_cost = None, None
    for mr in range(1, 9):
        for nr in range(1, 5):
            if mr * nr > MAX_TILE:
                continue
            cost = -(-ow // mr) * mr * -(-ov // nr) * nr * (1.0 + 0.5 * (mr + nr) / (mr * nr))
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = Isa("vnni", 16, mr, nr), cost
    assert best is not None
    return best


def _cost(shape: ConvShape, tile: Isa, lanes: bool) -> float:
    """Dot-product lanes a kernel computes (weighted by its operand loads), per input word
    step, plus (channel lanes) the epilogue's transpose."""
    oh, ow = shape.out_hw
    load = 0.5 * (tile.mr + tile.nr) / (tile.mr * tile.nr)
    steps = -(-shape.channels // 4) * shape.kernel[0] * shape.kernel[1]
    if lanes:
        ov = -(-shape.out_channels // 16)
        computed = oh * -(-ow // tile.mr) * tile.mr * -(-ov // tile.nr) * tile.nr * 16
        packed = PACK_LANES * shape.channels * shape.height * shape.width \
            if _packless(shape) else 0
        return computed * (1 + load) * steps + STORE_LANES * shape.out_channels * oh * ow \
            + packed
    nv = grid_vectors(shape, tile.lanes, tile)
    computed = -(-shape.out_channels // tile.mr) * tile.mr * -(-nv // tile.nr) * tile.nr \
        * tile.lanes
    return computed * (1 + load) * steps


def channel_lanes(shape: ConvShape, isa: Isa) -> bool:
    """Whether a conv on ``isa`` runs on this kernel: VNNI, and fewer weighted lanes than
    the direct kernel's best tile (a 1x1 conv's pack counted: the direct one has none)."""
    if isa.name != "vnni":
        return False
    return _cost(shape, lanes_tile(shape), True) < _cost(shape, choose_tile(shape, isa), False)


def pack_lanes_weight(q: np.ndarray) -> np.ndarray:
    """``[O, C, KH, KW]`` int8 -> ``[O/16, C/4 * KH * KW, 16, 4]`` (zero-padded): step
    ``(cb, kh, kw)``'s weight words of 16 output channels, one 64-byte vector."""
    o, c, kh, kw = q.shape
    ov, cb = -(-o // 16), -(-c // 4)
    w = np.zeros((ov * 16, cb * 4, kh, kw), np.int8)
    w[:o, :c] = q
    # [ov, 16, cb, 4, kh, kw] -> [ov, cb, kh, kw, 16, 4]
    w = w.reshape(ov, 16, cb, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(w.reshape(ov, cb * kh * kw, 16, 4))


def lanes_params(q: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray,
                 shape: ConvShape, isa: Isa) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bias (less the input offset's contribution), multiplier and shift, padded to 16."""
    return linear_params(q.reshape(q.shape[0], -1).T, bias, mult, shift, shape, isa)


@functools.cache  # built once per shape: TVMScript parsing is slow
def conv2d_lanes_kernel(shape: ConvShape, isa: Isa):
    """``(pack, kernel, scratch)`` as :func:`~pqcompile.lower.kernels.conv2d_kernel`'s, the
    kernel ``kernel(Xc, Wv, B, M, S, Y)`` with ``Wv`` from :func:`pack_lanes_weight` and
    ``isa`` a :func:`lanes_tile`."""
    from tvm.script import tirx as T

    # the direct kernel's pack (a 1x1 conv's too: given the pad value, one a zero input
    # gets, it packs); its scratch's slack covers a whole tile of junk pixels
    direct = Isa("vnni", 16, 1, 1)
    pack, _, scratch_bytes = conv2d_kernel(
        shape, direct, pad=direct.offset(shape.in_dtype) if _packless(shape) else None)
    C, OC = shape.channels, shape.out_channels
    KH, KW = shape.kernel
    PH, PW = shape.padding
    s = shape.stride
    OH, OW = shape.out_hw
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    L, MR, NR = 16, isa.mr, isa.nr
    CB = -(-C // 4)
    KS = CB * KH * KW
    OV = -(-OC // L)
    OB = -(-OV // NR)
    par = parallel_worth(macs=OC * OH * OW * C * KH * KW)
    Wq = -(-(shape.width + 2 * PW) // s)
    Hq = -(-(shape.height + 2 * PH) // s)
    plane = Hq * Wq
    TW = -(-OW // MR)  # pixel tiles per output row
    PT = OH * TW
    Np = OV * L
    _dot4 = dot4_macro("vnni")
    _store = requant_macro(out_dt, lo, hi)
    assert isa.offset(in_dt) == (128 if in_dt == "int8" else 0)

    def xat(kh, kw, cb, p):  # the word of tap (kh, kw), channel block cb, grid position p
        return (((kh % s) * s + kw % s) * CB + cb) * plane + (kh // s) * Wq + kw // s + p

    @T.prim_func(s_tir=True)
    def kernel(Xc: T.Buffer((scratch_bytes,), "uint8"), Wv: T.Buffer((OV, KS, L, 4), "int8"),
               B: T.Buffer((Np,), "int32"), M: T.Buffer((Np,), "int32"),
               S: T.Buffer((Np,), "int32"), Y: T.Buffer((1, OC, OH, OW), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                     KERNEL_ATTR: "conv2d.lanes"})
        with T.sblock("root"):
            Yf = T.decl_buffer((OC * OH * OW,), out_dt, data=Y.data)
            # channel blocks outer: a thread's weights stay
            for t in T.parallel(OB * PT) if par else T.serial(OB * PT):
                acc = T.alloc_buffer((MR * NR * L,), "int32", scope="global")
                yt = T.alloc_buffer((MR * NR * L,), out_dt, scope="global")
                for r in T.unroll(MR):  # the accumulators start at the bias
                    for v in T.unroll(NR):
                        for lane in T.vectorized(L):
                            acc[(r * NR + v) * L + lane] = B[
                                T.min(((t // PT) * NR + v) * L + lane, Np - 1)]
                for cb in range(CB):
                    for kh in range(KH):
                        for kw in range(KW):
                            for r in T.unroll(MR):
                                for v in T.unroll(NR):
                                    _dot4(acc, (r * NR + v) * L, splat(Xc.vload([4 * xat(
                                        kh, kw, cb, (t % PT) // TW * Wq + (t % PT) % TW * MR
                                        + r)], "uint8x4"), L, "uint8x64"),
                                        Wv.vload([T.min((t // PT) * NR + v, OV - 1),
                                                  (cb * KH + kh) * KW + kw, 0, 0], "int8x64"))
                for r in T.unroll(MR):
                    for v in T.unroll(NR):
                        for lane in T.vectorized(L):
                            _store(yt, (r * NR + v) * L + lane, acc, (r * NR + v) * L + lane,
                                   T.Cast("int64", M[T.min(((t // PT) * NR + v) * L + lane,
                                                            Np - 1)]),
                                   requant_terms(S[T.min(((t // PT) * NR + v) * L + lane,
                                                         Np - 1)])[0],
                                   requant_terms(S[T.min(((t // PT) * NR + v) * L + lane,
                                                         Np - 1)])[1])
                # the transpose: each channel's MR pixels, those inside the row and the
                # channels that exist
                for c in range(NR * L):
                    if (t // PT) * NR * L + c < OC:
                        for r in T.unroll(MR):
                            if (t % PT) % TW * MR + r < OW:
                                Yf[((t // PT) * NR * L + c) * OH * OW + (t % PT) // TW * OW
                                   + (t % PT) % TW * MR + r] = yt[r * NR * L + c]

    return pack, kernel, scratch_bytes


__all__ = ["MAX_TILE", "PACK_LANES", "STORE_LANES", "channel_lanes", "conv2d_lanes_kernel",
           "lanes_params", "lanes_tile", "pack_lanes_weight"]
