"""Relax emitters of the integer elementwise ops (:mod:`pqcompile.quant.lut`).

A table lookup is the kernel of :mod:`~pqcompile.lower.kernels_lut` where the program is lowered
for a target (the table stored rotated, indexed by the code's raw byte), else
``take(table, astype(q, int32) - offset)``. A product is an int64 multiply and one fixed-point
requantization, broadcasting as torch does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.lut import QLut, QMul
from .kernels_lut import lut_kernel, rotated_table

if TYPE_CHECKING:
    from .relax_builder import Lowering


def table_param(lw: Lowering, node, module: QLut) -> relax.Var:
    """The table as a parameter of the program (256 codes of the output dtype)."""
    return lw.param(f"{node.name}.table", module.table.numpy())


def lut(lw: Lowering, node, module: QLut, x) -> relax.Expr:
    bb = lw.bb
    if lw.lut is not None and str(x.ty.dtype) in ("int8", "uint8") \
            and module.offset in (0, -128):
        shape = lw.shape(node)
        table = lw.param(f"{node.name}.table",
                         rotated_table(module.table.numpy(), module.offset))
        lw.lut_used = lw.lut
        lw.kernels[node.name] = f"lut {lw.lut}"
        return lw.call_kernel(lut_kernel(shape, str(x.ty.dtype), module.out.dtype, lw.lut),
                              f"{node.name}_lut", [x, table], shape, module.out.dtype)
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
