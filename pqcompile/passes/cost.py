"""CostAnalysis: MACs, parameters, weight bytes and BOPs per node, and graph totals.

MACs are counted for the compute layers (convolutions, transposed convolutions, linear layers,
matmul/bmm and attention); BOPs = MACs x weight bits x activation bits, with bits from
``meta.BITS``. Counts are for the example input's batch size.

An unannotated graph (no node has bits: the FP32 model) is costed as FP32: 32/32 bits for every
MAC, 4 bytes for every parameter, so ``bops == macs * 1024``. A graph with bits (what a solver
chose) is costed as the integer program stores and runs it (:mod:`pqcompile.lower`):

* a conv/linear layer with bits: its weight packed at its weight bits, and per output channel
  an int32 bias, requantization multiplier and shift (:data:`PER_CHANNEL_WORDS`);
* ``nn.Embedding``: an int8 (uint8) table whatever the output's bits (:data:`TABLE_BITS`),
  or, marked with ``meta.EMBEDDING_BITS`` 4 or 2, packed rows and an int32 multiplier per row
  (:func:`table_bytes`, :mod:`pqcompile.quant.tables`);
* an unfolded inference batch norm: an integer per-channel affine map
  (:mod:`pqcompile.quant.affine`), per channel an int32 multiplier and shift and an int64
  offset (:data:`AFFINE_CHANNEL_WORDS`); it is no MAC layer (0 MACs, 0 BOPs);
* everything else a float island reads -- norms' parameters, a layer left in float -- is a
  float64 constant of the island (:data:`ISLAND_BITS`);
* values computed from constants alone (a position-embedding lookup of ``position_ids``, a
  parameter read with ``get_attr``) are stored by the ops that read them, as float64
  constants of their islands, not by their modules; pointwise ops of one quantized tensor
  store a 256-entry table, a fixed-point softmax 256 int32 exponentials; identical float
  islands are stored once
  (:mod:`pqcompile.passes.stored`).

Matmuls of two activations (attention's ``q @ k^T`` and ``probs @ v``, also inside
``scaled_dot_product_attention``) are integer products in the program, int8/uint8 operands and
an int32 accumulator (:mod:`pqcompile.quant.matmul`): their MACs count at
:data:`~pqcompile.quant.matmul.PRODUCT_BITS` x ``PRODUCT_BITS`` bits (8 x 8).
MACs of the other nodes without bits (float convolutions, leaf modules, matmuls with a
constant operand) have no integer lowering: the program computes them in its float64 islands.
They are costed as float MACs, :data:`FLOAT_BITS` x :data:`FLOAT_BITS` bits, the width the
FP32 reference counts them at, so compressing the rest never makes them look dearer than in
the FP32 model; the report states both.

:func:`program_constant_bytes` measures the built program's side: the bytes of the float
islands' constants (the weights file holds the rest), so ``.totals["weight_bytes"]`` of a
build is what its artifact stores.

>>> import torch, pqcompile
>>> from pqcompile.passes import ShapeAnalysis
>>> from pqcompile.meta import COST_TOTALS
>>> gm = pqcompile.trace(torch.nn.Conv2d(3, 8, 3, padding=1), (torch.randn(1, 3, 8, 8),))
>>> gm = pqcompile.Pipeline([ShapeAnalysis(), CostAnalysis()])(gm).graph_module
>>> COST_TOTALS.get(gm).macs == 8 * 8 * 8 * 3 * 3 * 3
True
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..meta import (
    BITS,
    COST,
    COST_TOTALS,
    EMBEDDING_BITS,
    SHAPE,
    BitWidths,
    CostTotals,
    NodeCost,
)
from .base import Pass, PassInfo, PassResult
from .layer_modules import OpaqueLeaf
from .stored import StoredExtras, stored_extras

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FN = (F.conv1d, F.conv2d, F.conv3d)
_MATMUL_FN = (torch.matmul, torch.bmm, torch.mm, operator.matmul)
_FP32 = BitWidths(32, 32)
FLOAT_BITS = 32  # each operand of a float MAC (a float island's), as the FP32 reference
TABLE_BITS = 8  # an nn.Embedding table: int8 (uint8) rows gathered by the program
ISLAND_BITS = 64  # a parameter read by a float island: a float64 constant of it
PER_CHANNEL_WORDS = 3  # a quantized layer's int32 bias, multiplier and shift per out channel
AFFINE_CHANNEL_WORDS = 4  # a batch norm's int32 multiplier and shift, int64 offset per channel


def is_matmul(node: torch.fx.Node) -> bool:
    """``matmul``/``bmm``/``mm``/``@`` of two tensors, as a function or a method."""
    return (node.op == "call_function" and node.target in _MATMUL_FN) or (
        node.op == "call_method" and node.target in ("matmul", "bmm", "mm"))


def conv_macs(out_shape: Sequence[int], kernel_size: Sequence[int], in_channels: int,
              out_channels: int, groups: int) -> int:
    """MACs of a convolution: positions x out_channels x (in_channels / groups) x kernel.

    ``out_shape`` is (N, C, *spatial); its channel entry is ignored in favour of
    ``out_channels`` so the formula also predicts a pruned layer.
    """
    if in_channels % groups:
        raise ValueError(f"in_channels {in_channels} is not divisible by groups {groups}")
    positions = out_shape[0] * math.prod(out_shape[2:])
    return int(positions * out_channels * (in_channels // groups) * math.prod(kernel_size))


def conv_transpose_macs(in_shape: Sequence[int], kernel_size: Sequence[int], in_channels: int,
                        out_channels: int, groups: int) -> int:
    """MACs of a transposed convolution: every input position scatters a kernel per output."""
    positions = in_shape[0] * math.prod(in_shape[2:])
    return int(positions * in_channels * (out_channels // groups) * math.prod(kernel_size))


def linear_macs(out_shape: Sequence[int], in_features: int) -> int:
    """MACs of a linear layer: every output element is an ``in_features``-long dot product."""
    return int(math.prod(out_shape) * in_features)


def matmul_macs(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """MACs of ``a @ b`` with numpy broadcasting of the batch dimensions."""
    a, b = list(a_shape), list(b_shape)
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    if a[-1] != b[-2]:
        raise ValueError(f"matmul shapes {tuple(a_shape)} and {tuple(b_shape)} do not match")
    batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return int(math.prod(batch) * a[-2] * a[-1] * b[-1])


def _shape(n) -> tuple[int, ...]:
    return tuple(SHAPE.get(n).shape)


def _tensor_meta_shape(arg) -> tuple[int, ...] | None:
    if isinstance(arg, torch.fx.Node) and hasattr(SHAPE.find(arg), "shape"):
        return tuple(SHAPE.get(arg).shape)
    return None


def _attr(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    return None


def _mha_macs(m: nn.MultiheadAttention, node: torch.fx.Node) -> int:
    q, k = (_tensor_meta_shape(a) for a in node.args[:2])
    if q is None or k is None:
        return 0
    if not m.batch_first and len(q) == 3:  # (L, N, E) -> (N, L, E)
        q, k = (q[1], q[0], q[2]), (k[1], k[0], k[2])
    n_q, n_k = math.prod(q[:-1]), math.prod(k[:-1])
    e, kdim, vdim = m.embed_dim, m.kdim, m.vdim
    proj = n_q * e * e + n_k * kdim * e + n_k * vdim * e
    attn = 2 * n_q * k[-2] * e
    return int(proj + attn + n_q * e * e)


def node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    """MACs of one node from its shapes (0 for nodes that do no multiply-accumulate work)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, OpaqueLeaf):  # a leaf layer kept whole: its MACs run in float
            m = m.module
        if isinstance(m, _CONV):
            return conv_macs(_shape(node), m.kernel_size, m.in_channels, m.out_channels,
                             m.groups)
        if isinstance(m, _CONV_T):
            return conv_transpose_macs(_tensor_meta_shape(node.args[0]), m.kernel_size,
                                       m.in_channels, m.out_channels, m.groups)
        if isinstance(m, nn.Linear):
            return linear_macs(_shape(node), m.in_features)
        if isinstance(m, nn.Bilinear):
            return linear_macs(_shape(node), m.in1_features * m.in2_features)
        if isinstance(m, nn.MultiheadAttention):
            return _mha_macs(m, node)
        return 0
    if node.op != "call_function" and not (node.op == "call_method" and node.target in
                                           ("matmul", "bmm", "mm")):
        return 0
    if node.target in _CONV_FN:
        w = _tensor_meta_shape(node.args[1])
        groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
        return conv_macs(_shape(node), w[2:], w[1] * groups, w[0], groups)
    if node.target is F.linear:
        w = _tensor_meta_shape(node.args[1])
        if w is None:
            w = tuple(_attr(gm, node.args[1]).shape)
        return linear_macs(_shape(node), w[1])
    if node.target in _MATMUL_FN or node.op == "call_method":
        a, b = (_tensor_meta_shape(x) for x in node.args[:2])
        return matmul_macs(a, b) if a is not None and b is not None else 0
    if node.target is F.scaled_dot_product_attention:
        q, k, v = (_tensor_meta_shape(x) for x in node.args[:3])
        if len(q) >= 3 and q[-3] != k[-3]:  # grouped-query heads: k and v repeated per group
            k, v = (tuple(t[:-3]) + (q[-3],) + tuple(t[-2:]) for t in (k, v))
        return matmul_macs(q, tuple(k[:-2]) + (k[-1], k[-2])) + matmul_macs(
            tuple(q[:-1]) + (k[-2],), v)
    return 0


