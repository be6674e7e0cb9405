"""The residual add in int32 lanes: the reference's ``clamp((a m_a + b m_b + 2^(sh-1)) >> sh,
lo, hi)`` (:class:`~pqcompile.quant.qmodules.QAdd`, int64) computed with the same integers in
32-bit arithmetic.

The int64 form cost one 64-bit multiply a lane (AVX-512: ``vpmullq``, three micro-ops; NEON has
no 64-bit vector multiply at all, so LLVM multiplied lane by lane in scalar registers). The
inputs are 8-bit codes, so the sum has at most 256 x 256 distinct argument pairs, and an int32
form is chosen at lowering time and checked on every one of them:

- ``single``: the multipliers and shift scaled down by ``2^t`` (rounded), the largest ``t``
  whose results equal the reference's on the whole input domain and whose sums fit int32;
- ``split`` (where no ``t`` does): each multiplier as ``2^16 h + l`` (``0 <= l < 2^16``), the
  sum as ``2^16 H + L`` with ``H = a h_a + b h_b`` and ``L = a l_a + b l_b`` (each well within
  int32), and ``floor((2^16 H + L + 2^(sh-1)) / 2^sh) = (H + (L >> 16) + 2^(sh-17)) >>
  (sh - 16)``: exact for ``17 <= sh <= 46``, an identity of floor divisions by powers of two.

A shift outside that range keeps the int64 form (``None``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tvm import relax
from tvm.relax import op as R

from .kernel_types import KERNEL_ATTR
from .tir_flat import flat_macro

if TYPE_CHECKING:
    from ..quant.qmodules import QAdd
    from .relax_builder import Lowering


@dataclass(frozen=True)
class Int32Add:
    """``kind`` ``"single"``: ``mults`` and ``shift`` of the scaled-down form; ``"split"``:
    ``mults`` the high halves ``h``, ``lows`` the low halves ``l``, ``shift`` the
    reference's."""

    kind: str
    mults: tuple[int, int]
    shift: int
    lows: tuple[int, int] = (0, 0)


def code_range(dtype: str) -> tuple[int, int]:
    """The codes an int8/uint8 tensor holds."""
    return (0, 255) if dtype == "uint8" else (-128, 127)


def evaluate(form: Int32Add | None, a: np.ndarray, b: np.ndarray, mults, shift: int,
             lo: int, hi: int) -> np.ndarray:
    """``form`` on int64 arrays ``a``, ``b`` (broadcasting), as the program computes it in
    int32 (asserting every intermediate fits); ``None``: the reference's int64 form."""
    if form is None:
        return np.clip((a * mults[0] + b * mults[1] + (1 << (shift - 1))) >> shift, lo, hi)
    if form.kind == "single":
        (m1, m2), s = form.mults, form.shift
        acc = a * m1 + b * m2 + (1 << (s - 1))
        _fits(acc)
        return np.clip(acc >> s, lo, hi)
    (h1, h2), (l1, l2), s = form.mults, form.lows, form.shift
    high, low = a * h1 + b * h2, a * l1 + b * l2
    acc = high + (low >> 16) + (1 << (s - 17))
    for v in (high, low, acc):
        _fits(v)
    return np.clip(acc >> (s - 16), lo, hi)


def _fits(v: np.ndarray) -> None:
    if v.size and (int(v.max()) >= 1 << 31 or int(v.min()) < -(1 << 31)):
        raise OverflowError("an int32 add form overflowed")


def int32_form(mults, shift: int, lo: int, hi: int, dtypes: tuple[str, str]
               ) -> Int32Add | None:
    """The int32 form of the add (module doc), checked on every pair of input codes of
    ``dtypes``; ``None`` where the int64 form must stay."""
    (ra, rb) = (code_range(d) for d in dtypes)
    a = np.arange(ra[0], ra[1] + 1, dtype=np.int64)[:, None]
    b = np.arange(rb[0], rb[1] + 1, dtype=np.int64)[None, :]
    ma, mb = (int(m) for m in mults)
    want = evaluate(None, a, b, (ma, mb), shift, lo, hi)
    big_a, big_b = max(abs(v) for v in ra), max(abs(v) for v in rb)
    for t in range(shift - 1, -1, -1):
        m1, m2 = ((ma + (1 << (t - 1))) >> t, (mb + (1 << (t - 1))) >> t) if t else (ma, mb)
        s = shift - t
        if big_a * abs(m1) + big_b * abs(m2) + (1 << (s - 1)) >= 1 << 31:
            continue  # the sum might not fit int32
        form = Int32Add("single", (m1, m2), s)
        if np.array_equal(evaluate(form, a, b, mults, shift, lo, hi), want):
            return form
    if 17 <= shift <= 46:
        form = Int32Add("split", (ma >> 16, mb >> 16), shift, (ma & 0xFFFF, mb & 0xFFFF))
        if np.array_equal(evaluate(form, a, b, mults, shift, lo, hi), want):
            return form
    return None


