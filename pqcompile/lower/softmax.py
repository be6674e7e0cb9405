"""Relax emitter of the fixed-point softmax (:class:`pqcompile.quant.softmax.QSoftmax`).

The reference's int64 arithmetic, op for op: the row max of the codes, the table of
exponentials indexed by its distance to each code (an int32 parameter of the program, entries
at most ``2^20``: 1 KiB in the weights file), the row sum, one floor division per row for the
reciprocal, then a multiply, rounding shift and clamp per element. TVM fuses the elementwise ops around the two reductions; nothing runs in
float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.softmax import QSoftmax

if TYPE_CHECKING:
    from .relax_builder import Lowering


def _i64(value: int) -> relax.Expr:
    return relax.const(np.asarray(value, dtype=np.int64), "int64")


def softmax(lw: Lowering, node, module: QSoftmax, q) -> relax.Expr:
    bb = lw.bb
    # a parameter of the program (the weights file: what totals["weight_bytes"] measures),
    # int32 as the stored-bytes prediction counts it (quant.softmax.TABLE_BYTES)
    table = lw.param(f"{node.name}.table", module.table.numpy().astype(np.int32))
    qi = bb.emit(R.astype(q, "int32"))
    d = bb.emit(R.subtract(R.max(qi, axis=-1, keepdims=True), qi))
    e = bb.emit(R.astype(R.take(table, d, axis=0), "int64"))
    s = bb.emit(R.sum(e, axis=-1, keepdims=True))
    r = bb.emit(R.floor_divide(R.add(_i64(module.g), R.floor_divide(s, _i64(2))), s))
    y = bb.emit(R.right_shift(R.add(R.multiply(e, r), _i64(1 << (module.t - 1))),
                              _i64(module.t)))
    return bb.emit(R.astype(R.clip(y, module.lo, module.hi), module.out.dtype))


EMITTERS = {QSoftmax: softmax}
