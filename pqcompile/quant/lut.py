"""Integer elementwise ops: lookup tables for pointwise functions, fixed-point products.

A pointwise op of one quantized tensor of at most 8 bits (hardswish, hardsigmoid, sigmoid,
SiLU, GELU, tanh, ELU, leaky ReLU, mish, ``x * 0.5``, ``x + 3``, ...) sees at most 256 input
codes, so it is a 256-entry table of output codes, computed once at quantization time:
``table[q - offset] = clamp(floor(f(q * s_in) / s_out + 0.5), lo, hi)`` with ``f`` evaluated
in float64 (the rounding of a float op's quantize), ``offset`` the storage dtype's lowest code
(-128 for int8, 0 for uint8). The reference, the compiled program (a ``take``) and the ONNX
export (a ``Gather``) all index the same table, so they agree bit for bit.

The product of two quantized tensors (a squeeze-excite gate ``x * sigmoid(s)``, broadcast per
channel) is ``requantize(qa * qb, s_a * s_b / s_out)`` in int64 with one fixed-point
multiplier, as a conv's epilogue.

>>> import torch
>>> from pqcompile.meta import QParams
>>> t = make_table(torch.nn.functional.hardsigmoid, QParams(0.05, 8, True),
...                QParams(1 / 255, 8, False), 0, 255)
>>> [int(t[q + 128]) for q in (-127, -60, 0, 60, 127)]
[0, 0, 128, 255, 255]
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..meta import QParams
from .fixedpoint import requantize
from .qmodules import QModule

# Modules computing a function of each element alone (PReLU only with one shared slope).
_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.ELU,
            nn.CELU, nn.SELU, nn.LeakyReLU, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid,
            nn.Tanhshrink, nn.Hardtanh, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.ReLU6,
            nn.ReLU)
_FUNCTIONS = {F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid, F.silu, F.gelu, F.tanh,
              torch.tanh, F.elu, F.celu, F.selu, F.leaky_relu, F.mish, F.softplus, F.softsign,
              F.logsigmoid, F.tanhshrink, F.hardtanh, F.hardshrink, F.softshrink, F.threshold,
              F.relu6, F.relu, torch.relu, torch.exp, torch.erf, torch.abs, torch.neg,
              torch.square, torch.clamp, torch.clip, torch.special.expit, torch.nan_to_num,
              operator.neg, operator.abs}
_METHODS = {"sigmoid", "tanh", "exp", "erf", "abs", "neg", "square", "clamp", "clip", "relu",
            "hardswish"}
# Arithmetic with Python numbers: x * 0.5, x + 3, 1 - x, x / 6.
_SCALAR_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                     torch.sub, torch.mul, torch.div, torch.true_divide, torch.rsub}
_SCALAR_METHODS = {"add", "sub", "mul", "div", "true_divide", "rsub"}


def _numbers(values) -> bool:
    """Only Python numbers, strings, ``None`` and containers of them (no tensors, no nodes)."""
    ok = []
    torch.fx.node.map_aggregate(values, lambda v: ok.append(
        v is None or isinstance(v, (bool, int, float, str))))
    return all(ok)


def _slot(n: torch.fx.Node) -> tuple[tuple, dict, torch.fx.Node] | None:
    """``n``'s arguments with its one tensor input replaced by a marker, if it reads exactly one
    node, once, and every other argument is a plain Python value."""
    ins = n.all_input_nodes
    if len(ins) != 1:
        return None
    x = ins[0]
    seen = []
    args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: seen.append(a) or _X)
    if len(seen) != 1 or not _numbers(torch.fx.node.map_aggregate(
            (args, kwargs), lambda v: None if v is _X else v)):
        return None
    return args, kwargs, x


class _Marker:
    def __repr__(self) -> str:
        return "<x>"


_X = _Marker()


def _fill(template: Any, x: torch.Tensor) -> Any:
    return torch.fx.node.map_aggregate(template, lambda v: x if v is _X else v)


class _Call:
    """``f(x)``: the node's function with ``x`` in place of its tensor input."""

    def __init__(self, kind: str, target: Any, args: tuple, kwargs: dict) -> None:
        self.kind, self.target, self.args, self.kwargs = kind, target, args, kwargs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = _fill(self.args, x), _fill(self.kwargs, x)
        if self.kind == "call_module":
            return self.target(*args, **kwargs)
        if self.kind == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


