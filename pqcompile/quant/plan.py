"""Planning: which op each node becomes in the integer program, and how each tensor is stored.

Every tensor-valued node that depends on an input is *quantized*. Nodes are sorted into:

* roots, which produce a new integer tensor with its own scale: ``input``, ``conv``, ``linear``,
  ``add``, ``cat``, ``avgpool`` (incl. adaptive pooling and ``mean``), ``embedding`` (a lookup
  of integer ids, e.g. tokens, which come in as ``index`` inputs), ``lut`` (a pointwise op of
  one tensor, a table of its codes), ``mul`` (the product of two tensors; see
  :mod:`pqcompile.quant.lut`), ``matmul`` (a matrix product of two tensors, e.g. attention's
  ``q @ k^T``: :mod:`pqcompile.quant.matmul`), ``affine`` (an eval-mode batch norm, an
  integer per-channel affine map: :mod:`pqcompile.quant.affine`) and ``float`` (an op with no
  integer lowering, run dequantize -> float -> quantize);
* pass-through ops, which share their input's scale: ``maxpool``, ``view`` (flatten, reshape,
  view, squeeze, unsqueeze, permute, transpose, channel shuffle, indexing with integers,
  slices, ``None`` and ``...``, and taking one item of a split), ``split`` (chunk, split,
  tensor_split, unbind: tuple-valued, read only through ``getitem``), ``identity`` (Identity,
  Dropout, contiguous), ``clip`` (a ReLU/ReLU6 that could not be folded), ``pad`` (a constant
  pad) and ``gather`` (reflect/replicate/circular pads, nearest resampling; see
  :mod:`pqcompile.quant.movement`);
* ``fused``: a ReLU/ReLU6 folded into the clamp of its producer (a root other than input or
  float whose only user it is);
* ``const`` (depends on no input; its value is captured) and ``meta`` (non-tensor values such
  as ``x.size(0)``, kept as they are);
* ``mask``: an op on integer inputs (``index``) and other ``mask`` values only, e.g. an
  attention mask turned into an additive bias: not quantized, computed exactly as written
  (:mod:`pqcompile.quant.exact`); a float op reading one gets it cast to float64;
* ``inlined``: a float op reading an unquantized (``index``/``mask``) value whose only reader
  is a float op: computed inside that reader's island, never quantized itself
  (``Plan.inlined`` maps it to the reader), so e.g. a mask bias never takes a tensor's scale.

A *domain* is a root and the pass-through ops reading it: one scale, one set of bits.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> from pqcompile.passes import ShapeAnalysis
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
...                                torch.nn.Flatten()), (torch.randn(1, 3, 5, 5),))
>>> gm = ShapeAnalysis()(gm).graph_module
>>> p = make_plan(gm, Assignment.uniform(["_0"], weight=4, activation=6))
>>> [p.kind[n] for n in ("input_1", "_0", "_1", "_2")], p.bits["input_1"], p.signed["_0"]
(['input', 'conv', 'fused', 'view'], 6, False)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..assignment import Assignment
from ..errors import UnsupportedOpError
from ..frontend.attention import AttentionSoftmax
from ..meta import SHAPE
from .affine import is_affine_norm
from .lut import elementwise_function, is_product, nonnegative
from .matmul import is_integer_product
from .movement import movement_args
from .op_args import (
    _arg,
    _avgpool_args,
    _conv_args,
    _inert_drop,
    _is_tensor,
    _maxpool_args,
    _relu_kind,
    _shape,
    is_basic_index,
    is_split,
)

ROOTS = ("input", "conv", "linear", "add", "cat", "avgpool", "float", "embedding", "lut", "mul",
         "affine", "matmul")
PASS_THROUGH = ("maxpool", "view", "identity", "clip", "split", "pad", "gather")
FUSABLE = ("conv", "linear", "add", "cat", "avgpool", "mul", "affine", "matmul")

_ADD = (operator.add, operator.iadd, torch.add)
_CAT = (torch.cat, torch.concat)
_VIEW_FN = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
            torch.transpose, torch.swapaxes, torch.swapdims)
_VIEW_METHODS = ("flatten", "reshape", "view", "squeeze", "unsqueeze", "permute", "transpose",
                 "swapaxes", "swapdims")
_SHUFFLE_FN = (F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle)
_NONNEG = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, torch.sigmoid, F.sigmoid, F.hardsigmoid,
           F.softmax, torch.softmax, torch.exp, "sigmoid", "softmax", "exp", AttentionSoftmax)


@dataclass
class Plan:
    kind: dict[str, str] = field(default_factory=dict)
    op: dict[str, str] = field(default_factory=dict)       # readable op, for reports
    fused: dict[str, str] = field(default_factory=dict)    # producer -> folded relu node
    relu6: set[str] = field(default_factory=set)           # relu nodes that are ReLU6
    root: dict[str, str] = field(default_factory=dict)     # quantized node -> its domain root
    bits: dict[str, int] = field(default_factory=dict)     # root -> activation bits
    signed: dict[str, bool] = field(default_factory=dict)  # root -> signedness
    args: dict[str, dict] = field(default_factory=dict)    # node -> op parameters
    inlined: dict[str, str] = field(default_factory=dict)  # float op -> the island computing it

    def observe_at(self, root: str) -> str:
        """The node whose float value sets a root's scale (its folded ReLU, if any)."""
        return self.fused.get(root, root)


