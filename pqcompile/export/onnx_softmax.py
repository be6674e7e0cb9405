"""ONNX emitter of the fixed-point softmax (:class:`pqcompile.quant.softmax.QSoftmax`): the
reference's integer arithmetic in int64 ONNX ops (``ReduceMax``, ``Gather`` of the exponential
table, ``ReduceSum``, integer ``Div`` for the row reciprocal and the rounding shift: every
operand is non-negative, so ONNX's truncating division is the reference's floor), so ONNX
Runtime computes the reference's codes exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import TensorProto

from ..errors import UnsupportedOpError
from ..quant.softmax import QSoftmax

if TYPE_CHECKING:
    from .onnx_export import _Export


def softmax(ex: _Export, node, module: QSoftmax, x: str, bias: str | None = None) -> str:
    if bias is not None:
        raise UnsupportedOpError(
            f"node {node.name!r} (fixed-point softmax of scores plus an attention mask's bias) "
            f"has no ONNX export: export the model without the mask (every position attended), "
            f"or deploy the TVM artifact, which runs it")
    base = node.name
    q = ex.node("Cast", [x], f"{base}_int64", f"{base}/Cast", to=TensorProto.INT64)
    if ex.opset >= 18:
        mx = ex.node("ReduceMax", [q, ex.int64s("axes_last", [-1])], f"{base}_max",
                     f"{base}/ReduceMax", keepdims=1)
    else:
        mx = ex.node("ReduceMax", [q], f"{base}_max", f"{base}/ReduceMax", axes=[-1],
                     keepdims=1)
    d = ex.node("Sub", [mx, q], f"{base}_distance", f"{base}/Sub")
    e = ex.node("Gather", [ex.const(f"{base}.table", module.table.numpy()), d],
                f"{base}_exp", f"{base}/Gather", axis=0)
    s = ex.node("ReduceSum", [e, ex.int64s("axes_last", [-1])], f"{base}_sum",
                f"{base}/ReduceSum", keepdims=1)
    half = ex.node("Div", [s, ex.int64s("int64_2", 2)], f"{base}_half_sum", f"{base}/Div_half")
    r = ex.node("Div", [ex.node("Add", [half, ex.int64s(f"{base}.g", module.g)],
                                f"{base}_g", f"{base}/Add_g"), s],
                f"{base}_reciprocal", f"{base}/Div_sum")
    y = ex.node("Add", [ex.node("Mul", [e, r], f"{base}_scaled", f"{base}/Mul"),
                        ex.int64s(f"{base}.round", 1 << (module.t - 1))],
                f"{base}_rounded", f"{base}/Add_round")
    y = ex.node("Div", [y, ex.int64s(f"{base}.two_t", 1 << module.t)], f"{base}_shifted",
                f"{base}/Div_shift")
    y = ex.node("Clip", [y, ex.int64s(f"{base}.lo", module.lo), ex.int64s(f"{base}.hi",
                                                                         module.hi)],
                f"{base}_clipped", f"{base}/Clip")
    out = ex.node("Cast", [y], base, f"{base}/Cast_out",
                  to=TensorProto.UINT8 if module.out.dtype == "uint8" else TensorProto.INT8)
    ex.qp[out] = module.out
    return out


EMITTERS = {QSoftmax: softmax}
