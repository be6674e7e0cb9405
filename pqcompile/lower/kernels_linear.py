"""The integer linear kernel: rows x output-feature vectors, the inputs' 4-byte groups
broadcast against weight vectors (``vpdpbusd`` / ``sdot``), the requantizing epilogue of the
conv kernels."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .kernel_types import KERNEL_ATTR, Isa, parallel_worth
from .tir_macros import dot4_macro, requant_macro, requant_terms, splat
from .tir_neon import pair_sums, quad_lane


@dataclass(frozen=True)
class LinearShape:
    """A quantized linear layer as the kernel sees it: ``[M, K] x [K, N]`` (M: the flattened
    leading dims of the input)."""

    rows: int
    in_features: int
    out_features: int
    in_dtype: str
    out_dtype: str
    lo: int
    hi: int


def linear_tile(shape: LinearShape, isa: Isa) -> Isa:
    """Rows of the input x vectors of output features held in registers (``neon``: at most
    16 accumulator registers, two a vector of 4 features)."""
    mr = max(1, min(4, shape.rows))
    nv = -(-shape.out_features // isa.lanes)
    if isa.name == "neon":
        return Isa("neon", isa.lanes, mr, max(1, min(nv, 8 // mr)))
    # at most 8 vectors a row; on sdot 16 accumulators in all (of aarch64's 32 registers)
    most = 16 // mr if isa.name == "sdot" else 8
    nr = max(1, min(nv, 1020 // (mr * isa.lanes * 4), most))
    return Isa(isa.name, isa.lanes, mr, nr)


def pack_linear_weight(wt: np.ndarray, isa: Isa) -> np.ndarray:
    """``[K, N]`` int8 -> ``[1, N/L * K/D, L, D]``: vectors of ``L`` outputs x ``D``
    consecutive inputs (zero-padded), grouped as the kernel's tiles read them: each group of
    ``NR`` vectors (the last group the rest) step by step, ``[K/D, NR, L, D]``, so a step's
    vectors are one contiguous run (``ldp`` / adjacent lines); :func:`weight_vector` indexes
    it. ``neon``: ``[N/4, K/8, half, step, 8]`` (see :func:`linear_kernel`)."""
    k, n = wt.shape
    d, lanes = isa.depth, isa.lanes
    kp, np_ = -(-k // d) * d, -(-n // lanes) * lanes
    w = np.zeros((kp, np_), np.int8)
    w[:k, :n] = wt
    w = w.reshape(kp // d, d, np_ // lanes, lanes).transpose(2, 0, 3, 1)
    if isa.name == "neon":
        if w.shape[1] % 2:
            w = np.concatenate([w, np.zeros_like(w[:, :1])], axis=1)
        w = w.reshape(w.shape[0], -1, 2, 2, 8).transpose(0, 1, 3, 2, 4)
        return np.ascontiguousarray(w)
    groups = [w[g:g + isa.nr].transpose(1, 0, 2, 3).reshape(-1)
              for g in range(0, w.shape[0], isa.nr)]
    return np.concatenate(groups).reshape(1, -1, lanes, d)


def weight_vector(nb, kb, v, nv: int, kb_count: int, nr: int):
    """The index of tile group ``nb``'s vector ``v`` (clamped to the group's last) at step
    ``kb`` in :func:`pack_linear_weight`'s grouped order (``nv`` vectors, ``kb_count`` steps,
    groups of ``nr``)."""
    from tvm.script import tirx as T

    width = T.min(nr, nv - nb * nr)
    return nb * nr * kb_count + kb * width + T.min(v, width - 1)


def linear_params(wt: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray,
                  shape: LinearShape, isa: Isa) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output feature: bias (less the input offset's contribution), multiplier, shift,
    padded to whole vectors."""
    n = wt.shape[1]
    pad = -(-n // isa.lanes) * isa.lanes - n
    b = bias.astype(np.int64) - isa.offset(shape.in_dtype) * wt.astype(np.int64).sum(axis=0)
    fix = lambda a, fill: np.concatenate([a.astype(np.int64), np.full(pad, fill)])  # noqa: E731
    return (fix(b, 0).astype(np.int32), fix(mult, 0).astype(np.int32),
            fix(shift, 40).astype(np.int32))  # pads: any valid shift


@functools.cache  # built once per shape: TVMScript parsing is slow
def linear_kernel(shape: LinearShape, isa: Isa):
    """``(pack, kernel, scratch)``: ``pack(X[M, K]) -> Xp`` (offset, K padded to the depth),
    ``kernel(Xp, Wv, B, M, S, Y[M, N])``. Tiles of ``MR`` rows x ``NR`` vectors of ``L``
    output features; each step broadcasts ``D`` inputs of a row against a weight vector.

    ``neon`` takes two steps at once from two 16-byte loads and no broadcast: the pack
    stores a row's words of steps ``2j`` and ``2j + 1`` each twice (``[a a b b]``), the
    weights of a vector half (2 features) are the two steps' 8 bytes side by side, so
    ``smull`` of the low halves, ``smlal2`` of the high ones and one ``sadalp`` add the
    half's 16 products (two a pair sum: at most 2 x 128 x 127 in int16)."""
    from tvm.script import tirx as T

    Mr, K, N = shape.rows, shape.in_features, shape.out_features
    in_dt, out_dt, lo, hi = shape.in_dtype, shape.out_dtype, shape.lo, shape.hi
    L, MR, NR, D = isa.lanes, isa.mr, isa.nr, isa.depth
    KB = -(-K // D)
    NV = -(-N // L)
    NB = -(-NV // NR)
    MB = -(-Mr // MR)
    par = parallel_worth(macs=Mr * K * N)
    Np = NV * L
    Ng = NB * NR * L
    off = isa.offset(in_dt)
    pdt = isa.packed_dtype or in_dt
    neon = isa.name == "neon"
    KB2 = -(-KB // 2)  # neon: step pairs
    scratch = MB * MR * KB2 * 16 if neon else MB * MR * KB * D
    AW = isa.acc_width
    # sdot with whole row quads: a step's 4 rows' words are 16 consecutive bytes of the pack,
    # one load, each word an indexed sdot operand (quad_lane)
    quads = isa.name == "sdot" and MR % 4 == 0
    _dot = None if neon else linear_dot_macro(isa, quads)

    words = D == 4 and K % D == 0  # the pack moves 4-byte words

    def at(m, k):
        return pack_index(m, k, KB, D, quads)

    _quad = _neon_quad_macro() if neon else None
    w_shape = (NV, KB2, 2, 2, 8) if neon else (1, NV * KB, L, D)

    def at2(m, kb, i):  # neon: where copy i of row m's word kb goes in the pack
        return (m * KB2 + kb // 2) * 16 + kb % 2 * 8 + i * 4

    @T.macro
    def _step(acc, Wv, Xp, mb_nb, kb):  # one step of the tile: MR x NR dot products
        for r in T.unroll(MR):
            for v in T.unroll(NR):
                _dot(acc, (r * NR + v) * L, Wv, 0, weight_vector(mb_nb % NB, kb, v, NV, KB, NR),
                     Xp, at(mb_nb // NB * MR + r, kb * D))

    # the 64-bit epilogue (per-lane constants: the 32-bit one's terms would be computed per
    # lane, and TVM 0.27's bound analysis drops its clamp)
    _store = requant_macro(out_dt, lo, hi)

    @T.prim_func(s_tir=True)
    def pack(X: T.Buffer((Mr, K), in_dt), Xp: T.Buffer((scratch,), pdt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "linear.pack"})
        with T.sblock("root"):
            if neon and words:  # padding steps meet zero weights: any bytes do
                for m in range(MB * MR):
                    for kb in range(KB2 * 2):
                        for i in T.unroll(2):
                            Xp[T.ramp(at2(m, kb, i), 1, D)] = offset_word(X.vload(
                                [T.min(m, Mr - 1), T.min(kb, KB - 1) * D], f"{in_dt}x{D}"),
                                off, pdt)
            elif neon:
                for m in range(MB * MR):
                    for kb in range(KB2 * 2):
                        for i in T.unroll(2):
                            for d in range(D):
                                Xp[at2(m, kb, i) + d] = T.Cast(pdt, T.Cast("int32", X[
                                    T.min(m, Mr - 1), T.min(kb * D + d, K - 1)]) + off)
            elif words:  # rows past the last repeat it: their outputs are never stored
                for m in range(MB * MR):
                    for kb in range(KB):
                        Xp[T.ramp(at(m, kb * D), 1, D)] = offset_word(
                            X.vload([T.min(m, Mr - 1), kb * D], f"{in_dt}x{D}"), off, pdt)
            else:
                for m in range(MB * MR):
                    for k in range(KB * D):
                        Xp[at(m, k)] = T.if_then_else(
                            m < Mr and k < K, T.Cast(pdt, T.Cast("int32", X[
                                T.min(m, Mr - 1), T.min(k, K - 1)]) + off), T.Cast(pdt, off))

    @T.prim_func(s_tir=True)
    def kernel(Xp: T.Buffer((scratch,), pdt), Wv: T.Buffer(w_shape, "int8"),
               B: T.Buffer((Np,), "int32"), M: T.Buffer((Np,), "int32"),
               S: T.Buffer((Np,), "int32"), Y: T.Buffer((Mr, N), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "linear"})
        with T.sblock("root"):
            Yg = T.alloc_buffer((MB * MR * Ng,), out_dt)
            for mb_nb in T.parallel(MB * NB) if par else T.serial(MB * NB):
                acc = T.alloc_buffer((MR * NR * L * AW,), "int32", scope="global")
                if neon:  # pair sums from zero; the bias is added when they are summed
                    for i in T.unroll(MR * NR * 2):
                        acc[T.ramp(4 * i, 1, 4)] = T.broadcast(T.int32(0), 4)
                    for kp in range(KB2):
                        for r in T.unroll(MR):
                            for v in T.unroll(NR):
                                _quad(acc, 2 * (r * NR + v) * L, Wv,
                                      T.min((mb_nb % NB) * NR + v, NV - 1), kp, Xp,
                                      ((mb_nb // NB * MR + r) * KB2 + kp) * 16)
                    for r in T.unroll(MR):  # in place: vector a writes below every later one
                        for v in T.unroll(NR):
                            acc[T.ramp((r * NR + v) * L, 1, 4)] = \
                                pair_sums(acc, (r * NR + v) * L) + B.vload(
                                    [T.min((mb_nb % NB) * NR + v, NV - 1) * L], "int32x4")
                else:
                    for r in T.unroll(MR):  # the accumulators start at the bias
                        for v in T.unroll(NR):
                            for lane in T.vectorized(L):
                                acc[(r * NR + v) * L + lane] = B[
                                    T.min(((mb_nb % NB) * NR + v) * L + lane, Np - 1)]
                    for kb2 in range(KB // 2):  # two steps a loop iteration
                        for u in T.unroll(2):
                            _step(acc, Wv, Xp, mb_nb, kb2 * 2 + u)
                    for kb in range(KB // 2 * 2, KB):
                        _step(acc, Wv, Xp, mb_nb, kb)
                for r in T.unroll(MR):
                    for v in T.unroll(NR):
                        for lane in T.vectorized(L):
                            _store(Yg, (mb_nb // NB * MR + r) * Ng + ((mb_nb % NB) * NR + v) * L
                                   + lane, acc, (r * NR + v) * L + lane,
                                   T.Cast("int64", M[T.min(((mb_nb % NB) * NR + v) * L + lane,
                                                            Np - 1)]),
                                   requant_terms(S[T.min(((mb_nb % NB) * NR + v) * L + lane,
                                                         Np - 1)])[0],
                                   requant_terms(S[T.min(((mb_nb % NB) * NR + v) * L + lane,
                                                         Np - 1)])[1])
            for m in range(Mr):
                for n in range(N):
                    Y[m, n] = Yg[m * Ng + n]

    return pack, kernel, scratch


def pack_index(m, k, kb: int, depth: int, quads: bool = False):
    """Where row ``m``'s byte ``k`` goes in a pack of ``kb`` steps of ``depth`` bytes a row:
    row-major, or (``quads``, 4-byte steps) each step's words of 4 consecutive rows side by
    side, 16 bytes (one load, each word an indexed ``sdot`` operand:
    :func:`~pqcompile.lower.tir_neon.quad_lane`)."""
    if quads:
        return ((m // 4 * kb + k // depth) * 4 + m % 4) * depth + k % depth
    return m * kb * depth + k


def offset_word(word, off: int, dtype: str):
    """4 bytes ``word`` (an ``int8x4`` / ``uint8x4`` load) plus ``off`` (0 or +-128, the
    dot product's operand type) each, as ``dtype`` x 4: adding 128 modulo 256 flips each
    byte's top bit, one ``eor`` of the 32-bit word."""
    from tvm.script import tirx as T

    w = T.reinterpret(word, dtype="int32")
    if off:
        w = T.bitwise_xor(w, T.int32(-0x7F7F7F80))  # 0x80808080
    return T.reinterpret(w, dtype=f"{dtype}x4")


def linear_dot_macro(isa: Isa, quads: bool = False):
    """``acc[a:a+L] += Wv[nv, kb] (L x D weights) . broadcast(Xp[x:x+D])`` (``quads``, on
    ``sdot``: ``Xp[x]`` is a word of a 16-byte quad, read with one load as an indexed
    operand)."""
    from tvm.script import tirx as T

    L = isa.lanes
    if quads:
        _dot4 = dot4_macro("sdot")

        @T.macro
        def dot(acc, a, Wv, nv, kb, Xp, x):
            _dot4(acc, a, Wv.vload([nv, kb, 0, 0], "int8x16"),
                  quad_lane(Xp.vload([x - x % 16], "int8x16"), x % 16 // 4))
    elif isa.name in ("vnni", "sdot", "avx2", "avx2u"):  # a 4-byte dot product a lane
        _dot4 = dot4_macro(isa.name)
        x_dt, w_dt = isa.packed_dtype, f"int8x{4 * L}"

        @T.macro
        def dot(acc, a, Wv, nv, kb, Xp, x):
            _dot4(acc, a, splat(Xp.vload([x], f"{x_dt}x4"), L, f"{x_dt}x{4 * L}"),
                  Wv.vload([nv, kb, 0, 0], w_dt))
    else:
        @T.macro
        def dot(acc, a, Wv, nv, kb, Xp, x):
            for lane in T.vectorized(L):
                acc[a + lane] = acc[a + lane] + T.Cast("int32", Wv[nv, kb, lane, 0]) \
                    * T.Cast("int32", Xp[x])
    return dot


def _neon_quad_macro():
    """``quad(acc, a, Wv, nv, kp, Xp, x)`` (aarch64 NEON without dot products, see
    :func:`linear_kernel`): ``acc[a:a+4]`` and ``acc[a+4:a+8]`` (the pair sums of features
    0-1 and 2-3 of vector ``nv``) += step pair ``kp``'s products with the row's words at
    ``Xp[x:x+16]``."""
    from tvm.script import tirx as T

    def smull(w, x, half):
        part = list(range(8 * half, 8 * half + 8))
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
            T.Shuffle([w], part), T.Shuffle([x], part), dtype="int16x8")

    def half(Wv, nv, kp, Xp, x, h):
        w = Wv.vload([nv, kp, h, 0, 0], "int8x16")
        xq = Xp.vload([x], "int8x16")
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
            smull(w, xq, 0) + smull(w, xq, 1), dtype="int32x4")

    @T.macro
    def quad(acc, a, Wv, nv, kp, Xp, x):
        acc[T.ramp(a, 1, 4)] = acc.vload([a], "int32x4") + half(Wv, nv, kp, Xp, x, 0)
        acc[T.ramp(a + 4, 1, 4)] = acc.vload([a + 4], "int32x4") + half(Wv, nv, kp, Xp, x, 1)
    return quad


def linear_pair_macro():
    """``pair(acc, a, Wv, nv, kb, Xp, x)`` (aarch64 NEON without dot products, one step: the
    product kernel, whose operands are both activations): ``acc[a:a+4]`` (features 0-1 of
    vector ``nv``, two pair sums each) and ``acc[a+4:a+8]`` (features 2-3) += the products of
    the 4-input word ``Wv[nv, kb]`` with the row's input word ``Xp[x]`` splat: ``smull`` into
    int16 lanes (a product of two int8 is at most 16384: exact for -128 on both sides, which a
    second step's ``smlal`` could overflow), then ``sadalp``."""
    from tvm.script import tirx as T

    def intrin(name, dtype, *args):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.aarch64.neon.{name}"),
                                       *args, dtype=dtype)

    def half(Wv, nv, kb, Xp, x, h):
        return intrin("saddlp.v4i32.v8i16", "int32x4", intrin(
            "smull.v8i16", "int16x8", Wv.vload([nv, kb, 2 * h, 0], "int8x8"),
            splat(Xp.vload([x], "int8x4"), 2, "int8x8")))

    @T.macro
    def pair(acc, a, Wv, nv, kb, Xp, x):
        acc[T.ramp(a, 1, 4)] = acc.vload([a], "int32x4") + half(Wv, nv, kb, Xp, x, 0)
        acc[T.ramp(a + 4, 1, 4)] = acc.vload([a + 4], "int32x4") + half(Wv, nv, kb, Xp, x, 1)
    return pair
