"""Relax emitter of the integer activation x activation products (:mod:`pqcompile.quant.matmul`).

``a @ b`` of two int8/uint8 tensors is one ``matmul`` with an int32 accumulator (TVM widens
the operands inside the reduction, so no int32 copies of them are made), then the fixed-point
requantization every integer op shares (:func:`pqcompile.lower.ops.requant`). Batch dims
broadcast as in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvm import relax
from tvm.relax import op as R

from ..quant.matmul import QMatMul

if TYPE_CHECKING:
    from .relax_builder import Lowering


def matmul(lw: Lowering, node, module: QMatMul, a, b) -> relax.Expr:
    from .ops import requant

    bb = lw.bb
    acc = bb.emit(R.matmul(a, b, out_dtype="int32"))
    return requant(bb, acc, module.mult, module.shift, module.lo, module.hi, module.out.dtype)


EMITTERS = {QMatMul: matmul}
