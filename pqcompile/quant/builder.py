"""The reference's builder: one integer-exact op per node of the quantization plan.

:func:`pqcompile.quant.build_reference` plans the graph, calibrates it, and hands the plan and
the activations' :class:`~pqcompile.meta.QParams` to :class:`_Builder`, which writes the new
graph: quantized layers, adds, concatenations, pools, lookup tables, integer products, affine
maps and the float islands between a dequantize and a quantize, each with its fixed-point
requantization. Constants the float ops read are stored compacted (:func:`_compact`) where they
broadcast (:func:`_broadcasts`), as the compiled program stores them.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg

from ..assignment import Assignment
from ..meta import (
    BITS,
    EMBEDDING_BITS,
    FUSED_ACTIVATION,
    QPARAMS,
    REQUANT,
    SHAPE,
    WEIGHT_QUANT,
    FixedPoint,
    FloatOp,
    QParams,
    Requant,
)
from .affine import QAffine
from .fixedpoint import quantize_multiplier, quantize_multipliers, shared_shift
from .exact import MaskOp, region_nodes, subgraph
from .islands import Slot, make_island
from .lut import QLut, QMul, elementwise_function, make_table
from .matmul import make_matmul, matmul_operands
from .movement import pad_code
from .plan import Plan
from .qmodules import (
    Dequantize,
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
from .qmodules import FloatOp as FloatOpModule
from .qparams import quantize_layer
from .layernorm import integer_layer_norm, make_layer_norm
from .softmax import integer_softmax, make_softmax, masked_softmax_operands, softmax_input
from .tables import packed_lookup


def _relu6_hi(qp: QParams) -> int:
    return min(qp.qmax, math.floor(6.0 / qp.scale + 0.5))


class _Builder:
    def __init__(self, gm: torch.fx.GraphModule, plan: Plan, qp: dict[str, QParams],
                 values: dict[str, Any], assignment: Assignment) -> None:
        self.gm, self.plan, self.qp, self.values = gm, plan, qp, values
        self.assignment = assignment
        self.root = nn.Module()
        self.graph = torch.fx.Graph()
        self.env: dict[str, torch.fx.Node] = {}
        self.float_ops: list[FloatOp] = []

    def qparams(self, name: str) -> QParams:
        return self.qp[self.plan.root[name]]

    def bounds(self, n: torch.fx.Node, out: QParams) -> tuple[int, int]:
        relu = self.plan.fused.get(n.name)
        hi = _relu6_hi(out) if relu in self.plan.relu6 else out.qmax
        return out.qmin, hi

    def emit(self, n: torch.fx.Node, module: nn.Module, args: tuple, name: str | None = None,
             meta: dict | None = None) -> torch.fx.Node:
        node = self.graph.create_node("call_module", "", args, {}, name=name or n.name)
        target = node.name
        while hasattr(self.root, target):
            target += "_"
        node.target = target
        self.root.add_module(target, module)
        node.meta.update(n.meta)
        for key, value in (meta or {}).items():
            key.set(node, value)
        return node

    def mapped(self, a: torch.fx.Node) -> Any:
        return self.env[a.name] if a.name in self.env else self.values[a.name]

    def ins(self, n: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in n.all_input_nodes if a.name in self.plan.root]

    # --- one method per kind --------------------------------------------------------------

    def index_input(self, n):
        ph = self.graph.placeholder(n.name)
        ph.meta.update(n.meta)
        return ph

    def input(self, n):
        qp = self.qp[n.name]
        return self.emit(n, Quantize(qp), (self.index_input(n),), f"{n.name}_quantize",
                         meta={QPARAMS: qp})

    def embedding(self, n):
        m = self.gm.get_submodule(n.target)
        out = self.qp[n.name]
        lo, hi = self.bounds(n, out)
        bits = EMBEDDING_BITS.find(n, 8)
        if bits < 8:  # packed rows with a multiplier each (pqcompile.quant.tables)
            module = packed_lookup(m.weight, bits, out, lo, hi, where=f"table {n.name!r}")
            return self.emit(n, module, (self.env[n.all_input_nodes[0].name],),
                             meta={QPARAMS: out})
        with torch.no_grad():  # the table rounded as Quantize rounds the inputs
            table = Quantize(out, lo, hi)(m.weight.detach())
        module = QEmbedding(table, out, lo, hi)
        return self.emit(n, module, (self.env[n.all_input_nodes[0].name],), meta={QPARAMS: out})

    def layer(self, n):
        m = self.gm.get_submodule(n.target)
        src = self.ins(n)[0]
        inp, out = self.qparams(src.name), self.qp[n.name]
        bw = self.assignment.bits[n.name]
        where = f"layer {n.name!r}"
        wint, wq, bias = quantize_layer(m.weight, m.bias, bw.weight, inp, where=where)
        M = inp.scale * np.asarray(wq.scales) / out.scale
        mult, shift = quantize_multipliers(M, where=where)
        fp = FixedPoint(tuple(int(v) for v in mult), tuple(int(v) for v in shift))
        lo, hi = self.bounds(n, out)
        common = (wint, bias, wq, fp, inp, out, lo, hi)
        module = QConv2d(*common, **self.plan.args[n.name]) if self.plan.kind[n.name] == "conv" \
            else QLinear(*common)
        meta = {QPARAMS: out, WEIGHT_QUANT: wq, REQUANT: Requant((fp,), lo, hi), BITS: bw}
        if n.name in self.plan.fused:
            meta[FUSED_ACTIVATION] = self.plan.fused[n.name]
        return self.emit(n, module, (self.env[src.name],), meta=meta)

    def add(self, n):
        a, b = n.args
        out = self.qp[n.name]
        mults, sh = shared_shift([self.qparams(a.name).scale / out.scale,
                                  self.qparams(b.name).scale / out.scale],
                                 where=f"add {n.name!r}")
        lo, hi = self.bounds(n, out)
        req = Requant(tuple(FixedPoint((m,), (sh,)) for m in mults), lo, hi)
        return self.emit(n, QAdd(mults, sh, out, lo, hi), (self.env[a.name], self.env[b.name]),
                         meta={QPARAMS: out, REQUANT: req})

    def cat(self, n):
        out = self.qp[n.name]
        lo, hi = self.bounds(n, out)
        fps = []
        for a in n.args[0]:
            inp = self.qparams(a.name)
            if inp == out and n.name not in self.plan.fused:
                fps.append(None)
            else:
                m, sh = quantize_multiplier(inp.scale / out.scale, where=f"cat {n.name!r}")
                fps.append(FixedPoint((m,), (sh,)))
        module = QCat(self.plan.args[n.name]["dim"], fps, out, lo, hi)
        return self.emit(n, module, tuple(self.env[a.name] for a in n.args[0]),
                         meta={QPARAMS: out, REQUANT: Requant(tuple(fps), lo, hi)})

    def avgpool(self, n):
        src = self.ins(n)[0]
        inp, out, args = self.qparams(src.name), self.qp[n.name], self.plan.args[n.name]
        m, sh = quantize_multiplier(inp.scale / (out.scale * args["count"]),
                                    where=f"pool {n.name!r}")
        fp = FixedPoint((m,), (sh,))
        lo, hi = self.bounds(n, out)
        module = QSumPool(args["window"], args["dims"], args["keepdim"], args["count"], fp, out,
                          lo, hi)
        return self.emit(n, module, (self.env[src.name],),
                         meta={QPARAMS: out, REQUANT: Requant((fp,), lo, hi)})

    def maxpool(self, n):
        src = self.ins(n)[0]
        return self.emit(n, QMaxPool(**self.plan.args[n.name]), (self.env[src.name],),
                         meta={QPARAMS: self.qparams(n.name)})

    def pad(self, n):
        src, qp, args = self.ins(n)[0], self.qparams(n.name), self.plan.args[n.name]
        code = pad_code(args["value"], qp, f"node {n.name!r} ({self.plan.op[n.name]})")
        return self.emit(n, QPad(args["pad"], code, qp.scale), (self.env[src.name],),
                         meta={QPARAMS: qp})

    def gather(self, n):
        src = self.ins(n)[0]
        return self.emit(n, QGather(self.plan.args[n.name]["index"]), (self.env[src.name],),
                         meta={QPARAMS: self.qparams(n.name)})

    def clip(self, n):
        src = self.ins(n)[0]
        qp = self.qparams(n.name)
        hi = _relu6_hi(qp) if n.name in self.plan.relu6 else qp.qmax
        return self.emit(n, QClip(qp, max(qp.qmin, 0), hi), (self.env[src.name],),
                         meta={QPARAMS: qp})

    def lut(self, n):
        """A pointwise op of one tensor of at most 8 bits as a table of its codes (a float op
        where the input is wider or the function is not finite on its codes)."""
        src = self.ins(n)[0]
        inp, out = self.qparams(src.name), self.qp[n.name]
        lo, hi = self.bounds(n, out)
        fn = elementwise_function(self.gm, n)
        table = make_table(fn, inp, out, lo, hi) if inp.bits <= 8 else None
        if table is None:
            return self.float(n)
        module = QLut(table, fn, self.plan.op[n.name], inp, out, lo, hi)
        return self.emit(n, module, (self.env[src.name],), meta={QPARAMS: out})

    def mul(self, n):
        a, b = n.args
        out = self.qp[n.name]
        M = self.qparams(a.name).scale * self.qparams(b.name).scale / out.scale
        m, sh = quantize_multiplier(M, where=f"mul {n.name!r}")
        fp = FixedPoint((m,), (sh,))
        lo, hi = self.bounds(n, out)
        return self.emit(n, QMul(m, sh, out, lo, hi), (self.env[a.name], self.env[b.name]),
                         meta={QPARAMS: out, REQUANT: Requant((fp,), lo, hi)})

    def matmul(self, n):
        """A product of two quantized tensors (:mod:`pqcompile.quant.matmul`)."""
        a, b = matmul_operands(n)
        out = self.qp[n.name]
        lo, hi = self.bounds(n, out)
        module = make_matmul(self.qparams(a.name), self.qparams(b.name), out, lo, hi,
                             SHAPE.get(a).shape[-1], where=f"node {n.name!r} (matmul)")
        fp = FixedPoint((module.mult,), (module.shift,))
        meta = {QPARAMS: out, REQUANT: Requant((fp,), lo, hi)}
        if n.name in self.plan.fused:
            meta[FUSED_ACTIVATION] = self.plan.fused[n.name]
        return self.emit(n, module, (self.env[a.name], self.env[b.name]), meta=meta)

    def affine(self, n):
        """An eval-mode batch norm as an integer per-channel affine map (a fused ReLU clamps)."""
        src = self.ins(n)[0]
        inp, out = self.qparams(src.name), self.qp[n.name]
        lo, hi = self.bounds(n, out)
        module = QAffine.from_norm(self.gm.get_submodule(n.target), inp, out, lo, hi,
                                   where=f"batch norm {n.name!r}")
        meta = {QPARAMS: out}
        if n.name in self.plan.fused:
            meta[FUSED_ACTIVATION] = self.plan.fused[n.name]
        return self.emit(n, module, (self.env[src.name],), meta=meta)

    def verbatim(self, n):
        if n.op == "call_module":
            node = self.emit(n, copy.deepcopy(self.gm.get_submodule(n.target)),
                             map_arg(n.args, self.mapped))
            node.kwargs = map_arg(n.kwargs, self.mapped)
        else:
            node = self.graph.node_copy(n, self.mapped)
        if n.name in self.plan.root:
            QPARAMS.set(node, self.qparams(n.name))
        return node

    def raw(self, a: torch.fx.Node) -> bool:
        """An unquantized input-derived tensor (an integer input or a ``mask`` op)."""
        return self.plan.kind.get(a.name) in ("index", "mask")

    def in_qparams(self, a: torch.fx.Node) -> QParams | None:
        """How a float op reads ``a``: dequantized with these, or (None) cast to float64."""
        return None if self.raw(a) else self.qparams(a.name)

    def mask(self, n):
        fn, ins = subgraph(self.gm, [n], lambda a: a.name in self.env and self.raw(a),
                           self.values, "MaskOp")
        return self.emit(n, MaskOp(fn, self.plan.op[n.name]), tuple(self.env[a.name]
                                                                    for a in ins))

    def region(self, n):
        """``n`` with the float ops inlined into it, as one island (one quantization)."""
        nodes = region_nodes(self.gm, n, set(self.plan.inlined))
        fn, ins = subgraph(self.gm, nodes, lambda a: a.name in self.env and (
            a.name in self.plan.root or self.raw(a)), self.values, "FloatRegion")
        op = " + ".join(self.plan.op[x.name] for x in nodes)
        island = make_island(fn, "call_module", tuple(Slot(i) for i in range(len(ins))), {},
                             [tuple(SHAPE.get(a).shape) for a in ins],
                             where=f"nodes {[x.name for x in nodes]} ({op})")
        self.float_ops.append(FloatOp(n.name, op, island.precision))
        qp = self.qp[n.name]
        module = FloatOpModule(island.fn, op, [self.in_qparams(a) for a in ins], qp)
        return self.emit(n, module, tuple(self.env[a.name] for a in ins), meta={QPARAMS: qp})

    def float(self, n):
        masked = masked_softmax_operands(self.gm, self.plan, n)
        if masked is not None:
            x, out = masked[0], self.qp[n.name]  # scores + a mask's bias: in fixed point
            module = make_softmax(self.qparams(x.name), out, *self.bounds(n, out))
            if module is not None:
                return self.emit(n, module, (self.env[x.name], self.env[masked[1].name]),
                                 meta={QPARAMS: out})
        if any(a.name in self.plan.inlined for a in n.all_input_nodes):
            return self.region(n)
        if integer_layer_norm(self.gm, self.plan, n):  # in fixed point
            x, out = n.args[0], self.qp[n.name]
            module = make_layer_norm(self.gm.get_submodule(n.target), self.qparams(x.name), out,
                                     *self.bounds(n, out), where=f"node {n.name!r}")
            if module is not None:
                return self.emit(n, module, (self.env[x.name],), meta={QPARAMS: out})
        if integer_softmax(self.gm, self.plan, n):  # one 8-bit tensor's: in fixed point
            x, out = softmax_input(self.gm, n), self.qp[n.name]
            module = make_softmax(self.qparams(x.name), out, *self.bounds(n, out))
            if module is not None:
                return self.emit(n, module, (self.env[x.name],), meta={QPARAMS: out})
        ins, index, consts = [], {}, {}

        def arg(a):
            if a.name in self.plan.root or self.raw(a):
                if a.name not in index:
                    index[a.name] = len(ins)
                    ins.append(a)
                return Slot(index[a.name])
            v = self.values[a.name]
            if not isinstance(v, torch.Tensor):
                return v
            consts[f"const{len(consts)}"] = _compact(v) if _broadcasts(n, a) else v
            return f"\0const{len(consts) - 1}"

        args, kwargs = map_arg(n.args, arg), map_arg(n.kwargs, arg)
        target = self.gm.get_submodule(n.target) if n.op == "call_module" else n.target
        island = make_island(target, n.op, args, kwargs, [tuple(SHAPE.get(a).shape) for a in ins],
                             consts, where=f"node {n.name!r} ({self.plan.op[n.name]})")
        op = self.plan.op[n.name]
        self.float_ops.append(FloatOp(n.name, op, island.precision))
        qp = self.qp[n.name]
        module = FloatOpModule(island.fn, op, [self.in_qparams(a) for a in ins], qp)
        return self.emit(n, module, tuple(self.env[a.name] for a in ins), meta={QPARAMS: qp})

    def output(self, n):
        def dequant(a):
            if a.name not in self.plan.root:
                raise ValueError(f"output {a.name!r} does not depend on the model input; "
                                 "pqcompile quantizes input-dependent outputs only")
            qp = self.qparams(a.name)
            return self.emit(a, Dequantize(qp), (self.env[a.name],), f"{a.name}_dequantize",
                             meta={QPARAMS: qp})

        self.graph.output(map_arg(n.args[0], dequant))

    def run(self) -> None:
        handlers: dict[str, Callable] = {
            "input": self.input, "conv": self.layer, "linear": self.layer, "add": self.add,
            "cat": self.cat, "avgpool": self.avgpool, "maxpool": self.maxpool,
            "clip": self.clip, "pad": self.pad, "gather": self.gather, "view": self.verbatim,
            "identity": self.verbatim,
            "split": self.verbatim, "meta": self.verbatim, "float": self.float,
            "index": self.index_input, "embedding": self.embedding, "mask": self.mask,
            "lut": self.lut, "mul": self.mul, "affine": self.affine, "matmul": self.matmul}
        for n in self.gm.graph.nodes:
            kind = self.plan.kind[n.name]
            if kind == "output":
                self.output(n)
            elif kind == "fused":
                self.env[n.name] = self.env[self.plan.root[n.name]]
            elif kind not in ("const", "inlined"):  # inlined: computed in its reader's island
                self.env[n.name] = handlers[kind](n)


_ELEMENTWISE = (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul)


def _broadcasts(n: torch.fx.Node, const: torch.fx.Node) -> bool:
    """``n`` is an elementwise add/sub/mul whose result has the shape of an operand other than
    ``const``: the constant may then be stored with its repeated dims reduced to 1."""
    if n.op != "call_function" or n.target not in _ELEMENTWISE:
        return False
    out = tuple(SHAPE.get(n).shape)
    return any(a is not const and isinstance(a, torch.fx.Node) and
               hasattr(SHAPE.find(a), "shape") and tuple(SHAPE.get(a).shape) == out
               for a in n.args)


def _compact(v: torch.Tensor) -> torch.Tensor:
    """``v`` with every dim along which it repeats one slice reduced to size 1 (it broadcasts
    back to the same values), e.g. a token-type embedding repeated over batch and positions."""
    for d in range(v.dim()):
        if v.shape[d] > 1 and bool((v == v.narrow(d, 0, 1)).all()):
            v = v.narrow(d, 0, 1)
    return v.contiguous().clone()
