"""Hand-scheduled integer convolution kernels (TIR), chosen per target instruction set.

One kernel computes a whole quantized conv layer: ``int8/uint8`` input (NCHW) -> int32
accumulators -> bias, fixed-point requantization, clamp -> ``int8/uint8`` output (NCHW), the
same arithmetic as :func:`pqcompile.lower.ops.requant` (so the integers are the reference's).

Layout (direct convolution; im2col on small aarch64 maps only): the kernel first copies the
input into a padded,
channel-interleaved scratch buffer ``[phase][C/4][rows][cols][4]`` (4 channels of a pixel in one
32-bit word; stride-2 convs are split into 4 stride-1 "phases" of even/odd rows and columns),
so that for any kernel tap the 4-channel words of 16 consecutive output pixels are one
contiguous 64-byte vector. The output is computed on a ``rows x cols`` grid (a few junk columns
per row: the pad) in blocks of ``MR`` output channels x ``NR`` vectors of ``L`` pixels held in
registers (the parallel tasks take them pixel tiles or channel blocks outer,
:func:`pixel_tiles_outer`), and each vector is stored straight into NCHW: one masked store per grid row its
lanes span, of the lanes that are output columns. On aarch64, where those junk columns are
10% of the lanes or more (small maps, :func:`~pqcompile.lower.kernel_types.im2col`), the pack
also writes an im2col copy (each tap's words of the output pixels, contiguous) after the
padded planes, and the kernel reads that instead.

The inner step is one dot-product instruction per (output channel, pixel vector):

- ``vnni`` (x86 AVX-512 VNNI, 16 pixels): ``vpdpbusd``, uint8 x int8; a signed input is
  offset by +128 and the offset's contribution (128 x the channel's weight sum) is taken out
  of the bias at lowering time;
- ``sdot`` (aarch64 ``+dotprod``, 4 pixels): ``sdot``, int8 x int8; an unsigned input is
  offset by -128 the same way;
- ``neon`` (aarch64 without ``sdot``, 4 pixels): the ``sdot`` layout, each step two
  ``smull`` and two ``sadalp`` (:func:`~pqcompile.lower.tir_macros.smull_pairs_macro`);
- ``generic`` (any CPU): 4 widening multiply-adds per step, vectorized by LLVM.

The weights are pre-packed once at lowering time (:func:`pack_weight`) as
``[O/MR][C/4 * KH * KW][MR][4]``. The accumulators start at the bias, and each tile reads
its channels' requantization constants once
(:func:`~pqcompile.lower.tir_macros.channel_macros`). The 1x1 conv
(:mod:`~pqcompile.lower.kernels_conv1x1`), the depthwise conv and max pool
(:mod:`~pqcompile.lower.kernels_planar`) and the linear kernel
(:mod:`~pqcompile.lower.kernels_linear`) share the row copies, the tiles and the epilogue
(:mod:`~pqcompile.lower.tir_macros`).
"""

from __future__ import annotations

import functools

import numpy as np

from .kernel_types import (
    AVX2U_MAX_WEIGHT,
    ISAS,
    KERNEL_ATTR,
    ConvShape,
    Isa,
    choose_tile,
    fit_isa,
    grid_vectors,
    im2col,
    isa_for,
    parallel_worth,
    supported,
)
from .kernels_conv1x1 import conv1x1_kernel
from .tir_macros import (
    acc_macros,
    channel_macros,
    dot_macro,
    dot_pair_macro,
    dot_steps,
    row_macro,
    tail_store_macro,
)

