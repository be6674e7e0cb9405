"""Relax emitters, one per op of the integer reference (the scheme of :mod:`pqcompile.quant`).

Each emitter takes the lowering state, the reference node, its module (or ``None``) and the
Relax values of its inputs, and returns the Relax value of its output. Integer tensors of up to
8 bits are int8/uint8; accumulators int32; requantization int64.

>>> import numpy as np
>>> from tvm import relax
>>> bb = relax.BlockBuilder()
>>> x = relax.Var("x", relax.TensorType((4,), "int32"))
>>> with bb.function("main", [x]):
...     with bb.dataflow():
...         y = bb.emit_output(requant(bb, x, 1 << 30, 31, -127, 127, "int8"))
...     gv = bb.emit_func_output(y)
>>> str(bb.get()["main"].ret_ty.dtype)
'int8'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from tvm import relax
from tvm.relax import op as R
from tvm.relax.frontend.torch import from_fx

from ..meta import SHAPE, QParams
from ..quant.affine import QAffine
from ..quant.exact import MaskOp
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
from ..quant.tables import QPackedEmbedding
from . import kernels, kernels_lanes, kernels_linear, kernels_mean, kernels_planar, kernels_quantize
from .add32 import add
from .affine import affine
from .float_islands import island_key, translate_island
from .kernels_layernorm import EMITTERS as LAYER_NORM_EMITTERS
from .lut import EMITTERS as LUT_EMITTERS
from .matmul import EMITTERS as MATMUL_EMITTERS
from .packing import emit_unpack, group, is_packed, pack
from .softmax import EMITTERS as SOFTMAX_EMITTERS
from .table_lookup import packed_embedding
from .tir_macros import NARROW_MIN_SHIFT

if TYPE_CHECKING:
    from .relax_builder import Lowering


def i64(value) -> relax.Expr:
    return relax.const(np.asarray(value, dtype=np.int64), "int64")


def requant(bb, acc, m, sh, lo: int, hi: int, dtype: str) -> relax.Expr:
    """``clamp((acc * m + (1 << (sh - 1))) >> sh, lo, hi)`` in int64, cast to ``dtype``.

    ``m`` and ``sh`` are Python ints (one multiplier) or int64 Relax values that broadcast.
    """
    acc = bb.emit(R.astype(acc, "int64"))
    if isinstance(m, int):
        rnd = i64(1 << (sh - 1))
        m, sh = i64(m), i64(sh)
    else:
        rnd = bb.emit(R.left_shift(i64(1), R.subtract(sh, i64(1))))
    y = bb.emit(R.right_shift(R.add(R.multiply(acc, m), rnd), sh))
    return bb.emit(R.astype(R.clip(y, lo, hi), dtype))


def quantize(bb, x, qp: QParams, lo: int, hi: int) -> relax.Expr:
    """float -> integers: ``clamp(floor(float64(x) / s + 0.5), lo, hi)``."""
    y = R.divide(R.astype(x, "float64"), relax.const(qp.scale, "float64"))
    y = bb.emit(R.floor(R.add(y, relax.const(0.5, "float64"))))
    return bb.emit(R.astype(R.clip(y, lo, hi), qp.dtype))


def dequantize(bb, q, qp: QParams, dtype: str) -> relax.Expr:
    return bb.emit(R.multiply(R.astype(q, dtype), relax.const(qp.scale, dtype)))


def _per_channel(lw: Lowering, name: str, module, view) -> tuple[relax.Expr, relax.Expr]:
    m = lw.param(f"{name}.mult", module.mult.numpy().astype(np.int32))
    sh = lw.param(f"{name}.shift", module.shift.numpy().astype(np.int32))
    bb = lw.bb
    return (bb.emit(R.reshape(bb.emit(R.astype(m, "int64")), view)),
            bb.emit(R.reshape(bb.emit(R.astype(sh, "int64")), view)))


def _weight(lw: Lowering, name: str, q: np.ndarray, bits: int) -> relax.Expr:
    """The int8 weight, from a packed uint8 parameter for 2 to 7 bits (:mod:`.packing`)."""
    if is_packed(bits):
        var = lw.param(f"{name}.weight", pack(q, bits))
        per, nbytes = group(bits)
        lw.storage[name] = f"int{bits} packed {per} per " + \
            ("byte" if nbytes == 1 else f"{nbytes} bytes")
        return emit_unpack(lw.bb, var, bits, q.shape)
    lw.storage[name] = f"int{bits} in int8" if bits < 8 else "int8"
    return lw.param(f"{name}.weight", q.astype(np.int8))


def conv2d(lw: Lowering, node, module: QConv2d, x) -> relax.Expr:
    bb, name = lw.bb, node.name
    if lw.isa is not None:
        y = kernel_conv2d(lw, node, module, x)
        if y is not None:
            return y
    w = _weight(lw, name, module.weight.numpy(), module.wq.bits)
    acc = bb.emit(R.nn.conv2d(x, w, strides=module.stride, padding=module.padding,
                              dilation=module.dilation, groups=module.groups, out_dtype="int32"))
    b = lw.param(f"{name}.bias", module.bias.numpy().astype(np.int32))
    acc = bb.emit(R.add(acc, R.reshape(b, (1, -1, 1, 1))))
    m, sh = _per_channel(lw, name, module, (1, -1, 1, 1))
    return requant(bb, acc, m, sh, module.lo, module.hi, module.out.dtype)


def _narrow(module) -> bool:
    """Every output channel's shift allows the kernels' 32-bit epilogue."""
    return int(module.shift.min()) >= NARROW_MIN_SHIFT


def kernel_conv2d(lw: Lowering, node, module: QConv2d, x) -> relax.Expr | None:
    """The layer as a hand-scheduled kernel (:mod:`pqcompile.lower.kernels`), or ``None``
    where the kernels do not cover it (grouped, dilated, batch > 1, stride > 2)."""
    n, c, h, w = lw.shape(node.all_input_nodes[0])
    q = module.weight.numpy()
    depthwise = module.groups == c == q.shape[0] and c > 1
    if n != 1 or (module.groups != 1 and not depthwise) \
            or tuple(module.dilation) != (1, 1) or module.stride[0] != module.stride[1]:
        return None
    shape = kernels.ConvShape(c, h, w, q.shape[0], tuple(q.shape[2:]), int(module.stride[0]),
                              tuple(int(p) for p in module.padding), str(x.ty.dtype),
                              module.out.dtype, module.lo, module.hi, _narrow(module))
    if not kernels.supported(shape):
        return None
    if depthwise:
        return _kernel_dwconv2d(lw, node, module, x, shape)
    name, isa = node.name, kernels.choose_tile(shape, kernels.fit_isa(lw.isa, q))
    lanes = kernels_lanes.channel_lanes(shape, lw.isa)  # small maps: channels in the lanes
    if lanes:
        isa = kernels_lanes.lanes_tile(shape)
    wvar = _weight(lw, name, kernels_lanes.pack_lanes_weight(q) if lanes
                   else kernels.pack_weight(q, isa), module.wq.bits)
    bias, mult, shift = (kernels_lanes.lanes_params if lanes else kernels.channel_params)(
        q, module.bias.numpy(), module.mult.numpy(), module.shift.numpy(), shape, isa)
    pvars = [lw.param(f"{name}.{k}", v) for k, v in
             (("bias", bias), ("mult", mult), ("shift", shift))]
    lw.kernels[name] = f"conv2d {isa.name} {'lanes ' if lanes else ''}" \
        f"{isa.mr}x{isa.nr * isa.lanes}"
    return _call_kernel(lw, name, "conv", (kernels_lanes.conv2d_lanes_kernel if lanes
                                           else kernels.conv2d_kernel)(shape, isa),
                        isa.packed_dtype or shape.in_dtype, x, [wvar, *pvars],
                        (1, shape.out_channels, *shape.out_hw), shape.out_dtype)


def _call_kernel(lw: Lowering, name: str, suffix: str, made, scratch_dtype: str, x,
                 args: list, out_shape, out_dtype: str) -> relax.Expr:
    """Emit a kernel's calls: its pack of ``x`` into the scratch, then the kernel on the
    scratch and ``args``; ``made`` is the kernel builder's ``(pack, kernel, scratch)`` (a
    kernel without a pack, ``pack`` None, takes ``x`` itself)."""
    pack, kernel, scratch = made
    xc = x if pack is None else lw.call_kernel(pack, f"{name}_pack", [x], (scratch,),
                                               scratch_dtype)
    return lw.call_kernel(kernel, f"{name}_{suffix}", [xc, *args], out_shape, out_dtype)


def _kernel_dwconv2d(lw: Lowering, node, module: QConv2d, x, shape) -> relax.Expr:
    name = node.name
    q = module.weight.numpy()
    isa = kernels_planar.fit_dw_isa(lw.isa, q)
    wvar = _weight(lw, name, kernels_planar.pack_dw_weight(q, shape, isa), module.wq.bits)
    params = kernels_planar.pack_dw_params(q, module.bias.numpy(), module.mult.numpy(),
                                           module.shift.numpy(), shape, isa)
    pvars = [lw.param(f"{name}.{k}", v) for k, v in zip(("bias", "mult", "shift"), params)]
    lw.kernels[name] = (f"dwconv2d {kernels_planar.dw_schedule(shape, isa)} "
                        f"{kernels_planar.dw_isa(isa).lanes} lanes")
    return _call_kernel(lw, name, "dw", kernels_planar.dwconv2d_kernel(shape, isa),
                        shape.in_dtype, x, [wvar, *pvars],
                        (1, shape.out_channels, *shape.out_hw), shape.out_dtype)


def _kernel_linear(lw: Lowering, node, module: QLinear, x) -> relax.Expr:
    """The layer as a hand-scheduled kernel
    (:func:`pqcompile.lower.kernels_linear.linear_kernel`); leading input dims are flattened
    into rows."""
    bb, name = lw.bb, node.name
    in_shape = lw.shape(node.all_input_nodes[0])
    wt = np.ascontiguousarray(module.weight.numpy().T)
    rows = int(np.prod(in_shape[:-1]))
    shape = kernels_linear.LinearShape(rows, wt.shape[0], wt.shape[1], str(x.ty.dtype),
                                       module.out.dtype, module.lo, module.hi)
    isa = kernels_linear.linear_tile(shape, kernels.fit_isa(lw.isa, wt))
    wvar = _weight(lw, name, kernels_linear.pack_linear_weight(wt, isa), module.wq.bits)
    bias, mult, shift = kernels_linear.linear_params(
        wt, module.bias.numpy(), module.mult.numpy(), module.shift.numpy(), shape, isa)
    pvars = [lw.param(f"{name}.{k}", v) for k, v in
             (("bias", bias), ("mult", mult), ("shift", shift))]
    pack, kernel, scratch = kernels_linear.linear_kernel(shape, isa)
    if len(in_shape) != 2:
        x = bb.emit(R.reshape(x, (rows, shape.in_features)))
    xp = lw.call_kernel(pack, f"{name}_pack", [x], (scratch,),
                        isa.packed_dtype or shape.in_dtype)
    lw.kernels[name] = f"linear {isa.name} {isa.mr}x{isa.nr * isa.lanes}"
    y = lw.call_kernel(kernel, f"{name}_fc", [xp, wvar, *pvars], (rows, shape.out_features),
                       shape.out_dtype)
    if len(in_shape) != 2:
        y = bb.emit(R.reshape(y, (*in_shape[:-1], shape.out_features)))
    return y


def linear(lw: Lowering, node, module: QLinear, x) -> relax.Expr:
    if lw.isa is not None:
        return _kernel_linear(lw, node, module, x)
    # Stored transposed (in, out) so the program multiplies without a per-call transpose.
    bb, name = lw.bb, node.name
    w = _weight(lw, name, np.ascontiguousarray(module.weight.numpy().T), module.wq.bits)
    acc = bb.emit(R.matmul(x, w, out_dtype="int32"))
    acc = bb.emit(R.add(acc, lw.param(f"{name}.bias", module.bias.numpy().astype(np.int32))))
    m, sh = _per_channel(lw, name, module, (-1,))
    return requant(bb, acc, m, sh, module.lo, module.hi, module.out.dtype)


def cat(lw: Lowering, node, module: QCat, *xs) -> relax.Expr:
    parts = [x if fp is None else requant(lw.bb, x, fp.mult[0], fp.shift[0], module.lo,
                                          module.hi, module.out.dtype)
             for x, fp in zip(xs, module.fps)]
    return lw.bb.emit(R.concat(parts, axis=module.dim))


def sum_pool(lw: Lowering, node, module: QSumPool, x) -> relax.Expr:
    bb = lw.bb
    if module.window is not None:
        # A depthwise conv with an all-ones kernel is an exact integer window sum.
        (kh, kw), stride, pad = module.window
        channels = lw.shape(node.all_input_nodes[0])[1]
        ones = relax.const(np.ones((channels, 1, kh, kw), np.int8), "int8")
        acc = bb.emit(R.nn.conv2d(x, ones, strides=stride, padding=pad, groups=channels,
                                  out_dtype="int32"))
    else:
        y = kernels_mean.emit_mean(lw, node, module, x)
        if y is not None:
            return y
        acc = bb.emit(R.sum(R.astype(x, "int32"), axis=list(module.dims),
                            keepdims=module.keepdim))
    fp = module.fp
    return requant(bb, acc, fp.mult[0], fp.shift[0], module.lo, module.hi, module.out.dtype)


def embedding(lw: Lowering, node, module: QEmbedding, ids) -> relax.Expr:
    table = module.table.numpy()
    lw.storage[node.name] = f"{table.dtype} lookup table"
    # Out-of-range ids would read past the table: the program checks them (the reference's
    # IndexError), and "clip" keeps the lookup in bounds before the check reports.
    rows, dtype = table.shape[0], str(ids.ty.dtype)
    ok = R.logical_and(R.greater_equal(R.min(ids), relax.const(0, dtype)),
                       R.less(R.max(ids), relax.const(rows, dtype)))
    lw.checks.append((lw.bb.emit(ok), f"node {node.name!r} (embedding): ids must be in "
                      f"[0, {rows}), the table's rows; an input holds an id outside"))
    return lw.bb.emit(R.take(lw.param(f"{node.name}.weight", table), ids, axis=0, mode="clip"))


def max_pool(lw: Lowering, node, module: QMaxPool, x) -> relax.Expr:
    if lw.isa is not None:
        y = _kernel_max_pool(lw, node, module, x)
        if y is not None:
            return y
    return lw.bb.emit(R.nn.max_pool2d(x, module.kernel, module.stride, module.padding,
                                      module.dilation, module.ceil_mode))


def _kernel_max_pool(lw: Lowering, node, module: QMaxPool, x) -> relax.Expr | None:
    """The pool as a hand-scheduled kernel, where it covers it (batch 1, stride 1/2, square
    stride, no dilation, floor mode, pads under half the window)."""
    pair = torch.nn.modules.utils._pair
    (kh, kw), (sh, sw) = pair(module.kernel), pair(module.stride or module.kernel)
    (ph, pw), dil = pair(module.padding), pair(module.dilation)
    n, c, h, w = lw.shape(node.all_input_nodes[0])
    if n != 1 or sh != sw or dil != (1, 1) or module.ceil_mode or 2 * ph > kh or 2 * pw > kw:
        return None
    shape = kernels.ConvShape(c, h, w, c, (kh, kw), sh, (ph, pw), str(x.ty.dtype),
                              str(x.ty.dtype), 0, 0)
    if not kernels.supported(shape) or tuple(lw.shape(node))[2:] != shape.out_hw:
        return None
    lw.kernels[node.name] = "maxpool2d"
    return _call_kernel(lw, node.name, "pool", kernels_planar.maxpool2d_kernel(shape, lw.isa),
                        shape.in_dtype, x, [], (1, c, *shape.out_hw), shape.in_dtype)


def clip(lw: Lowering, node, module: QClip, x) -> relax.Expr:
    return lw.bb.emit(R.clip(x, module.lo, module.hi))


def pad(lw: Lowering, node, module: QPad, x) -> relax.Expr:
    """A constant pad with the constant's code; negative widths (crops) as a slice after."""
    shape = lw.shape(node.all_input_nodes[0])
    widths = [(0, 0)] * len(shape)
    for i in range(len(module.pad) // 2):
        widths[len(shape) - 1 - i] = (module.pad[2 * i], module.pad[2 * i + 1])
    if any(b > 0 or a > 0 for b, a in widths):
        x = lw.bb.emit(R.nn.pad(x, [max(v, 0) for w in widths for v in w], "constant",
                                float(module.code)))
    if any(b < 0 or a < 0 for b, a in widths):
        padded = [s + max(b, 0) + max(a, 0) for s, (b, a) in zip(shape, widths)]
        x = lw.bb.emit(R.strided_slice(x, axes=list(range(len(shape))),
                                       begin=[max(-b, 0) for b, _ in widths],
                                       end=[s - max(-a, 0) for s, (_, a) in zip(padded, widths)]))
    return x


def gather(lw: Lowering, node, module: QGather, x) -> relax.Expr:
    """Reflect/replicate/circular pads and nearest resampling: one ``take`` per axis, with
    the reference's indices (in range by construction)."""
    for axis, idx in module.indices():
        x = lw.bb.emit(R.take(x, relax.const(idx.numpy().astype(np.int32), "int32"),
                              axis=axis, mode="clip"))
    return x


def float_op(lw: Lowering, node, module: FloatOp, *qs) -> relax.Expr:
    """Dequantize, the island's Relax function, quantize. Islands that translate alike (same
    code, shapes and constants: every GELU of a stage) share one function."""
    bb = lw.bb
    shapes = [lw.shape(a) for a in node.all_input_nodes]
    key = island_key(module.fn, shapes, with_values=True)
    gv = lw.islands.get(key)
    if gv is None:
        gv = bb.add_func(translate_island(module.fn, shapes), f"float_{node.name}")
        lw.islands[key] = gv
    xs = [dequantize(bb, q, p, "float64") if p is not None else bb.emit(R.astype(q, "float64"))
          for q, p in zip(qs, module.ins)]
    y = bb.emit(relax.Call(gv, xs))
    return quantize(bb, y, module.out, module.lo, module.hi)


def mask_op(lw: Lowering, node, module: MaskOp, *xs) -> relax.Expr:
    """An op on integer-derived values (:mod:`pqcompile.quant.exact`): the reference's very
    graph, translated at its inputs' dtypes (int64, bool, float32) and called."""
    info = [(lw.shape(a), str(SHAPE.get(a).dtype).removeprefix("torch."))
            for a in node.all_input_nodes]
    fn = from_fx(module.fn, info)["main"].without_attr("global_symbol")
    gv = lw.bb.add_func(fn, f"mask_{node.name}")
    return lw.bb.emit(relax.Call(gv, list(xs)))


def quantize_input(lw: Lowering, node, module: Quantize, x) -> relax.Expr:
    if lw.fma and str(x.ty.dtype) == "float32" and module.out.dtype in ("int8", "uint8"):
        # without a division (kernels_quantize): the same codes
        shape = lw.shape(node)
        lw.kernels[node.name] = "quantize"
        return lw.call_kernel(kernels_quantize.quantize_kernel(
            shape, module.out.scale, module.lo, module.hi, module.out.dtype),
            f"{node.name}_quantize", [x], shape, module.out.dtype)
    return quantize(lw.bb, x, module.out, module.lo, module.hi)


def dequantize_output(lw: Lowering, node, module: Dequantize, q) -> relax.Expr:
    return dequantize(lw.bb, q, module.out, "float32")


EMITTERS = {Quantize: quantize_input, Dequantize: dequantize_output, QConv2d: conv2d,
            QLinear: linear, QAdd: add, QCat: cat, QSumPool: sum_pool, QMaxPool: max_pool,
            QClip: clip, FloatOp: float_op, QEmbedding: embedding, QPad: pad, QGather: gather,
            MaskOp: mask_op, QAffine: affine}
EMITTERS.update(LUT_EMITTERS)  # table lookups and products (pqcompile.lower.lut)
EMITTERS.update(MATMUL_EMITTERS)  # activation x activation products (pqcompile.lower.matmul)
EMITTERS[QPackedEmbedding] = packed_embedding  # pqcompile.lower.table_lookup
EMITTERS.update(SOFTMAX_EMITTERS)  # fixed-point softmax (pqcompile.lower.softmax)
EMITTERS.update(LAYER_NORM_EMITTERS)  # fixed-point layer norm (pqcompile.lower.kernels_layernorm)