def activation_products(gm: torch.fx.GraphModule) -> set[str]:
    """The nodes the program runs as integer activation x activation products
    (:func:`pqcompile.quant.matmul.activation_products`)."""
    from ..quant.matmul import activation_products as products

    return products(gm)


def _weight_param_names(m: nn.Module) -> set[str]:
    """Parameters stored at the layer's weight bits; the rest (bias, norms) stay 32-bit."""
    if isinstance(m, (_CONV, _CONV_T, nn.Linear, nn.Bilinear, nn.Embedding)):
        return {"weight"}
    if isinstance(m, nn.MultiheadAttention):
        return {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                "out_proj.weight"}
    return set()


class CostAnalysis(Pass):
    """Writes ``meta.COST`` on every node and ``meta.COST_TOTALS`` on the graph.

    Parameters are counted once per module even when it is called several times; a leaf
    module's parameters include its submodules'.
    """

    info = PassInfo("CostAnalysis", requires=(SHAPE,), provides=(COST, COST_TOTALS))

    def run(self, gm, ctx):
        seen: set[str] = set()
        totals = dict(macs=0, params=0, bops=0, weight_bytes=0.0, fp32_weight_bytes=0.0)
        from ..quant.matmul import PRODUCT_BITS

        quantized = any(BITS.has(n) for n in gm.graph.nodes)
        products = activation_products(gm) if quantized else set()
        extras = program_extras(gm) if quantized else StoredExtras()
        for node in gm.graph.nodes:
            bits = BITS.find(node) or _FP32
            wbits, abits = (bits.weight, bits.activation) if BITS.has(node) or not quantized \
                else (PRODUCT_BITS, PRODUCT_BITS) if node.name in products \
                else (FLOAT_BITS, FLOAT_BITS)
            params, wbytes, fp32_bytes = 0, 0.0, 0.0
            owner = None
            if node.op == "call_module":
                owner = node.target
            elif node.op == "get_attr" and isinstance(_attr(gm, node), nn.Parameter):
                owner = node.target
            if owner is not None and owner not in seen:
                seen.add(owner)
                if node.op == "call_module":
                    m = gm.get_submodule(owner)
                    params = sum(p.numel() for p in m.parameters())
                    fp32_bytes = params * 4.0
                    wbytes = fp32_bytes if not quantized else 0.0 if folded_bn(gm, node) or \
                        node.name in extras.folded or node.name in extras.shared \
                        else stored_bytes(m, BITS.find(node), EMBEDDING_BITS.find(node))
                else:  # quantized: stored by the ops that read it (extras.constants)
                    p = _attr(gm, node)
                    params, fp32_bytes = p.numel(), p.numel() * 4.0
                    wbytes = 0.0 if quantized else fp32_bytes
            wbytes += extras.node_bytes(node.name)
            macs = node_macs(gm, node)
            bops = macs * wbits * abits
            COST.set(node, NodeCost(macs, params, wbits, abits, bops, wbytes))
            totals["macs"] += macs
            totals["params"] += params
            totals["bops"] += bops
            totals["weight_bytes"] += wbytes
            totals["fp32_weight_bytes"] += fp32_bytes
        COST_TOTALS.set(gm, CostTotals(
            macs=totals["macs"], params=totals["params"], bops=totals["bops"],
            weight_bytes=totals["weight_bytes"], fp32_bops=totals["macs"] * 32 * 32,
            fp32_weight_bytes=totals["fp32_weight_bytes"]))
        return PassResult(gm, False)