def pack_weight(q: np.ndarray, isa: Isa) -> np.ndarray:
    """``[O, C, KH, KW]`` int8 -> ``[O/MR, C/D * KH * KW, MR, D]`` (zero-padded) int8, ``D``
    the instruction set's dot-product depth."""
    o, c, kh, kw = q.shape
    d = isa.depth
    ob, cb = -(-o // isa.mr), -(-c // d)
    w = np.zeros((ob * isa.mr, cb * d, kh, kw), np.int8)
    w[:o, :c] = q
    # [ob, mr, cb, d, kh, kw] -> [ob, cb, kh, kw, mr, d]
    w = w.reshape(ob, isa.mr, cb, d, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    if dot_steps(isa) == 2 and cb >= 2:
        # the kernel steps two channel blocks at once: [cb/2][kh][kw][2] (the odd block last)
        even = cb // 2 * 2
        pairs = w[:, :even].reshape(ob, cb // 2, 2, kh * kw, isa.mr, d).transpose(
            0, 1, 3, 2, 4, 5)
        w = np.concatenate([pairs.reshape(ob, even * kh * kw, isa.mr, d),
                            w[:, even:].reshape(ob, (cb - even) * kh * kw, isa.mr, d)], axis=1)
    return np.ascontiguousarray(w.reshape(ob, cb * kh * kw, isa.mr, d))


def channel_params(q: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray,
                   shape: ConvShape, isa: Isa) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bias (less the input offset's contribution), multiplier and shift, padded to MR."""
    o = q.shape[0]
    pad = -(-o // isa.mr) * isa.mr - o
    b = bias.astype(np.int64) - isa.offset(shape.in_dtype) * \
        q.reshape(o, -1).astype(np.int64).sum(axis=1)
    fix = lambda a, fill: np.concatenate([a.astype(np.int64), np.full(pad, fill)])  # noqa: E731
    return (fix(b, 0).astype(np.int32), fix(mult, 0).astype(np.int32),
            fix(shift, 40).astype(np.int32))  # pads: any valid shift


def pixel_tiles_outer(weight_bytes: int, input_bytes: int, pixel_tiles: int,
                      channel_blocks: int) -> bool:
    """The conv kernel's task order: pixel tiles outer (each task's tile of every output
    channel block in turn) or channel blocks outer. The operand the inner index sweeps is read
    again for each outer step (pixel tiles outer: all the weights once a tile; channel blocks
    outer: all the input once a block), so the outer index is the one whose sweep moves more
    bytes. Measured, 2 threads, against channel blocks outer: 48 -> 48 3x3 at 56x56 0.154 ->
    0.145 ms, 64 -> 128 3x3 stride 2 at 56x56 0.157 -> 0.129 ms; late layers (more weights
    than pixels) unchanged either way."""
    return pixel_tiles * weight_bytes < channel_blocks * input_bytes


@functools.cache  # built once per shape: TVMScript parsing is slow
def conv2d_kernel(shape: ConvShape, isa: Isa, pad: int | None = None):
    """``(pack, kernel, scratch)``: ``pack(X) -> Xc`` and ``kernel(Xc, Wp, B, M, S, Y)`` for one
    conv layer (see the module doc); ``pad``: the value of the pad (default: a zero input).
    A 1x1 conv (stride 1, no pad) has no pack (``pack`` None, ``scratch`` 0): its kernel
    takes the NCHW input ``X`` in place of ``Xc``
    (:func:`~pqcompile.lower.kernels_conv1x1.conv1x1_kernel`)."""
    from tvm.script import tirx as T

    if shape.kernel == (1, 1) and shape.stride == 1 and shape.padding == (0, 0) and pad is None:
        return None, conv1x1_kernel(shape, isa), 0

    C, H, W, OC = shape.channels, shape.height, shape.width, shape.out_channels
    KH, KW = shape.kernel
    PH, PW = shape.padding
    s = shape.stride
    OH, OW = shape.out_hw
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    L, MR, D = isa.lanes, isa.mr, isa.depth
    CB = -(-C // D)
    OB = -(-OC // MR)
    KS = CB * KH * KW                       # dot-product steps
    Wq = -(-(W + 2 * PW) // s)              # grid columns per phase
    Hq = -(-(H + 2 * PH) // s)              # rows per phase
    cols = pad is None and im2col(shape, isa)  # the kernel reads an im2col copy
    NQ = OH * (OW if cols else Wq)          # output grid positions
    NV = -(-NQ // L)                        # pixel vectors
    NR = min(isa.nr, NV)
    QB = -(-NV // NR)                       # pixel tiles
    plane = Hq * Wq                         # grid positions per (phase, channel block)
    if isa.name == "neon":  # whole 8-byte words apart: the next block's loads take offsets
        plane += plane % 2
    phases = s * s
    # Junk lanes of the last tile read past the last plane: slack so they stay in bounds.
    scratch = phases * CB * plane + QB * NR * L + (KH // s + 1) * Wq + KW + L
    # the im2col copy after the padded planes: [tap][CB][NQ2] words, NQ2 the pixels of the
    # tiles (junk lanes of the last tile read inside the plane)
    NQ2, base = QB * NR * L, scratch
    if cols:
        scratch += KH * KW * CB * NQ2
    off = isa.offset(in_dt)
    pdt = isa.packed_dtype or in_dt
    pad_value = off if pad is None else pad  # a zero input, offset
    direct = cols or Wq == OW  # 1x1 convs, im2col: no junk columns
    par = parallel_worth(macs=OC * OH * OW * C * KH * KW)
    par_pack = parallel_worth(nbytes=scratch * D)
    flat = s == 1 and PH == 0 and PW == 0
    moved = H * W if flat else W // s  # columns a row copy moves
    _row = row_macro(D, s, H * W, C * H * W, in_dt, pdt, off,
                      16 if moved >= 16 else 8 if moved >= 8 else 4)
    _dot = dot_macro(isa)
    _dot2, P = dot_pair_macro(isa), dot_steps(isa)
    _init, _finish = acc_macros(isa)
    AW = isa.acc_width
    arm = isa.name in ("sdot", "neon")  # the NEON epilogue
    _kload, _kstore = channel_macros(out_dt, lo, hi, shape.narrow, L, arm)
    _, _kstore32 = channel_macros("int32", lo, hi, shape.narrow, L, arm)  # partial vectors
    _tail = tail_store_macro(out_dt, L)
    SEG = -(-(L - 1) // Wq) + 1  # grid rows a vector's lanes span

    def xat(kh, kw, cb, p):  # the word of tap (kh, kw), channel block cb, grid position p
        if cols:
            return base + ((kh * KW + kw) * CB + cb) * NQ2 + p
        return (((kh % s) * s + kw % s) * CB + cb) * plane + (kh // s) * Wq + kw // s + p

    DX = NQ2 if cols else plane  # words from one channel block to the next
    # neon walks a stride-2 grid's taps phase by phase (an im2col copy has no phases); for
    # the sdot kernels that split measured slower (a 7x7 stem 1.9 -> 2.8 M instructions)
    SP = s if isa.name == "neon" and not cols else 1

    if pixel_tiles_outer(OB * MR * KS * D, scratch * D, QB, OB):
        obi = lambda i: i % OB
        qbi = lambda i: i // OB
    else:
        obi = lambda i: i // QB
        qbi = lambda i: i % QB

    def row(ob_qb, v):  # the grid row of a vector's first lane
        return (qbi(ob_qb) * NR + v) * L // Wq

    def col(ob_qb, v):  # its grid column
        return (qbi(ob_qb) * NR + v) * L % Wq

    @T.prim_func(s_tir=True)
    def pack(X: T.Buffer((1, C, H, W), in_dt), Xc: T.Buffer((scratch * D,), pdt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "conv2d.pack"})
        with T.sblock("root"):
            Xf = T.decl_buffer((C * H * W,), in_dt, data=X.data)
            # padded, channel-interleaved, phase-split copy of the input, row by row: pad
            # rows and pad columns filled apart so the interior copy has no bounds checks
            # (LLVM vectorizes it, the D channels of a word interleaved by shuffles)
            if flat:  # no pad, stride 1: a channel plane is one contiguous row
                for cb in T.parallel(CB) if par_pack else T.serial(CB):
                    if cb * D + D <= C:
                        _row(Xc, Xf, cb * plane * D, cb * D * H * W, 0, H * W)
                    else:
                        for t in T.unroll(D):
                            for e in range(H * W):
                                Xc[(cb * plane + e) * D + t] = T.if_then_else(
                                    cb * D + t < C, T.Cast(pdt, T.Cast("int32", Xf[
                                        T.min(cb * D + t, C - 1) * H * W + e]) + off),
                                    T.Cast(pdt, pad_value))
            else:
                for pci in T.parallel(phases * CB * Hq) if par_pack else \
                        T.serial(phases * CB * Hq):
                    if (pci % Hq) * s + pci // (CB * Hq) // s - PH < 0 \
                            or (pci % Hq) * s + pci // (CB * Hq) // s - PH >= H:
                        for e in range(Wq * D):
                            Xc[((pci // Hq) * plane + pci % Hq * Wq) * D + e] = T.Cast(
                                pdt, pad_value)
                    else:
                        for e in range((PW - pci // (CB * Hq) % s + s - 1) // s * D):
                            Xc[((pci // Hq) * plane + pci % Hq * Wq) * D + e] = T.Cast(
                                pdt, pad_value)
                        for e in range((W + PW - pci // (CB * Hq) % s + s - 1) // s * D, Wq * D):
                            Xc[((pci // Hq) * plane + pci % Hq * Wq) * D + e] = T.Cast(
                                pdt, pad_value)
                        if (pci % (CB * Hq) // Hq) * D + D <= C:
                            _row(Xc, Xf, ((pci // Hq) * plane + pci % Hq * Wq) * D,
                                 (((pci % (CB * Hq) // Hq) * D) * H
                                  + (pci % Hq) * s + pci // (CB * Hq) // s - PH) * W
                                 + pci // (CB * Hq) % s - PW,
                                 (PW - pci // (CB * Hq) % s + s - 1) // s,
                                 (W + PW - pci // (CB * Hq) % s + s - 1) // s)
                        else:
                            for j in range((PW - pci // (CB * Hq) % s + s - 1) // s,
                                           (W + PW - pci // (CB * Hq) % s + s - 1) // s):
                                for t in T.unroll(D):
                                    Xc[((pci // Hq) * plane + pci % Hq * Wq + j) * D
                                       + t] = T.if_then_else(
                                        (pci % (CB * Hq) // Hq) * D + t < C,
                                        T.Cast(pdt, T.Cast("int32", X[
                                            0, T.min((pci % (CB * Hq) // Hq) * D + t, C - 1),
                                            (pci % Hq) * s + pci // (CB * Hq) // s - PH,
                                            j * s + pci // (CB * Hq) % s - PW]) + off),
                                        T.Cast(pdt, pad_value))
            for i in T.serial((base - phases * CB * plane) * D):
                Xc[phases * CB * plane * D + i] = T.Cast(pdt, pad_value)
            if cols:  # each tap's words of the output pixels, a row a vector copy
                Xw = T.decl_buffer((scratch,), "int32", data=Xc.data)
                for tc in T.parallel(KH * KW * CB) if par_pack else T.serial(KH * KW * CB):
                    for oh in range(OH):
                        Xw[T.ramp(base + tc * NQ2 + oh * OW, 1, OW)] = Xw.vload([
                            (((tc // CB // KW % s) * s + tc // CB % KW % s) * CB + tc % CB)
                            * plane + (oh + tc // CB // KW // s) * Wq + tc // CB % KW // s],
                            f"int32x{OW}")

    @T.prim_func(s_tir=True)
    def kernel(Xc: T.Buffer((scratch * D,), pdt), Wp: T.Buffer((OB, KS, MR, D), "int8"),
               B: T.Buffer((OB * MR,), "int32"), M: T.Buffer((OB * MR,), "int32"),
               S: T.Buffer((OB * MR,), "int32"), Y: T.Buffer((1, OC, OH, OW), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "conv2d"})
        with T.sblock("root"):
            Yf = T.decl_buffer((OC * OH * OW,), out_dt, data=Y.data)
            # 2. register-tiled direct convolution with the requantizing epilogue
            for ob_qb in T.parallel(OB * QB) if par else T.serial(OB * QB):
                # under 1 KiB, so it is a stack array LLVM keeps in registers (Isa checks)
                acc = T.alloc_buffer((MR * NR * L * AW,), "int32", scope="global")
                yv = T.alloc_buffer((L,), "int32", scope="global")
                for r in T.unroll(MR):  # the accumulators start at the bias
                    for v in T.unroll(NR):
                        _init(acc, (r * NR + v) * L, B[obi(ob_qb) * MR + r])
                for cp in range(CB // P):  # P channel blocks a step (neon: 2)
                    # the taps phase by phase (stride 2: a phase's taps are a plain grid,
                    # so their words and weights advance by constant steps)
                    for ph in T.unroll(SP):
                        for pw in T.unroll(SP):
                            for kh2 in range((KH - ph + SP - 1) // SP):
                                for kw2 in range((KW - pw + SP - 1) // SP):
                                    for r in T.unroll(MR):
                                        for v in T.unroll(NR):
                                            _dot2(acc, Xc, Wp, obi(ob_qb),
                                                  ((cp * KH + kh2 * SP + ph) * KW + kw2 * SP
                                                   + pw) * P, 1, r, (r * NR + v) * L,
                                                  xat(kh2 * SP + ph, kw2 * SP + pw, cp * P,
                                                      (qbi(ob_qb) * NR + v) * L), DX)
                # the channel block left over (P = 2, CB odd): two taps of a row a step
                if P == 2 and CB % 2 == 1:
                    for ph in T.unroll(SP):  # rows phase by phase, as above
                        for kh2 in range((KH - ph + SP - 1) // SP):
                            for jw in range(KW // 2):
                                for r in T.unroll(MR):
                                    for v in T.unroll(NR):
                                        _dot2(acc, Xc, Wp, obi(ob_qb),
                                              ((CB - 1) * KH + kh2 * SP + ph) * KW + 2 * jw, 1,
                                              r, (r * NR + v) * L,
                                              xat(kh2 * SP + ph, 2 * jw, CB - 1,
                                                  (qbi(ob_qb) * NR + v) * L),
                                              xat(0, 1, 0, 0) - xat(0, 0, 0, 0))
                            if KW % 2 == 1:
                                for r in T.unroll(MR):
                                    for v in T.unroll(NR):
                                        _dot(acc, Xc, Wp, obi(ob_qb),
                                             ((CB - 1) * KH + kh2 * SP + ph) * KW + KW - 1, r,
                                             (r * NR + v) * L,
                                             xat(kh2 * SP + ph, KW - 1, CB - 1,
                                                 (qbi(ob_qb) * NR + v) * L))
                for r in T.unroll(MR):
                    for v in T.unroll(NR):
                        _finish(acc, (r * NR + v) * L, B[obi(ob_qb) * MR + r])
                kc = T.alloc_buffer((3 * MR,), "int64", scope="global")
                for r in T.unroll(MR):
                    _kload(kc, 3 * r, obi(ob_qb) * MR + r, M, S)
                for r in T.unroll(MR):
                    for v in T.unroll(NR):
                        if obi(ob_qb) * MR + r < OC:
                            if direct and (qbi(ob_qb) * NR + v) * L + L <= NQ:
                                _kstore(Yf, (obi(ob_qb) * MR + r) * NQ  # the grid is the output
                                        + (qbi(ob_qb) * NR + v) * L,
                                        acc, (r * NR + v) * L, kc, 3 * r, L)
                            elif direct:  # the last vector: its lanes up to the end
                                if (qbi(ob_qb) * NR + v) * L < NQ:
                                    _kstore32(yv, 0, acc, (r * NR + v) * L, kc, 3 * r, L)
                                    _tail(Yf, (obi(ob_qb) * MR + r) * NQ
                                          + (qbi(ob_qb) * NR + v) * L,
                                          yv.vload([0], f"int32x{L}"), 0,
                                          NQ - (qbi(ob_qb) * NR + v) * L)
                            elif row(ob_qb, v) < OH and col(ob_qb, v) + L <= OW:
                                _kstore(Yf, ((obi(ob_qb) * MR + r) * OH  # one row's columns
                                             + row(ob_qb, v)) * OW + col(ob_qb, v),
                                        acc, (r * NR + v) * L, kc, 3 * r, L)
                            else:
                                # a vector of grid positions spans up to SEG grid rows: one
                                # masked store per row, of the lanes that are output columns
                                _kstore32(yv, 0, acc, (r * NR + v) * L, kc, 3 * r, L)
                                for k in T.unroll(SEG):
                                    if row(ob_qb, v) + k < OH \
                                            and col(ob_qb, v) - k * Wq < OW \
                                            and col(ob_qb, v) - k * Wq + L > 0:
                                        _tail(Yf, ((obi(ob_qb) * MR + r) * OH + row(ob_qb, v)
                                                   + k) * OW + col(ob_qb, v) - k * Wq,
                                              yv.vload([0], f"int32x{L}"),
                                              T.max(k * Wq - col(ob_qb, v), 0),
                                              T.min(OW + k * Wq - col(ob_qb, v), L))

    return pack, kernel, scratch * D


__all__ = ["AVX2U_MAX_WEIGHT", "ISAS", "KERNEL_ATTR", "ConvShape", "Isa", "channel_params",
           "choose_tile", "conv1x1_kernel", "conv2d_kernel", "fit_isa", "grid_vectors", "im2col", "isa_for",
           "pack_weight", "supported"]
