"""What the integer program stores outside the layers' own parameters, predicted from the graph.

:class:`~pqcompile.passes.cost.CostAnalysis` and the solvers' problem
(:func:`pqcompile.solvers.graph.build_problem`) count a compressed model's weight bytes as the
built program stores them (``Compiled.totals["weight_bytes"]``: the weights file plus the float
islands' constants, :func:`~pqcompile.passes.cost.program_constant_bytes`). Three things the
program does beyond "each module stores its parameters" change that count:

* **Folded constants.** A node that depends on no model input (a position-embedding lookup of
  ``position_ids``, a token-type row, a parameter read by ``get_attr``) is computed once when the
  reference is built (:func:`pqcompile.quant.plan.make_plan`: kind ``const``); its parameters
  are not stored. Each op that reads such a value stores the value itself as a constant of its
  float island, in float64 (integer tensors at their dtype), with the dims along which it
  repeats reduced to 1 where the op broadcasts it (:func:`pqcompile.quant.builder._compact`).
  BERT's positions: the first ``L`` rows of the table at 8 bytes an entry, not the table.
* **Lookup tables.** A pointwise op of one quantized tensor (GELU, a division by a number, a
  sigmoid) runs as a table of :data:`LUT_ENTRIES` int8/uint8 codes (:mod:`pqcompile.quant.lut`);
  a softmax over the last dim of one 8-bit tensor runs in fixed point with a table of 256 int32
  exponentials (:data:`~pqcompile.quant.softmax.TABLE_BYTES`, :mod:`pqcompile.quant.softmax`).
* **Shared islands.** Float islands with the same code, input shapes and constant values are one
  function with one copy of its constants (:func:`pqcompile.lower.float_islands.island_key`).
  A layer norm over the last dim of a quantized tensor is not an island: it runs in fixed point
  (:mod:`pqcompile.quant.layernorm`) and stores its own int32 multipliers and shifts and int64
  offsets, 16 bytes a channel (what the module's two float64 parameters would).

What this cannot see, and so leaves out: a pointwise op or softmax whose input is wider than 8
bits (a residual sum widened by ``residual_bits``) or a pointwise function not finite on its
input codes (calibration decides; it stays a float island, no table), an island that falls back to float32 (constants at 4 bytes), and pruning of channels a
folded constant carries (the solvers hold it whole).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

LUT_ENTRIES = 256  # a lookup table: one int8/uint8 output code per 8-bit input code
FLOAT_CONST_BYTES = 8  # a floating constant of a float island: float64


@dataclass(frozen=True)
class StoredExtras:
    """Per node name: ``folded`` (computed from constants: stores nothing), ``constants``
    (bytes of the constant tensors it stores for its inputs), ``tables`` (bytes of its lookup
    table), ``shared`` (a float island another node's stores: its module stores nothing)."""

    folded: frozenset[str] = frozenset()
    constants: dict[str, float] = field(default_factory=dict)
    tables: dict[str, float] = field(default_factory=dict)
    shared: frozenset[str] = frozenset()

    def node_bytes(self, name: str) -> float:
        """Bytes ``name`` stores beyond its module's parameters."""
        return self.constants.get(name, 0.0) + self.tables.get(name, 0.0)


def program_plan(gm: torch.fx.GraphModule, assignment):
    """The integer program's plan (:func:`pqcompile.quant.plan.make_plan`) under
    ``assignment``, or ``None`` for a graph the plan refuses (the build names why)."""
    from ..errors import PQCompileError
    from ..quant.plan import make_plan

    try:
        return make_plan(gm, assignment)
    except (PQCompileError, ValueError, KeyError):
        return None


def program_kinds(gm: torch.fx.GraphModule, assignment) -> dict[str, str]:
    """Each node's kind in the integer program under ``assignment``; a graph the plan refuses
    gets ``const`` and ``float`` from its structure alone."""
    plan = program_plan(gm, assignment)
    return dict(plan.kind) if plan is not None else _structural_kinds(gm)


def _structural_kinds(gm: torch.fx.GraphModule) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for n in gm.graph.nodes:
        depends = n.op == "placeholder" or any(kinds[a.name] != "const"
                                               for a in n.all_input_nodes)
        kinds[n.name] = "float" if depends else "const"
    return kinds


class _Constants(torch.fx.Interpreter):
    """Evaluates the constant nodes of a graph (they read no input), in graph order."""

    def values(self, names: set[str]) -> dict[str, object]:
        with torch.no_grad():
            for n in self.module.graph.nodes:
                if n.name in names:
                    self.env[n] = self.run_node(n)
        return {n.name: v for n, v in self.env.items()}


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() \
        if data.numel() else ""


def _stored(v: torch.Tensor) -> float:
    return float(v.numel() * (FLOAT_CONST_BYTES if v.is_floating_point() else v.element_size()))


def _module_key(m: nn.Module) -> tuple:
    tensors = [(k, tuple(t.shape), _digest(t)) for k, t in
               list(m.named_parameters()) + [(k, b) for k, b in m.named_buffers()
                                             if b.is_floating_point()]]
    return (type(m).__qualname__, m.extra_repr(), tuple(tensors))


def stored_extras(gm: torch.fx.GraphModule, assignment) -> StoredExtras:
    """What ``gm`` (``SHAPE`` set) stores beyond its modules' parameters under ``assignment``
    (an :class:`~pqcompile.assignment.Assignment`; module docstring)."""
    from ..meta import SHAPE
    from ..quant.builder import _broadcasts, _compact  # the reference's own rules
    from ..quant.layernorm import integer_layer_norm
    from ..quant.softmax import TABLE_BYTES, integer_softmax

    plan = program_plan(gm, assignment)
    kinds = dict(plan.kind) if plan is not None else _structural_kinds(gm)
    # bits the plan refuses (activations not tied) have no program: their softmax tables are
    # counted as at 8/8, as the solver's problem counts them
    softmax_plan = plan if plan is not None else program_plan(
        gm, type(assignment).uniform(sorted(assignment.bits), 8, 8))
    const = {n.name for n in gm.graph.nodes if kinds.get(n.name) == "const"}
    readers = [n for n in gm.graph.nodes if n.name not in const and n.op != "output" and any(
        a.name in const for a in n.all_input_nodes)]
    needed = {a.name for n in readers for a in n.all_input_nodes if a.name in const}
    values = _Constants(gm).values(_closure(gm, needed)) if needed else {}

    constants, tables, shared, keys = {}, {}, set(), set()
    for n in gm.graph.nodes:
        kind = kinds.get(n.name)
        if kind == "lut":
            tables[n.name] = float(LUT_ENTRIES)
            continue
        if softmax_plan is not None and integer_softmax(gm, softmax_plan, n):
            tables[n.name] = float(TABLE_BYTES)
            continue
        if softmax_plan is not None and integer_layer_norm(gm, softmax_plan, n):
            continue  # its own multipliers, shifts and offsets (the module's bytes), unshared
        if kind not in ("float", "mask", "inlined") or n.name in const:
            continue
        # a FloatOp island stores floats in float64, compacted where it broadcasts them; a
        # region (float ops inlined into their reader's island) in float64 as they are; an
        # exact op on masks or ids at their own dtypes
        region = kind == "inlined" or any(kinds.get(a.name) == "inlined"
                                          for a in n.all_input_nodes)
        island = kind == "float" and not region
        stored, digests = 0.0, []

        def constant(a):
            nonlocal stored
            if not isinstance(a, torch.fx.Node) or a.name not in const:
                return ("in", tuple(SHAPE.get(a).shape)) if isinstance(a, torch.fx.Node) and \
                    hasattr(SHAPE.find(a), "shape") else ("arg", repr(a))
            v = values[a.name]
            if not isinstance(v, torch.Tensor):
                return ("value", repr(v))
            if island or region:
                v = _compact(v) if island and _broadcasts(n, a) else v
                stored += _stored(v)
            else:
                stored += float(v.numel() * v.element_size())
            digests.append(_digest(v))
            return ("const", tuple(v.shape), digests[-1])

        args = torch.fx.node.map_aggregate((n.args, n.kwargs), constant)
        if island:  # the lowering shares islands by code, shapes and constant values
            target = _module_key(gm.get_submodule(n.target)) if n.op == "call_module" \
                else (n.op, getattr(n.target, "__qualname__", str(n.target)))
            key = (target, repr(args))
            if key in keys:
                shared.add(n.name)
                continue
            keys.add(key)
        if stored:
            constants[n.name] = stored
    return StoredExtras(frozenset(const), constants, tables, frozenset(shared))


def _closure(gm: torch.fx.GraphModule, names: set[str]) -> set[str]:
    """``names`` and every node they are computed from."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out, todo = set(), list(names)
    while todo:
        x = todo.pop()
        if x not in out:
            out.add(x)
            todo.extend(a.name for a in nodes[x].all_input_nodes)
    return out
