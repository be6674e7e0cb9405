"""The depthwise row schedules of :mod:`~pqcompile.lower.kernels_planar` (``rows``,
``rows-vnni``, ``rows-neon``, ``rows-neon-group``; see its module doc): each tile copies the
input rows it reads into a padded row buffer on the stack and reads its taps there, with no
separate pack."""

from __future__ import annotations

from .kernel_types import KERNEL_ATTR, ConvShape, Isa, parallel_worth
from .tir_macros import channel_macros, dot4_macro, row_macro, splat
from .tir_neon import neon_requant_lanes, neon_requant_narrow

__all__ = ["GROUP_SPAN", "dw_group_layout", "dw_rows_group_kernel", "dw_rows_kernel",
           "dw_rows_layout", "row_fill", "row_stride", "tap_pairs_sum"]


#: What a depthwise multiply-accumulate weighs against a dense one in
#: :func:`~pqcompile.lower.kernel_types.parallel_worth` (one channel a lane, no 4-channel
#: dot-product steps: several times the time per multiply-accumulate).
DW_MAC_WEIGHT = 4


def tap_pairs_sum(KH: int, KW: int, product):
    """The int32x16 sum over every tap of ``product(kh, kw)`` (an int16x16 of byte x weight
    products), two taps summed in int16 lanes before each widening (two products of a byte
    and a weight in [-127, 127] fit): the ``rows-neon`` kernels' taps."""
    from tvm.script import tirx as T

    ks = [(kh, kw) for kh in range(KH) for kw in range(KW)]
    total = None
    for i in range(0, len(ks), 2):
        pair = None
        for kh, kw in ks[i:i + 2]:
            term = product(kh, kw)
            pair = term if pair is None else pair + term
        wide = T.Cast("int32x16", pair)
        total = wide if total is None else total + wide
    return total

