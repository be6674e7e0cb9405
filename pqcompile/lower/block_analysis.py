"""What the rule-based CPU schedules (:mod:`pqcompile.lower.schedule`) need to know about a
TIR block: its iterator kinds, the widest value it computes in, whether its loads and stores are
contiguous along a loop, whether it may be merged with its neighbours (:func:`fma_safe`), and
small helpers on loops and extents."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, tirx


@dataclass
class Body:
    """What :func:`body` found in a block."""

    has_let: bool = False
    has_if_then_else: bool = False
    value_bits: int = 8  # the widest value type the block loads, stores or casts to
    accesses: list = field(default_factory=list)  # (buffer, indices) of every load and store
    #: its float value may hold a product: inlined into a consumer that adds, LLVM could
    #: contract the two into one FMA (rounding once); see :func:`fma_safe`
    may_multiply: bool = False


_LETS = ("Let", "LetStmt", "Bind")
_LOADS = ("BufferLoad", "TensorLoad")
# What a float value may be made of and still be inlined (none can become a product: LLVM
# turns a division into a multiplication only by an exact reciprocal, a power of two, whose
# product rounds nothing); anything else computed in floats (a product, a call such as exp
# or tanh, which lower to polynomials) keeps the block apart.
_NO_PRODUCT = {"Add", "Sub", "Div", "Min", "Max", "Cast", "Select", "FloatImm", "IntImm",
               "Var", "BufferLoad", "TensorLoad", "EQ", "NE", "LT", "LE", "GT", "GE", "And",
               "Or", "Not", "Broadcast", "Ramp"}
_NO_PRODUCT_CALLS = {"tirx.floor", "tirx.ceil", "tirx.trunc", "tirx.round", "tirx.nearbyint",
                     "tirx.fabs", "tirx.if_then_else"}


def _dtype(expr: Any) -> str | None:
    """An expression's value type (``dtype``, or its type's), ``None`` for non-values."""
    dtype = getattr(expr, "dtype", None)
    if dtype is None:
        dtype = getattr(getattr(expr, "ty", None), "dtype", None)
    return None if dtype is None else str(dtype)


def _is_float_type(dtype: str) -> bool:
    return tvm.DataType(dtype).type_code in (tvm.DataTypeCode.FLOAT, tvm.DataTypeCode.BFLOAT)


def _bits(expr: Any) -> int:
    return tvm.DataType(_dtype(expr) or str(expr.ty)).bits


def body(block: Any) -> Body:
    """Walk the block's body (and init): lets, selects, value widths, accesses, products."""
    info = Body()
    bits: list[int] = []

    def visit(node: Any) -> None:
        kind = type(node).__name__  # class names moved between TVM releases (LetStmt/Bind)
        if kind in _LETS:
            info.has_let = True
        elif kind == "Call":
            if getattr(node.op, "name", "").endswith("if_then_else"):
                info.has_if_then_else = True
        elif kind in _LOADS:
            bits.append(_bits(node))
            buffer = node.buffer if hasattr(node, "buffer") else node.source
            info.accesses.append((buffer, list(node.indices)))
        elif kind == "Cast":
            bits.append(_bits(node))
        elif kind == "BufferStore":
            bits.append(_bits(node.value))
            info.accesses.append((node.buffer, list(node.indices)))
        if not info.may_multiply and isinstance(node, tvm.ir.Expr):
            dtype = _dtype(node)
            info.may_multiply = dtype is not None and _is_float_type(dtype) and (
                kind not in _NO_PRODUCT if kind != "Call"
                else getattr(node.op, "name", "") not in _NO_PRODUCT_CALLS)

    tvm_ffi.structural_walk(block.body, visit)
    if block.init is not None:
        tvm_ffi.structural_walk(block.init, visit)
    info.value_bits = max([b for b in bits if b > 1] or [8])
    return info


def fma_safe(block: Any) -> bool:
    """Whether the block may be merged with its neighbours into one expression: it computes
    no floats, or its float value holds no product (see ``_NO_PRODUCT``)."""
    return not any(is_float(w.source) for w in block.writes) or not body(block).may_multiply


def contiguous(block: Any, info: Body, var: Any) -> bool:
    """Whether every load and store of the block reads consecutive elements as ``var`` steps
    by one (or the same element): vectorized over ``var``, no access becomes a gather."""
    from tvm.sym import Analyzer
    from tvm.sym.pattern import detect_linear_equation

    analyzer = Analyzer()
    for iv in block.iter_vars:  # e.g. v % 512 is v where v < 512
        analyzer.bind(iv.var, iv.dom)
    for buffer, indices in info.accesses:
        shape = list(buffer.shape)
        if not all(isinstance(d, tirx.IntImm) for d in shape) or len(shape) != len(indices):
            return False
        step, stride = 0, 1  # the flat index's step: sum of coefficient x row-major stride
        for index, dim in zip(reversed(indices), reversed(shape)):
            coeff = detect_linear_equation(analyzer.simplify(index), [var])
            if not coeff or not isinstance(coeff[0], tirx.IntImm):
                return False
            step += int(coeff[0].value) * stride
            stride *= int(dim.value)
        if step not in (0, 1):
            return False
    return True


def reads(block: Any) -> int:
    """How many buffers the block reads besides the ones it writes."""
    written = {w.source.same_as for w in block.writes}
    return sum(1 for r in block.reads if not any(f(r.source) for f in written))


def iter_kinds(block: Any) -> str:
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in block.iter_vars)


def is_float(buffer: Any) -> bool:
    return _is_float_type(str(buffer.dtype))


def extent(sch: s_tir.Schedule, loop: Any) -> int:
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm):
        raise Unsupported("a loop with a symbolic extent")
    return int(extent.value)


def trivially_bound(sch: s_tir.Schedule, block: Any, loops: list) -> bool:
    """Whether the block sits alone under ``loops``, its i-th iterator bound to the i-th."""
    realize = sch.get(loops[-1]).body if loops else None
    if realize is None or type(realize).__name__ != "SBlockRealize" \
            or not realize.block.same_as(sch.get(block)):
        return False
    values = list(realize.iter_values)
    return len(values) == len(loops) and all(
        v.same_as(sch.get(lp).loop_var) for v, lp in zip(values, loops))


def largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 1, -1):
        if n % d == 0:
            return d
    return 1


class Unsupported(Exception):
    """The rules do not handle this function."""
