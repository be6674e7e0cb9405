"""Relax emitter of the integer activation x activation products (:mod:`pqcompile.quant.matmul`).

``a @ b`` of two int8/uint8 tensors is one ``matmul`` with an int32 accumulator (TVM widens
the operands inside the reduction, so no int32 copies of them are made), then the fixed-point
requantization every integer op shares (:func:`pqcompile.lower.ops.requant`). Batch dims
broadcast as in torch. On targets with AVX-512 VNNI, products whose operands have the same
batch dims run on the hand-scheduled kernel of :mod:`pqcompile.lower.matmul_kernel` instead
(the same integers, 10x faster than TVM's ``matmul`` on attention's shapes); so do they on
aarch64, with and without ``sdot``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tvm import relax
from tvm.relax import op as R

from ..quant.matmul import QMatMul
from . import matmul_kernel as mk

if TYPE_CHECKING:
    from .relax_builder import Lowering


def matmul(lw: Lowering, node, module: QMatMul, a, b) -> relax.Expr:
    from .ops import requant

    if lw.isa is not None and lw.isa.name in mk.ISAS:
        y = _kernel_matmul(lw, node, module, a, b)
        if y is not None:
            return y
    bb = lw.bb
    acc = bb.emit(R.matmul(a, b, out_dtype="int32"))
    return requant(bb, acc, module.mult, module.shift, module.lo, module.hi, module.out.dtype)


def _kernel_matmul(lw: Lowering, node, module: QMatMul, a, b) -> relax.Expr | None:
    """The product on :func:`pqcompile.lower.matmul_kernel.product_kernel`, or ``None`` where
    it does not cover it (operands of different batch dims or rank, ragged columns)."""
    sa, sb = (lw.shape(x) for x in node.args[:2])
    if len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
        return None
    batch = math.prod(sa[:-2])
    shape = mk.ProductShape(batch, sa[-2], sa[-1], sb[-1], str(a.ty.dtype), str(b.ty.dtype),
                            module.out.dtype, module.lo, module.hi, module.mult, module.shift)
    isa = lw.isa.name
    if not mk.supported(shape, isa):
        return None
    bb, name = lw.bb, node.name
    pack_a, pack_b, kernel = mk.product_kernel(shape, isa)
    m, k, n = shape.rows, shape.depth, shape.cols
    lanes = mk.ISAS[isa][0]
    kp, nv = -(-k // mk.DEPTH) * mk.DEPTH, n // lanes

    def call(func, suffix, args, out):
        gv = bb.add_func(func.without_attr("global_symbol"), f"{name}_{suffix}")
        return bb.emit(relax.call_tir(gv, args, out))

    a3 = bb.emit(R.reshape(a, (batch, m, k)))
    b3 = bb.emit(R.reshape(b, (batch, k, n)))
    pa = call(pack_a, "pack_a", [a3], [relax.TensorType((batch * m * kp,),
                                                        "uint8" if isa == "vnni" else "int8"),
                                       relax.TensorType((batch * m,), "int32")])
    pb = call(pack_b, "pack_b", [b3], [
        relax.TensorType((batch * nv, kp // mk.DEPTH, lanes, mk.DEPTH), "int8"),
        relax.TensorType((batch * n,), "int32")])
    parts = [bb.emit(relax.TupleGetItem(t, i)) for t in (pa, pb) for i in (0, 1)]
    mr, nr = mk.tile(shape, isa)
    lw.kernels[name] = f"product {isa} {mr}x{nr * lanes}"
    y = call(kernel, "mm", parts, relax.TensorType((batch * m * n,), shape.out_dtype))
    return bb.emit(R.reshape(y, (*sa[:-1], n)))


EMITTERS = {QMatMul: matmul}
