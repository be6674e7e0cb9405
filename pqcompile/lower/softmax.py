"""The fixed-point softmax (:class:`pqcompile.quant.softmax.QSoftmax`) as one kernel.

The reference's integers, row by row (rows split among parallel tasks where there are enough
of them): the row max of the codes, the table of exponentials indexed by its distance to each
code (an int32 parameter of the program, entries at most ``2^20``: 1 KiB in the weights file),
the row sum ``S``, one floor division per row for the reciprocal ``R``, then a multiply,
rounding shift and clamp per element. With a mask's bias (a second input, float), the
positions whose bias is at most ``MASKED`` are left out of the row max and sum, as the
reference leaves them: the bias becomes one byte a position (``keep``, its own shape, read
through broadcast strides: an attention mask's ``[B, 1, 1, N]`` is not expanded to the
scores' shape). Nothing runs in float.

Every step but the table's loads runs in vector lanes (``VL`` elements a step, the rest of a
row scalar): the row max, the table indices ``max - q``, the mask (a select after the loads),
the row sum, and the per-element product in 64-bit lanes from two 32-bit operands (``smull`` /
``vpmuldq``): ``e <= 2^20`` and ``R`` is taken at most ``2^31 - 1``. That clamp is exact: a
row with an attended position has its max's ``E[0] = 2^20`` in ``S``, so ``R <= G / 2^20 <
2^27``; a row with none has every ``e = 0``, whatever ``R``. The shifted product is below
``2^(48 - t) <= 2^31`` (``t >= 17``), so the output clamp runs in 32-bit lanes. (As Relax
ops, one per step, the int64 chain ran scalar on aarch64: ~20 M instructions a MiniLM-L3
inference; with the indices, mask and product scalar, the kernel took ~19 instructions an
element on arm-dotprod, now ~9.)
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.softmax import MASKED, QSoftmax
from .kernel_types import KERNEL_ATTR, parallel_worth

if TYPE_CHECKING:
    from .relax_builder import Lowering

_NONE = -(1 << 16)  # below every code: the row max of a row with nothing attended
VL = 16  # int32 lanes of the row max (a multiple of every target's vector)


def _keep_index(shape: tuple[int, ...], kshape: tuple[int, ...], r, j):
    """The flat index into ``keep`` (``kshape``, broadcast to ``shape``) of row ``r``,
    column ``j`` of the scores."""
    kshape = (1,) * (len(shape) - len(kshape)) + tuple(kshape)
    index, inner, kstride = 0, 1, 1
    for d in range(len(shape) - 1, -1, -1):
        pos = j if d == len(shape) - 1 else (r // inner) % shape[d]
        if d < len(shape) - 1:
            inner *= shape[d]
        if kshape[d] != 1:
            index = index + pos * kstride
        kstride *= kshape[d]
    return index


@functools.cache  # one kernel per shape and constants: TVMScript parsing is slow
def softmax_kernel(shape: tuple[int, ...], kshape: tuple[int, ...] | None, in_dt: str,
                   out_dt: str, g: int, t: int, lo: int, hi: int):
    """``kernel(X, E, [K,] Y)``: :class:`~pqcompile.quant.softmax.QSoftmax` over the last dim
    of ``X`` (``shape``, codes) into ``Y``; ``E`` the 256-entry table, ``K`` (``kshape``,
    int8, broadcast to ``shape``) 1 where a position is attended (no ``K``: every one)."""
    from tvm.script import tirx as T

    N = int(shape[-1])
    rows = math.prod(shape[:-1])
    par = parallel_worth(nbytes=rows * N * 4)
    wide = N >= 2048  # S in int64 where N * 2^20 could pass 2^31
    s_dt = "int64" if wide else "int32"
    ksize = math.prod(kshape) if kshape is not None else 1

    blocks, tail = divmod(N, VL)
    if t < 17:  # make_softmax's output scale above 1e-9 (< 2^-29) puts t at 17 or more
        raise ValueError(f"softmax kernel: shift {t} below 17 (an output scale under 2^-29)")

    def kept(Kf, r, j):
        if Kf is None:
            return T.bool(True)
        return Kf[_keep_index(shape, kshape, r, j)] != T.int8(0)

    def code(e, rr, j):  # e R rounded at 2^-t (one smull / vpmuldq), clamped in 32 bits
        return T.Cast(out_dt, T.max(T.min(T.Cast("int32", T.shift_right(
            T.Cast("int64", e[j]) * T.Cast("int64", rr[0]) + T.int64(1 << (t - 1)),
            T.int64(t))), T.int32(hi)), T.int32(lo)))

    @T.macro
    def body(Xf, E, Kf, Yf, r):
        e = T.alloc_buffer((N,), "int32", scope="global")
        v = T.alloc_buffer((2,), s_dt, scope="global")  # [row max, S]
        lanes = T.alloc_buffer((VL,), s_dt, scope="global")
        v[0] = T.Cast(s_dt, _NONE)
        for lane in T.vectorized(VL):  # the row max in VL lanes, then across them
            lanes[lane] = T.Cast(s_dt, _NONE)
        for jb in range(blocks):
            for lane in T.vectorized(VL):
                lanes[lane] = T.max(lanes[lane], T.Select(
                    kept(Kf, r, jb * VL + lane), T.Cast(s_dt, Xf[r * N + jb * VL + lane]),
                    T.Cast(s_dt, _NONE)))
        for lane in range(VL):
            v[0] = T.max(v[0], lanes[lane])
        for j in range(tail):
            v[0] = T.max(v[0], T.Select(kept(Kf, r, blocks * VL + j), T.Cast(
                s_dt, Xf[r * N + blocks * VL + j]), T.Cast(s_dt, _NONE)))
        # the table's indices in lanes, its entries one load each, the masked ones zeroed
        # and the row sum in lanes
        for jb in range(blocks):
            for lane in T.vectorized(VL):
                e[jb * VL + lane] = T.max(T.min(T.Cast("int32", v[0]) - T.Cast(
                    "int32", Xf[r * N + jb * VL + lane]), 255), 0)
        for j in range(tail):
            e[blocks * VL + j] = T.max(T.min(T.Cast("int32", v[0]) - T.Cast(
                "int32", Xf[r * N + blocks * VL + j]), 255), 0)
        for j in range(N):
            e[j] = E[e[j]]
        for lane in T.vectorized(VL):
            lanes[lane] = T.Cast(s_dt, 0)
        for jb in range(blocks):
            for lane in T.vectorized(VL):
                e[jb * VL + lane] = T.Select(kept(Kf, r, jb * VL + lane), e[jb * VL + lane], 0)
                lanes[lane] = lanes[lane] + T.Cast(s_dt, e[jb * VL + lane])
        v[1] = T.Cast(s_dt, 0)
        for lane in range(VL):
            v[1] = v[1] + lanes[lane]
        for j in range(tail):
            e[blocks * VL + j] = T.Select(kept(Kf, r, blocks * VL + j), e[blocks * VL + j], 0)
            v[1] = v[1] + T.Cast(s_dt, e[blocks * VL + j])
        rr = T.alloc_buffer((1,), "int32", scope="global")
        rr[0] = T.Cast("int32", T.min(T.floordiv(
            T.int64(g) + T.floordiv(T.max(T.Cast("int64", v[1]), T.int64(1)), T.int64(2)),
            T.max(T.Cast("int64", v[1]), T.int64(1))), T.int64((1 << 31) - 1)))
        for jb in range(blocks):
            for lane in T.vectorized(VL):
                Yf[r * N + jb * VL + lane] = code(e, rr, jb * VL + lane)
        for j in range(tail):
            Yf[r * N + blocks * VL + j] = code(e, rr, blocks * VL + j)

    if kshape is None:
        @T.prim_func(s_tir=True)
        def kernel(X: T.Buffer(shape, in_dt), E: T.Buffer((256,), "int32"),
                   Y: T.Buffer(shape, out_dt)):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                         KERNEL_ATTR: "softmax"})
            with T.sblock("root"):
                Xf = T.decl_buffer((rows * N,), in_dt, data=X.data)
                Yf = T.decl_buffer((rows * N,), out_dt, data=Y.data)
                for r in T.parallel(rows) if par else T.serial(rows):
                    body(Xf, E, None, Yf, r)
    else:
        @T.prim_func(s_tir=True)
        def kernel(X: T.Buffer(shape, in_dt), E: T.Buffer((256,), "int32"),
                   K: T.Buffer(kshape, "int8"), Y: T.Buffer(shape, out_dt)):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                         KERNEL_ATTR: "softmax"})
            with T.sblock("root"):
                Xf = T.decl_buffer((rows * N,), in_dt, data=X.data)
                Kf = T.decl_buffer((ksize,), "int8", data=K.data)
                Yf = T.decl_buffer((rows * N,), out_dt, data=Y.data)
                for r in T.parallel(rows) if par else T.serial(rows):
                    body(Xf, E, Kf, Yf, r)
    return kernel


def softmax(lw: Lowering, node, module: QSoftmax, q, bias=None) -> relax.Expr:
    bb, name = lw.bb, node.name
    shape = tuple(int(d) for d in lw.shape(node))
    # a parameter of the program (the weights file: what totals["weight_bytes"] measures),
    # int32 as the stored-bytes prediction counts it (quant.softmax.TABLE_BYTES)
    table = lw.param(f"{name}.table", module.table.numpy().astype(np.int32))
    args, kshape = [q, table], None
    if bias is not None:  # the attended positions only
        dt = str(bias.ty.dtype)
        kshape = tuple(int(d) for d in bias.ty.shape)
        if len(kshape) > len(shape) or any(
                k not in (1, s) for k, s in zip(kshape[::-1], shape[::-1], strict=False)):
            raise ValueError(f"{name}: the mask bias of shape {kshape} does not broadcast "
                             f"to the scores' {shape}")
        args.append(bb.emit(R.astype(R.greater(
            bias, relax.const(np.asarray(MASKED, dtype=dt), dt)), "int8")))
    kernel = softmax_kernel(shape, kshape, str(q.ty.dtype), module.out.dtype, int(module.g),
                            int(module.t), module.lo, module.hi)
    lw.kernels[name] = "softmax" + (" masked" if kshape is not None else "")
    return lw.call_kernel(kernel, f"{name}_softmax", args, shape, module.out.dtype)


EMITTERS = {QSoftmax: softmax}
