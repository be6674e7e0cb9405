"""The torch.export frontend: ``trace(..., frontend="export")``, ``compile(..., frontend=...)``.

``torch.export`` runs ``forward`` on the example inputs (non-strict: Python control flow on
shapes and constants is taken as it runs, so code ``torch.fx.symbolic_trace`` rejects is
captured) and returns an ATen graph. The passes expect the forms symbolic tracing gives:
``call_module`` nodes for ``torch.nn`` layers (what is quantized, pruned and costed) and
torch/operator calls for the rest. :func:`export_graph` maps the ATen graph back:

- the ATen nodes that ran inside one ``torch.nn`` leaf module (``nn_module_stack``: e.g.
  ``aten.conv2d`` in ``features.0``, ``aten.batch_norm`` in ``features.1``) become one
  ``call_module`` node of that module, named as symbolic tracing names it;
- other ATen ops become the torch function of the same name (``aten.add.Tensor`` ->
  ``operator.add``, ``aten.mean.dim`` -> ``torch.mean``, ``aten.view`` -> ``Tensor.view``);
  an op with no such function is an :class:`~pqcompile.errors.UnsupportedOpError` naming it.

The graph is specialized to the example inputs' shapes (``pqc.shape_specialized``), like the
shape-specialized symbolic trace, and is checked against the model's output by ``trace``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ..errors import TraceError, UnsupportedOpError

_OPERATORS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
              "div": operator.truediv, "neg": operator.neg, "matmul": operator.matmul}
_SKIPPED = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


def export_graph(work: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                 leaf_paths: set[str], leaf_types: tuple[type, ...]) -> torch.fx.GraphModule:
    """``work`` captured by ``torch.export`` and mapped back to module calls (module
    docstring); ``leaf_paths``/``leaf_types``: modules kept whole besides the torch.nn ones."""
    from .tracer import _Tracer  # the same leaf rule as symbolic tracing

    try:
        with torch.no_grad():
            program = torch.export.export(work, tuple(example_inputs), strict=False)
    except Exception as exc:  # export raises many kinds, by case
        raise TraceError(f"torch.export cannot capture {type(work).__name__}.forward: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         "; try frontend='fx' (symbolic tracing, with leaf_modules=)") from exc
    aten = program.module()
    tracer = _Tracer(leaf_paths, leaf_types)
    modules = dict(work.named_modules())
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    attrs: dict[str, torch.fx.Node] = {}

    def leaf_of(node: torch.fx.Node) -> str | None:
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            module = modules.get(path)
            if path and module is not None and tracer.is_leaf_module(module, path):
                return path  # the outermost leaf: what symbolic tracing would call
        return None

    def value(arg: Any) -> Any:
        def one(a: Any) -> Any:
            if not isinstance(a, torch.fx.Node):
                return a
            if a.op == "get_attr":
                if a.target not in attrs:
                    _ensure_attr(work, aten, a.target)
                    attrs[a.target] = graph.get_attr(a.target)
                return attrs[a.target]
            return env[a]
        return torch.fx.node.map_aggregate(arg, one)

    nodes = list(aten.graph.nodes)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        i += 1
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr" or (node.op == "call_module" and node.target == "_guards_fn"):
            continue
        elif node.op == "output":
            flat = [value(a) for a in node.args[0]]
            graph.output(pytree.tree_unflatten(flat, program.call_spec.out_spec))
        elif node.op == "call_function" and (path := leaf_of(node)) is not None:
            group = [node]
            while i < len(nodes) and nodes[i].op == "call_function" and leaf_of(nodes[i]) == path:
                group.append(nodes[i])
                i += 1
            _call_leaf(graph, path, group, env, value)
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if name in _SKIPPED:
                continue
            op, target = _function(node)
            env[node] = graph.create_node(op, target, value(node.args), value(node.kwargs))
        else:
            raise UnsupportedOpError(f"torch.export produced node {node.name!r} ({node.op} "
                                     f"{node.target}), which pqcompile cannot map back; use "
                                     "frontend='fx'")
    return torch.fx.GraphModule(work, graph, type(work).__name__)


def _call_leaf(graph: torch.fx.Graph, path: str, group: list[torch.fx.Node],
               env: dict[torch.fx.Node, Any], value: Any) -> None:
    """One ``call_module`` of ``path`` for the ATen nodes ``group`` that ran inside it: its
    inputs are the values the group reads from outside (not its own parameters)."""
    inside = set(group)
    inputs: list[torch.fx.Node] = []
    for n in group:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    outputs = [n for n in group if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        raise UnsupportedOpError(
            f"torch.export: module {path!r} ran as {[n.name for n in group]} with "
            f"{len(outputs)} results used outside it; pqcompile maps a module back only when it "
            "returns one tensor: use frontend='fx' (or declare a leaf)")
    env[outputs[0]] = graph.call_module(path, tuple(value(a) for a in inputs))


def _function(node: torch.fx.Node) -> tuple[str, Any]:
    """The (fx op, target) symbolic tracing would record for an ATen call."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return "call_function", target  # operator.getitem and other Python callables
    name = target.overloadpacket.__name__
    if name in _OPERATORS and not node.kwargs:
        return "call_function", _OPERATORS[name]
    for owner in (torch, F):
        fn = getattr(owner, name, None)
        if callable(fn):
            return "call_function", fn
    if callable(getattr(torch.Tensor, name, None)):
        return "call_method", name
    raise UnsupportedOpError(f"torch.export produced {target} (node {node.name!r}), which has "
                             "no torch function to map it back to; use frontend='fx' or declare "
                             "the module computing it a leaf (leaf_modules=)")


def _ensure_attr(work: torch.nn.Module, aten: torch.fx.GraphModule, target: str) -> None:
    """A constant torch.export lifted (e.g. a tensor made in forward) copied onto ``work``."""
    try:
        work.get_submodule(target.rpartition(".")[0]).__getattr__(target.rpartition(".")[2])
        return
    except AttributeError:
        pass
    owner, _, leaf = target.rpartition(".")
    tensor = getattr(aten.get_submodule(owner) if owner else aten, leaf)
    (work.get_submodule(owner) if owner else work).register_buffer(leaf, tensor.detach().clone())
