"""Relax emitters of the integer elementwise ops (:mod:`pqcompile.quant.lut`).

A table lookup is ``take(table, astype(q, int32) - offset)``: one injective op that TVM fuses
with the cast into a single elementwise kernel. A product is an int64 multiply and one fixed-point
requantization, broadcasting as torch does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.lut import QLut, QMul

if TYPE_CHECKING:
    from .relax_builder import Lowering


def table_param(lw: Lowering, node, module: QLut) -> relax.Var:
    """The table as a parameter of the program (256 codes of the output dtype)."""
    return lw.param(f"{node.name}.table", module.table.numpy())


def lut(lw: Lowering, node, module: QLut, x) -> relax.Expr:
    bb = lw.bb
    table = table_param(lw, node, module)
    index = R.astype(x, "int32")
    if module.offset:
        index = R.subtract(index, relax.const(np.int32(module.offset), "int32"))
    return bb.emit(R.take(table, bb.emit(index), axis=0, mode="clip"))


def mul(lw: Lowering, node, module: QMul, a, b) -> relax.Expr:
    from .ops import requant

    bb = lw.bb
    acc = bb.emit(R.multiply(R.astype(a, "int64"), R.astype(b, "int64")))
    return requant(bb, acc, module.mult, module.shift, module.lo, module.hi, module.out.dtype)


EMITTERS = {QLut: lut, QMul: mul}
