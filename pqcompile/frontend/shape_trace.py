"""Tracing with the example inputs' shapes fixed: for code that branches on tensor shapes.

``torch.fx`` traces with symbolic values, so ``batch, length = x.shape`` or
``if x.size(-1) % window: x = F.pad(...)`` cannot be traced: the shape is a proxy. pqcompile
compiles for fixed input shapes anyway, so :class:`ShapeTracer` runs the model on the example
inputs while it traces: every proxy carries its real value, and a tensor's ``shape``,
``size()``, ``dim()``, ``dtype``, ``device``, ``len()`` and iteration are answered with
concrete Python values. The graph is then specialized to those shapes (a batch of another
size needs another trace). Branching on tensor *values* still fails, as it must.

>>> import torch
>>> class Pad(torch.nn.Module):
...     def forward(self, x):
...         b, n = x.shape
...         return torch.nn.functional.pad(x, (0, 4 - n % 4)) if n % 4 else x
>>> gm = trace_with_shapes(Pad(), (torch.randn(2, 3),))
>>> tuple(gm(torch.randn(2, 3)).shape)
(2, 4)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_aggregate

_CONCRETE_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad")
_CONCRETE_METHODS = ("size", "dim", "numel", "nelement", "ndimension", "is_floating_point",
                     "is_contiguous", "element_size")


class _ValueProxy(torch.fx.Proxy):
    """A proxy that knows the value it stands for (``tracer.values``)."""

    @property
    def value(self) -> Any:
        return self.tracer.values[self.node]

    def __getattr__(self, k: str):
        if k in _CONCRETE_ATTRS and isinstance(self.value, torch.Tensor):
            return getattr(self.value, k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self):
        return iter([self[i] for i in range(len(self.value))])

    def __bool__(self) -> bool:
        if isinstance(self.value, torch.Tensor):
            raise torch.fx.proxy.TraceError(
                "symbolically traced variables cannot be used as inputs to control flow "
                f"(the branch depends on the values of {self.node.name!r}, not on its shape)")
        return bool(self.value)


class ShapeTracingMixin:
    """Makes an fx tracer execute as it traces (see the module doc); mix it in before the
    tracer class, then call :meth:`trace_with`."""

    values: dict[torch.fx.Node, Any]
    inputs: dict[str, Any]
    _executing: bool = False

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def _value(self, a: Any) -> Any:
        return map_aggregate(a, lambda v: self.values[v.node] if isinstance(v, torch.fx.Proxy)
                             else v)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        vargs, vkwargs = self._value(args), self._value(kwargs)
        if kind == "call_method" and target in _CONCRETE_METHODS and \
                isinstance(vargs[0], torch.Tensor):
            return getattr(vargs[0], target)(*vargs[1:], **vkwargs)  # a concrete value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if kind == "placeholder":
            name = target.lstrip("*")
            # fx names the placeholder of an argument fixed to its default ``{name}_{k}``
            value = self.inputs[name] if name in self.inputs else \
                self.inputs.get(name.rsplit("_", 1)[0])
        elif kind == "get_attr":
            self._executing = True
            try:
                value = self.root
                for atom in target.split("."):
                    value = getattr(value, atom)
            finally:
                self._executing = False
        elif kind == "call_function":
            value = target(*vargs, **vkwargs)
        elif kind == "call_method":
            value = getattr(vargs[0], target)(*vargs[1:], **vkwargs)
        elif kind == "call_module":
            self._executing = True  # the leaf runs eagerly: its inner calls make no nodes
            try:
                value = self.root.get_submodule(target)(*vargs, **vkwargs)
            finally:
                self._executing = False
        else:
            value = None
        self.values[proxy.node] = value
        return proxy

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._executing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._executing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def trace_with(self, root: torch.nn.Module, example_inputs: Sequence[torch.Tensor]
                   ) -> torch.fx.Graph:
        params = list(inspect.signature(root.forward).parameters.values())
        if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(*xs)
            self.values, self._executing = {}, False
            self.inputs = {params[0].name: tuple(example_inputs)}
            return self.trace(root)
        if len(example_inputs) > len(params):
            raise TypeError(f"{type(root).__name__}.forward takes {len(params)} inputs, "
                            f"{len(example_inputs)} example inputs given")
        self.values, self._executing = {}, False
        self.inputs = {p.name: x for p, x in zip(params, example_inputs)}
        concrete = {p.name: p.default for p in params[len(example_inputs):]
                    if p.default is not inspect.Parameter.empty}
        self.inputs.update(concrete)
        return self.trace(root, concrete_args=concrete)


class ShapeTracer(ShapeTracingMixin, torch.fx.Tracer):
    """``torch.fx.Tracer`` with :class:`ShapeTracingMixin`."""


def drop_default_arguments(gm: torch.fx.GraphModule, keep: int) -> torch.fx.GraphModule:
    """fx's checks on the arguments left at their defaults go, and so do their placeholders
    (all but the first ``keep``), where nothing reads them any more."""
    graph = gm.graph
    for n in reversed(list(graph.nodes)):
        if n.op == "call_function" and "assert" in getattr(n.target, "__name__", ""):
            graph.erase_node(n)
    graph.eliminate_dead_code()
    for ph in [n for n in graph.nodes if n.op == "placeholder"][keep:]:
        if not ph.users:
            graph.erase_node(ph)
    gm.recompile()
    return gm


def trace_with_shapes(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                      tracer: ShapeTracingMixin | None = None) -> torch.fx.GraphModule:
    """``model`` traced by ``tracer`` (default: a :class:`ShapeTracer`) on ``example_inputs``
    (positional; the other arguments of ``forward`` keep their defaults)."""
    tracer = tracer or ShapeTracer()
    with torch.no_grad():
        graph = tracer.trace_with(model, example_inputs)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    return drop_default_arguments(gm, len(example_inputs))