def row_stride(shape: ConvShape, split: bool) -> int:
    """Bytes of one padded input row in the row schedules' buffer: ``W + 2 PW``, or where the
    row is split into its even and odd columns (``rows-neon`` at stride 2), twice the even
    half's."""
    wp = shape.width + 2 * shape.padding[1]
    return 2 * -(-wp // 2) if split else wp


def dw_rows_layout(shape: ConvShape, L: int, split: bool = False
                    ) -> tuple[int, int, int, int, int]:
    """``(R, V, N, RT, RB)`` of the row schedules: ``R`` output rows per vector (0 where a row
    is at least ``L`` pixels: a tile is then ``RT`` rows of ``V`` vectors each, as many rows
    as keep its input rows under 1 KiB; else as many whole rows as fit in ``L`` lanes, and a
    tile is the channel's plane in ``V`` vectors), ``N`` the bytes one vector's taps span (a
    power of two, at least ``4 L``), ``RB`` the bytes of the tile's padded input rows plus
    ``N``. ``split``: the rows are held as their even then odd columns
    (:func:`row_stride`), so a stride-2 tap reads consecutive bytes of one half."""
    oh, ow = shape.out_hw
    s, (kh, kw) = shape.stride, shape.kernel
    wp = row_stride(shape, split)
    r = 0 if ow >= L else min(L // ow, oh)
    v = -(-ow // L) if r == 0 else -(-oh // r)
    span = (max(r, 1) - 1) * s * wp + (min(ow, L) - 1) * (1 if split else s) + kw
    n = max(4 * L, 1 << (span - 1).bit_length())
    if r:
        return r, v, n, oh, (shape.height + 2 * shape.padding[0]) * wp + n
    rt = max(1, min(oh, ((1023 - n) // wp - kh) // s + 1))
    return r, v, n, rt, ((rt - 1) * s + kh) * wp + n


#: The most buffer bytes a ``rows-neon-group`` vector's taps may span (two 64-byte halves).
GROUP_SPAN = 128


def dw_group_layout(shape: ConvShape) -> tuple[int, int, int, int] | None:
    """``(G, U, PL, N)`` of the ``rows-neon-group`` schedule, or None where it does not apply:
    output planes of ``U`` <= 8 pixels, ``G`` >= 2 channels a 16-lane vector (each channel's
    padded input plane ``PL`` bytes of the row buffer, all of them within ``GROUP_SPAN``),
    ``N`` the bytes one vector's taps span."""
    oh, ow = shape.out_hw
    u = oh * ow
    pl = (shape.height + 2 * shape.padding[0]) * row_stride(shape, shape.stride == 2)
    g = min(16 // u, GROUP_SPAN // pl) if u <= 8 else 0
    if g < 2:
        return None
    return g, u, pl, max(64, 1 << (g * pl - 1).bit_length())


def row_fill(shape: ConvShape, bdt: str, boff: int, split: bool):
    """``fill(Xb, Xf, r, ih, c)``: row ``r`` of a row schedule's buffer (``row_stride``
    bytes a row) <- input row ``ih`` of channel ``c`` as ``bdt`` bytes (plus ``boff``), zero
    pads around it, or all pad where ``ih`` is outside the image. ``split``: the row is held
    as its even then its odd padded columns."""
    from tvm.script import tirx as T

    C, H, W = shape.channels, shape.height, shape.width
    PW = shape.padding[1]
    in_dt = shape.in_dtype
    Wp = row_stride(shape, split)
    Wh = Wp // 2
    _row = row_macro(1, 1, 0, C * H * W, in_dt, bdt, boff,
                     16 if W >= 16 else 8 if W >= 8 else 4)
    # split rows: input column i goes to byte (PW + i) // 2 of half (PW + i) % 2; CW columns
    # a step (one load, its even and odd bytes: LLVM's uzp1/uzp2), the rest one by one
    CW = 32 if W >= 32 else 16 if W >= 16 else 8
    flip = T.broadcast(T.uint8(128), CW // 2)

    def fixed(v):  # in_dt bytes -> the buffer's signed bytes (uint8 offset by -128: a xor)
        if not boff:
            return v
        return T.reinterpret(T.bitwise_xor(T.reinterpret(v, dtype=f"uint8x{CW // 2}"), flip),
                             dtype=f"int8x{CW // 2}")

    @T.macro
    def fill_split(Xb, Xf, r, ih, c):
        if 0 <= ih and ih < H:  # the pad columns, then the row's columns into its halves
            for j in T.unroll(PW):
                Xb[r * Wp + j % 2 * Wh + j // 2] = T.Cast(bdt, boff)
            for j in T.unroll(Wp - PW - W):
                Xb[r * Wp + (PW + W + j) % 2 * Wh + (PW + W + j) // 2] = T.Cast(bdt, boff)
            for k in range(W // CW):
                for h in T.unroll(2):
                    Xb[T.ramp(r * Wp + (PW + h) % 2 * Wh + (PW + k * CW + h) // 2, 1, CW // 2)] \
                        = fixed(T.Shuffle([Xf.vload([(c * H + ih) * W + k * CW], f"{in_dt}x{CW}")],
                                          [2 * i + h for i in range(CW // 2)]))
            for i in range(W // CW * CW, W):
                Xb[r * Wp + (PW + i) % 2 * Wh + (PW + i) // 2] = T.Cast(
                    bdt, T.Cast("int32", Xf[(c * H + ih) * W + i]) + boff)
        else:
            for j in range(Wp):
                Xb[r * Wp + j] = T.Cast(bdt, boff)

    @T.macro
    def fill(Xb, Xf, r, ih, c):
        if 0 <= ih and ih < H:
            for j in range(PW):
                Xb[r * Wp + j] = T.Cast(bdt, boff)
                Xb[r * Wp + PW + W + j] = T.Cast(bdt, boff)
            _row(Xb, Xf, r * Wp + PW, (c * H + ih) * W, 0, W)
        else:
            for j in range(Wp):
                Xb[r * Wp + j] = T.Cast(bdt, boff)

    return fill_split if split else fill


def dw_rows_kernel(shape: ConvShape, isa: Isa, mode: str):
    """The ``rows`` / ``rows-vnni`` / ``rows-neon`` depthwise kernel (see the module doc):
    ``kernel(X, Wd, B,
    M, S, Y)`` on the NCHW input. Each tile first copies the input rows it reads into a
    padded row buffer on the stack (``[rows][W + 2 PW]``, zero pads; no stride phases: a
    stride-2 tap's pixels are every other byte of one load, picked by the shuffle)."""
    from tvm.script import tirx as T

    C, H, W = shape.channels, shape.height, shape.width
    KH, KW = shape.kernel
    PH = shape.padding[0]
    s = shape.stride
    OH, OW = shape.out_hw
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    vnni, neon = mode == "rows-vnni", mode == "rows-neon"
    par = parallel_worth(macs=DW_MAC_WEIGHT * C * OH * OW * KH * KW)
    # rows-neon: the row buffer holds signed bytes (uint8 offset by -128, pads too)
    bdt, boff = ("int8", -128 if in_dt == "uint8" else 0) if neon else (in_dt, 0)
    L = isa.lanes
    split = neon and s == 2  # each buffered row: its even columns, then its odd ones
    Wp = row_stride(shape, split)
    Wh = Wp // 2  # the even half
    R, V, N, RT, RB = dw_rows_layout(shape, L, split)
    NT = -(-OH // RT) if R == 0 else 1  # tiles per channel (the last one may overlap)
    RIN = (RT - 1) * s + KH if R == 0 else H + 2 * PH  # input rows a tile copies
    U = L if R == 0 else R * OW  # the lanes a vector stores
    G = -(-KW // 4)
    WK = KH * G * 4 if vnni else KH * KW
    _kload, _kstore = channel_macros(out_dt, lo, hi, shape.narrow, L, neon)
    # Lane i of a vector is column i of its row (R = 0), or pixel (i // OW, i % OW) of its R
    # rows; tap kw reads it at off[i] * s + kw past the vector's first input byte: one load
    # of N bytes (two of N/2: a shuffle may not have more lanes than its inputs), a shuffle
    # picks the bytes: for rows-vnni 4 taps per pixel (a missing tap repeats tap 0, its
    # weight 0), else one tap per shuffle (contiguous loads instead where R = 0 and the
    # stride is 1). Junk lanes (i >= U) read lane 0's bytes and are not stored.
    off = [i if R == 0 else (i // OW) * Wp * (s if split else 1) + i % OW if i < U else 0
           for i in range(L)]
    if R == 1 and (L - 1) * s + KW <= N:
        # one output row a vector: the junk lanes read on past the row, so that a stride-1
        # tap is one plain load (repeating lane 0 made LLVM insert a byte with SSE4a's
        # ``insertq``, microcoded on recent AMD cores: 7x7 planes ran 20x slower)
        off = list(range(L))
    taps = [[kw if kw < KW else 4 * g for kw in range(4 * g, 4 * g + 4)] for g in range(G)]

    def picked(Xb, base, pattern):
        return T.Shuffle([Xb.vload([base], f"{bdt}x{N // 2}"),
                          Xb.vload([base + N // 2], f"{bdt}x{N // 2}")], pattern)

    def tap(Xb, o, v, kh, kw):  # rows-neon: the 16 signed input bytes tap (kh, kw) reads
        if split:  # column x * 2 + kw is byte x + kw // 2 of the half kw % 2
            base = first(o, v, kh) + kw % 2 * Wh + kw // 2
            if R <= 1:
                return Xb.vload([base], "int8x16")
            return picked(Xb, base, off)
        if s == 1 and R == 0:
            return Xb.vload([first(o, v, kh) + kw], "int8x16")
        return picked(Xb, first(o, v, kh) + kw, [off[i] * s for i in range(L)])

    def taps_sum(Xb, Wd, c, o, v):  # rows-neon: the int32x16 sum of every tap's products
        return tap_pairs_sum(KH, KW, lambda kh, kw: T.Cast(
            "int16x16", tap(Xb, o, v, kh, kw)) * T.broadcast(
                T.Cast("int16", Wd[c, kh * KW + kw]), 16))

    def bias(B, Wd, c):  # the bias, plus the input offset's contribution (rows-neon)
        if boff == 0:
            return B[c]
        out = B[c]
        for k in range(KH * KW):
            out = out - boff * T.Cast("int32", Wd[c, k])
        return out

    def row0(t):  # the tile's first output row
        return T.min(t % NT * RT, OH - RT)

    def first(o, v, kh):  # output row o's vector v's first input byte in the row buffer
        if R == 0:
            return (o * s + kh) * Wp + T.min(v * L, OW - L) * (1 if split else s)
        return (T.min(v * R, OH - R) * s + kh) * Wp

    def out(t, o, v):  # the vector's first output pixel in the channel's plane
        if R == 0:
            return (row0(t) + o) * OW + T.min(v * L, OW - L)
        return T.min(v * R, OH - R) * OW

    _dot4 = dot4_macro("vnni")

    def word(Wd, c, w):  # the 4 tap weights Wd[c, w:w+4], one per byte of every lane
        return splat(Wd.vload([c, w], "int8x4"), 16, "int8x64")

    _fill = row_fill(shape, bdt, boff, split)

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((1, C, H, W), in_dt), Wd: T.Buffer((C, WK), "int8"),
               B: T.Buffer((C,), "int32"), M: T.Buffer((C,), "int32"),
               S: T.Buffer((C,), "int32"), Y: T.Buffer((1, C, OH, OW), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "dwconv2d"})
        with T.sblock("root"):
            Xf = T.decl_buffer((C * H * W,), in_dt, data=X.data)
            Yf = T.decl_buffer((C * OH * OW,), out_dt, data=Y.data)
            for t in T.parallel(C * NT) if par else T.serial(C * NT):
                # under 1 KiB each, so stack arrays (dw_schedule checks)
                acc = T.alloc_buffer((V * L,), "int32", scope="global")
                Xb = T.alloc_buffer((RB,), bdt, scope="global")
                kc = T.alloc_buffer((3,), "int64", scope="global")
                _kload(kc, 0, t // NT, M, S)
                for r in range(RIN):
                    _fill(Xb, Xf, r, (row0(t) * s if R == 0 else 0) + r - PH, t // NT)
                for o in range(RT if R == 0 else 1):
                    for v in T.unroll(V):  # the accumulators start at the bias
                        acc[T.ramp(v * L, 1, L)] = T.broadcast(bias(B, Wd, t // NT), L)
                    if neon:
                        for v in T.unroll(V):
                            acc[T.ramp(v * L, 1, L)] = acc.vload([v * L], "int32x16") \
                                + taps_sum(Xb, Wd, t // NT, o, v)
                    for kh in T.unroll(0 if neon else KH):
                        for v in T.unroll(V):
                            if vnni:
                                _dot4(acc, v * L, picked(
                                    Xb, first(o, v, kh),
                                    [off[i] * s + taps[0][j] for i in range(L) for j in range(4)]),
                                    word(Wd, t // NT, kh * G * 4))
                                if G > 1:
                                    _dot4(acc, v * L, picked(
                                        Xb, first(o, v, kh),
                                        [off[i] * s + taps[G - 1][j] for i in range(L)
                                         for j in range(4)]),
                                        word(Wd, t // NT, (kh * G + G - 1) * 4))
                            elif s == 1 and R == 0:
                                for kw in T.unroll(KW):
                                    for lane in T.vectorized(L):
                                        acc[v * L + lane] = acc[v * L + lane] + T.Cast(
                                            "int32", Xb[first(o, v, kh) + kw + lane]) \
                                            * T.Cast("int32", Wd[t // NT, kh * KW + kw])
                            else:
                                for kw in range(KW):  # LLVM unrolls it (kw a known offset)
                                    acc[T.ramp(v * L, 1, L)] = acc.vload([v * L], f"int32x{L}") \
                                        + T.Cast(f"int32x{L}", picked(
                                            Xb, first(o, v, kh) + kw,
                                            [off[i] * s for i in range(L)])) \
                                        * T.broadcast(T.Cast("int32", Wd[t // NT, kh * KW + kw]),
                                                      L)
                    for v in T.unroll(V):
                        _kstore(Yf, t // NT * OH * OW + out(t, o, v), acc, v * L, kc, 0, U)

    return kernel


def dw_rows_group_kernel(shape: ConvShape):
    """The ``rows-neon-group`` depthwise kernel: ``kernel(X, Wg, B, M, S, Y)`` for output
    planes of at most 8 pixels, ``G`` channels a 16-lane vector (lane ``i``: channel ``i //
    U``, pixel ``i % U``), so that a 2x2 plane fills a vector with 4 channels instead of 4 of
    its 16 lanes. Each tile copies its channels' padded planes into a row buffer (as
    ``rows-neon``, stride-2 rows split into even and odd columns), each tap is one byte
    shuffle of it times the tap's weight vector (``[C/G][taps][16]``,
    :func:`pack_dw_weight`), two taps summed in int16 lanes as in ``rows-neon``; the
    epilogue takes per-lane constants (:func:`pack_dw_params`), and the tile's ``G U``
    outputs, consecutive in NCHW, are one store."""
    from tvm.script import tirx as T

    C, H, W = shape.channels, shape.height, shape.width
    KH, KW = shape.kernel
    PH = shape.padding[0]
    s = shape.stride
    OH, OW = shape.out_hw
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    G, U, PL, N = dw_group_layout(shape)
    par = parallel_worth(macs=DW_MAC_WEIGHT * C * OH * OW * KH * KW)
    CG = -(-C // G)
    split = s == 2
    Wp = row_stride(shape, split)
    Wh = Wp // 2
    RIN = H + 2 * PH
    bdt, boff = "int8", -128 if in_dt == "uint8" else 0
    _fill = row_fill(shape, bdt, boff, split)
    # lane i's first byte in the buffer (junk lanes past G U: byte 0, weight 0)
    goff = [i // U * PL + i % U // OW * s * Wp + i % U % OW * (1 if split else s)
            if i < G * U else 0 for i in range(16)]

    def tap_at(kh, kw):  # the byte of tap (kh, kw) for a lane's first byte
        return kh * Wp + (kw % 2 * Wh + kw // 2 if split else kw)

    def tap(Xb, kh, kw):  # the 16 lanes' bytes of tap (kh, kw)
        return T.Shuffle([Xb.vload([tap_at(kh, kw)], f"int8x{N // 2}"),
                          Xb.vload([tap_at(kh, kw) + N // 2], f"int8x{N // 2}")], goff)

    def taps_sum(Xb, Wg, t):
        return tap_pairs_sum(KH, KW, lambda kh, kw: T.Cast("int16x16", tap(Xb, kh, kw))
                             * T.Cast("int16x16", Wg.vload([t, kh * KW + kw, 0], "int8x16")))

    def requant(acc, M, S, t):  # int32x16: clamp((acc * m + 2^(sh-1)) >> sh) lane by lane
        if shape.narrow:  # sqdmulh and a rounding shift (neon_requant_narrow)
            return T.Shuffle([neon_requant_narrow(
                acc.vload([4 * q], "int32x4"), M.vload([t * 16 + 4 * q], "int32x4"),
                T.broadcast(T.int32(31), 4) - S.vload([t * 16 + 4 * q], "int32x4"), lo, hi)
                for q in range(4)], list(range(16)))
        return neon_requant_lanes(
            acc, 0, 16, lambda h: M.vload([t * 16 + 2 * h], "int32x2"),
            lambda h: T.Cast("int64x2", T.broadcast(T.int32(0), 2)
                             - S.vload([t * 16 + 2 * h], "int32x2")), lo, hi)

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((1, C, H, W), in_dt), Wg: T.Buffer((CG, KH * KW, 16), "int8"),
               B: T.Buffer((CG * 16,), "int32"), M: T.Buffer((CG * 16,), "int32"),
               S: T.Buffer((CG * 16,), "int32"), Y: T.Buffer((1, C, OH, OW), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "dwconv2d"})
        with T.sblock("root"):
            Xf = T.decl_buffer((C * H * W,), in_dt, data=X.data)
            Yf = T.decl_buffer((C * OH * OW,), out_dt, data=Y.data)
            for t in T.parallel(CG) if par else T.serial(CG):
                # under 1 KiB each, so stack arrays (GROUP_SPAN bounds the buffer)
                Xb = T.alloc_buffer((G * PL + N,), bdt, scope="global")
                acc = T.alloc_buffer((16,), "int32", scope="global")
                yv = T.alloc_buffer((16,), "int32", scope="global")
                for g in range(G):
                    for r in range(RIN):
                        _fill(Xb, Xf, g * RIN + r, r - PH, T.min(t * G + g, C - 1))
                acc[T.ramp(0, 1, 16)] = B.vload([t * 16], "int32x16") + taps_sum(Xb, Wg, t)
                if t * G + G <= C:
                    Yf[T.ramp(t * G * U, 1, G * U)] = T.Shuffle(
                        [T.Cast(f"{out_dt}x16", requant(acc, M, S, t))], list(range(G * U)))
                else:  # the last channels
                    yv[T.ramp(0, 1, 16)] = requant(acc, M, S, t)
                    for i in range((C - t * G) * U):
                        Yf[t * G * U + i] = T.Cast(out_dt, yv[i])

    return kernel
