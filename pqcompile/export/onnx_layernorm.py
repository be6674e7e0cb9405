"""ONNX emitter of the fixed-point layer norm (:class:`pqcompile.quant.layernorm.QLayerNorm`):
the reference's integer arithmetic in int64/uint64 ONNX ops, so ONNX Runtime computes its codes
exactly.

``ReduceSum`` of the codes and their squares, ``GreaterOrEqual`` against the powers of 4 summed
for the exponent, ``BitShift`` (unsigned: every shifted value here is non-negative, or is made
so by adding ``2^62`` as in :mod:`pqcompile.export.onnx_affine`) for the normalization and the
rounding shifts, integer ``Div`` for the Newton steps and the reciprocal (non-negative operands:
ONNX's truncation is the reference's floor). ``tests/test_integer_layernorm.py`` checks ONNX
Runtime's codes against the reference's on a model with two norms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from ..quant.layernorm import NEWTON_STEPS, POWERS_OF_4, RECIPROCAL, Z_SHIFT, QLayerNorm

if TYPE_CHECKING:
    from .onnx_export import _Export

_BIAS = 62  # |value| < 2^62 before a signed right shift: value + 2^62 is non-negative
_DTYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}


def _shift_right(ex: _Export, x: str, sh: str, base: str, tag: str) -> str:
    """``x >> sh`` (int64, arithmetic) for ``|x| < 2^62`` and int64 ``sh`` in ``[0, 62]``."""
    u = ex.node("Cast", [ex.node("Add", [x, ex.int64s("int64_2_62", 1 << _BIAS)],
                                 f"{base}_{tag}_biased", f"{base}/Add_{tag}_bias")],
                f"{base}_{tag}_u64", f"{base}/Cast_{tag}_u64", to=TensorProto.UINT64)
    su = ex.node("Cast", [sh], f"{base}_{tag}_shift", f"{base}/Cast_{tag}_shift",
                 to=TensorProto.UINT64)
    y = ex.node("Cast", [ex.node("BitShift", [u, su], f"{base}_{tag}_shifted",
                                 f"{base}/BitShift_{tag}", direction="RIGHT")],
                f"{base}_{tag}_i64", f"{base}/Cast_{tag}_i64", to=TensorProto.INT64)
    unbias = ex.node("Cast", [ex.node("BitShift", [ex.const("uint64_2_62", np.array(
        1 << _BIAS, np.uint64)), su], f"{base}_{tag}_unbias_u", f"{base}/BitShift_{tag}_unbias",
        direction="RIGHT")], f"{base}_{tag}_unbias", f"{base}/Cast_{tag}_unbias",
        to=TensorProto.INT64)
    return ex.node("Sub", [y, unbias], f"{base}_{tag}", f"{base}/Sub_{tag}")


def layer_norm(ex: _Export, node, module: QLayerNorm, x: str) -> str:
    base = node.name
    n = ex.shape(node)[-1]
    i64 = ex.int64s
    axes = i64("axes_last", [-1])

    def op(kind: str, ins: list[str], tag: str, **attrs) -> str:
        return ex.node(kind, ins, f"{base}_{tag}", f"{base}/{kind}_{tag}", **attrs)

    q = op("Cast", [x], "int64", to=TensorProto.INT64)
    s1 = op("ReduceSum", [q, axes], "sum", keepdims=1)
    s2 = op("ReduceSum", [op("Mul", [q, q], "squares"), axes], "sum_squares", keepdims=1)
    w = op("Sub", [op("Mul", [s2, i64(f"int64_{n}", n)], "n_sum_squares"),
                   op("Mul", [s1, s1], "sum_squared")], "variance")
    w = op("Max", [op("Add", [w, i64(f"{base}.eps", module.eps_codes)], "w_eps"),
                   i64("int64_1", 1)], "w")
    ge = op("GreaterOrEqual", [w, i64("powers_of_4", list(POWERS_OF_4))], "ge")
    e = op("ReduceSum", [op("Cast", [ge], "ge_int64", to=TensorProto.INT64), axes], "e",
           keepdims=1)
    up = op("Cast", [op("Mul", [op("Sub", [i64("int64_31", 31), e], "31_e"),
                                i64("int64_2", 2)], "normalize_by")],
            "normalize_by_u64", to=TensorProto.UINT64)
    wn = op("Cast", [op("BitShift", [op("Cast", [w], "w_u64", to=TensorProto.UINT64), up],
                        "wn_u64", direction="LEFT")], "wn", to=TensorProto.INT64)
    r = i64("int64_2_31", 1 << 31)
    for step in range(NEWTON_STEPS):
        r = op("Div", [op("Add", [r, op("Div", [wn, r], f"quotient{step}")], f"newton{step}"),
                       i64("int64_2", 2)], f"root{step}")
    over = op("Cast", [op("Greater", [op("Mul", [r, r], "root_squared"), wn], "over")],
              "over_int64", to=TensorProto.INT64)
    r = op("Sub", [r, over], "root")
    recip = op("Div", [i64("int64_2_61_1", RECIPROCAL), r], "reciprocal")
    d = op("Sub", [op("Mul", [q, i64(f"int64_{n}", n)], "n_q"), s1], "centered")
    k = op("Add", [e, i64(f"int64_{Z_SHIFT}", Z_SHIFT)], "k")
    half = op("Cast", [op("BitShift", [ex.const("uint64_1", np.array(1, np.uint64)),
                                       op("Cast", [op("Sub", [k, i64("int64_1", 1)], "k_1")],
                                          "k_1_u64", to=TensorProto.UINT64)],
                          "half_u64", direction="LEFT")], "half", to=TensorProto.INT64)
    z = _shift_right(ex, op("Add", [op("Mul", [d, recip], "scaled"), half], "z_rounding"), k,
                     base, "z")
    acc = op("Add", [op("Mul", [z, ex.const(f"{base}.mult", module.mult.numpy())], "product"),
                     ex.const(f"{base}.offset", module.offset.numpy())], "acc")
    y = _shift_right(ex, acc, ex.const(f"{base}.shift", module.shift.numpy()), base, "y")
    bounds = [ex.const(f"clip_int64_{v}", np.array(v, np.int64)) for v in (module.lo, module.hi)]
    y = op("Clip", [y] + bounds, "clipped")
    out = ex.node("Cast", [y], base, f"{base}/CastOut", to=_DTYPES[module.out.dtype])
    ex.qp[out] = module.out
    return out


EMITTERS = {QLayerNorm: layer_norm}