def elementwise_function(gm: torch.fx.GraphModule, n: torch.fx.Node
                         ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The float function of a pointwise op of one tensor (``f(x)`` elementwise, any shape,
    float64 in, float64 out), or ``None`` where ``n`` is not such an op."""
    slot = _slot(n)
    if slot is None:
        return None
    args, kwargs, _ = slot
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if not (isinstance(m, _MODULES) or (isinstance(m, nn.PReLU) and m.num_parameters == 1)):
            return None
        if len(args) != 1 or kwargs:
            return None
        m = copy.deepcopy(m).to(torch.float64)
        for p in m.parameters():
            p.requires_grad_(False)
        return _Call("call_module", m, args, kwargs)
    if n.op == "call_function":
        if n.target in _FUNCTIONS and args and args[0] is _X:
            return _Call("call_function", n.target, args, kwargs)
        if n.target in _SCALAR_FUNCTIONS and len(args) == 2 and not kwargs:
            return _Call("call_function", n.target, args, kwargs)
        return None
    if n.op == "call_method" and args and args[0] is _X:
        if n.target in _METHODS or (n.target in _SCALAR_METHODS and len(args) == 2
                                    and not kwargs):
            return _Call("call_method", n.target, args, kwargs)
    return None


def nonnegative(fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``fn`` is non-negative on a wide grid of inputs (its output is then stored
    unsigned, with twice the resolution)."""
    grid = torch.linspace(-64.0, 64.0, 4097, dtype=torch.float64)
    grid = torch.cat([grid, -torch.logspace(-6, 4, 201, dtype=torch.float64),
                      torch.logspace(-6, 4, 201, dtype=torch.float64)])
    with torch.no_grad():
        y = fn(grid.clone())
    return bool(torch.isfinite(y).all()) and bool((y >= 0).all())


def table_offset(inp: QParams) -> int:
    """The code at table index 0: the lowest code of the input's storage dtype."""
    return -128 if inp.signed else 0


def make_table(fn: Callable[[torch.Tensor], torch.Tensor], inp: QParams, out: QParams,
               lo: int, hi: int) -> torch.Tensor | None:
    """The 256 output codes of ``fn`` for every code of an input of at most 8 bits, or
    ``None`` where ``fn`` is not finite on a code the input can hold (that op stays in float).
    Codes outside ``[inp.qmin, inp.qmax]`` never occur: they repeat the nearest valid entry."""
    if inp.bits > 8:
        raise ValueError(f"a lookup table takes inputs of at most 8 bits, got {inp.bits}")
    offset = table_offset(inp)
    codes = torch.arange(offset, offset + 256, dtype=torch.float64)
    codes = codes.clamp(inp.qmin, inp.qmax)
    with torch.no_grad():
        y = fn(codes * inp.scale).to(torch.float64)
    if tuple(y.shape) != (256,) or not bool(torch.isfinite(y).all()):
        return None
    q = torch.floor(y / out.scale + 0.5).clamp(lo, hi)
    return q.to(torch.int64)


class QLut(QModule):
    """A pointwise op as a table lookup: ``table[q - offset]`` (see the module doc). ``fn``
    is the float function (the fake-quant view evaluates it in float32)."""

    def __init__(self, table: torch.Tensor, fn: Callable, op: str, inp: QParams,
                 out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.register_buffer("table", table.to(torch.int8 if out.signed else torch.uint8))
        self.fn, self.op, self.inp = fn, op, inp
        self.offset = table_offset(inp)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(self.fn(q.to(torch.float64)))
        return self.table.to(torch.float64)[q.to(torch.int64) - self.offset]


class QMul(QModule):
    """``a * b`` of two quantized tensors (broadcasting): the int64 product requantized by
    ``s_a * s_b / s_out`` with one fixed-point multiplier."""

    def __init__(self, mult: int, shift: int, out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.mult, self.shift = int(mult), int(shift)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(a.to(torch.float64) * b.to(torch.float64))
        acc = a.to(torch.int64) * b.to(torch.int64)
        return requantize(acc, self.mult, self.shift, self.lo, self.hi).to(torch.float64)


def is_product(n: torch.fx.Node) -> bool:
    """``a * b`` of two tensor nodes (which may be the same node), no other arguments."""
    mul = (n.op == "call_function" and n.target in (operator.mul, torch.mul)) or (
        n.op == "call_method" and n.target == "mul")
    return mul and len(n.args) == 2 and not n.kwargs and all(
        isinstance(a, torch.fx.Node) for a in n.args)
