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


def _dw_rows_layout(shape: ConvShape, L: int) -> tuple[int, int, int]:
    """``(R, V, N)`` of the row schedules: ``R`` output rows per vector (0 where a row is at
    least ``L`` pixels: a tile is then one row of ``V`` vectors; else as many whole rows as
    fit in ``L`` lanes, and a tile is the channel's plane in ``V`` vectors), ``N`` the bytes
    one vector's taps span (a power of two, at least ``4 L``)."""
    oh, ow = shape.out_hw
    s, kw = shape.stride, shape.kernel[1]
    r = 0 if ow >= L else min(L // ow, oh)
    v = -(-ow // L) if r == 0 else -(-oh // r)
    span = (max(r, 1) - 1) * s * (shape.width + 2 * shape.padding[1]) + (min(ow, L) - 1) * s + kw
    return r, v, max(4 * L, 1 << (span - 1).bit_length())


def dw_schedule(shape: ConvShape, isa: Isa) -> str:
    """``"rows-vnni"``, ``"rows"`` or ``"grid"`` for a depthwise conv (see the module doc)."""
    L = dw_isa(isa).lanes
    r, v, n = _dw_rows_layout(shape, L)
    if v * L * 4 >= 1024 or n > 128:  # a tile of 1 KiB or more; taps beyond two vectors
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
        pack, _, scratch = conv2d_kernel(dataclasses.replace(shape, stride=1), isa,
                                         slack=_dw_rows_layout(shape, isa.lanes)[2])
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
    scratch ``[C][H + 2 PH][W + 2 PW]`` (no stride phases: a stride-2 tap's pixels are every
    other byte of one load, picked by the shuffle)."""
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
    R, V, N = _dw_rows_layout(shape, L)
    NT = OH if R == 0 else 1  # tiles per channel
    U = L if R == 0 else R * OW  # the lanes a vector stores
    G = -(-KW // 4)
    WK = KH * G * 4 if vnni else KH * KW
    _store = _requant_macro(out_dt, lo, hi)
    # Lane i of a vector is column i of its row (R = 0), or pixel (i // OW, i % OW) of its R
    # rows; tap kw reads it at off[i] * s + kw past the vector's first input byte: one load
    # of N bytes (two of N/2: a shuffle may not have more lanes than its inputs), a shuffle
    # picks the bytes: for rows-vnni 4 taps per pixel (a missing tap repeats tap 0, its
    # weight 0), else one tap per shuffle (contiguous loads instead where R = 0 and the
    # stride is 1). Junk lanes (i >= U) read lane 0's bytes and are not stored.
    off = [i if R == 0 else (i // OW) * Wp + i % OW if i < U else 0 for i in range(L)]
    taps = [[kw if kw < KW else 4 * g for kw in range(4 * g, 4 * g + 4)] for g in range(G)]
    last = (C - 1) * plane + ((OH - 1) * s + KH - 1) * Wp + (OW - min(OW, L)) * s + N
    assert last <= scratch, (shape, last, scratch)  # the pack's slack covers the loads

    def picked(Xc, base, pattern):
        return T.Shuffle([Xc.vload([base], f"{in_dt}x{N // 2}"),
                          Xc.vload([base + N // 2], f"{in_dt}x{N // 2}")], pattern)

    def first(t, v):  # the vector's first input byte, less the channel's plane
        if R == 0:
            return (t % OH * s) * Wp + T.min(v * L, OW - L) * s
        return T.min(v * R, OH - R) * s * Wp

    def out(t, v):  # the vector's first output pixel in the channel's plane
        return t % OH * OW + T.min(v * L, OW - L) if R == 0 else T.min(v * R, OH - R) * OW

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
            for t in T.parallel(C * NT):
                acc = T.alloc_buffer((V * L,), "int32", scope="global")
                for v in T.unroll(V):
                    acc[T.ramp(v * L, 1, L)] = T.broadcast(T.int32(0), L)
                for kh in T.unroll(KH):
                    for v in T.unroll(V):
                        if vnni:
                            _vdot(acc, v * L, picked(
                                Xc, t // NT * plane + kh * Wp + first(t, v),
                                [off[i] * s + taps[0][j] for i in range(L) for j in range(4)]),
                                Wd, t // NT, kh * G * 4)
                            if G > 1:
                                _vdot(acc, v * L, picked(
                                    Xc, t // NT * plane + kh * Wp + first(t, v),
                                    [off[i] * s + taps[G - 1][j] for i in range(L)
                                     for j in range(4)]),
                                    Wd, t // NT, (kh * G + G - 1) * 4)
                        elif s == 1 and R == 0:
                            for kw in T.unroll(KW):
                                for lane in T.vectorized(L):
                                    acc[v * L + lane] = acc[v * L + lane] + T.Cast("int32", Xc[
                                        t // NT * plane + kh * Wp + kw + first(t, v) + lane]) \
                                        * T.Cast("int32", Wd[t // NT, kh * KW + kw])
                        else:
                            for kw in range(KW):  # unrolled by LLVM; the shuffle needs kw known
                                acc[T.ramp(v * L, 1, L)] = acc.vload([v * L], f"int32x{L}") \
                                    + T.Cast(f"int32x{L}", picked(
                                        Xc, t // NT * plane + kh * Wp + kw + first(t, v),
                                        [off[i] * s for i in range(L)])) \
                                    * T.broadcast(T.Cast("int32", Wd[t // NT, kh * KW + kw]), L)
                for v in T.unroll(V):
                    for lane in T.vectorized(U):
                        _store(Yf, t // NT * OH * OW + out(t, v) + lane, acc, v * L + lane,
                               t // NT, B, M, S)

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
