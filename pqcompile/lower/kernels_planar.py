"""Planar integer kernels: depthwise conv and max pool (one channel per tile, no dot product
across channels). The max pool and the depthwise ``grid`` schedule read the padded planar
scratch of :func:`pqcompile.lower.kernels.conv2d_kernel`'s pack with the generic (depth 1)
layout; the depthwise row schedules need no pack.

The depthwise conv has three schedules (:func:`dw_schedule`):

- ``rows``: a tile is one output row of one channel, in vectors of ``L`` pixels (the last one
  overlapping the one before where ``L`` does not divide the width), or where rows are
  narrower than a vector the channel's whole plane, several rows per vector. It copies the
  input rows it reads into a zero-padded row buffer on the stack, and stores straight into
  NCHW; each tap is a vector widening multiply-add with the tap's weight broadcast.
- ``rows-vnni`` (AVX-512 VNNI, uint8 input): the same tiles, but the taps of a kernel row go
  4 at a time into one ``vpdpbusd``: one byte shuffle lays out, for each of 16 pixels, the 4
  input bytes its 4 taps read (at stride 2, every other byte: no stride phases) next to the
  4 tap weights.
- ``rows-neon`` (aarch64): the same tiles at 16 pixels a vector, the input rows copied as
  signed bytes (a uint8 input offset by -128, its contribution added to the bias in the
  kernel); each pair of taps is two ``smull``/``smlal`` into 16 int16 lanes (two products of
  a byte and a weight in [-127, 127] fit) and four ``saddw`` into the int32 accumulators:
  32 multiply-accumulates in 8 instructions (the generic kernels: 8 in ~6); at stride 2
  each buffered row is held as its even then its odd columns, so a tap is one plain load;
- ``rows-neon-group`` (aarch64, output planes of at most 8 pixels): ``rows-neon`` with
  several channels a vector (lane ``i``: channel ``i // U``, pixel ``i % U``), per-lane
  weights and requantization constants (:func:`pack_dw_weight`, :func:`pack_dw_params`);
- ``grid`` (where the row schedules' stack buffers would reach 1 KiB): a tile is ``NR``
  vectors of the channel's output grid (output rows x padded input columns, a few junk
  columns per row), copied out to NCHW at the end.

The row schedules' kernels are in :mod:`~pqcompile.lower.kernels_dw_rows`.
"""

from __future__ import annotations

import functools

import numpy as np

from .kernel_types import KERNEL_ATTR, ConvShape, Isa
from .kernels import conv2d_kernel
from .kernels_dw_rows import dw_group_layout, dw_rows_group_kernel, dw_rows_kernel, dw_rows_layout
from .tir_macros import channel_macros


