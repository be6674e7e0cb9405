"""Relax emitter of the fixed-point layer norm (:class:`pqcompile.quant.layernorm.QLayerNorm`).

The reference's int64 arithmetic, op for op: the row sums of the codes and their squares, the
exponent ``e`` as a count of the powers of 4 at most ``W``, the integer square root by the same
Newton steps, the reciprocal, then per element the normalized value and the per-channel affine
map (int32 multiplier and shift, int64 offset: parameters of the program, in the weights file).
Nothing runs in float.

Not used yet: the builder keeps layer norms as float islands. Built as written here (one Relax
op per step), TVM took over ten minutes to compile a two-norm test model: the fused elementwise
kernels inline the per-row Newton chain, whose steps each read the previous one twice. The
per-row part (``W`` to ``e`` and ``R``) needs its own TIR function (a loop over rows with
scalar locals) before the builder can emit :class:`QLayerNorm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.layernorm import NEWTON_STEPS, POWERS_OF_4, Z_BITS, QLayerNorm

if TYPE_CHECKING:
    from .relax_builder import Lowering


def _i64(value) -> relax.Expr:
    return relax.const(np.asarray(value, dtype=np.int64), "int64")


def layer_norm(lw: Lowering, node, module: QLayerNorm, q) -> relax.Expr:
    bb, name = lw.bb, node.name
    n = int(lw.shape(node)[-1])
    x = bb.emit(R.astype(q, "int64"))
    s1 = bb.emit(R.sum(x, axis=-1, keepdims=True))
    s2 = bb.emit(R.sum(R.multiply(x, x), axis=-1, keepdims=True))
    w = bb.emit(R.maximum(R.add(R.subtract(R.multiply(_i64(n), s2), R.multiply(s1, s1)),
                                _i64(module.eps_codes)), _i64(1)))
    powers = _i64(np.array(POWERS_OF_4, np.int64))
    e = bb.emit(R.sum(R.astype(R.greater_equal(w, powers), "int64"), axis=-1, keepdims=True))
    wn = bb.emit(R.left_shift(w, R.multiply(_i64(2), R.subtract(_i64(31), e))))
    r = bb.emit(R.full_like(wn, _i64(1 << 31)))
    for _ in range(NEWTON_STEPS):
        r = bb.emit(R.right_shift(R.add(r, R.floor_divide(wn, r)), _i64(1)))
    r = bb.emit(R.subtract(r, R.astype(R.greater(R.multiply(r, r), wn), "int64")))
    recip = bb.emit(R.floor_divide(_i64(1 << 62), r))
    d = bb.emit(R.subtract(R.multiply(_i64(n), x), s1))
    k = bb.emit(R.subtract(e, _i64(Z_BITS - 31)))
    z = bb.emit(R.right_shift(R.add(R.multiply(d, recip),
                                    R.left_shift(_i64(1), R.subtract(k, _i64(1)))), k))
    m = lw.param(f"{name}.mult", module.mult.numpy().astype(np.int32))
    sh = lw.param(f"{name}.shift", module.shift.numpy().astype(np.int32))
    off = lw.param(f"{name}.offset", module.offset.numpy().astype(np.int64))
    y = bb.emit(R.right_shift(R.add(R.multiply(z, R.astype(m, "int64")), off),
                              R.astype(sh, "int64")))
    return bb.emit(R.astype(R.clip(y, module.lo, module.hi), module.out.dtype))


EMITTERS = {QLayerNorm: layer_norm}
