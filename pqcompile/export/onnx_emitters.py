"""The ONNX emitters of :func:`pqcompile.export.onnx_export.export_onnx`: one per module of the
integer reference (as :mod:`pqcompile.lower.ops` lowers them to Relax), and the data
movement ops between them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from ..lower.movement import item_box, view_op
from .onnx_affine import affine
from .onnx_islands import splice_island
from .onnx_layernorm import EMITTERS as LAYER_NORM_EMITTERS
from .onnx_softmax import EMITTERS as SOFTMAX_EMITTERS
from ..quant.lut import QLut, QMul
from ..quant.matmul import QMatMul
from ..quant.affine import QAffine
from ..quant.qmodules import (
    Dequantize,
    FloatOp,
    QAdd,
    QCat,
    QClip,
    QConv2d,
    QEmbedding,
    QGather,
    QLinear,
    QMaxPool,
    QPad,
    QSumPool,
    Quantize,
)

if TYPE_CHECKING:
    from .onnx_export import _Export


# --- one emitter per module of the reference (as pqcompile.lower.ops) ------------------------


def quantize_input(ex: _Export, node, module: Quantize, x: str) -> str:
    x64 = ex.node("Cast", [x], f"{node.name}_float64", f"{node.name}/Cast", to=TensorProto.DOUBLE)
    return ex.quantize_exact(x64, module.out, module.lo, module.hi, node.name)


def dequantize_output(ex: _Export, node, module: Dequantize, q: str) -> str:
    return ex.dequantize(q)


def conv2d(ex: _Export, node, module: QConv2d, x: str) -> str:
    xf = ex.dequantize(x)
    w, b = ex.weight(node.name, module)
    ph, pw = module.padding
    y = ex.node("Conv", [xf, w, b], f"{node.name}_conv", f"{node.name}/Conv",
                kernel_shape=list(module.weight.shape[2:]), strides=list(module.stride),
                pads=[ph, pw, ph, pw], dilations=list(module.dilation), group=module.groups)
    return ex.requantize(y, node, module)


def linear(ex: _Export, node, module: QLinear, x: str) -> str:
    """``Gemm`` with the (out, in) weight (``transB``); other ranks flattened to 2-D around it,
    on the integers."""
    in_shape, out_shape = ex.shape(node.args[0]), ex.shape(node)
    if len(in_shape) != 2:
        x = ex.reshape(x, (-1, in_shape[-1]), f"{node.name}_input_2d")
    xf = ex.dequantize(x)
    w, b = ex.weight(node.name, module)
    y = ex.node("Gemm", [xf, w, b], f"{node.name}_gemm", f"{node.name}/Gemm",
                transB=1)
    name = node.name if len(out_shape) == 2 else f"{node.name}_2d"
    q = ex.quantize(ex.activation(y, node, module), module.out, module.lo, module.hi, name)
    return q if len(out_shape) == 2 else ex.reshape(q, out_shape, node.name)


def add(ex: _Export, node, module: QAdd, a: str, b: str) -> str:
    y = ex.node("Add", [ex.dequantize(a), ex.dequantize(b)], f"{node.name}_add",
                f"{node.name}/Add")
    return ex.requantize(y, node, module)


def cat(ex: _Export, node, module: QCat, *xs: str) -> str:
    if all(fp is None for fp in module.fps):  # every input already at the output's scale
        out = ex.node("Concat", list(xs), node.name, f"{node.name}/Concat", axis=module.dim)
        return ex.passthrough(out, xs[0])
    y = ex.node("Concat", [ex.dequantize(x) for x in xs], f"{node.name}_concat",
                f"{node.name}/Concat", axis=module.dim)
    return ex.requantize(y, node, module)


def sum_pool(ex: _Export, node, module: QSumPool, x: str) -> str:
    xf = ex.dequantize(x)
    rank = len(ex.shape(node.args[0]))
    if module.window is not None:
        (kh, kw), stride, (ph, pw) = module.window
        y = ex.node("AveragePool", [xf], f"{node.name}_pool", f"{node.name}/AveragePool",
                    kernel_shape=[kh, kw], strides=list(stride), pads=[ph, pw, ph, pw],
                    count_include_pad=1)
    elif tuple(module.dims) == (2, 3) and module.keepdim and rank == 4:
        y = ex.node("GlobalAveragePool", [xf], f"{node.name}_pool",
                    f"{node.name}/GlobalAveragePool")
    else:
        y = ex.reduce_mean(xf, module.dims, module.keepdim, f"{node.name}_mean")
    return ex.requantize(y, node, module)


def embedding(ex: _Export, node, module: QEmbedding, ids: str) -> str:
    table = ex.const(f"{node.name}.weight", module.table.numpy())
    out = ex.node("Gather", [table, ids], node.name, f"{node.name}/Gather", axis=0)
    ex.qp[out] = module.out
    return out


def max_pool(ex: _Export, node, module: QMaxPool, x: str) -> str:
    (ph, pw) = module.padding
    out = ex.node("MaxPool", [x], node.name, f"{node.name}/MaxPool",
                  kernel_shape=list(module.kernel), strides=list(module.stride),
                  pads=[ph, pw, ph, pw], dilations=list(module.dilation),
                  ceil_mode=int(module.ceil_mode))
    return ex.passthrough(out, x)


def clip(ex: _Export, node, module: QClip, x: str) -> str:
    out = ex.clip_int(x, module.lo, module.hi, module.out.dtype, node.name)
    return ex.passthrough(out, x)


def pad(ex: _Export, node, module: QPad, x: str) -> str:
    """A constant ``Pad`` on the integers, with the constant's code (negative widths crop)."""
    rank = len(ex.shape(node.args[0]))
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(module.pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = module.pad[2 * i], module.pad[2 * i + 1]
    dtype = ex.qp[x].dtype if x in ex.qp else "int8"
    out = ex.node("Pad", [x, ex.int64s(f"{node.name}_pads", begins + ends),
                          ex.const(f"{node.name}_value", np.array(module.code, dtype))],
                  node.name, f"{node.name}/Pad", mode="constant")
    return ex.passthrough(out, x)


def gather(ex: _Export, node, module: QGather, x: str) -> str:
    """Reflect/replicate/circular pads and nearest resampling: one ``Gather`` per axis."""
    for i, (axis, idx) in enumerate(module.indices()):
        out = ex.node("Gather", [x, ex.int64s(f"{node.name}_index{i}", idx.numpy())],
                      node.name if i == len(module.axes) - 1 else f"{node.name}_{i}",
                      f"{node.name}/Gather", axis=axis)
        x = ex.passthrough(out, x)
    return x


def float_op(ex: _Export, node, module: FloatOp, *qs: str) -> str:
    shapes = [ex.shape(a) for a in node.args]
    xs = [ex.dequantize_exact(q, p.scale) for q, p in zip(qs, module.ins)]
    y = splice_island(ex, node, module, xs, shapes)
    return ex.quantize_exact(y, module.out, module.lo, module.hi, node.name)


def lut(ex: _Export, node, module: QLut, x: str) -> str:
    """A pointwise op as its table: ``Gather(table, int64(q) - offset)`` on the codes."""
    idx = ex.node("Cast", [x], f"{node.name}_index", f"{node.name}/Cast", to=TensorProto.INT64)
    if module.offset:
        idx = ex.node("Sub", [idx, ex.int64s(f"offset_{module.offset}", module.offset)],
                      f"{node.name}_index_offset", f"{node.name}/Sub")
    table = ex.const(f"{node.name}.table", module.table.numpy())
    out = ex.node("Gather", [table, idx], node.name, f"{node.name}/Gather", axis=0)
    ex.qp[out] = module.out
    return out


def mul(ex: _Export, node, module: QMul, a: str, b: str) -> str:
    y = ex.node("Mul", [ex.dequantize(a), ex.dequantize(b)], f"{node.name}_mul",
                f"{node.name}/Mul")
    return ex.requantize(y, node, module)


def matmul(ex: _Export, node, module: QMatMul, a: str, b: str) -> str:
    """A product of two activations in QDQ form (ONNX Runtime fuses it into
    ``QLinearMatMul``): dequantize both, ``MatMul``, quantize at the output scale."""
    y = ex.node("MatMul", [ex.dequantize(a), ex.dequantize(b)], f"{node.name}_matmul",
                f"{node.name}/MatMul")
    return ex.requantize(y, node, module)


EMITTERS = {Quantize: quantize_input, Dequantize: dequantize_output, QConv2d: conv2d,
            QLinear: linear, QAdd: add, QCat: cat, QSumPool: sum_pool, QMaxPool: max_pool,
            QClip: clip, FloatOp: float_op, QEmbedding: embedding, QPad: pad, QGather: gather,
            QLut: lut, QMul: mul, QAffine: affine, QMatMul: matmul}
EMITTERS.update(SOFTMAX_EMITTERS)  # fixed-point softmax in int64 ops (onnx_softmax)
EMITTERS.update(LAYER_NORM_EMITTERS)  # fixed-point layer norm in int64 ops (onnx_layernorm)


def getitem(ex: _Export, node, x: str) -> str:
    """One item of a split, or basic indexing: a ``Slice``, then a ``Reshape`` to the recorded
    shape (ints drop axes, ``None`` adds them)."""
    in_shape, box = item_box(node, ex.shape)
    axes = [i for i, (b, s) in enumerate(zip(box, in_shape)) if b != (0, s, 1)]
    if axes:
        base = f"{node.name}_slice"
        x = ex.passthrough(ex.node("Slice", [
            x, ex.int64s(f"{base}_starts", [box[i][0] for i in axes]),
            ex.int64s(f"{base}_ends", [box[i][1] for i in axes]),
            ex.int64s(f"{base}_axes", axes),
            ex.int64s(f"{base}_steps", [box[i][2] for i in axes])], base, f"{base}/Slice"), x)
    return ex.reshape(x, ex.shape(node), node.name)


def movement(ex: _Export, node, x: str) -> str:
    """Flatten/reshape/view/squeeze/unsqueeze (to the recorded shape), permute, transpose,
    channel shuffle, indexing: on the integers (:func:`pqcompile.lower.ops.view_op`)."""
    kind, arg = view_op(ex.ref, node, len(ex.shape(node)))
    if kind == "index":
        return getitem(ex, node, x)
    if kind == "identity":
        return x
    if kind == "permute":
        return ex.passthrough(ex.node("Transpose", [x], node.name, f"{node.name}/Transpose",
                                      perm=arg), x)
    if kind == "shuffle":
        n, c, *rest = ex.shape(node)
        y = ex.reshape(x, (n, arg, c // arg, *rest), f"{node.name}_groups")
        y = ex.passthrough(ex.node("Transpose", [y], f"{node.name}_shuffled",
                                   f"{node.name}/Transpose",
                                   perm=[0, 2, 1, *range(3, 3 + len(rest))]), y)
        return ex.reshape(y, (n, c, *rest), node.name)
    return ex.reshape(x, ex.shape(node), node.name)