def op_name(gm: torch.fx.GraphModule, n: torch.fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    return getattr(n.target, "__name__", str(n.target))


def _classify(gm, n, assignment: Assignment, quantized: set[str], plan: Plan) -> str:
    index = [a for a in n.all_input_nodes if plan.kind.get(a.name) in ("index", "mask")]
    if index:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, nn.Embedding) and mod.max_norm is None and len(n.all_input_nodes) == 1:
            return "embedding"
        if isinstance(mod, nn.Embedding):
            raise UnsupportedOpError(
                f"node {n.name!r} (Embedding) looks up {index[0].name!r} with max_norm or "
                "further inputs; only plain lookups (max_norm=None) lower: drop max_norm")
        # integer-derived values only: exact as written; with quantized tensors: a float op
        return "float" if any(a.name in quantized for a in n.all_input_nodes) else "mask"
    if n.op == "call_function" and n.target is operator.getitem and \
            isinstance(n.args[0], torch.fx.Node) and n.args[0].name in quantized:
        if plan.kind[n.args[0].name] == "split" or (
                _is_tensor(n.args[0]) and is_basic_index(n.args[1])):
            return "view"
    tensor_ins = [a for a in n.all_input_nodes if _is_tensor(a)]
    all_quantized = all(a.name in quantized for a in tensor_ins)
    mod = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(mod, (nn.Conv2d, nn.Linear)) and all_quantized:
        if n.name not in assignment.bits:
            plan.op[n.name] = f"{type(mod).__name__} (not in the assignment)"
            return "float"
        args = _conv_args(mod) if isinstance(mod, nn.Conv2d) else {}
        if args is None:
            plan.op[n.name] = f"Conv2d (padding_mode {mod.padding_mode!r} or padding " \
                f"{mod.padding!r})"
            return "float"
        plan.args[n.name] = args
        return "conv" if isinstance(mod, nn.Conv2d) else "linear"
    if mod is not None and len(tensor_ins) == 1 and all_quantized and \
            is_affine_norm(mod, len(_shape(n))):
        return "affine"
    relu = _relu_kind(gm, n)
    if relu is not None and len(tensor_ins) == 1 and all_quantized:
        if relu == "relu6":
            plan.relu6.add(n.name)
        return "relu"
    if not all_quantized or len(tensor_ins) == 0:
        return "float"
    if is_integer_product(n, lambda a: a.name in quantized):
        return "matmul"
    if is_product(n) and all(a in tensor_ins for a in n.args):
        return "mul"
    if elementwise_function(gm, n) is not None:
        return "lut"
    if (n.op == "call_function" and n.target in _ADD) or (
            n.op == "call_method" and n.target in ("add", "add_")):
        if len(n.args) == 2 and not n.kwargs and all(
                isinstance(a, torch.fx.Node) and _is_tensor(a) for a in n.args):
            return "add"  # also x + x: both operands the same node
        return "float"
    if n.op == "call_function" and n.target in _CAT and isinstance(n.args[0], (list, tuple)):
        dim = _arg(n, 1, "dim", 0)
        plan.args[n.name] = {"dim": dim % len(_shape(n))}
        return "cat"
    pool = _avgpool_args(gm, n)
    if pool is not None:
        plan.args[n.name] = pool
        return "avgpool"
    pool = _maxpool_args(gm, n)
    if pool is not None:
        plan.args[n.name] = pool
        return "maxpool"
    if isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)) or (
            n.op == "call_method" and n.target in ("contiguous", "clone")) or _inert_drop(n):
        return "identity"
    if isinstance(mod, (nn.Flatten, nn.ChannelShuffle)) or (
            n.op == "call_function" and n.target in _VIEW_FN + _SHUFFLE_FN) or (
            n.op == "call_method" and n.target in _VIEW_METHODS):
        return "view"
    if len(tensor_ins) == 1 and n.args and n.args[0] is tensor_ins[0]:
        moved = movement_args(gm, n, _shape(tensor_ins[0]))
        if moved is not None:
            plan.args[n.name] = moved[1]
            return moved[0]
    return "float"