def program_extras(gm: torch.fx.GraphModule) -> StoredExtras:
    """:func:`~pqcompile.passes.stored.stored_extras` of a graph with bits: its layers are the
    nodes with ``meta.BITS``."""
    from ..assignment import Assignment

    return stored_extras(gm, Assignment({n.name: BITS.get(n) for n in gm.graph.nodes
                                         if BITS.has(n)}))


def folded_bn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A batch norm that FoldBatchNorm folds into the conv/linear it reads (that layer's only
    user): it stores nothing of its own in the program (the layer's bias takes it)."""
    if node.op != "call_module" or \
            not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
        return False
    src = node.args[0] if node.args else None
    return isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1 \
        and isinstance(gm.get_submodule(src.target), (_CONV, nn.Linear))


def table_bytes(rows: int, dim: int, bits: int | None) -> float:
    """Bytes of an embedding table stored at ``bits`` (``None``: :data:`TABLE_BITS`): packed
    rows, plus an int32 multiplier per row below 8 bits (:mod:`pqcompile.quant.tables`)."""
    bits = TABLE_BITS if bits is None else bits
    if bits >= 8:
        return float(rows * dim * bits // 8)
    return float(rows * math.ceil(dim * bits / 8) + rows * 4)


def stored_bytes(m: nn.Module, bits: BitWidths | None, table_bits: int | None = None) -> float:
    """Bytes the integer program stores for module ``m`` (its layer bits, or ``None``): the
    module docstring's rules (packed weight + per-channel words; int8 or packed table
    (``table_bits``); float64 constants of a float island)."""
    if bits is not None and isinstance(m, (nn.Conv2d, nn.Linear)):
        out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        return m.weight.numel() * bits.weight / 8 + out * PER_CHANNEL_WORDS * 4
    if isinstance(m, nn.Embedding) and m.max_norm is None:
        return table_bytes(m.num_embeddings, m.embedding_dim, table_bits)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
        return m.num_features * AFFINE_CHANNEL_WORDS * 4
    numel = sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for b in m.buffers() if b.is_floating_point())
    return numel * ISLAND_BITS / 8


def program_constant_bytes(reference: torch.fx.GraphModule) -> int:
    """Bytes of the tensors the built program's float islands and exact ops capture as
    constants (what the library stores beside the weights file), each distinct island
    counted once, as the lowering shares them (:func:`pqcompile.lower.float_islands.island_key`).
    """
    from ..lower.float_islands import island_key
    from ..quant.qmodules import FloatOp

    seen, total = set(), 0
    for node in reference.graph.nodes:
        if node.op != "call_module":
            continue
        m = reference.get_submodule(node.target)
        if not isinstance(getattr(m, "fn", None), torch.fx.GraphModule):
            continue  # FloatOp islands and the exact ops on integer values carry a graph
        tensors = [t for n in m.fn.graph.nodes if n.op == "get_attr"
                   for t in [_attr(m.fn, n)] if isinstance(t, torch.Tensor)]
        shapes = [tuple(SHAPE.get(a).shape) if hasattr(SHAPE.find(a), "shape") else ()
                  for a in node.all_input_nodes]
        key = island_key(m.fn, shapes, with_values=True) if isinstance(m, FloatOp) \
            else node.name  # an exact op is translated once per node
        if key in seen:
            continue
        seen.add(key)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return int(total)


def analyze_cost(gm: torch.fx.GraphModule) -> CostTotals:
    """Run ShapeAnalysis (if needed) and CostAnalysis on ``gm``; return the totals."""
    from .shapes import ShapeAnalysis

    if not all(SHAPE.has(n) for n in gm.graph.nodes if n.op != "output"):
        gm = ShapeAnalysis()(gm).graph_module
    gm = CostAnalysis()(gm).graph_module
    return COST_TOTALS.get(gm)
