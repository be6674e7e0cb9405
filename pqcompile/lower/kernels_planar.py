"""Planar integer kernels: depthwise conv and max pool (one channel per tile, no dot product
across channels), on the padded planar scratch of :func:`pqcompile.lower.kernels.conv2d_kernel`'s
pack with the generic (depth 1) layout.

The depthwise conv has three schedules (:func:`dw_schedule`):

- ``rows``: a tile is one output row of one channel, in vectors of ``L`` pixels (the last one
  overlapping the one before where ``L`` does not divide the width), stored straight into
  NCHW; each tap is a vector widening multiply-add with the tap's weight broadcast.
- ``rows-vnni`` (AVX-512 VNNI, uint8 input): the same tiles, but the taps of a kernel row go
  4 at a time into one ``vpdpbusd``: one byte shuffle lays out, for each of 16 pixels, the 4
  input bytes its 4 taps read (at stride 2, every other byte) next to the 4 tap weights.
  Both read padded planes without stride phases (``vpermb`` picks the bytes).
- ``grid`` (rows narrower than a vector): a tile is ``NR`` vectors of the channel's output
  grid (output rows x padded input columns, a few junk columns per row), copied out to NCHW
  at the end.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .kernels import KERNEL_ATTR, ConvShape, Isa, _requant_macro, conv2d_kernel


def dw_isa(isa: Isa) -> Isa:
    """Depthwise convs use plain widening multiply-adds (one channel per plane, no dot
    product across channels): the planar generic packing at the instruction set's width."""
    return Isa("generic", isa.lanes, 1, max(1, min(8, 1020 // (isa.lanes * 4))))


def dw_schedule(shape: ConvShape, isa: Isa) -> str:
    """``"rows-vnni"``, ``"rows"`` or ``"grid"`` for a depthwise conv (see the module doc)."""
    L = dw_isa(isa).lanes
    ow = shape.out_hw[1]
    if ow < L or -(-ow // L) * L * 4 >= 1024:  # narrow rows; or a row's tile 1 KiB or more
        return "grid"
    if isa.name == "vnni" and shape.in_dtype == "uint8" and shape.kernel[1] <= 8:
        return "rows-vnni"
    return "rows"


def pack_dw_weight(q: np.ndarray, shape: ConvShape, isa: Isa) -> np.ndarray:
    """``[C, 1, KH, KW]`` int8 -> the depthwise kernel's weights: ``[C, KH * KW]``, or for
    ``rows-vnni`` ``[C, KH * G * 4]`` (each kernel row's taps in ``G`` <= 2 words of 4,
    zero-padded)."""
    c, _, kh, kw = q.shape
    if dw_schedule(shape, isa) != "rows-vnni":
        return np.ascontiguousarray(q.reshape(c, kh * kw))
    g = -(-kw // 4)
    w = np.zeros((c, kh, g * 4), np.int8)
    w[:, :, :kw] = q.reshape(c, kh, kw)
    return w.reshape(c, kh * g * 4)


def dwconv2d_kernel(shape: ConvShape, isa: Isa):
    """Depthwise conv (groups = channels = out channels): ``(pack, kernel, scratch)`` like
    :func:`conv2d_kernel`; the kernel is ``(Xc, Wd, B, M, S, Y)`` with ``Wd`` from
    :func:`pack_dw_weight`, scheduled as :func:`dw_schedule` says (see the module doc)."""
    from tvm.script import tirx as T

    schedule = dw_schedule(shape, isa)
    isa = dw_isa(isa)
    if schedule != "grid":  # packed as for stride 1: padded planes, no stride phases
        pack, _, scratch = conv2d_kernel(dataclasses.replace(shape, stride=1), isa)
        return pack, _dw_rows(shape, isa, scratch, schedule == "rows-vnni"), scratch
    pack, _, scratch = conv2d_kernel(shape, isa)
    C, H, W = shape.channels, shape.height, shape.width
    KH, KW = shape.kernel
    PW, PH = shape.padding[1], shape.padding[0]
    s = shape.stride
    OH, OW = shape.out_hw
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    L = isa.lanes
    Wq = -(-(W + 2 * PW) // s)
    Hq = -(-(H + 2 * PH) // s)
    NV = -(-(OH * Wq) // L)
    NR = min(isa.nr, NV)
    QB = -(-NV // NR)
    plane = Hq * Wq
    grid = QB * NR * L
    _store = _requant_macro(out_dt, lo, hi)

    @T.prim_func(s_tir=True)
    def kernel(Xc: T.Buffer((scratch,), in_dt), Wd: T.Buffer((C, KH * KW), "int8"),
               B: T.Buffer((C,), "int32"), M: T.Buffer((C,), "int32"),
               S: T.Buffer((C,), "int32"), Y: T.Buffer((1, C, OH, OW), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "dwconv2d"})
        with T.sblock("root"):
            Yg = T.alloc_buffer((C * grid,), out_dt)
            for c_qb in T.parallel(C * QB):
                acc = T.alloc_buffer((NR * L,), "int32", scope="global")
                for v in T.unroll(NR):
                    acc[T.ramp(v * L, 1, L)] = T.broadcast(T.int32(0), L)
                for kh in T.unroll(KH):
                    for kw in T.unroll(KW):
                        for v in T.unroll(NR):
                            for lane in T.vectorized(L):
                                acc[v * L + lane] = acc[v * L + lane] + T.Cast("int32", Xc[
                                    (((kh % s) * s + kw % s) * C + c_qb // QB) * plane
                                    + (kh // s) * Wq + kw // s
                                    + ((c_qb % QB) * NR + v) * L + lane]) \
                                    * T.Cast("int32", Wd[c_qb // QB, kh * KW + kw])
                for v in T.unroll(NR):
                    for lane in T.vectorized(L):
                        _store(Yg, c_qb // QB * grid + ((c_qb % QB) * NR + v) * L + lane, acc,
                               v * L + lane, c_qb // QB, B, M, S)
            for c_oh in T.parallel(C * OH):
                for ow in T.vectorized(OW):
                    Y[0, c_oh // OH, c_oh % OH, ow] = Yg[c_oh // OH * grid + c_oh % OH * Wq + ow]

    return pack, kernel, scratch


def _dw_rows(shape: ConvShape, isa: Isa, scratch: int, vnni: bool):
    """The ``rows`` / ``rows-vnni`` depthwise kernel (see the module doc) on the padded planar
    scratch ``[C][H + 2 PH][W + 2 PW]`` (no stride phases: a stride-2 tap's 16 pixels are
    every other byte of one load, picked by the shuffle)."""
    from tvm.script import tirx as T

    C, H, W = shape.channels, shape.height, shape.width
    KH, KW = shape.kernel
    PH, PW = shape.padding
    s = shape.stride
    OH, OW = shape.out_hw
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    L = isa.lanes
    Wp = W + 2 * PW
    plane = (H + 2 * PH) * Wp
    VPR = -(-OW // L)  # vectors per output row, the last one ending at the row's end
    G = -(-KW // 4)
    WK = KH * G * 4 if vnni else KH * KW
    _store = _requant_macro(out_dt, lo, hi)
    # The bytes a kernel row's taps read for L pixels: one load of N bytes (two of N/2, as a
    # shuffle may not have more lanes than its inputs), the shuffle picks pixel i's tap kw at
    # i * s + kw: for rows-vnni 4 taps per pixel (a missing tap repeats tap 0, its weight 0),
    # else one tap per shuffle (stride 2 only; stride 1 loads the tap's pixels directly).
    N = max(4 * L if vnni else 2 * L, 1 << ((L - 1) * s + KW - 1).bit_length())
    taps = [[min(kw, KW - 1) if kw < KW else 4 * g for kw in range(4 * g, 4 * g + 4)]
            for g in range(G)]
    last = (C - 1) * plane + ((OH - 1) * s + KH - 1) * Wp + (OW - L) * s + N
    assert last <= scratch, (shape, last, scratch)  # the pack's slack covers the loads

    def picked(Xc, base, pattern):
        return T.Shuffle([Xc.vload([base], f"{in_dt}x{N // 2}"),
                          Xc.vload([base + N // 2], f"{in_dt}x{N // 2}")], pattern)

    @T.macro
    def _vdot(acc, a, data, Wd, c, w):  # acc[a:a+16] += 16 pixels' 4 bytes . Wd[c, w:w+4]
        acc[T.ramp(a, 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            acc.vload([a], "int32x16"), data,
            T.reinterpret(T.broadcast(T.reinterpret(Wd.vload([c, w], "int8x4"), dtype="int32"),
                                      16), dtype="int8x64"), dtype="int32x16")

    @T.prim_func(s_tir=True)
    def kernel(Xc: T.Buffer((scratch,), in_dt), Wd: T.Buffer((C, WK), "int8"),
               B: T.Buffer((C,), "int32"), M: T.Buffer((C,), "int32"),
               S: T.Buffer((C,), "int32"), Y: T.Buffer((1, C, OH, OW), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "dwconv2d"})
        with T.sblock("root"):
            Yf = T.decl_buffer((C * OH * OW,), out_dt, data=Y.data)
            for c_oh in T.parallel(C * OH):
                acc = T.alloc_buffer((VPR * L,), "int32", scope="global")
                for v in T.unroll(VPR):
                    acc[T.ramp(v * L, 1, L)] = T.broadcast(T.int32(0), L)
                for kh in T.unroll(KH):
                    for v in T.unroll(VPR):
                        if vnni:
                            _vdot(acc, v * L, picked(
                                Xc, c_oh // OH * plane + (c_oh % OH * s + kh) * Wp
                                + T.min(v * L, OW - L) * s,
                                [i * s + taps[0][t] for i in range(L) for t in range(4)]),
                                Wd, c_oh // OH, kh * G * 4)
                            if G > 1:
                                _vdot(acc, v * L, picked(
                                    Xc, c_oh // OH * plane + (c_oh % OH * s + kh) * Wp
                                    + T.min(v * L, OW - L) * s,
                                    [i * s + taps[G - 1][t] for i in range(L) for t in range(4)]),
                                    Wd, c_oh // OH, (kh * G + G - 1) * 4)
                        elif s == 1:
                            for kw in T.unroll(KW):
                                for lane in T.vectorized(L):
                                    acc[v * L + lane] = acc[v * L + lane] + T.Cast("int32", Xc[
                                        c_oh // OH * plane + (c_oh % OH + kh) * Wp + kw
                                        + T.min(v * L, OW - L) + lane]) \
                                        * T.Cast("int32", Wd[c_oh // OH, kh * KW + kw])
                        else:
                            for kw in range(KW):  # unrolled by LLVM; the shuffle needs kw known
                                acc[T.ramp(v * L, 1, L)] = acc.vload([v * L], f"int32x{L}") \
                                    + T.Cast(f"int32x{L}", picked(
                                        Xc, c_oh // OH * plane + (c_oh % OH * s + kh) * Wp + kw
                                        + T.min(v * L, OW - L) * s, [i * s for i in range(L)])) \
                                    * T.broadcast(T.Cast("int32", Wd[c_oh // OH, kh * KW + kw]), L)
                for v in T.unroll(VPR):
                    for lane in T.vectorized(L):
                        _store(Yf, c_oh * OW + T.min(v * L, OW - L) + lane, acc, v * L + lane,
                               c_oh // OH, B, M, S)

    return kernel


def maxpool2d_kernel(shape: ConvShape, isa: Isa):
    """Max pool on the integers (stride 1 or 2, no dilation, floor mode): ``(pack, kernel,
    scratch)`` with ``kernel(Xc, Y)``. The scratch is the depthwise conv's padded planar one,
    padded with the dtype's minimum; each tile takes the vector max over the window's taps,
    a byte per lane."""
    from tvm.script import tirx as T

    lanes = 4 * dw_isa(isa).lanes  # bytes, not int32 accumulators
    tile = Isa("generic", lanes, 1, max(1, min(3, 1020 // (lanes * 4))))
    low = 0 if shape.in_dtype == "uint8" else -128
    pack, _, scratch = conv2d_kernel(shape, tile, pad=low)
    C, H, W = shape.channels, shape.height, shape.width
    KH, KW = shape.kernel
    PH, PW = shape.padding
    s = shape.stride
    OH, OW = shape.out_hw
    dt = shape.in_dtype
    L = tile.lanes
    Wq = -(-(W + 2 * PW) // s)
    Hq = -(-(H + 2 * PH) // s)
    NV = -(-(OH * Wq) // L)
    NR = min(tile.nr, NV)
    QB = -(-NV // NR)
    plane = Hq * Wq
    grid = QB * NR * L

    @T.prim_func(s_tir=True)
    def kernel(Xc: T.Buffer((scratch,), dt), Y: T.Buffer((1, C, OH, OW), dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "maxpool2d"})
        with T.sblock("root"):
            Yg = T.alloc_buffer((C * grid,), dt)
            for c_qb in T.parallel(C * QB):
                for v in T.unroll(NR):
                    for lane in T.vectorized(L):
                        Yg[c_qb // QB * grid + ((c_qb % QB) * NR + v) * L + lane] = T.Cast(dt, low)
                    for kh in T.unroll(KH):
                        for kw in T.unroll(KW):
                            for lane in T.vectorized(L):
                                Yg[c_qb // QB * grid + ((c_qb % QB) * NR + v) * L + lane] = T.max(
                                    Yg[c_qb // QB * grid + ((c_qb % QB) * NR + v) * L + lane],
                                    Xc[(((kh % s) * s + kw % s) * C + c_qb // QB) * plane
                                       + (kh // s) * Wq + kw // s
                                       + ((c_qb % QB) * NR + v) * L + lane])
            for c_oh in T.parallel(C * OH):
                for ow in T.vectorized(OW):
                    Y[0, c_oh // OH, c_oh % OH, ow] = Yg[c_oh // OH * grid + c_oh % OH * Wq + ow]

    return pack, kernel, scratch
