"""Float islands: one op with no integer lowering, as a small flat fx graph in float64.

The same graph runs in the reference (torch) and is translated for the compiled program (TVM's
fx frontend), so both compute the op with the same float64 arithmetic. Modules are traced
through to functional calls, their parameters turned into float64 constants (the frontend
takes float64 constants but not float64 module parameters). A module whose ``forward`` cannot
be traced, or that the compiled program cannot run in float64, stays one call in float32
between casts (``precision == "float32"``). Batch and layer norms are written as the
elementwise ops they compute first, so they run in float64 (TVM's own ``layer_norm`` and
``batch_norm`` kernels are float32-only).
Each candidate is translated and legalized by TVM first (no code generation), so the choice is
made once, here, and the reference and the program always agree on it. That check runs once
per island key (:func:`pqcompile.lower.float_islands.island_key`: code, input shapes, constant
shapes and dtypes): a model's islands repeat (MaxViT: 234 islands, a few dozen keys).
Keyword arguments of ATen ops are passed positionally in the island's graph, where torch's
schema says where they go: TVM's frontend reads many ops' arguments by position only.

>>> import torch
>>> island = make_island(torch.nn.Hardswish(), "call_module", (Slot(0),), {}, [(2, 3)])
>>> island.precision, [n.op for n in island.fn.graph.nodes]
('float64', ['placeholder', 'call_function', 'output'])
>>> make_island(torch.nn.LayerNorm(3), "call_module", (Slot(0),), {}, [(2, 3)]).precision
'float64'
"""

from __future__ import annotations

import copy
import inspect
import operator
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.operator_schemas import get_signature_for_torch_op

from ..errors import UnsupportedOpError
from ..passes.fold_bn import bn_scale
from ..frontend.shape_trace import ShapeTracingMixin


class Slot(int):
    """Marks where the ``i``-th dequantized tensor goes in an op's arguments."""


class _FlatTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False


_FROM_SHAPE = ("new_zeros", "new_ones", "new_full", "new_empty")


class _ShapeFlatTracer(ShapeTracingMixin, _FlatTracer):
    """Traces through modules at fixed shapes. A tensor made from shapes alone
    (``x.new_zeros(h, w)``) is a constant of the island, not a node: code may fill it in place
    (swin's shifted-window attention mask), which a traced value cannot be."""

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        traced = []  # traced values among the arguments other than the tensor itself
        torch.fx.node.map_aggregate((args[1:], kwargs), lambda v: traced.append(v)
                                    if isinstance(v, torch.fx.Proxy) else None)
        if kind == "call_method" and target in _FROM_SHAPE and not traced and \
                isinstance(proxy, torch.fx.Proxy) and not proxy.node.users:
            value = self.values.pop(proxy.node)
            self.graph.erase_node(proxy.node)
            return value.clone()
        return proxy


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == "op" or super().is_leaf_module(m, qualname)


def _fill(template: Any, xs: tuple, consts: nn.Module) -> Any:
    if isinstance(template, Slot):
        return xs[int(template)]
    if isinstance(template, str) and template.startswith("\0const"):
        return getattr(consts, template[1:])
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(t, xs, consts) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v, xs, consts) for k, v in template.items()}
    return template


class _Op(nn.Module):
    def __init__(self, target: Any, kind: str, args: Any, kwargs: Any, n: int,
                 cast: bool) -> None:
        super().__init__()
        self.target, self.kind, self.n, self.cast = target, kind, n, cast
        self.args_t, self.kwargs_t = args, kwargs
        self.consts = nn.Module()

    def forward(self, *xs):
        if self.cast:
            xs = tuple(xs[i].to(torch.float32) for i in range(self.n))
        args, kwargs = _fill(self.args_t, xs, self.consts), _fill(self.kwargs_t, xs, self.consts)
        if self.kind == "call_module":
            y = self.op(*args, **kwargs)
        elif self.kind == "call_method":
            y = getattr(args[0], self.target)(*args[1:], **kwargs)
        else:
            y = self.target(*args, **kwargs)
        return y.to(torch.float64) if self.cast else y


@dataclass
class Island:
    fn: torch.fx.GraphModule
    precision: str


