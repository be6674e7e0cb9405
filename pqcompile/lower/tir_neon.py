"""TIR expression builders for aarch64 NEON used by the kernels' macros
(:mod:`~pqcompile.lower.tir_macros`): the broadcast weight word, the indexed ``sdot`` operand,
the ``smull``/``sadalp`` pair step of the ``neon`` conv kernels and the NEON requantization.
"""

from __future__ import annotations


def splat(word, n: int, dtype: str):
    """``n`` copies of a 4-byte ``word`` (an ``int8x4`` / ``uint8x4`` load) as one vector of
    ``dtype`` (``n * 4`` bytes): the broadcast operand of a 4-byte dot product."""
    from tvm.script import tirx as T

    return T.reinterpret(T.broadcast(T.reinterpret(word, dtype="int32"), n), dtype=dtype)


def quad_lane(words, q):
    """Word ``q`` (0-3, an expression that is constant once the kernel's loops are
    unrolled) of the 16 bytes ``words`` (4 output channels' 4-byte weight words, one load)
    splat over the vector: LLVM selects the indexed ``sdot v.4s, x.16b, w.4b[q]``, so a
    tile's 4 channels cost one 16-byte weight load instead of 4 ``ld1r`` (each with its own
    address arithmetic: ``ld1r`` has no offset form)."""
    from tvm.script import tirx as T

    w32 = T.reinterpret(words, dtype="int32x4")
    lanes = [T.reinterpret(T.Shuffle([w32], [i] * 4), dtype="int8x16") for i in range(4)]
    return T.Select(q == 0, lanes[0], T.Select(q == 1, lanes[1],
                                               T.Select(q == 2, lanes[2], lanes[3])))


def pair_sums(acc, a):
    """The 4 int32 sums of output vector ``a``'s pair sums ``acc[2a:2a+8]`` (the ``neon``
    accumulators: two registers a vector), neighbouring lanes added (``addp``)."""
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"),
                                   acc.vload([2 * a], "int32x4"),
                                   acc.vload([2 * a + 4], "int32x4"), dtype="int32x4")


def neon_requant(acc, a, m, sh, lo: int, hi: int):
    """``clamp((acc[a:a+4] * m + 2^(sh-1)) >> sh, lo, hi)`` as int32x4 on aarch64 NEON, one
    channel's constants (``m`` the int32 multiplier, ``sh`` the negated shift, int64) for
    every lane: :func:`neon_requant_lanes`."""
    from tvm.script import tirx as T

    return neon_requant_lanes(acc, a, 4, lambda h: T.broadcast(m, 2),
                              lambda h: T.broadcast(sh, 2), lo, hi)


