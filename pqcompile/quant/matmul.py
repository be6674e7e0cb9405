"""Integer products of two activations: ``a @ b`` with both operands quantized tensors.

Attention computes two of them per head, ``q @ k^T`` and ``softmax(...) @ v``. Both operands
are integer tensors of at most 8 bits (int8, or uint8 for a non-negative tensor such as the
softmax output, whose calibrated scale is ~1/255), the products accumulate in int32, and one
fixed-point multiplier ``M = s_a * s_b / s_out`` (:mod:`pqcompile.quant.fixedpoint`) requantizes
the accumulator to the output's scale, as a linear layer's epilogue does:
``y = clamp((acc * m + (1 << (sh - 1))) >> sh, lo, hi)``. The reference computes the
accumulator in float64 (every partial sum is an integer below 2^31, hence exact) and the
program with an int32 ``matmul`` (:mod:`pqcompile.lower.matmul`): they agree bit for bit.

``matmul``/``bmm``/``mm``/``@`` (function or method) of two input-dependent tensors of rank
two or more is such a product. :func:`activation_products` names them on an analyzed float
graph, before any plan exists, so the cost model counts their MACs at :data:`PRODUCT_BITS` x
:data:`PRODUCT_BITS` bits (a ``scaled_dot_product_attention`` whose pieces the reference
builds as integer products, :func:`pqcompile.frontend.attention.sdpa_decomposable`, counts alike).

>>> import torch
>>> from pqcompile.meta import QParams
>>> a, b = QParams(0.02, 8, True), QParams(0.05, 8, True)
>>> mm = make_matmul(a, b, QParams(0.1, 8, True), -127, 127, 16, where="matmul 'mm'")
>>> qa = torch.tensor([[10.0, -20.0], [3.0, 4.0]])
>>> qb = torch.tensor([[50.0], [25.0]])
>>> mm(qa, qb).tolist()  # (500 - 500) * 0.001 / 0.1 = 0 and (150 + 100) * 0.01 = 2.5 -> 3
[[0.0], [3.0]]
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from ..errors import UnsupportedOpError
from ..meta import SHAPE, QParams
from .fixedpoint import quantize_multiplier, requantize
from .qmodules import QModule

PRODUCT_BITS = 8  # each operand of an integer activation x activation product
ACC_LIMIT = 1 << 31  # int32 accumulation: |acc| stays below this
_MATMUL_FN = (torch.matmul, torch.bmm, torch.mm, operator.matmul)
_MATMUL_METHODS = ("matmul", "bmm", "mm")


def matmul_operands(n: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(a, b)`` of ``a @ b`` (``matmul``/``bmm``/``mm``/``@``, function or method) when both
    are nodes and there are no other arguments; else ``None``."""
    is_mm = (n.op == "call_function" and n.target in _MATMUL_FN) or (
        n.op == "call_method" and n.target in _MATMUL_METHODS)
    if not is_mm or len(n.args) != 2 or n.kwargs:
        return None
    a, b = n.args
    if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
        return a, b
    return None


def _rank(n: torch.fx.Node) -> int:
    meta = SHAPE.find(n)
    return len(meta.shape) if hasattr(meta, "shape") else 0


def is_integer_product(n: torch.fx.Node, quantized: Callable[[torch.fx.Node], bool]) -> bool:
    """``n`` is a matmul of two quantized tensors (``quantized(node)``) of rank >= 2."""
    ops = matmul_operands(n)
    return ops is not None and all(quantized(x) and _rank(x) >= 2 for x in ops)


def quantized_nodes(gm: torch.fx.GraphModule) -> set[str]:
    """The nodes whose values the integer program holds as quantized tensors (or tuples of
    them), as :func:`pqcompile.quant.plan.make_plan` decides it, from the graph alone: what
    depends on a float input, and lookups of integer inputs (embeddings). Values computed
    from integer inputs alone (masks, ids) and constants are not quantized."""
    quantized: set[str] = set()
    raw: set[str] = set()  # derived from integer inputs only
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            meta = SHAPE.find(n)
            floating = getattr(meta, "dtype", torch.float32).is_floating_point
            (quantized if floating else raw).add(n.name)
            continue
        ins = n.all_input_nodes
        if any(a.name in quantized for a in ins):
            quantized.add(n.name)
        elif any(a.name in raw for a in ins):
            lookup = n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                          nn.Embedding)
            (quantized if lookup else raw).add(n.name)
    return quantized


def activation_products(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the nodes of an analyzed graph (``SHAPE`` set) that the integer program runs
    as integer activation x activation products: matmuls of two quantized tensors, and
    ``scaled_dot_product_attention`` calls the reference decomposes into two of them."""
    from ..frontend.attention import sdpa_decomposable

    quantized = quantized_nodes(gm)
    is_q = lambda x: x.name in quantized  # noqa: E731
    out = set()
    for n in gm.graph.nodes:
        if is_integer_product(n, is_q):
            out.add(n.name)
        elif sdpa_decomposable(n) and all(is_q(x) and _rank(x) >= 2 for x in n.args[:3]):
            out.add(n.name)
    return out


class QMatMul(QModule):
    """``a @ b`` of two integer tensors: the int32 accumulator requantized by
    ``s_a * s_b / s_out`` with one fixed-point multiplier (see the module doc)."""

    def __init__(self, mult: int, shift: int, a: QParams, b: QParams, out: QParams, lo: int,
                 hi: int) -> None:
        super().__init__(out, lo, hi)
        self.mult, self.shift = int(mult), int(shift)
        self.a, self.b = a, b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(torch.matmul(a.to(torch.float32), b.to(torch.float32)))
        acc = torch.matmul(a.to(torch.float64), b.to(torch.float64))  # exact: |acc| < 2^31
        return requantize(acc.to(torch.int64), self.mult, self.shift, self.lo,
                          self.hi).to(torch.float64)


def _magnitude(qp: QParams) -> int:
    return max(-qp.qmin, qp.qmax)


def make_matmul(a: QParams, b: QParams, out: QParams, lo: int, hi: int, depth: int, *,
                where: str) -> QMatMul:
    """The :class:`QMatMul` of operands quantized with ``a`` and ``b`` and a reduction of
    ``depth`` terms; raises :class:`UnsupportedOpError` naming ``where`` when an operand is
    wider than 8 bits or the accumulator could leave int32."""
    for name, qp in (("first", a), ("second", b)):
        if qp.bits > 8:
            raise UnsupportedOpError(
                f"{where}: its {name} operand is a {qp.bits}-bit tensor; integer products take "
                "operands of at most 8 bits: give the layers reading it 8 activation bits or "
                "fewer")
    worst = _magnitude(a) * _magnitude(b) * int(depth)
    if worst >= ACC_LIMIT:
        raise UnsupportedOpError(
            f"{where}: a reduction over {depth} terms of {a.bits}- and {b.bits}-bit operands "
            f"can reach {worst}, past the int32 accumulator; split the product along its "
            "reduced dimension")
    m, sh = quantize_multiplier(a.scale * b.scale / out.scale, where=where)
    return QMatMul(m, sh, a, b, out, lo, hi)
