"""The ONNX export of :class:`pqcompile.quant.affine.QAffine`, on integers as the reference.

ONNX has no arithmetic right shift on signed integers (``BitShift`` takes unsigned types only),
so the export shifts a non-negative copy: with ``acc = q * m + off`` (int64,
``|acc| < 2^62``), ``acc >> sh == ((uint64)(acc + 2^62) >> sh) - 2^(62 - sh)`` exactly, as
``2^62`` is a multiple of ``2^sh``. Then an integer ``Clip`` to ``[lo, hi]`` and a ``Cast`` to
the output's dtype: ``Cast, Mul, Add, Cast, BitShift, Cast, Sub, Clip, Cast``, all integer ops,
so ONNX Runtime computes the reference's integers bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from ..quant.affine import QAffine

if TYPE_CHECKING:
    from .onnx_export import _Export

_BIAS = 62  # acc + 2^62 >= 0 for |acc| < 2^62 (the bound quant.affine keeps)
_DTYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}


def affine(ex: _Export, node, module: QAffine, q: str) -> str:
    base = node.name
    view = module.view(len(ex.shape(node)))
    shift = module.shift.numpy()
    acc = ex.node("Cast", [q], f"{base}_int64", f"{base}/Cast", to=TensorProto.INT64)
    acc = ex.node("Mul", [acc, ex.const(f"{base}.mult", module.mult.numpy().reshape(view))],
                  f"{base}_product", f"{base}/Mul")
    offset = module.offset.numpy() + (np.int64(1) << np.int64(_BIAS))
    acc = ex.node("Add", [acc, ex.const(f"{base}.offset_biased", offset.reshape(view))],
                  f"{base}_biased", f"{base}/Add")
    acc = ex.node("Cast", [acc], f"{base}_uint64", f"{base}/CastUnsigned",
                  to=TensorProto.UINT64)
    acc = ex.node("BitShift", [acc, ex.const(f"{base}.shift",
                                             shift.astype(np.uint64).reshape(view))],
                  f"{base}_shifted", f"{base}/BitShift", direction="RIGHT")
    acc = ex.node("Cast", [acc], f"{base}_shifted_int64", f"{base}/CastSigned",
                  to=TensorProto.INT64)
    unbias = (np.int64(1) << (np.int64(_BIAS) - shift)).astype(np.int64)
    acc = ex.node("Sub", [acc, ex.const(f"{base}.unbias", unbias.reshape(view))],
                  f"{base}_rounded", f"{base}/Sub")
    bounds = [ex.const(f"clip_int64_{v}", np.array(v, np.int64)) for v in (module.lo, module.hi)]
    acc = ex.node("Clip", [acc] + bounds, f"{base}_clipped", f"{base}/Clip")
    out = ex.node("Cast", [acc], base, f"{base}/CastOut", to=_DTYPES[module.out.dtype])
    ex.qp[out] = module.out
    return out