def neon_requant_lanes(acc, a, n: int, m2, sh2, lo: int, hi: int):
    """``clamp((acc[a:a+n] * m + 2^(sh-1)) >> sh, lo, hi)`` as int32 x ``n`` (even) on
    aarch64 NEON, two lanes at a time: ``m2(h)`` the int32x2 multipliers and ``sh2(h)`` the
    int64x2 negated shifts of lanes ``2h, 2h + 1``. ``smull`` (the exact int64 products),
    ``srshl`` by ``-sh`` (the rounding right shift: ``(x + 2^(sh-1)) >> sh`` exactly, so the
    integers of :func:`~pqcompile.lower.tir_macros.requant_macro`), ``sqxtn`` (saturating
    to int32 keeps the clamp's result), ``smin``/``smax``."""
    from tvm.script import tirx as T

    def intrin(name, dtype, *args):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{name}"),
                                       *args, dtype=dtype)

    halves = [intrin("sqxtn.v2i32", "int32x2", intrin(
        "srshl.v2i64", "int64x2", intrin("smull.v2i64", "int64x2",
                                         acc.vload([a + 2 * h], "int32x2"), m2(h)),
        sh2(h))) for h in range(n // 2)]
    return T.max(T.min(T.Shuffle(halves, list(range(n))), T.broadcast(T.int32(hi), n)),
                 T.broadcast(T.int32(lo), n))


def pair_word(Wp, ob, ks, mr: int, i):
    """Weight word ``i`` (an expression that is constant once the kernel's loops are
    unrolled; ``0 <= i < 2 mr``) of the pair of steps ``ks``, ``ks + 1`` (``Wp[ob, ks, :]``
    then ``Wp[ob, ks + 1, :]``: ``2 mr`` contiguous 4-byte words) splat over int8x8. The
    words are read 4 at a time (16 bytes, the last 2 words 8 bytes) and each is broadcast
    from its lane (``dup v.2s, v.s[j]``): a tile's ``2 mr`` splats cost ``mr / 2`` loads
    and ``2 mr`` dups, where ``ld1r`` (no offset form) needs an address for each."""
    from tvm.script import tirx as T

    out = None
    for w in reversed(range(2 * mr)):
        g = w // 4 * 4
        n = 4 if g + 4 <= 2 * mr else 2
        start = [ob, ks, g, 0] if g < mr else [ob, ks + 1, g - mr, 0]
        chunk = T.reinterpret(Wp.vload(start, f"int8x{4 * n}"), dtype=f"int32x{n}")
        lane = T.reinterpret(T.Shuffle([chunk], [w - g] * 2), dtype="int8x8")
        out = lane if out is None else T.Select(i == w, lane, out)
    return out


def smull_pairs_macro(steps: int = 1, mr: int | None = None):
    """``pairs(acc, a, Xc, x, dx, Wp, ob, ks, dks, r)`` (aarch64 NEON without dot products):
    ``acc[a:a+8]`` (int32) += the pair sums of the byte products of ``steps`` input vectors
    ``Xc[4 (x + i dx) ...]`` (16 bytes: 4 pixels' 4-channel words) with the weight words
    ``Wp[ob, ks + i dks, r]`` (each splat over its vector's 4 pixels). With ``mr`` (the
    tile's output channels, ``steps`` 2), ``dks`` must be 1 and the weights are read by
    :func:`pair_word`.

    Per 8 bytes (2 pixels): ``smull`` (int16 products of two int8: they fit), the next step's
    ``smlal`` into the same int16 lanes (two products of an int8 input and a weight in
    [-127, 127], the quantizer's narrow range, sum to at most 32512: no overflow), then
    ``sadalp`` adds neighbouring int16 lanes into 4 int32 lanes: lane ``i`` of ``acc[a:a+4]``
    holds pixel ``i // 2``'s channels ``2 (i % 2)``, ``2 (i % 2) + 1`` (pixels 0-1),
    ``acc[a+4:a+8]`` pixels 2-3. Two steps are 32 multiply-accumulates in 6 instructions, one
    step 16 in 4 (one ``sdot`` does 16). The halves are loaded as 8 bytes each (a 16-byte
    load would need ``ext`` for its high half: the weights' splat has no high half for
    ``smull2``)."""
    from tvm.script import tirx as T

    smull = "llvm.aarch64.neon.smull.v8i16"
    saddlp = "llvm.aarch64.neon.saddlp.v4i32.v8i16"

    def weight(Wp, ob, ks, dks, r, i):
        if mr is not None:
            return pair_word(Wp, ob, ks, mr, r + i * mr)
        return splat(Wp.vload([ob, ks + i * dks, r, 0], "int8x4"), 2, "int8x8")

    def products(Xc, x, dx, Wp, ob, ks, dks, r, h):
        out = None
        for i in range(steps):
            term = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(smull), Xc.vload([(x + i * dx) * 4 + 8 * h], "int8x8"),
                weight(Wp, ob, ks, dks, r, i), dtype="int16x8")
            out = term if out is None else out + term
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(saddlp), out, dtype="int32x4")

    @T.macro
    def pairs(acc, a, Xc, x, dx, Wp, ob, ks, dks, r):
        acc[T.ramp(a, 1, 4)] = acc.vload([a], "int32x4") \
            + products(Xc, x, dx, Wp, ob, ks, dks, r, 0)
        acc[T.ramp(a + 4, 1, 4)] = acc.vload([a + 4], "int32x4") \
            + products(Xc, x, dx, Wp, ob, ks, dks, r, 1)
    return pairs


#: The smallest shift of :func:`neon_requant_narrow` (its rounding term ``2^(sh-1)`` a
#: multiple of ``2^31``).
NEON_NARROW_MIN_SHIFT = 32


def neon_requant_narrow(x, m, nsh, lo: int, hi: int):
    """``clamp((x * m + 2^(sh-1)) >> sh, lo, hi)`` as int32x4 on aarch64 NEON for shifts of at
    least :data:`NEON_NARROW_MIN_SHIFT`, in two instructions: ``x`` the int32x4 accumulators,
    ``m`` the int32x4 multipliers (non-negative), ``nsh`` the int32x4 ``31 - sh``.

    ``sqdmulh`` gives ``floor(2 x m / 2^32) = floor(x m / 2^31)`` exactly (it saturates only
    for ``x = m = -2^31``, and ``m >= 0``). As ``2^(sh-1)`` is a multiple of ``2^31``,
    ``floor((x m + 2^(sh-1)) / 2^31) = floor(x m / 2^31) + 2^(sh-32)``, and one more floor
    division by ``2^(sh-31)`` is ``srshl`` by ``31 - sh``: the rounding right shift
    ``(v + 2^(sh-32)) >> (sh-31)``. The integers of
    :func:`~pqcompile.lower.tir_macros.requant_macro`; :func:`neon_requant_lanes` (the int64
    products, ``smull``/``srshl``/``sqxtn`` two lanes at a time) takes 7 instructions for
    the same 4 lanes."""
    from tvm.script import tirx as T

    def intrin(name, *args):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{name}"),
                                       *args, dtype="int32x4")

    y = intrin("srshl.v4i32", intrin("sqdmulh.v4i32", x, m), nsh)
    return T.max(T.min(y, T.broadcast(T.int32(hi), 4)), T.broadcast(T.int32(lo), 4))
