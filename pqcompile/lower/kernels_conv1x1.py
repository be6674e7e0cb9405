"""The 1x1 conv kernel (stride 1, no pad): no separate pack, each task interleaves its own
pixels (see :func:`conv1x1_kernel`); the layout, tiles and epilogue are those of
:func:`pqcompile.lower.kernels.conv2d_kernel`."""

from __future__ import annotations

from .kernel_types import KERNEL_ATTR, ConvShape, Isa, parallel_worth
from .tir_macros import (
    acc_macros,
    channel_macros,
    dot_macro,
    dot_pair_macro,
    dot_steps,
    row_macro,
    tail_store_macro,
)


def conv1x1_kernel(shape: ConvShape, isa: Isa):
    """A 1x1 conv (stride 1, no pad) as one kernel on the NCHW input: each task packs its
    block of ``NR * L`` pixels, every input channel, into a channel-interleaved buffer of its
    own (a separate pack would be one more pass over memory and one more parallel launch),
    then computes a chunk of the output-channel blocks on it, storing straight into NCHW.
    Where there are few pixel blocks, the output channels are split into up to ``NOC``
    chunks (each task packing its pixels again) so that there are tasks for every thread."""
    from tvm.script import tirx as T

    C, H, W, OC = shape.channels, shape.height, shape.width, shape.out_channels
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    L, MR, D = isa.lanes, isa.mr, isa.depth
    CB, OB, NQ = -(-C // D), -(-OC // MR), H * W
    NV = -(-NQ // L)
    NR = min(isa.nr, NV)
    QB = -(-NV // NR)
    NRL = NR * L  # pixels per task
    # at least 8 tasks where the output channels allow 32 or more per chunk
    OBC = -(-OB // max(1, min(-(-8 // QB), OC // 32, OB)))  # output-channel blocks per chunk
    NOC = -(-OB // OBC)
    par = parallel_worth(macs=OC * NQ * C)
    off = isa.offset(in_dt)
    pdt = isa.packed_dtype or in_dt
    _row = row_macro(D, 1, NQ, C * NQ, in_dt, pdt, off, 16 if NRL >= 16 else 8)
    _dot = dot_macro(isa)
    _dot2, P = dot_pair_macro(isa), dot_steps(isa)
    _init, _finish = acc_macros(isa)
    AW = isa.acc_width
    arm = isa.name in ("sdot", "neon")  # the NEON epilogue
    _kload, _kstore = channel_macros(out_dt, lo, hi, shape.narrow, L, arm)
    _, _kstore32 = channel_macros("int32", lo, hi, shape.narrow, L, arm)  # partial vectors
    _tail = tail_store_macro(out_dt, L)

    def p0(t):  # the task's first pixel
        return t // NOC * NRL

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((1, C, H, W), in_dt), Wp: T.Buffer((OB, CB, MR, D), "int8"),
               B: T.Buffer((OB * MR,), "int32"), M: T.Buffer((OB * MR,), "int32"),
               S: T.Buffer((OB * MR,), "int32"), Y: T.Buffer((1, OC, H, W), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "conv2d"})
        with T.sblock("root"):
            Xf = T.decl_buffer((C * NQ,), in_dt, data=X.data)
            Yf = T.decl_buffer((OC * NQ,), out_dt, data=Y.data)
            for t in T.parallel(QB * NOC) if par else T.serial(QB * NOC):
                # the task's pixels, interleaved [CB][NRL][D] (pixels past the plane are
                # left as they are: their lanes are never stored)
                Xl = T.alloc_buffer((CB * NRL * D,), pdt, scope="global")
                for cb in range(CB):
                    if cb * D + D <= C:
                        _row(Xl, Xf, cb * NRL * D, cb * D * NQ + p0(t), 0,
                             T.min(NRL, NQ - p0(t)))
                    else:
                        for j in range(T.min(NRL, NQ - p0(t))):
                            for e in T.unroll(D):
                                Xl[(cb * NRL + j) * D + e] = T.if_then_else(
                                    cb * D + e < C, T.Cast(pdt, T.Cast("int32", Xf[
                                        T.min(cb * D + e, C - 1) * NQ + p0(t) + j]) + off),
                                    T.Cast(pdt, off))
                acc = T.alloc_buffer((MR * NR * L * AW,), "int32", scope="global")
                yv = T.alloc_buffer((L,), "int32", scope="global")
                kc = T.alloc_buffer((3 * MR,), "int64", scope="global")
                for ob in range(t % NOC * OBC, T.min(t % NOC * OBC + OBC, OB)):
                    for r in T.unroll(MR):  # the accumulators start at the bias
                        for v in T.unroll(NR):
                            _init(acc, (r * NR + v) * L, B[ob * MR + r])
                    for cp in range(CB // P):  # P channel blocks a step (neon: 2)
                        for r in T.unroll(MR):
                            for v in T.unroll(NR):
                                _dot2(acc, Xl, Wp, ob, cp * P, 1, r, (r * NR + v) * L,
                                      cp * P * NRL + v * L, NRL)
                    for cb in range(CB // P * P, CB):  # the channel blocks left over
                        for r in T.unroll(MR):
                            for v in T.unroll(NR):
                                _dot(acc, Xl, Wp, ob, cb, r, (r * NR + v) * L, cb * NRL + v * L)
                    for r in T.unroll(MR):
                        for v in T.unroll(NR):
                            _finish(acc, (r * NR + v) * L, B[ob * MR + r])
                    for r in T.unroll(MR):
                        _kload(kc, 3 * r, ob * MR + r, M, S)
                    for r in T.unroll(MR):
                        for v in T.unroll(NR):
                            if ob * MR + r < OC:
                                if p0(t) + v * L + L <= NQ:
                                    _kstore(Yf, (ob * MR + r) * NQ + p0(t) + v * L,
                                            acc, (r * NR + v) * L, kc, 3 * r, L)
                                elif p0(t) + v * L < NQ:  # the plane's last vector
                                    _kstore32(yv, 0, acc, (r * NR + v) * L, kc, 3 * r, L)
                                    _tail(Yf, (ob * MR + r) * NQ + p0(t) + v * L,
                                          yv.vload([0], f"int32x{L}"), 0, NQ - p0(t) - v * L)

    return kernel
