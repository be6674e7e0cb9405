"""TIR macros shared by the hand-scheduled kernels (:mod:`~pqcompile.lower.kernels`,
:mod:`~pqcompile.lower.kernels_planar`, :mod:`~pqcompile.lower.kernels_linear`): the row
copy of the packs, the requantizing epilogue, and the dot-product step.

Each builder returns TVMScript macros (inlined where a kernel calls them), specialized at
build time on the dtypes and sizes it is given.
"""

from __future__ import annotations

from .tir_neon import (
    NEON_NARROW_MIN_SHIFT,
    neon_requant,
    neon_requant_narrow,
    pair_sums,
    quad_lane,
    smull_pairs_macro,
    splat,
)

__all__ = ["acc_macros", "channel_macros", "dot4_macro", "dot_macro", "dot_pair_macro",
           "dot_steps", "neon_requant", "quad_lane", "requant_macro", "requant_terms",
           "row_macro", "smull_pairs_macro", "splat", "tail_store_macro"]


def row_macro(D: int, s: int, chan: int, size: int, in_dt: str, pdt: str, off: int,
               CH: int = 16):
    """Copy one input row's columns ``jlo..jhi`` (every ``s``-th source byte, ``D`` channels
    ``chan`` apart interleaved into words) to ``Xc[dst + j * D ...]``, adding ``off`` (as a
    byte xor): ``CH`` columns a step with vector loads and one shuffle; a remainder is one more
    vector ending at ``jhi`` (rows of fewer than ``CH`` columns go one by one)."""
    from tvm.script import tirx as T

    src_lanes = f"{in_dt}x{CH * s}"
    idx = [t * CH * s + j * s for j in range(CH) for t in range(D)]
    flip = T.broadcast(T.uint8(128), CH * D) if off else None

    def fix(v):  # in_dt bytes -> pdt bytes with the offset: a xor of the sign bit
        if not off:
            return v
        return T.reinterpret(T.bitwise_xor(T.reinterpret(v, dtype=f"uint8x{CH * D}"), flip),
                             dtype=f"{pdt}x{CH * D}")

    if D == 1:
        @T.macro
        def vec(Xc, Xf, dst, src, j0):  # columns j0 .. j0 + CH
            if src + (j0 + CH) * s <= size:
                Xc[T.ramp(dst + j0, 1, CH)] = fix(T.Shuffle(
                    [Xf.vload([src + j0 * s], src_lanes)], idx))
            else:
                for j in range(CH):
                    Xc[dst + j0 + j] = T.Cast(pdt, T.Cast("int32", Xf[src + (j0 + j) * s]) + off)

        @T.macro
        def one(Xc, Xf, dst, src, j):
            Xc[dst + j] = T.Cast(pdt, T.Cast("int32", Xf[src + j * s]) + off)
    else:
        @T.macro
        def vec(Xc, Xf, dst, src, j0):
            if src + 3 * chan + (j0 + CH) * s <= size:
                Xc[T.ramp(dst + j0 * 4, 1, CH * 4)] = fix(T.Shuffle(
                    [Xf.vload([src + j0 * s], src_lanes),
                     Xf.vload([src + chan + j0 * s], src_lanes),
                     Xf.vload([src + 2 * chan + j0 * s], src_lanes),
                     Xf.vload([src + 3 * chan + j0 * s], src_lanes)], idx))
            else:
                for j in range(CH):
                    for t in T.unroll(4):
                        Xc[dst + (j0 + j) * 4 + t] = T.Cast(pdt, T.Cast(
                            "int32", Xf[src + t * chan + (j0 + j) * s]) + off)

        @T.macro
        def one(Xc, Xf, dst, src, j):
            for t in T.unroll(4):
                Xc[dst + j * 4 + t] = T.Cast(pdt, T.Cast("int32", Xf[src + t * chan + j * s])
                                             + off)

    @T.macro
    def row(Xc, Xf, dst, src, jlo, jhi):
        for jc in range((jhi - jlo) // CH):
            vec(Xc, Xf, dst, src, jlo + jc * CH)
        if (jhi - jlo) % CH != 0:
            if jhi - jlo >= CH:  # the last columns: one more vector, overlapping the one before
                vec(Xc, Xf, dst, src, jhi - CH)
            else:
                for j in range(jlo, jhi):
                    one(Xc, Xf, dst, src, j)
    return row


#: The smallest shift for which the epilogue may run on the product's high 32 bits.
NARROW_MIN_SHIFT = 33
# the NEON form of a narrow epilogue needs no more
assert NARROW_MIN_SHIFT >= NEON_NARROW_MIN_SHIFT


def requant_macro(out_dt: str, lo: int, hi: int, narrow: bool = False):
    """``store(dst, i, acc, a, m, r, sh)``: ``dst[i] = clamp((int64(acc[a]) * m + r) >> sh,
    lo, hi)`` with the int64 multiplier ``m``, rounding term ``r = 2^(sh-1)`` and shift
    ``sh`` (:func:`requant_terms`): the requantization of :func:`pqcompile.lower.ops.requant`
    for accumulators that start at the bias (the same int32 sum). Every kernel's epilogue.

    ``narrow`` (every shift at least :data:`NARROW_MIN_SHIFT`): the same integers from the
    product's high 32 bits, ``(hi32(acc * m) + 2^(sh-33)) >> (sh-32)`` in int32 (``r`` and
    ``sh`` then that rounding term and shift). Exact: the rounding term ``2^(sh-1)`` is a
    multiple of ``2^32``, so the low 32 bits never carry into the result; ``|hi32| < 2^30``,
    so the int32 sum cannot overflow. It halves the 64-bit lanes of the epilogue.
    (Written without let-bindings, which TVM 0.27's vectorizer evaluates once for all lanes.)
    """
    from tvm.script import tirx as T

    if narrow:
        @T.macro
        def store(dst, i, acc, a, m, r, sh):
            dst[i] = T.Cast(out_dt, T.max(T.min(
                (T.Cast("int32", (T.Cast("int64", acc[a]) * m) >> T.int64(32)) + r) >> sh,
                T.int32(hi)), T.int32(lo)))
    else:
        @T.macro
        def store(dst, i, acc, a, m, r, sh):
            dst[i] = T.Cast(out_dt, T.max(T.min((T.Cast("int64", acc[a]) * m + r) >> sh,
                                                T.int64(hi)), T.int64(lo)))
    return store


def requant_terms(shift, narrow: bool = False):
    """``(r, sh)`` for :func:`requant_macro` from an int32 shift expression."""
    from tvm.script import tirx as T

    if narrow:
        return T.int32(1) << (shift - NARROW_MIN_SHIFT), shift - 32
    return T.int64(1) << T.Cast("int64", shift - 1), T.Cast("int64", shift)


def channel_macros(out_dt: str, lo: int, hi: int, narrow: bool = False, lanes: int = 0,
                   neon: bool = False):
    """``(load, store)``: :func:`requant_macro` with a channel's constants read once per
    tile: ``load(K, j, ch, M, S)`` puts multiplier, rounding term and shift (int64) in
    ``K[j:j+3]`` (a small stack array, so registers), ``store(dst, i, acc, a, K, j, n)``
    requantizes ``acc[a:a+n]`` into ``dst[i:i+n]`` with them. (Read per vector, as LLVM must
    where the stores may alias them, and added to the accumulators at the end, which LLVM
    widens to two 64-bit adds, they cost a third of the epilogue.)

    ``narrow`` with ``lanes`` 16 (AVX-512) or 8 (AVX2): the 32-bit epilogue written on whole
    vectors, so
    that each half of the lanes is one ``vpmuldq`` (the even lanes as they are, the odd ones
    shifted down) and one blend gathers the high halves (LLVM lowers the per-lane form to
    widening moves, two multiplies and narrowing moves: 13 instructions a vector, this 9).

    ``neon`` (aarch64): every 4 lanes by :func:`~pqcompile.lower.tir_neon.neon_requant`
    (``K[j + 2]`` holds the negated shift); LLVM's lowering of the int64 form multiplies lane
    by lane in scalar registers. ``neon`` and ``narrow``:
    :func:`~pqcompile.lower.tir_neon.neon_requant_narrow` (``K[j + 2]`` holds ``31 - sh``),
    two instructions for 4 lanes where the int64 form takes seven."""
    from tvm.script import tirx as T

    _requant = requant_macro(out_dt, lo, hi, narrow)
    term_dt = "int32" if narrow else "int64"

    if neon:
        # narrow: sqdmulh and a rounding shift by 31 - sh (neon_requant_narrow)
        @T.macro
        def load(K, j, ch, M, S):
            K[j] = T.Cast("int64", M[ch])
            K[j + 1] = T.int64(0)
            K[j + 2] = T.Cast("int64", (31 if narrow else 0) - S[ch])

        def group(acc, a, K, j):
            if narrow:
                return neon_requant_narrow(acc.vload([a], "int32x4"),
                                           T.broadcast(T.Cast("int32", K[j]), 4),
                                           T.broadcast(T.Cast("int32", K[j + 2]), 4), lo, hi)
            return neon_requant(acc, a, T.Cast("int32", K[j]), K[j + 2], lo, hi)

        def store_neon(dst, i, acc, a, K, j, n):
            groups = [group(acc, a + 4 * g, K, j) for g in range(-(-n // 4))]
            whole = groups[0] if len(groups) == 1 else T.Shuffle(
                groups, list(range(4 * len(groups))))
            return T.Shuffle([T.Cast(f"{out_dt}x{4 * len(groups)}", whole)], list(range(n)))

        @T.macro
        def store(dst, i, acc, a, K, j, n):
            if n == 1:  # a one-pixel tail (49 = 12 x 4 + 1 outputs of a 7x7 map): no ramp
                dst[i] = store_neon(dst, i, acc, a, K, j, n)
            else:
                dst[T.ramp(i, 1, n)] = store_neon(dst, i, acc, a, K, j, n)
        return load, store

    @T.macro
    def load(K, j, ch, M, S):
        K[j] = T.Cast("int64", M[ch])
        K[j + 1] = T.Cast("int64", requant_terms(S[ch], narrow)[0])
        K[j + 2] = T.Cast("int64", requant_terms(S[ch], narrow)[1])

    if narrow and lanes in (8, 16):
        L, H = lanes, lanes // 2

        def b64(v):
            return T.broadcast(T.int64(v), H)

        def high(acc, a, m):  # hi32(acc[a + l] * m) for the L lanes, int32xL
            x = T.reinterpret(acc.vload([a], f"int32x{L}"), dtype=f"int64x{H}")
            return T.Shuffle(
                [T.reinterpret((((x << b64(32)) >> b64(32)) * T.broadcast(m, H)) >> b64(32),
                               dtype=f"int32x{L}"),
                 T.reinterpret((x >> b64(32)) * T.broadcast(m, H), dtype=f"int32x{L}")],
                [e if e % 2 == 0 else L + e for e in range(L)])

        @T.macro
        def store(dst, i, acc, a, K, j, n):
            dst[T.ramp(i, 1, n)] = T.Shuffle([T.Cast(f"{out_dt}x{L}", T.max(T.min(
                (high(acc, a, K[j]) + T.broadcast(T.Cast("int32", K[j + 1]), L))
                >> T.broadcast(T.Cast("int32", K[j + 2]), L),
                T.broadcast(T.int32(hi), L)), T.broadcast(T.int32(lo), L)))], list(range(n)))
    else:
        @T.macro
        def store(dst, i, acc, a, K, j, n):
            for lane in T.vectorized(n):
                _requant(dst, i + lane, acc, a + lane, K[j], T.Cast(term_dt, K[j + 1]),
                         T.Cast(term_dt, K[j + 2]))
    return load, store


def tail_store_macro(out_dt: str, lanes: int):
    """``store(Y, i, y, lo, hi)``: ``Y[i + l] = y[l]`` for ``lo <= l < hi``, ``y`` an int32
    vector of ``lanes`` already clamped to ``out_dt``'s range: the lanes of a vector that
    are outputs. With 16 lanes (AVX-512) one ``vpmovdb`` with a lane mask
    (``llvm.x86.avx512.mask.pmov.db.mem.512``): LLVM 22's masked store of a narrowed vector
    turns a constant one-lane mask into a 4-byte store (three bytes past the lane). Elsewhere
    LLVM's masked store (per-lane stores where the target has none)."""
    from tvm.script import tirx as T

    if lanes == 16:
        @T.macro
        def store(Y, i, y, lo, hi):
            T.evaluate(T.call_llvm_intrin(
                "void", "llvm.x86.avx512.mask.pmov.db.mem.512", T.address_of(Y[i]), y,
                T.Cast("uint16", ((1 << hi) - 1) - ((1 << lo) - 1))))
    else:
        @T.macro
        def store(Y, i, y, lo, hi):
            T.masked_store(Y, T.Cast(f"{out_dt}x{lanes}", y), T.ramp(i, 1, lanes),
                           T.And(T.ramp(0, 1, lanes) >= T.broadcast(lo, lanes),
                                 T.ramp(0, 1, lanes) < T.broadcast(hi, lanes)))
    return store


def dot4_macro(name: str):
    """``dot4(acc, a, u, w)``: ``acc[a:a+L]`` (int32 lanes) += the dot product of each lane's
    4 bytes of ``u`` and of ``w``: ``vpdpbusd`` (``u`` uint8x64, ``w`` int8x64) or ``sdot``
    (both int8x16), or on AVX2 the exact four-instruction sequence of
    :func:`_avx2_dot4_macro` (both int8x32). Every kernel's dot-product instruction."""
    from tvm.script import tirx as T

    if name in ("avx2", "avx2u"):
        return _avx2_dot4_macro(signed=name == "avx2")
    intrinsics = {"vnni": ("llvm.x86.avx512.vpdpbusd.512", 16),
                  "sdot": ("llvm.aarch64.neon.sdot.v4i32.v16i8", 4)}
    if name not in intrinsics:
        raise ValueError(f"{name!r} has no 4-byte dot-product instruction")
    intrinsic, lanes = intrinsics[name]

    @T.macro
    def dot4(acc, a, u, w):
        acc[T.ramp(a, 1, lanes)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(intrinsic), acc.vload([a], f"int32x{lanes}"), u, w,
            dtype=f"int32x{lanes}")
    return dot4


def _avx2_dot4_macro(signed: bool = True):
    """``dot4`` on AVX2 (no dot-product instruction), ``u`` and ``w`` int8x32, exact: ``w``'s
    bytes take the signs of ``u``'s (``vpsignb``), ``u``'s bytes their magnitudes (``vpsignb``
    of ``u`` by itself: -128 becomes the unsigned byte 128), ``vpmaddubsw`` multiplies the
    magnitudes (unsigned) by the signed weights and sums neighbouring pairs in int16 lanes,
    ``vpmaddwd`` by ones sums neighbouring pairs of those into int32 lanes. A pair of products
    is at most 2 x 128 x 127 = 32512 in magnitude, so ``vpmaddubsw``'s saturation never binds,
    given weights in the quantizer's narrow range [-127, 127] (a -128 weight would change
    sign wrongly: such layers get the ``generic`` kernels, see
    :func:`~pqcompile.lower.kernel_types.fit_isa`). Four instructions per 32 multiply-adds
    (``vpdpbusd`` does 64 in one).

    ``signed=False`` (``avx2u``): ``u`` uint8x32 as it is, the weights within +-64 (7 bits or
    fewer), so a pair of products is at most 2 x 255 x 64 = 32640: ``vpmaddubsw`` straight
    away, three instructions per 32 multiply-adds."""
    from tvm.script import tirx as T

    def intrin(name, dtype, *args):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.x86.avx2.{name}"),
                                       *args, dtype=dtype)

    def pairs(u, w):  # int16x16: the pair sums of (unsigned) |u| x (signed) w
        if signed:
            u, w = intrin("psign.b", "int8x32", u, u), intrin("psign.b", "int8x32", w, u)
        return intrin("pmadd.ub.sw", "int16x16", u, w)

    @T.macro
    def dot4(acc, a, u, w):
        acc[T.ramp(a, 1, 8)] = acc.vload([a], "int32x8") + intrin(
            "pmadd.wd", "int32x8", pairs(u, w), T.broadcast(T.int16(1), 16))
    return dot4


def dot_macro(isa):
    """The conv kernels' step for an :class:`~pqcompile.lower.kernel_types.Isa`:
    ``dot(acc, Xc, Wp, ob, ks, r, a, x)``: ``acc[a:a+L]`` += the ``L`` pixels' interleaved input
    words at ``Xc[x]`` . output channel ``r``'s weight word ``Wp[ob, ks, r]`` (``neon``: the
    pair sums of ``acc[2a:2a+2L]``, see :func:`acc_macros`)."""
    from tvm.script import tirx as T

    L = isa.lanes
    if isa.name == "neon":
        _pairs = smull_pairs_macro()

        @T.macro
        def dot(acc, Xc, Wp, ob, ks, r, a, x):
            _pairs(acc, 2 * a, Xc, x, 0, Wp, ob, ks, 0, r)
    elif isa.name == "sdot" and isa.mr % 4 == 0:
        _dot4 = dot4_macro(isa.name)

        @T.macro
        def dot(acc, Xc, Wp, ob, ks, r, a, x):
            _dot4(acc, a, Xc.vload([x * 4], "int8x16"),
                  quad_lane(Wp.vload([ob, ks, r - r % 4, 0], "int8x16"), r % 4))
    elif isa.name in ("vnni", "sdot", "avx2", "avx2u"):
        _dot4 = dot4_macro(isa.name)
        u_dt = f"{isa.packed_dtype}x{4 * L}"
        w_dt = f"int8x{4 * L}"

        @T.macro
        def dot(acc, Xc, Wp, ob, ks, r, a, x):
            _dot4(acc, a, Xc.vload([x * 4], u_dt),
                  splat(Wp.vload([ob, ks, r, 0], "int8x4"), L, w_dt))
    else:
        @T.macro
        def dot(acc, Xc, Wp, ob, ks, r, a, x):
            for lane in T.vectorized(L):
                acc[a + lane] = acc[a + lane] + T.Cast("int32", Xc[x + lane]) \
                    * T.Cast("int32", Wp[ob, ks, r, 0])
    return dot


def dot_steps(isa) -> int:
    """Dot-product steps :func:`dot_pair_macro` takes at once (``neon``: 2)."""
    return 2 if isa.name == "neon" else 1


def dot_pair_macro(isa):
    """``dot2(acc, Xc, Wp, ob, ks, dks, r, a, x, dx)``: :func:`dot_macro`'s step at ``(ks,
    x)`` and, where :func:`dot_steps` is 2, the step at ``(ks + dks, x + dx)`` too (``neon``:
    both products summed in int16 lanes before one ``sadalp``, see
    :func:`smull_pairs_macro`)."""
    from tvm.script import tirx as T

    if dot_steps(isa) == 2:
        _pairs = smull_pairs_macro(2, isa.mr)

        @T.macro
        def dot2(acc, Xc, Wp, ob, ks, dks, r, a, x, dx):
            _pairs(acc, 2 * a, Xc, x, dx, Wp, ob, ks, dks, r)
    else:
        _dot = dot_macro(isa)

        @T.macro
        def dot2(acc, Xc, Wp, ob, ks, dks, r, a, x, dx):
            _dot(acc, Xc, Wp, ob, ks, r, a, x)
    return dot2


def acc_macros(isa):
    """``(init, finish)`` of an accumulator vector of ``isa`` (conv kernels): ``init(acc, a,
    b)`` starts output vector ``a`` (``acc[a:a+L]``) at the bias ``b``; ``finish(acc, a, b)``
    leaves its sums in ``acc[a:a+L]`` for the epilogue. For ``neon`` the vector's pair sums
    (:func:`smull_pairs_macro`) are ``acc[2a:2a+8]``: ``init`` zeroes them, ``finish`` adds
    neighbouring lanes (``addp``) and the bias. Finishing vectors in increasing ``a`` is
    safe in place (vector ``a`` writes below the pair sums of every later vector)."""
    from tvm.script import tirx as T

    L = isa.lanes
    if isa.name == "neon":
        @T.macro
        def init(acc, a, b):
            acc[T.ramp(2 * a, 1, 8)] = T.broadcast(T.int32(0), 8)

        @T.macro
        def finish(acc, a, b):
            acc[T.ramp(a, 1, 4)] = pair_sums(acc, a) + T.broadcast(b, 4)
    else:
        @T.macro
        def init(acc, a, b):
            acc[T.ramp(a, 1, L)] = T.broadcast(b, L)

        @T.macro
        def finish(acc, a, b):
            T.evaluate(0)
    return init, finish
