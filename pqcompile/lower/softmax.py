"""Relax emitter of the fixed-point softmax (:class:`pqcompile.quant.softmax.QSoftmax`).

The reference's int64 arithmetic, op for op: the row max of the codes, the table of
exponentials indexed by its distance to each code (an int32 parameter of the program, entries
at most ``2^20``: 1 KiB in the weights file), the row sum, one floor division per row for the
reciprocal, then a multiply, rounding shift and clamp per element. With a mask's bias (a
second input, float), the positions whose bias is at most ``MASKED`` are left out of the row
max and sum, as the reference leaves them. TVM fuses the elementwise ops around the two reductions; nothing runs in
float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.softmax import MASKED, QSoftmax

if TYPE_CHECKING:
    from .relax_builder import Lowering


def _i64(value: int) -> relax.Expr:
    return relax.const(np.asarray(value, dtype=np.int64), "int64")


def softmax(lw: Lowering, node, module: QSoftmax, q, bias=None) -> relax.Expr:
    bb = lw.bb
    # a parameter of the program (the weights file: what totals["weight_bytes"] measures),
    # int32 as the stored-bytes prediction counts it (quant.softmax.TABLE_BYTES)
    table = lw.param(f"{node.name}.table", module.table.numpy().astype(np.int32))
    qi = bb.emit(R.astype(q, "int32"))
    if bias is None:
        d = bb.emit(R.subtract(R.max(qi, axis=-1, keepdims=True), qi))
        e = bb.emit(R.astype(R.take(table, d, axis=0), "int64"))
    else:  # the attended positions only
        dt = str(bias.ty.dtype)
        keep = bb.emit(R.greater(bias, relax.const(np.asarray(MASKED, dtype=dt), dt)))
        mx = bb.emit(R.max(R.where(keep, qi, relax.const(np.int32(-(1 << 16)), "int32")),
                           axis=-1, keepdims=True))
        d = bb.emit(R.clip(R.subtract(mx, qi), 0, 255))
        e = bb.emit(R.where(keep, R.astype(R.take(table, d, axis=0), "int64"), _i64(0)))
    s = bb.emit(R.maximum(R.sum(e, axis=-1, keepdims=True), _i64(1)))
    r = bb.emit(R.floor_divide(R.add(_i64(module.g), R.floor_divide(s, _i64(2))), s))
    y = bb.emit(R.right_shift(R.add(R.multiply(e, r), _i64(1 << (module.t - 1))),
                              _i64(module.t)))
    return bb.emit(R.astype(R.clip(y, module.lo, module.hi), module.out.dtype))


EMITTERS = {QSoftmax: softmax}
