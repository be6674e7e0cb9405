"""The kernels of integer activation x activation products (``q @ k^T``, ``probs @ v``).

``C[b] = A[b] @ B[b]`` for int8/uint8 ``A`` (``[Bt, M, K]``) and ``B`` (``[Bt, K, N]``), both
computed at run time: unlike a linear layer's weights, ``B`` is packed on every call. TVM's
``matmul`` legalizes to one scalar reduction per output with ``B`` read down its columns (a
stride of ``N`` bytes per step): on MiniLM's ``probs @ v`` (12 heads, 128 x 128 x 32) that was
1.7 ms a layer on x86, more than the six linear layers of the layer together.

One kernel for three instruction sets (:data:`ISAS`), each step a 4-byte dot product per
int32 lane, the steps of the linear kernel (:mod:`pqcompile.lower.kernels_linear`):
``vnni`` (``vpdpbusd``: unsigned bytes of ``A`` by signed ones of ``B``, 16 lanes), ``sdot``
(aarch64 ``+dotprod``: signed by signed, 4 lanes) and ``neon`` (aarch64 without dot
products: ``smull`` of 8 bytes and ``sadalp`` into pair sums, two registers a vector, added
pairwise once before the epilogue; one step at a time, so a product of two -128 bytes cannot
overflow the int16 lanes). The packs offset each operand into the type its side takes
(``A + oA``, ``B + oB``; an offset is +-128 or 0) and start each accumulator at what the
offsets add: with ``A = A' - oA`` and ``B = B' - oB``,
``sum_k A B = sum_k A' B' - oB * rowsum(A) - oA * colsum(B) - K * oA * oB``. The packs compute
those sums from the original integers, so the accumulator ends at the same int32 the reference
computes in float64 (exact: every partial sum is an integer of at most 2^31), and the epilogue
is the requantization of :func:`pqcompile.lower.ops.requant` with the product's one
multiplier. ``K`` is padded to a multiple of 4 with zeros on both packed sides (they add
nothing); every tile divides the output, so the kernel stores straight into it.

Packs: ``A`` row-major with ``K`` padded (``[Bt, M, Kp]``, 4 bytes broadcast per step; on
``sdot`` with tiles of whole row quads, 4 rows' words of a step are 16 consecutive bytes, one
load, each word an indexed ``sdot`` operand), ``B`` as vectors of ``L`` columns x 4
consecutive ``k`` (``[Bt * N/L, Kp/4, L, 4]``, the layout of the linear kernel's weights).
Tiles: ``MR`` rows x ``NR`` vectors of ``L`` columns in registers, the tasks (head, row block,
column block) in parallel where the product is large enough.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .kernel_types import KERNEL_ATTR, Isa, parallel_worth
from .kernels_linear import linear_dot_macro, linear_pair_macro, offset_word, pack_index
from .tir_macros import NARROW_MIN_SHIFT, dot4_macro, requant_macro, requant_terms
from .tir_neon import pair_sums, quad_lane

DEPTH = 4  # bytes per lane of one dot-product step
#: int32 lanes of a vector and the most accumulator vectors of a tile: under 1 KiB of stack
#: (TVM keeps smaller buffers in registers) and, on aarch64, within the 32 vector registers
ISAS = {"vnni": (16, 15), "sdot": (4, 16), "neon": (4, 8)}
LANES = ISAS["vnni"][0]


@dataclass(frozen=True)
class ProductShape:
    """One integer product as the kernel sees it (leading dims flattened into ``batch``)."""

    batch: int
    rows: int
    depth: int
    cols: int
    a_dtype: str  # "int8" | "uint8"
    b_dtype: str
    out_dtype: str
    lo: int
    hi: int
    mult: int
    shift: int

    def offsets(self, isa: str = "vnni") -> tuple[int, int]:
        """``(oA, oB)``: what the packs add to each byte of ``A`` (to uint8 on ``vnni``, int8
        elsewhere) and ``B`` (to int8)."""
        if isa == "vnni":
            oa = 128 if self.a_dtype == "int8" else 0
        else:
            oa = -128 if self.a_dtype == "uint8" else 0
        return oa, (-128 if self.b_dtype == "uint8" else 0)


def tile(shape: ProductShape, isa: str = "vnni") -> tuple[int, int] | None:
    """``(MR, NR)``: rows x ``L``-column vectors per tile, both dividing the output; the most
    accumulators (at most the ISA's), then the fewest operand loads per dot product
    (``(MR + NR) / (MR * NR)``; on ``sdot`` a quad of rows is one load, on ``neon`` a vector
    of ``B`` two). ``None`` when the
    columns are not whole vectors."""
    lanes, most = ISAS[isa]
    if shape.cols % lanes:
        return None
    nv = shape.cols // lanes
    best, best_key = None, None
    for mr in range(1, most + 1):
        for nr in range(1, most + 1):
            if mr * nr > most or shape.rows % mr or nv % nr:
                continue
            loads = (mr / 4 if _quads(isa, mr) else mr) + nr * (2 if isa == "neon" else 1)
            key = (mr * nr, -loads / (mr * nr))
            if best_key is None or key > best_key:
                best, best_key = (mr, nr), key
    return best


def _quads(isa: str, mr: int) -> bool:
    """Whether the ``A`` pack interleaves rows by quads (indexed ``sdot`` operands)."""
    return isa == "sdot" and mr % 4 == 0


def supported(shape: ProductShape, isa: str = "vnni") -> bool:
    """The kernel covers the product: 8-bit operands, whole vectors of columns, and offset
    sums that stay in int32 (``255 * 128 * K`` below 2^31)."""
    return (isa in ISAS and shape.a_dtype in ("int8", "uint8")
            and shape.b_dtype in ("int8", "uint8")
            and shape.out_dtype in ("int8", "uint8") and tile(shape, isa) is not None
            and 255 * 128 * (-(-shape.depth // DEPTH) * DEPTH) < (1 << 31)
            and shape.shift >= 1)


@functools.cache  # built once per shape: TVMScript parsing is slow
def product_kernel(shape: ProductShape, isa: str = "vnni"):
    """``(pack_a, pack_b, kernel)`` TIR functions (see the module doc):
    ``pack_a(A) -> (Ap, Ra)``, ``pack_b(B) -> (Bp, Cb)`` (``Ra``/``Cb``: each row's and
    column's share of the offsets' correction, int32), ``kernel(Ap, Ra, Bp, Cb) -> C``
    (``C`` flat: ``[Bt * M * N]``)."""
    from tvm.script import tirx as T

    Bt, M, K, N = shape.batch, shape.rows, shape.depth, shape.cols
    oa, ob = shape.offsets(isa)
    mr, nr = tile(shape, isa)
    L = ISAS[isa][0]
    kisa = Isa(isa, L, mr, nr)
    KB = -(-K // DEPTH)
    Kp, NV = KB * DEPTH, N // L
    MB, NB = M // mr, NV // nr
    a_dt, b_dt, out_dt = shape.a_dtype, shape.b_dtype, shape.out_dtype
    pa_dt = kisa.packed_dtype
    quads, neon = _quads(isa, mr), isa == "neon"
    AW = kisa.acc_width
    _dot = None if neon else linear_dot_macro(kisa)
    _pair = linear_pair_macro() if neon else None
    _dot4 = dot4_macro("sdot") if quads else None
    narrow = shape.shift >= NARROW_MIN_SHIFT
    _store = requant_macro(out_dt, shape.lo, shape.hi, narrow=narrow)
    m_c = T.int64(shape.mult)
    r_c, sh_c = requant_terms(T.int32(shape.shift), narrow)
    corr = -K * oa * ob  # the constant term, added to each row's correction
    par = parallel_worth(macs=Bt * M * K * N)

    def a_at(bm, k):
        return pack_index(bm, k, KB, DEPTH, quads)

    @T.prim_func(s_tir=True)
    def pack_a(A: T.Buffer((Bt, M, K), a_dt), Ap: T.Buffer((Bt * M * Kp,), pa_dt),
               Ra: T.Buffer((Bt * M,), "int32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                     KERNEL_ATTR: "product.pack_a"})
        with T.sblock("root"):
            for bm in T.parallel(Bt * M) if par else T.serial(Bt * M):
                if K % DEPTH == 0:  # 4-byte words
                    for kb in range(KB):
                        Ap[T.ramp(a_at(bm, kb * DEPTH), 1, DEPTH)] = offset_word(
                            A.vload([bm // M, bm % M, kb * DEPTH], f"{a_dt}x{DEPTH}"), oa,
                            pa_dt)
                else:
                    for k in range(Kp):
                        Ap[a_at(bm, k)] = T.if_then_else(
                            k < K, T.Cast(pa_dt, T.Cast("int32", A[bm // M, bm % M,
                                                                     T.min(k, K - 1)]) + oa),
                            T.Cast(pa_dt, 0))
                Ra[bm] = corr
                if ob != 0:
                    for k in range(K):
                        Ra[bm] = Ra[bm] - ob * T.Cast("int32", A[bm // M, bm % M, k])

    @T.prim_func(s_tir=True)
    def pack_b(B: T.Buffer((Bt, K, N), b_dt), Bp: T.Buffer((Bt * NV, KB, L, DEPTH), "int8"),
               Cb: T.Buffer((Bt * N,), "int32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                     KERNEL_ATTR: "product.pack_b"})
        with T.sblock("root"):
            for bv in T.parallel(Bt * NV) if par else T.serial(Bt * NV):
                for kb in range(KB):
                    for lane in range(L):
                        for d in range(DEPTH):
                            Bp[bv, kb, lane, d] = T.if_then_else(
                                kb * DEPTH + d < K, T.Cast("int8", T.Cast("int32", B[
                                    bv // NV, T.min(kb * DEPTH + d, K - 1),
                                    bv % NV * L + lane]) + ob), T.int8(0))
                for lane in T.vectorized(L):
                    Cb[bv * L + lane] = 0
                if oa != 0:
                    for k in range(K):
                        for lane in T.vectorized(L):
                            Cb[bv * L + lane] = Cb[bv * L + lane] - oa * T.Cast(
                                "int32", B[bv // NV, k, bv % NV * L + lane])

    @T.prim_func(s_tir=True)
    def kernel(Ap: T.Buffer((Bt * M * Kp,), pa_dt), Ra: T.Buffer((Bt * M,), "int32"),
               Bp: T.Buffer((Bt * NV, KB, L, DEPTH), "int8"),
               Cb: T.Buffer((Bt * N,), "int32"), C: T.Buffer((Bt * M * N,), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "product"})
        with T.sblock("root"):
            for task in T.parallel(Bt * MB * NB) if par else T.serial(Bt * MB * NB):
                acc = T.alloc_buffer((mr * nr * L * AW,), "int32", scope="global")
                if neon:  # pair sums from zero; the corrections join when they are summed
                    for i in T.unroll(mr * nr * 2):
                        acc[T.ramp(4 * i, 1, 4)] = T.broadcast(T.int32(0), 4)
                else:  # the accumulators start at the offsets' correction
                    for r in T.unroll(mr):
                        for v in T.unroll(nr):
                            for lane in T.vectorized(L):
                                acc[(r * nr + v) * L + lane] = \
                                    Ra[task // (MB * NB) * M + task // NB % MB * mr + r] + \
                                    Cb[task // (MB * NB) * N + (task % NB * nr + v) * L + lane]
                for kb in range(KB):
                    for r in T.unroll(mr):
                        for v in T.unroll(nr):
                            if quads:  # the row's word second: the indexed form of sdot
                                _dot4(acc, (r * nr + v) * L,
                                      Bp.vload([task // (MB * NB) * NV + task % NB * nr + v,
                                                kb, 0, 0], f"int8x{DEPTH * L}"),
                                      quad_lane(Ap.vload([a_at(
                                          task // (MB * NB) * M + task // NB % MB * mr + r
                                          - r % 4, kb * DEPTH)], "int8x16"), r % 4))
                            elif neon:
                                _pair(acc, 2 * (r * nr + v) * L, Bp,
                                      task // (MB * NB) * NV + task % NB * nr + v, kb, Ap,
                                      a_at(task // (MB * NB) * M + task // NB % MB * mr + r,
                                           kb * DEPTH))
                            else:
                                _dot(acc, (r * nr + v) * L, Bp,
                                     task // (MB * NB) * NV + task % NB * nr + v, kb, Ap,
                                     a_at(task // (MB * NB) * M + task // NB % MB * mr + r,
                                          kb * DEPTH))
                if neon:  # pair sums added pairwise, in place (vector a writes below later ones)
                    for r in T.unroll(mr):
                        for v in T.unroll(nr):
                            acc[T.ramp((r * nr + v) * L, 1, 4)] = \
                                pair_sums(acc, (r * nr + v) * L) + T.broadcast(
                                    Ra[task // (MB * NB) * M + task // NB % MB * mr + r], 4) \
                                + Cb.vload([task // (MB * NB) * N + (task % NB * nr + v) * L],
                                           "int32x4")
                for r in T.unroll(mr):
                    for v in T.unroll(nr):
                        for lane in T.vectorized(L):
                            _store(C, (task // (MB * NB) * M + task // NB % MB * mr + r) * N
                                   + (task % NB * nr + v) * L + lane,
                                   acc, (r * nr + v) * L + lane, m_c, r_c, sh_c)

    return pack_a, pack_b, kernel