_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def _tuple_valued_error(gm: torch.fx.GraphModule, n: torch.fx.Node) -> UnsupportedOpError:
    """What to say about a node returning several tensors (other than a split read through
    indexing): recurrent layers by name, other ops by what to replace them with."""
    what = f"node {n.name!r} ({op_name(gm, n)}) returns several tensors"
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _RECURRENT):
        return UnsupportedOpError(
            f"{what}: recurrent layers (nn.LSTM, nn.GRU, nn.RNN and their cells) have no "
            f"integer lowering and cannot run in float inside a compiled model; compile the "
            f"layers before and after it as separate models and run the recurrent layer in "
            f"torch between them")
    return UnsupportedOpError(
        f"{what}; ops returning a tuple have no integer lowering (only split, chunk and unbind, "
        f"read through indexing, do): replace it with ops returning one tensor (e.g. "
        f"torch.amax(x, dim) for x.max(dim).values), or run it outside the compiled model")


def _inline_float_readers(gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Float ops reading an unquantized value (a mask, an integer input, or an inlined op)
    whose one reader is a float op become part of that reader's island (kind ``inlined``)."""
    for n in gm.graph.nodes:
        if plan.kind[n.name] != "float" or len(n.users) != 1:
            continue
        user = next(iter(n.users))
        raw = any(plan.kind[a.name] in ("index", "mask", "inlined") for a in n.all_input_nodes)
        if raw and plan.kind[user.name] == "float":
            plan.kind[n.name] = "inlined"
            plan.inlined[n.name] = user.name


def make_plan(gm: torch.fx.GraphModule, assignment: Assignment) -> Plan:
    """Classify every node, fold ReLUs, and give each tensor domain its bits and signedness.

    Needs ``SHAPE`` on the graph (run :class:`~pqcompile.passes.ShapeAnalysis` first).
    """
    assignment.validate(gm)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            SHAPE.get(n)  # names ShapeAnalysis when shapes are missing
    plan, quantized = Plan(), set()
    for n in gm.graph.nodes:
        depends = n.op == "placeholder" or any(a.name in quantized or plan.kind.get(a.name) in
                                               ("meta", "index", "mask")
                                               for a in n.all_input_nodes)
        if n.op == "output":
            kind = "output"
        elif not depends:
            kind = "const"
        elif not _is_tensor(n):
            if SHAPE.find(n) is not None and is_split(n) and n.args[0].name in quantized:
                kind = "split"
            elif SHAPE.find(n) is not None:
                raise _tuple_valued_error(gm, n)
            else:
                kind = "meta"
        elif n.op == "placeholder":
            kind = "input" if SHAPE.get(n).dtype.is_floating_point else "index"
        else:
            kind = _classify(gm, n, assignment, quantized, plan)
        plan.kind[n.name] = kind
        plan.op.setdefault(n.name, op_name(gm, n) if n.op != "placeholder" else "input")
        if kind not in ("output", "const", "meta", "index", "mask"):
            quantized.add(n.name)
    _inline_float_readers(gm, plan)

    for n in gm.graph.nodes:
        if plan.kind[n.name] != "relu":
            continue
        src = n.all_input_nodes[0]
        if plan.kind[src.name] in FUSABLE and len(src.users) == 1:
            plan.fused[src.name] = n.name
            plan.kind[n.name] = "fused"
        else:
            plan.kind[n.name] = "clip"

    readers: dict[str, list[tuple[str, int]]] = {}
    for n in gm.graph.nodes:
        kind = plan.kind[n.name]
        if kind in ROOTS:
            plan.root[n.name] = n.name
        elif kind in PASS_THROUGH:
            plan.root[n.name] = plan.root[n.all_input_nodes[0].name]
        elif kind == "fused":
            plan.root[n.name] = n.all_input_nodes[0].name
        if kind in ("conv", "linear"):
            bw = assignment.bits[n.name]
            for what, b in (("weight", bw.weight), ("activation", bw.activation)):
                if not 2 <= b <= 8:
                    raise ValueError(
                        f"layer {n.name!r}: {what} bits {b} are outside 2..8, the range of the "
                        "integer lowering; leave the layer out of the assignment to keep it "
                        "in float")
            src = plan.root[n.all_input_nodes[0].name]
            readers.setdefault(src, []).append((n.name, bw.activation))

    for root, layers in readers.items():
        acts = {b for _, b in layers}
        if len(acts) > 1:
            via = sorted(k for k, r in plan.root.items() if r == root and k != root)
            raise ValueError(
                f"layers {[f'{name} ({b} bits)' for name, b in layers]} read the tensor of node "
                f"{root!r}" + (f" (directly or through {via})" if via else "") +
                ": a tensor is quantized once, give them equal activation bits")
        plan.bits[root] = acts.pop()

    for n in gm.graph.nodes:
        kind = plan.kind[n.name]
        if kind not in ROOTS:
            continue
        plan.bits.setdefault(n.name, 8)
        ins = [plan.root[a.name] for a in n.all_input_nodes if a.name in plan.root]
        if n.name in plan.fused:
            signed = False
        elif kind in ("add", "cat", "avgpool", "mul", "matmul"):
            signed = any(plan.signed[r] for r in ins)
        elif kind == "lut":
            signed = not nonnegative(elementwise_function(gm, n))
        elif kind == "float":
            mod = gm.get_submodule(n.target) if n.op == "call_module" else None
            signed = not (isinstance(mod, tuple(t for t in _NONNEG if isinstance(t, type)))
                          or (mod is None and n.target in _NONNEG))
        else:
            signed = True
        plan.signed[n.name] = signed
    return plan


def residual_sums(gm: torch.fx.GraphModule, plan: Plan) -> list[str]:
    """The ``add`` roots whose tensor no conv/linear layer reads (directly or through
    pass-through ops): only float ops, adds and outputs do, so they may be wider than 8 bits
    (the integer kernels take 8-bit inputs)."""
    read = {plan.root[n.all_input_nodes[0].name] for n in gm.graph.nodes
            if plan.kind[n.name] in ("conv", "linear")}
    read |= {plan.root[n] for n, k in plan.kind.items()  # integer kernels of 8-bit tensors
             if k in ("maxpool", "clip", "pad", "gather", "fused")}
    read |= {plan.root[a.name] for n in gm.graph.nodes if plan.kind[n.name] == "matmul"
             for a in n.all_input_nodes}  # integer products take 8-bit operands
    return [r for r, k in plan.kind.items() if k == "add" and r not in read]


def layer_plan(gm: torch.fx.GraphModule, layers: Sequence[str]) -> Plan:
    """The plan of ``gm`` with ``layers`` quantized; its domains (which tensor each node's
    value shares, and their signedness) do not depend on the bits."""
    return make_plan(gm, Assignment.uniform(layers, 8, 8))


def activation_sources(gm: torch.fx.GraphModule, layers: Sequence[str],
                       plan: Plan | None = None) -> dict[str, str]:
    """For each conv/linear layer, the node whose quantized tensor it reads: its input, traced
    back through pass-through ops (pooling by max, views, ReLUs), since a tensor is quantized
    once and the layers reading it share its activation bits."""
    plan = plan or layer_plan(gm, layers)
    nodes = {n.name: n for n in gm.graph.nodes}
    return {name: plan.root[nodes[name].all_input_nodes[0].name] for name in layers}
