"""The lookup in a packed embedding table (:class:`~pqcompile.quant.tables.QPackedEmbedding`).

The program stores the table's packed uint8 rows and its int32 per-row multipliers as weights,
gathers both by id, unpacks the ``8 / bits`` codes of each byte with shifts and a mask (sign
extended), and requantizes ``codes * m_r`` with the table's shift: the reference's integers.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.tables import QPackedEmbedding


def packed_embedding(lw, node, module: QPackedEmbedding, ids) -> relax.Expr:
    """Relax for ``module(ids)``: gather, unpack, requantize (module docstring)."""
    from .ops import i64, requant

    bb, bits = lw.bb, module.bits
    per, rows = 8 // bits, int(module.packed.shape[0])
    lw.storage[node.name] = f"int{bits} lookup table ({per} a byte) + int32 multiplier per row"
    dtype = str(ids.ty.dtype)
    ok = R.logical_and(R.greater_equal(R.min(ids), relax.const(0, dtype)),
                       R.less(R.max(ids), relax.const(rows, dtype)))
    lw.checks.append((bb.emit(ok), f"node {node.name!r} (embedding): ids must be in "
                      f"[0, {rows}), the table's rows; an input holds an id outside"))
    packed = lw.param(f"{node.name}.weight", module.packed.numpy())
    mults = lw.param(f"{node.name}.row_mult", module.mults.numpy().astype(np.int32))
    row = bb.emit(R.astype(R.take(packed, ids, axis=0, mode="clip"), "int32"))
    shifts = relax.const(np.arange(per, dtype=np.int32) * bits, "int32")
    u = bb.emit(R.bitwise_and(R.right_shift(R.expand_dims(row, -1), shifts),
                              relax.const((1 << bits) - 1, "int32")))
    sign = R.left_shift(R.right_shift(u, relax.const(bits - 1, "int32")),
                        relax.const(bits, "int32"))
    codes = bb.emit(R.subtract(u, sign))
    shape = list(lw.shape(node))  # the ids' shape + (dim,)
    codes = bb.emit(R.reshape(codes, shape))
    m = bb.emit(R.expand_dims(R.astype(R.take(mults, ids, axis=0, mode="clip"), "int64"), -1))
    return requant(bb, codes, m, i64(module.shift), module.lo, module.hi, module.out.dtype)