#: int32 lanes a step of :func:`add_kernel`
LANES = 16
#: Elements a parallel task adds (smaller tensors: one task).
TASK_ELEMENTS = 1 << 14


@functools.cache  # one kernel per shape, dtypes and form: TVMScript parsing is slow
def add_kernel(shape: tuple[int, ...], dtypes: tuple[str, str], out_dt: str, form: Int32Add,
               lo: int, hi: int):
    """``kernel(A, B, Y)``: ``Y = form(A, B)`` clamped to ``[lo, hi]`` (:func:`evaluate`), for
    8-bit ``A``, ``B`` of ``shape``, flat, :data:`LANES` int32 lanes a step. (TVM's fused
    elementwise kernel vectorized NCHW's rows, 56 pixels in resnet18's first stage: 8 lanes.)"""
    from tvm.script import tirx as T

    n = int(np.prod(shape))
    V = LANES
    flat = flat_macro(n, V, TASK_ELEMENTS)

    def value(a, b, lanes: int):
        def c(v):
            return T.broadcast(T.int32(v), lanes) if lanes > 1 else T.int32(v)

        i32 = f"int32x{lanes}" if lanes > 1 else "int32"
        x, y = T.Cast(i32, a), T.Cast(i32, b)
        if form.kind == "single":
            (m1, m2), s = form.mults, form.shift
            acc = (x * c(m1) + y * c(m2) + c(1 << (s - 1))) >> c(s)
        else:
            (h1, h2), (l1, l2), s = form.mults, form.lows, form.shift
            acc = (x * c(h1) + y * c(h2) + ((x * c(l1) + y * c(l2)) >> c(16))
                   + c(1 << (s - 17))) >> c(s - 16)
        out = f"{out_dt}x{lanes}" if lanes > 1 else out_dt
        return T.Cast(out, T.max(T.min(acc, c(hi)), c(lo)))

    def vec(Af, Bf, i):
        return value(Af.vload([i], f"{dtypes[0]}x{V}"), Bf.vload([i], f"{dtypes[1]}x{V}"), V)

    def one(Af, Bf, i):
        return value(Af[i], Bf[i], 1)

    @T.prim_func(s_tir=True)
    def kernel(A: T.Buffer(shape, dtypes[0]), B: T.Buffer(shape, dtypes[1]),
               Y: T.Buffer(shape, out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "add"})
        with T.sblock("root"):
            Af = T.decl_buffer((n,), dtypes[0], data=A.data)
            Bf = T.decl_buffer((n,), dtypes[1], data=B.data)
            Yf = T.decl_buffer((n,), out_dt, data=Y.data)
            flat(Yf, Af, Bf, vec, one)

    return kernel


def add(lw: Lowering, node, module: QAdd, a, b) -> relax.Expr:
    """The Relax emitter of :class:`~pqcompile.quant.qmodules.QAdd`: :func:`add_kernel` where
    the program has kernels, else the int32 form as Relax ops, or the int64 form."""
    bb = lw.bb
    (ma, mb), sh = module.mults, module.shift
    dtypes = (str(a.ty.dtype), str(b.ty.dtype))
    form = int32_form((ma, mb), sh, module.lo, module.hi, dtypes) \
        if set(dtypes) <= {"int8", "uint8"} else None
    if form is None:  # the reference's int64 form
        def i64(v: int) -> relax.Expr:
            return relax.const(np.int64(v), "int64")

        acc = R.add(R.multiply(R.astype(a, "int64"), i64(ma)),
                    R.multiply(R.astype(b, "int64"), i64(mb)))
        y = bb.emit(R.right_shift(R.add(acc, i64(1 << (sh - 1))), i64(sh)))
        return bb.emit(R.astype(R.clip(y, module.lo, module.hi), module.out.dtype))

    # the same integers in int32 lanes, checked on every pair of input codes (add32)
    shape = lw.shape(node)
    if lw.isa is not None and all(isinstance(n, torch.fx.Node) and lw.shape(n) == shape
                                  for n in node.args):
        lw.kernels[node.name] = f"add {form.kind}"
        return lw.call_kernel(add_kernel(shape, dtypes, module.out.dtype, form, module.lo,
                                         module.hi), f"{node.name}_add", [a, b], shape,
                              module.out.dtype)

    def i32(v: int) -> relax.Expr:
        return relax.const(np.int32(v), "int32")

    def dot(m1: int, m2: int) -> relax.Expr:  # a m1 + b m2 in int32
        return R.add(R.multiply(R.astype(a, "int32"), i32(m1)),
                     R.multiply(R.astype(b, "int32"), i32(m2)))

    if form.kind == "single":
        y = R.right_shift(R.add(dot(*form.mults), i32(1 << (form.shift - 1))), i32(form.shift))
    else:
        y = R.right_shift(R.add(R.add(dot(*form.mults), R.right_shift(dot(*form.lows), i32(16))),
                                i32(1 << (form.shift - 17))), i32(form.shift - 16))
    return bb.emit(R.astype(R.clip(bb.emit(y), module.lo, module.hi), module.out.dtype))
