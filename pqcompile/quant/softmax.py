"""Softmax over the last dim of an 8-bit tensor in fixed point: the same integers in torch and
in the compiled program, no float island.

A float64 softmax island (dequantize, ``exp``, sum, divide, quantize) cost MiniLM 0.8 ms a
layer on the host, a fifth of the model: ``exp`` runs once per element, unvectorized. Its input
is one tensor of 8-bit codes ``q`` of scale ``s``; along a row ``softmax(s q)_i =
exp(-s d_i) / sum_j exp(-s d_j)`` with ``d_i = max(q) - q_i`` in ``[0, 255]``, so every
exponential is one of 256 numbers. :class:`QSoftmax` computes, in int64:

- ``e_i = E[d_i]``, ``E[d] = round(2^20 exp(-s d))`` (a 256-entry table; ``E[0] = 2^20``);
- ``S = sum_i e_i`` and, once per row, ``R = (G + S // 2) // S`` with ``G = round(2^T / s_out)``
  (``T`` puts ``G`` in ``[2^46, 2^47)``): ``R / 2^T`` is ``1 / (S s_out)`` rounded;
- ``y_i = clamp((e_i R + 2^(T-1)) >> T, lo, hi)``: ``round(p_i / s_out)``.

``e_i R <= 2^20 (G / 2^20 + 1) < 2^48``: no product leaves int64.

A softmax of ``scores + bias`` with ``bias`` an attention mask's additive bias (a ``mask``
value: computed exactly from an integer input, :mod:`pqcompile.quant.plan`) runs the same way
over the attended positions: those whose bias is above :data:`MASKED` (a mask's 0) keep their
``e_i``, the others (a mask's ``-10000`` or ``finfo.min``) get ``e_i = 0``; the row max is the
attended codes' and a row with none attended is all zeros (``S`` taken as at least 1). So a
mask's ``exp(-huge) = 0`` is exact, and the float island (dequantize, add, ``exp``: 0.84 ms a
layer of paraphrase-MiniLM-L3 at 128 tokens, a third of the model) is gone. An attended bias
other than 0 would be ignored: the reference raises on one (the compile's fidelity check runs
it on the calibration inputs). Values computed from integer inputs alone are masks in the
transformers seen (Hugging Face's ``(1 - mask) * finfo.min`` and its ``masked_fill``). Against the float softmax
quantized the same way the codes differ by at most one (``tests/test_integer_softmax.py``
measures how often): ``E``'s rounding moves ``p_i`` by at most ``2^-21 / S * 2^20``, well under
an output step unless a row is a single spike (where the output scale is coarse).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING

from ..meta import SHAPE, QParams
from .qmodules import QModule

if TYPE_CHECKING:
    from .plan import Plan

EXP_BITS = 20  # E[0] = 2^20
G_BITS = 46  # G in [2^46, 2^47)
TABLE_BYTES = 256 * 4  # the program stores E as a parameter of 256 int32 (entries <= 2^20)
MASKED = -1e4  # an additive bias at or below this masks its position out
_FUNCTIONS = (F.softmax, torch.softmax)


def softmax_input(gm: torch.fx.GraphModule, n: torch.fx.Node) -> torch.fx.Node | None:
    """The input of ``n`` when it is a softmax over the last dim of one tensor (``nn.Softmax``,
    ``F.softmax``, ``torch.softmax`` or ``x.softmax``, no ``dtype``); else ``None``."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is not nn.Softmax or len(n.args) != 1 or n.kwargs:
            return None
        x, dim = n.args[0], m.dim
    elif (n.op == "call_function" and n.target in _FUNCTIONS) or (
            n.op == "call_method" and n.target == "softmax"):
        kwargs = dict(n.kwargs)
        kwargs.pop("_stacklevel", None)
        if kwargs.pop("dtype", None) is not None or len(n.args) > 2 or not n.args:
            return None
        x = n.args[0]
        dim = n.args[1] if len(n.args) == 2 else kwargs.pop("dim", None)
        if kwargs:
            return None
    else:
        return None
    shape = getattr(SHAPE.find(x), "shape", None) if isinstance(x, torch.fx.Node) else None
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    return x