def _params_to_buffers(module: nn.Module) -> nn.Module:
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, p.detach().to(torch.float64))
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.to(torch.float64))
    return module


def layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``F.layer_norm`` written with elementwise ops and means, so that it runs in float64 in
    both torch and TVM (whose ``layer_norm`` kernel is float32-only)."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    d = x - x.mean(dims, keepdim=True)
    y = d / torch.sqrt((d * d).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class _LayerNorm(nn.Module):
    def __init__(self, m: nn.LayerNorm) -> None:
        super().__init__()
        self.shape, self.eps = tuple(m.normalized_shape), m.eps
        self.weight = None if m.weight is None else nn.Parameter(m.weight.detach().clone())
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone())

    def forward(self, x):
        return layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class _BatchNormEval(nn.Module):
    """An eval-mode batch norm as the per-channel affine map it is."""

    def __init__(self, m: nn.modules.batchnorm._BatchNorm, ndim: int) -> None:
        super().__init__()
        self.view = (1, -1) + (1,) * (ndim - 2)
        with torch.no_grad():
            scale = bn_scale(m)
            shift = (m.bias.double() if m.bias is not None else 0.0) - m.running_mean.double() \
                * scale
        self.scale, self.shift = nn.Parameter(scale), nn.Parameter(shift)

    def forward(self, x):
        return x * self.scale.reshape(self.view) + self.shift.reshape(self.view)


def _decomposed(target: Any, shapes: list[tuple[int, ...]]) -> Any:
    """Normalizations as the elementwise ops they compute (exact in float64 on both sides)."""
    if isinstance(target, nn.modules.batchnorm._BatchNorm) and not target.training and \
            target.running_mean is not None and len(shapes) == 1:
        return _BatchNormEval(target, len(shapes[0]))
    if type(target) is nn.LayerNorm:
        return _LayerNorm(target)
    if target is torch.nn.functional.layer_norm or target is torch.layer_norm:
        return layer_norm
    return target


def make_island(target: Any, kind: str, args: Any, kwargs: Any,
                shapes: list[tuple[int, ...]], consts: dict[str, torch.Tensor] | None = None,
                *, where: str = "float op") -> Island:
    """The island computing ``target`` (a module, function or method name).

    ``args``/``kwargs`` hold :class:`Slot` markers for the tensors (of ``shapes``), constant
    tensors as ``"\\0constK"`` (key ``constK`` of ``consts``) and plain Python values.
    """
    from ..lower.float_islands import island_key, translate_island  # (imports quant)

    n_inputs = len(shapes)
    errors = []
    original = target
    for cast in (False, True):
        target = original if cast else _decomposed(original, shapes)
        op = _Op(target if kind != "call_module" else None, kind, args, kwargs, n_inputs, cast)
        for name, value in (consts or {}).items():
            op.consts.register_buffer(name, value.to(torch.float32 if cast else torch.float64)
                                      if value.is_floating_point() else value)
        if kind == "call_module":
            module = copy.deepcopy(target)
            op.op = module.float() if cast else _params_to_buffers(module)
        tracer = _LeafTracer() if cast else _ShapeFlatTracer()
        try:
            if cast:
                graph = tracer.trace(op)
            else:  # shapes are fixed here: code branching on them traces too
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    graph = tracer.trace_with(op, [torch.randn(sh, dtype=torch.float64,
                                                               generator=g) for sh in shapes])
            _name_inputs(graph, n_inputs)
            _positional_args(graph, None if cast else tracer.values)
            fn = torch.fx.GraphModule(op, graph, "FloatIsland")
            key = island_key(fn, shapes)
            if key not in _CHECKED:
                try:
                    translate_island(fn, shapes, legalize=True)
                    _CHECKED[key] = None
                except Exception as exc:  # noqa: BLE001 (see below)
                    _CHECKED[key] = exc.with_traceback(None)  # keeps no frames alive
            if _CHECKED[key] is not None:
                raise _CHECKED[key]
        except Exception as exc:  # noqa: BLE001 (fx and TVM raise many types; kept, re-raised)
            last = (str(exc).strip().splitlines() or [""])[-1]
            errors.append(f"{type(exc).__name__}: {last}")
            continue
        return Island(fn, "float32" if cast else "float64")
    raise UnsupportedOpError(
        f"{where} has no integer lowering and cannot run in float in the compiled program "
        f"either: in float64: {errors[0]}; in float32: {errors[-1]}. Make it a leaf module "
        "TVM's fx frontend knows, or replace it")