def dw_isa(isa: Isa) -> Isa:
    """Depthwise convs use plain widening multiply-adds (one channel per plane, no dot
    product across channels): the planar generic packing at the instruction set's width."""
    lanes = isa.generic_lanes
    return Isa("generic", lanes, 1, max(1, min(8, 1020 // (lanes * 4))))


def fit_dw_isa(isa: Isa, q: np.ndarray) -> Isa:
    """``isa`` for a depthwise conv of int8 weights ``q``: ``rows-neon`` sums two products in
    int16 lanes, exact for weights in the quantizer's narrow range [-127, 127]; a layer with
    a -128 weight gets the ``generic`` kernels instead."""
    if isa.name in ("sdot", "neon") and int(q.min()) < -127:
        return Isa("generic", isa.generic_lanes, 4, 2)
    return isa


def dw_schedule(shape: ConvShape, isa: Isa) -> str:
    """``"rows-vnni"``, ``"rows-neon"``, ``"rows"`` or ``"grid"`` for a depthwise conv (see
    the module doc)."""
    if isa.name in ("sdot", "neon"):
        if dw_group_layout(shape) is not None:
            return "rows-neon-group"
        r, v, n, _, rb = dw_rows_layout(shape, 16, shape.stride == 2)
        if v * 16 * 4 < 1024 and rb < 1024 and n <= 128:
            return "rows-neon"
    L = dw_isa(isa).lanes
    r, v, n, _, rb = dw_rows_layout(shape, L)
    # accumulators or input rows of 1 KiB or more (TVM would put them on the heap); taps
    # spanning more than two vectors
    if v * L * 4 >= 1024 or rb >= 1024 or n > 128:
        return "grid"
    if isa.name == "vnni" and shape.in_dtype == "uint8" and shape.kernel[1] <= 8:
        return "rows-vnni"
    return "rows"


def pack_dw_weight(q: np.ndarray, shape: ConvShape, isa: Isa) -> np.ndarray:
    """``[C, 1, KH, KW]`` int8 -> the depthwise kernel's weights: ``[C, KH * KW]``, or for
    ``rows-vnni`` ``[C, KH * G * 4]`` (each kernel row's taps in ``G`` <= 2 words of 4,
    zero-padded)."""
    c, _, kh, kw = q.shape
    schedule = dw_schedule(shape, isa)
    if schedule == "rows-neon-group":  # [C/G][taps][16 lanes]: lane i is channel i // U's
        return np.ascontiguousarray(
            _group_lanes(q.reshape(c, kh * kw), shape, 0).astype(np.int8).transpose(0, 2, 1))
    if schedule != "rows-vnni":
        return np.ascontiguousarray(q.reshape(c, kh * kw))
    g = -(-kw // 4)
    w = np.zeros((c, kh, g * 4), np.int8)
    w[:, :, :kw] = q.reshape(c, kh, kw)
    return w.reshape(c, kh * g * 4)


def pack_dw_params(q: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray,
                   shape: ConvShape, isa: Isa) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The depthwise kernel's bias, multipliers and shifts (int32): per channel, or for
    ``rows-neon-group`` per lane (``[C/G][16]``; the bias less a uint8 input's -128 offset
    times the channel's weight sum, which the other schedules take out in the kernel)."""
    b, m, sh = (np.asarray(a, np.int64) for a in (bias, mult, shift))
    if dw_schedule(shape, isa) != "rows-neon-group":
        return b.astype(np.int32), m.astype(np.int32), sh.astype(np.int32)
    if shape.in_dtype == "uint8":
        b = b + 128 * q.reshape(q.shape[0], -1).astype(np.int64).sum(axis=1)
    # pads: a zero multiplier, any valid shift
    return tuple(_group_lanes(a, shape, fill).reshape(-1).astype(np.int32)
                 for a, fill in ((b, 0), (m, 0), (sh, 40)))


def _group_lanes(a: np.ndarray, shape: ConvShape, fill: int) -> np.ndarray:
    """Per-channel values ``a`` (``[C, ...]``) as ``rows-neon-group``'s lanes: ``[C/G][16]
    [...]``, lane ``i`` of group ``t`` channel ``t G + i // U``'s value, ``fill`` past the
    last channel and in the junk lanes (``i >= G U``)."""
    g, u, _, _ = dw_group_layout(shape)
    c = a.shape[0]
    cg = -(-c // g)
    full = np.full((cg * g, *a.shape[1:]), fill, np.int64)
    full[:c] = a
    lanes = np.full((cg, 16, *a.shape[1:]), fill, np.int64)
    lanes[:, :g * u] = np.repeat(full.reshape(cg, g, *a.shape[1:]), u, axis=1)
    return lanes


@functools.cache  # built once per shape: TVMScript parsing is slow
def dwconv2d_kernel(shape: ConvShape, isa: Isa):
    """Depthwise conv (groups = channels = out channels): ``(pack, kernel, scratch)`` like
    :func:`conv2d_kernel`, scheduled as :func:`dw_schedule` says (see the module doc); the
    kernel is ``(Xc, Wd, B, M, S, Y)`` with ``Wd`` from :func:`pack_dw_weight`. The row
    schedules have no pack (``pack`` None, ``scratch`` 0): their kernel takes the NCHW input
    ``X`` in place of ``Xc``."""
    from tvm.script import tirx as T

    schedule = dw_schedule(shape, isa)
    if schedule == "rows-neon-group":
        return None, dw_rows_group_kernel(shape), 0
    isa = Isa("generic", 16, 1, 1) if schedule == "rows-neon" else dw_isa(isa)
    if schedule != "grid":  # no pack: each tile copies the input rows it reads
        return None, dw_rows_kernel(shape, isa, schedule), 0
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
    _kload, _kstore = channel_macros(out_dt, lo, hi, shape.narrow, L)

    @T.prim_func(s_tir=True)
    def kernel(Xc: T.Buffer((scratch,), in_dt), Wd: T.Buffer((C, KH * KW), "int8"),
               B: T.Buffer((C,), "int32"), M: T.Buffer((C,), "int32"),
               S: T.Buffer((C,), "int32"), Y: T.Buffer((1, C, OH, OW), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "dwconv2d"})
        with T.sblock("root"):
            Yg = T.alloc_buffer((C * grid,), out_dt)
            for c_qb in T.parallel(C * QB):
                acc = T.alloc_buffer((NR * L,), "int32", scope="global")
                kc = T.alloc_buffer((3,), "int64", scope="global")
                _kload(kc, 0, c_qb // QB, M, S)
                for v in T.unroll(NR):  # the accumulators start at the bias
                    acc[T.ramp(v * L, 1, L)] = T.broadcast(B[c_qb // QB], L)
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
                    _kstore(Yg, c_qb // QB * grid + ((c_qb % QB) * NR + v) * L, acc, v * L, kc,
                            0, L)
            for c_oh in T.parallel(C * OH):
                for ow in T.vectorized(OW):
                    Y[0, c_oh // OH, c_oh % OH, ow] = Yg[c_oh // OH * grid + c_oh % OH * Wq + ow]

    return pack, kernel, scratch


@functools.cache  # built once per shape: TVMScript parsing is slow
def maxpool2d_kernel(shape: ConvShape, isa: Isa):
    """Max pool on the integers (stride 1 or 2, no dilation, floor mode): ``(pack, kernel,
    scratch)`` with ``kernel(Xc, Y)``. The scratch is the depthwise conv's padded planar one,
    padded with the dtype's minimum; each tile takes the vector max over the window's taps,
    a byte per lane. The 3x3 stride-2 pool with one pixel of pad on maps of even width of 32
    or more (resnets' stem) takes no pack: :func:`maxpool_3x3s2_kernel`."""
    from tvm.script import tirx as T

    if shape.kernel == (3, 3) and shape.stride == 2 and shape.padding == (1, 1) \
            and shape.width % 2 == 0 and shape.width >= 32:
        return None, maxpool_3x3s2_kernel(shape), 0

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


#: Output bytes a step of :func:`maxpool_3x3s2_kernel` (its input: twice as many; 16 on maps
#: narrower than 64)
POOL_OUT_LANES = 32


@functools.cache
def maxpool_3x3s2_kernel(shape: ConvShape):
    """``kernel(X, Y)``: the 3x3 stride-2 max pool with one pixel of pad straight from NCHW (no
    padded copy: through it resnet18's pool of a 64 x 112 x 112 map took 0.10 ms for the copy
    and 0.02 ms for the pool). A task per output row, 32 outputs a step: the vector max of
    the window's three input rows (64 bytes each; a row outside the map counts as the dtype's
    minimum), split into its even and odd columns (each a shuffle), and the max of even,
    odd and odd shifted by one column (the column left of the step read as a scalar, the
    minimum at the map's left edge; 16 outputs a step on maps narrower than 64). The last
    step of a row overlaps the one before (a max computed twice). Every vector is a whole register (64 or 32 bytes): with vectors of a
    row's width (112 bytes) LLVM had moved every byte through scalar registers."""
    from tvm.script import tirx as T

    C, H, W = shape.channels, shape.height, shape.width
    OH, OW = shape.out_hw
    dt = shape.in_dtype
    low = 0 if dt == "uint8" else -128
    V = POOL_OUT_LANES if W >= 2 * POOL_OUT_LANES else 16
    NS = -(-OW // V)  # steps a row

    def valid(r):
        return T.And(0 <= r, r < H)

    def window_rows(Xf, c, oh, col, width):  # max of the window's rows at col .. col + width
        rows = [T.if_then_else(valid(2 * oh - 1 + k), Xf.vload(
            [(c * H + T.max(T.min(2 * oh - 1 + k, H - 1), 0)) * W + col], f"{dt}x{width}"),
            T.broadcast(T.Cast(dt, low), width)) for k in range(3)]
        return _max_all(rows)

    def left(Xf, c, oh, o):  # the window rows' max at column 2 o - 1 (the minimum at o = 0)
        return T.if_then_else(o > 0, _max_all([T.if_then_else(
            valid(2 * oh - 1 + k), Xf[(c * H + T.max(T.min(2 * oh - 1 + k, H - 1), 0)) * W
                                      + T.max(2 * o - 1, 0)], T.Cast(dt, low))
            for k in range(3)]), T.Cast(dt, low))

    def step(Xf, c, oh, o):  # outputs o .. o + V of row oh
        r = window_rows(Xf, c, oh, 2 * o, 2 * V)
        even = T.Shuffle([r], [2 * j for j in range(V)])
        odd = T.Shuffle([r], [2 * j + 1 for j in range(V)])
        before = T.Shuffle([odd, T.broadcast(left(Xf, c, oh, o), V)], [V] + list(range(V - 1)))
        return T.max(T.max(even, odd), before)

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((1, C, H, W), dt), Y: T.Buffer((1, C, OH, OW), dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "maxpool2d"})
        with T.sblock("root"):
            Xf = T.decl_buffer((C * H * W,), dt, data=X.data)
            Yf = T.decl_buffer((C * OH * OW,), dt, data=Y.data)
            for c_oh in T.parallel(C * OH):
                for k in T.unroll(NS):
                    Yf[T.ramp(c_oh * OW + T.min(k * V, OW - V), 1, V)] = step(
                        Xf, c_oh // OH, c_oh % OH, T.min(k * V, OW - V))

    return kernel


def _max_all(vectors):
    from tvm.script import tirx as T

    out = vectors[0]
    for v in vectors[1:]:
        out = T.max(out, v)
    return out
