"""Planar integer kernels: depthwise conv and max pool (one channel per tile, no dot product
across channels), on the padded planar scratch of :func:`pqcompile.lower.kernels.conv2d_kernel`'s
pack with the generic (depth 1) layout."""

from __future__ import annotations

from .kernels import KERNEL_ATTR, ConvShape, Isa, _requant_macro, conv2d_kernel


def dw_isa(isa: Isa) -> Isa:
    """Depthwise convs use plain widening multiply-adds (one channel per plane, no dot
    product across channels): the planar generic packing at the instruction set's width."""
    return Isa("generic", isa.lanes, 1, max(1, min(8, 1020 // (isa.lanes * 4))))


def dwconv2d_kernel(shape: ConvShape, isa: Isa):
    """Depthwise conv (groups = channels = out channels): ``(pack, kernel, scratch)`` like
    :func:`conv2d_kernel`; the kernel is ``(Xc, Wd[C, KH * KW], B, M, S, Y)``. Each tile is one
    channel x ``NR`` vectors of its output grid; every tap is a vector widening
    multiply-add with the tap's weight broadcast."""
    from tvm.script import tirx as T

    isa = dw_isa(isa)
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