# Island key (code, input shapes, constant shapes and dtypes) -> what TVM's check raised, or
# None: it built. The check translates and legalizes; islands repeat (every GELU of a stage).
_CHECKED: dict[tuple, Exception | None] = {}


def _signatures(target: Any) -> list[inspect.Signature]:
    if not isinstance(target, types.BuiltinFunctionType):
        return []
    try:
        return get_signature_for_torch_op(target) or []
    except Exception:  # noqa: BLE001 (no schema: nothing to normalize by)
        return []


def _layout(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[list, dict] | None:
    """``args``/``kwargs`` bound to ``sig``, positional up to the last positional-or-keyword
    parameter given (earlier ones at their defaults); keyword-only ones stay keywords."""
    params = list(sig.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) for p in params):
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    last = max((i for i, p in enumerate(positional) if p.name in bound.arguments), default=-1)
    new_args = [bound.arguments.get(p.name, p.default) for p in positional[:last + 1]]
    new_kwargs = {k: v for k, v in bound.arguments.items()
                  if sig.parameters[k].kind is inspect.Parameter.KEYWORD_ONLY}
    return new_args, new_kwargs


def _positional_args(graph: torch.fx.Graph, values: dict | None) -> None:
    """Pass the keyword arguments of ATen ops positionally where their schema allows.

    TVM's fx frontend reads many ops' arguments by position only (``F.conv2d(x, w, b,
    padding=1)`` would lose its padding). A keyword is moved only when every schema of the op
    that accepts the call agrees on where it goes, and the values stand for what torch ran
    (``values``: the traced value of each node, where known, to pick the schema by types).
    ``x[i]`` on a tensor becomes ``torch.select(x, 0, i)``: the frontend's ``x[i]`` keeps the
    axis (a slice of one)."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and values is not None \
                and isinstance(n.args[1], int) and isinstance(n.args[0], torch.fx.Node):
            x, i = n.args
            value = values.get(x)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                i %= value.shape[0]
            if (x.op == "placeholder" and i >= 0) or isinstance(value, torch.Tensor):
                n.target, n.args = torch.select, (x, 0, i)  # the frontend ignores x[int]
        if n.op != "call_function" or not n.kwargs:
            continue
        layouts, names = [], set()
        for sig in _signatures(n.target):
            layout = _layout(sig, tuple(n.args), dict(n.kwargs))
            if layout is not None and _types_fit(sig, layout, values):
                layouts.append(layout)
                names.add((tuple(sig.parameters)[:len(layout[0])], tuple(layout[1])))
        if len(names) == 1 and not layouts[0][1].keys() - n.kwargs.keys():
            n.args, n.kwargs = tuple(layouts[0][0]), layouts[0][1]


def _types_fit(sig: inspect.Signature, layout: tuple[list, dict], values: dict | None) -> bool:
    """Whether tensors go to tensor parameters and other values elsewhere (a coarse check that
    tells apart overloads such as ``sum(input, dim)`` and ``sum(input, *, dtype)``)."""
    args, kwargs = layout
    bound = dict(zip(sig.parameters, args)) | kwargs
    for name, v in bound.items():
        is_tensor = isinstance(v, torch.fx.Node) and (
            values is None or v not in values or isinstance(values[v], torch.Tensor))
        annotation = str(sig.parameters[name].annotation)
        wants_tensor = "Tensor" in annotation and "List" not in annotation
        if isinstance(v, torch.fx.Node) and is_tensor != wants_tensor:
            return False
    return True


def _name_inputs(graph: torch.fx.Graph, n_inputs: int) -> None:
    """``forward(*xs)`` traces to one varargs placeholder; give the island n plain inputs."""
    ph = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_before(ph):
        inputs = [graph.placeholder(f"in{i}") for i in range(n_inputs)]
    for user in list(ph.users):
        if user.op == "call_function" and user.target.__name__ == "getitem":
            user.replace_all_uses_with(inputs[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(ph)
    graph.lint()
