"""The x86 kernel of integer activation x activation products (``q @ k^T``, ``probs @ v``).

``C[b] = A[b] @ B[b]`` for int8/uint8 ``A`` (``[Bt, M, K]``) and ``B`` (``[Bt, K, N]``), both
computed at run time: unlike a linear layer's weights, ``B`` is packed on every call. TVM's
``matmul`` legalizes to one scalar reduction per output with ``B`` read down its columns (a
stride of ``N`` bytes per step): on MiniLM's ``probs @ v`` (12 heads, 128 x 128 x 32) that was
1.7 ms a layer, more than the six linear layers of the layer together.

``vpdpbusd`` multiplies unsigned bytes by signed ones, four at a time per int32 lane. The
kernel offsets each operand into the type its side of the instruction takes (``A + oA`` in
uint8, ``B + oB`` in int8; an offset is 128 or 0) and starts each accumulator at what the
offsets add: with ``A = A' - oA`` and ``B = B' - oB``,
``sum_k A B = sum_k A' B' - oB * rowsum(A) - oA * colsum(B) - K * oA * oB``. The packs compute
those sums from the original integers, so the accumulator ends at the same int32 the reference
computes in float64 (exact: every partial sum is an integer of at most 2^31), and the epilogue
is the requantization of :func:`pqcompile.lower.ops.requant` with the product's one
multiplier. ``K`` is padded to a multiple of 4 with zeros on both packed sides (they add
nothing); every tile divides the output, so the kernel stores straight into it.

Packs: ``A`` row-major with ``K`` padded (``[Bt, M, Kp]``, 4 bytes broadcast per step), ``B``
as vectors of 16 columns x 4 consecutive ``k`` (``[Bt, N/16, Kp/4, 16, 4]``, the layout of the
linear kernel's weights). Tiles: ``MR`` rows x ``NR`` vectors of 16 columns in registers
(fewer than 16 vectors: TVM keeps a buffer under 1 KiB on the stack), the tasks (head, row
block, column block) in parallel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .kernel_types import KERNEL_ATTR
from .tir_macros import NARROW_MIN_SHIFT, dot4_macro, requant_macro, requant_terms, splat

LANES = 16  # int32 lanes of an AVX-512 vector
DEPTH = 4  # bytes per lane of one vpdpbusd
MAX_TILE = 15  # accumulator vectors: 16 x 4-byte lanes each, the tile under 1 KiB


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

    @property
    def offsets(self) -> tuple[int, int]:
        """``(oA, oB)``: what the packs add to each byte of ``A`` (to uint8) and ``B`` (to
        int8)."""
        return (128 if self.a_dtype == "int8" else 0), (-128 if self.b_dtype == "uint8" else 0)


def tile(shape: ProductShape) -> tuple[int, int] | None:
    """``(MR, NR)``: rows x 16-column vectors per tile, both dividing the output; the most
    accumulators (at most :data:`MAX_TILE`), then the fewest operand loads per dot product
    (``(MR + NR) / (MR * NR)``). ``None`` when the columns are not whole vectors."""
    if shape.cols % LANES:
        return None
    nv = shape.cols // LANES
    best, best_key = None, None
    for mr in range(1, MAX_TILE + 1):
        for nr in range(1, MAX_TILE + 1):
            if mr * nr > MAX_TILE or shape.rows % mr or nv % nr:
                continue
            key = (mr * nr, -(mr + nr) / (mr * nr))
            if best_key is None or key > best_key:
                best, best_key = (mr, nr), key
    return best


def supported(shape: ProductShape) -> bool:
    """The kernel covers the product: 8-bit operands, whole 16-column vectors, and offset
    sums that stay in int32 (``255 * 128 * K`` below 2^31)."""
    return (shape.a_dtype in ("int8", "uint8") and shape.b_dtype in ("int8", "uint8")
            and shape.out_dtype in ("int8", "uint8") and tile(shape) is not None
            and 255 * 128 * (-(-shape.depth // DEPTH) * DEPTH) < (1 << 31)
            and shape.shift >= 1)


@functools.cache  # built once per shape: TVMScript parsing is slow
def product_kernel(shape: ProductShape):
    """``(pack_a, pack_b, kernel)`` TIR functions (see the module doc):
    ``pack_a(A) -> (Ap, Ra)``, ``pack_b(B) -> (Bp, Cb)`` (``Ra``/``Cb``: each row's and
    column's share of the offsets' correction, int32), ``kernel(Ap, Ra, Bp, Cb) -> C``
    (``C`` flat: ``[Bt * M * N]``)."""
    from tvm.script import tirx as T

    Bt, M, K, N = shape.batch, shape.rows, shape.depth, shape.cols
    oa, ob = shape.offsets
    mr, nr = tile(shape)
    KB = -(-K // DEPTH)
    Kp, NV = KB * DEPTH, N // LANES
    MB, NB = M // mr, NV // nr
    a_dt, b_dt, out_dt = shape.a_dtype, shape.b_dtype, shape.out_dtype
    _dot4 = dot4_macro("vnni")
    narrow = shape.shift >= NARROW_MIN_SHIFT
    _store = requant_macro(out_dt, shape.lo, shape.hi, narrow=narrow)
    m_c = T.int64(shape.mult)
    r_c, sh_c = requant_terms(T.int32(shape.shift), narrow)
    corr = -K * oa * ob  # the constant term, added to each row's correction

    @T.prim_func(s_tir=True)
    def pack_a(A: T.Buffer((Bt, M, K), a_dt), Ap: T.Buffer((Bt * M * Kp,), "uint8"),
               Ra: T.Buffer((Bt * M,), "int32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                     KERNEL_ATTR: "product.pack_a"})
        with T.sblock("root"):
            for bm in T.parallel(Bt * M):
                for k in range(Kp):
                    Ap[bm * Kp + k] = T.if_then_else(
                        k < K, T.Cast("uint8", T.Cast("int32", A[bm // M, bm % M,
                                                                 T.min(k, K - 1)]) + oa),
                        T.uint8(0))
                Ra[bm] = corr
                if ob != 0:
                    for k in range(K):
                        Ra[bm] = Ra[bm] - ob * T.Cast("int32", A[bm // M, bm % M, k])

    @T.prim_func(s_tir=True)
    def pack_b(B: T.Buffer((Bt, K, N), b_dt), Bp: T.Buffer((Bt, NV, KB, LANES, DEPTH), "int8"),
               Cb: T.Buffer((Bt * N,), "int32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                     KERNEL_ATTR: "product.pack_b"})
        with T.sblock("root"):
            for bv in T.parallel(Bt * NV):
                for kb in range(KB):
                    for lane in range(LANES):
                        for d in range(DEPTH):
                            Bp[bv // NV, bv % NV, kb, lane, d] = T.if_then_else(
                                kb * DEPTH + d < K, T.Cast("int8", T.Cast("int32", B[
                                    bv // NV, T.min(kb * DEPTH + d, K - 1),
                                    bv % NV * LANES + lane]) + ob), T.int8(0))
                for lane in T.vectorized(LANES):
                    Cb[bv * LANES + lane] = 0
                if oa != 0:
                    for k in range(K):
                        for lane in T.vectorized(LANES):
                            Cb[bv * LANES + lane] = Cb[bv * LANES + lane] - oa * T.Cast(
                                "int32", B[bv // NV, k, bv % NV * LANES + lane])

    @T.prim_func(s_tir=True)
    def kernel(Ap: T.Buffer((Bt * M * Kp,), "uint8"), Ra: T.Buffer((Bt * M,), "int32"),
               Bp: T.Buffer((Bt, NV, KB, LANES, DEPTH), "int8"),
               Cb: T.Buffer((Bt * N,), "int32"), C: T.Buffer((Bt * M * N,), out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "product"})
        with T.sblock("root"):
            for task in T.parallel(Bt * MB * NB):
                acc = T.alloc_buffer((mr * nr * LANES,), "int32", scope="global")
                for r in T.unroll(mr):
                    for v in T.unroll(nr):
                        for lane in T.vectorized(LANES):
                            acc[(r * nr + v) * LANES + lane] = \
                                Ra[task // (MB * NB) * M + task // NB % MB * mr + r] + \
                                Cb[task // (MB * NB) * N + (task % NB * nr + v) * LANES + lane]
                for kb in range(KB):
                    for r in T.unroll(mr):
                        for v in T.unroll(nr):
                            _dot4(acc, (r * nr + v) * LANES,
                                  splat(Ap.vload([((task // (MB * NB) * M + task // NB % MB * mr
                                                    + r) * KB + kb) * DEPTH], "uint8x4"),
                                        LANES, f"uint8x{DEPTH * LANES}"),
                                  Bp.vload([task // (MB * NB), task % NB * nr + v, kb, 0, 0],
                                           f"int8x{DEPTH * LANES}"))
                for r in T.unroll(mr):
                    for v in T.unroll(nr):
                        for lane in T.vectorized(LANES):
                            _store(C, (task // (MB * NB) * M + task // NB % MB * mr + r) * N
                                   + (task % NB * nr + v) * LANES + lane,
                                   acc, (r * nr + v) * LANES + lane, m_c, r_c, sh_c)

    return pack_a, pack_b, kernel