def masked_softmax_operands(gm: torch.fx.GraphModule, plan: Plan, n: torch.fx.Node
                            ) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(scores, bias)`` when ``n`` is a float softmax over the last dim of ``scores + bias``
    (the add inlined into it and read by it alone), ``scores`` one quantized tensor of at most
    8 bits and ``bias`` a ``mask`` value, into an unsigned output; else ``None``."""
    a = softmax_input(gm, n) if plan.kind.get(n.name) == "float" else None
    if a is None or plan.inlined.get(a.name) != n.name or len(a.users) != 1 or \
            a.op != "call_function" or a.target not in (operator.add, torch.add) or \
            len(a.args) != 2 or a.kwargs or plan.signed.get(n.name, True):
        return None
    x, b = a.args
    if isinstance(b, torch.fx.Node) and b.name in plan.root:
        x, b = b, x
    if not (isinstance(x, torch.fx.Node) and isinstance(b, torch.fx.Node)) or \
            x.name not in plan.root or plan.bits.get(plan.root[x.name], 8) > 8 or \
            plan.kind.get(b.name) != "mask" or \
            tuple(getattr(SHAPE.find(a), "shape", ())) != tuple(SHAPE.get(x).shape):
        return None
    return x, b


def integer_softmax(gm: torch.fx.GraphModule, plan: Plan, n: torch.fx.Node) -> bool:
    """Whether the reference computes ``n`` as a :class:`QSoftmax` under ``plan``: a float
    node that is a softmax over the last dim (:func:`softmax_input`) of one quantized tensor of
    at most 8 bits, into an unsigned output, with no region inlined into it (a mask bias
    computed from an integer input keeps the softmax a float island). The builder and the
    stored-bytes prediction (:mod:`pqcompile.passes.stored`: :data:`TABLE_BYTES` a softmax)
    both ask this (a softmax of scores plus a mask's bias too: :func:`masked_softmax_operands`)."""
    if masked_softmax_operands(gm, plan, n) is not None:
        return True
    if plan.kind.get(n.name) != "float" or any(a.name in plan.inlined
                                                for a in n.all_input_nodes):
        return False
    x = softmax_input(gm, n)
    return x is not None and x.name in plan.root and \
        plan.bits.get(plan.root[x.name], 8) <= 8 and not plan.signed.get(n.name, True)


class QSoftmax(QModule):
    """``softmax(s q)`` over the last dim in fixed point (see the module doc); ``table`` is
    ``E`` (int64), ``g`` and ``t`` the output scale's ``G`` and ``T``."""

    def __init__(self, inp: QParams, out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.inp = inp
        d = torch.arange(256, dtype=torch.float64)
        self.register_buffer("table", torch.round(torch.exp(-inp.scale * d)
                                                  * (1 << EXP_BITS)).to(torch.int64))
        self.t = G_BITS - math.floor(math.log2(1.0 / out.scale))
        self.g = round(math.ldexp(1.0 / out.scale, self.t))
        if self.t < 1 or not (1 << G_BITS) <= self.g <= (1 << (G_BITS + 1)):
            raise ValueError(f"output scale {out.scale!r} out of the fixed-point range")

    def forward(self, q: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.fake:
            z = q.to(torch.float32)
            return self._fq(torch.softmax(z if bias is None else z + bias, dim=-1))
        q = q.to(torch.int64)
        if bias is None:
            e = self.table[q.amax(-1, keepdim=True) - q]
        else:  # over the attended positions only (module doc)
            keep = (bias > MASKED).expand(q.shape)
            if bool((keep & (bias != 0)).any()):
                raise ValueError(
                    f"softmax of scores plus a mask bias: an attended position's bias is "
                    f"{bias[(bias > MASKED) & (bias != 0)].flatten()[0].item()!r}, not 0; the "
                    f"fixed-point softmax reads the bias as a mask (0: attended, <= {MASKED:g}: "
                    f"masked out). Give the model a 0/1 attention mask")
            mx = torch.where(keep, q, -(1 << 16)).amax(-1, keepdim=True)
            e = torch.where(keep, self.table[(mx - q).clamp(0, 255)], 0)
        s = e.sum(-1, keepdim=True).clamp(min=1)
        r = torch.div(self.g + s // 2, s, rounding_mode="floor")
        y = (e * r + (1 << (self.t - 1))) >> self.t
        return y.clamp(self.lo, self.hi).to(torch.float64)


def make_softmax(inp: QParams, out: QParams, lo: int, hi: int) -> QSoftmax | None:
    """The :class:`QSoftmax` of an input of at most 8 bits into an unsigned output, or
    ``None`` (the softmax then stays a float island)."""
    if inp.bits > 8 or out.signed or lo < 0 or not 1e-9 < out.scale < 1e9:
        return None
    return QSoftmax(inp, out, lo, hi)
