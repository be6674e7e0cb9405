"""Frontend: a ``torch.nn.Module`` and example inputs to a ``torch.fx.GraphModule``.

The user's model is deep-copied first and never touched. Code ``torch.fx`` cannot trace
(data-dependent control flow, calls on proxies that Python cannot intercept) fails with the
module path and the user's source line, and names the two ways out: declare the module a leaf
(``leaf_modules=``), or let pqcompile do it (``fallback="leaf"``), which keeps the untraceable
submodules as opaque nodes (not pruned, not quantized). Code that only branches on tensor
*shapes* is traced again with the example inputs' shapes fixed
(:mod:`pqcompile.frontend.shape_trace`; ``gm.meta["pqc.shape_specialized"]`` says so).
``nn.MultiheadAttention`` modules are traced as the layers they compute
(:mod:`pqcompile.frontend.attention`), unless declared leaves.
Convolutions and linear layers computed from a module's own parameters (``F.conv2d(x,
self.weight, ...)`` in an overridden ``forward``, ``F.linear``), and ``nn.Conv1d``, become
``nn.Conv2d``/``nn.Linear`` layers of the traced graph (:mod:`pqcompile.passes.layer_discovery`;
``gm.meta["pqc.layer_discovery"]`` lists them, and why any other conv-like node runs in float).

>>> import torch
>>> gm = trace(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), (torch.randn(1, 3),))
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import copy
import difflib
import inspect
import linecache
import traceback
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import torch
import torch.fx

from .attention import decompose_attention
from ..errors import ExampleInputError, ModelError, OptionError, TraceError
from ..meta import EXAMPLE_INPUTS, LAYER_DISCOVERY, SOURCE_MODEL, ExampleInputs
from ..passes.base import TRACE_PROVIDES, mark_provided
from ..passes.layer_discovery import discover_layers
from .shape_trace import ShapeTracingMixin, drop_default_arguments

_FALLBACKS = (None, "leaf")
FRONTENDS = ("fx", "export")  # torch.fx symbolic tracing; torch.export (frontend_export.py)


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps the stack of module paths, to say where tracing failed."""

    def __init__(self, leaf_paths: Iterable[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_paths = set(leaf_paths)
        self.leaf_types = leaf_types
        self.path_stack: list[str] = []

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.path_stack.append(qualname)
        out = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()
        return out


def forward_parameters(model: torch.nn.Module) -> list[str]:
    """The names of ``model.forward``'s parameters that can be passed positionally."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def inputs_by_name(model: torch.nn.Module, named: Mapping[str, Any], what: str,
                   skip: Iterable[str] = ()) -> tuple[Any, ...]:
    """``named`` (e.g. a tokenizer's ``{"input_ids": ..., "attention_mask": ...}``) as the
    positional inputs of ``model.forward``: its keys must be the first parameters, in any
    order; keys in ``skip`` (labels) are left out. ``what`` names the dict in errors."""
    params = forward_parameters(model)
    keys = [k for k in named if k not in set(skip)]
    unknown = [k for k in keys if k not in params]
    if unknown:
        close = {k: difflib.get_close_matches(k, params, n=1) for k in unknown}
        hint = "; ".join(f"did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise ExampleInputError(
            f"{what} has key(s) {unknown} that {type(model).__name__}.forward does not take "
            f"(its parameters: {params[:8]}){'; ' + hint if hint else ''}")
    first = params[:len(keys)]
    missing = [p for p in first if p not in keys]
    if missing:
        raise ExampleInputError(
            f"{what} gives {keys} but not {missing}, which forward() takes before them; "
            f"inputs are passed by position, so give the first {len(keys)} parameters "
            f"({first}) or wrap the model in a module whose forward takes just yours")
    return tuple(named[p] for p in first)


def check_model_and_inputs(model: Any, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``model`` is an eager module and ``example_inputs`` a tensor, a non-empty tuple of
    tensors, or a dict of them keyed by ``forward``'s parameter names (returned as a tuple in
    parameter order); otherwise an error saying what to pass."""
    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function in "
            "an nn.Module whose forward calls it")
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError("model is a TorchScript module; pass the eager nn.Module instead")
    if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        raise ModelError(f"model is a torch.compile'd module ({type(model).__name__}), which "
                         f"torch.fx cannot trace; pass the eager module it wraps: "
                         f"model._orig_mod")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping) and example_inputs:
        example_inputs = inputs_by_name(model, example_inputs, "example_inputs")
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ExampleInputError(
            "example_inputs must be a non-empty tuple of tensors, one per forward() argument, "
            f"or a dict of them by parameter name, got {type(example_inputs).__name__}")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise ExampleInputError(
                f"example_inputs[{i}] is {type(t).__name__}, not a torch.Tensor; convert it "
                "with torch.as_tensor(...) (one tensor per forward() argument)")
        if t.dim() > 0 and 0 in t.shape:
            what = "batch size 0" if t.shape[0] == 0 else "a dimension of size 0"
            raise ExampleInputError(
                f"example_inputs[{i}] has {what} (shape {tuple(t.shape)}): there is nothing to "
                f"trace or calibrate on; pass at least one real sample per input, in the shape "
                f"the compiled program will take (batch size included)")
    return tuple(example_inputs)


def check_leaf_modules(model: torch.nn.Module, leaf_modules: Any
                       ) -> tuple[set[str], tuple[type, ...]]:
    """``leaf_modules`` as (module paths, module classes); an :class:`OptionError` names an
    item that is neither a path of ``model``'s submodules nor an ``nn.Module`` class."""
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, Iterable):
        raise OptionError(f"leaf_modules must be a list of module paths or classes, e.g. "
                          f"[{leaf_modules!r}], got {type(leaf_modules).__name__}")
    items = list(leaf_modules)
    bad = [m for m in items if not isinstance(m, str) and not (
        isinstance(m, type) and issubclass(m, torch.nn.Module))]
    if bad:
        raise OptionError(f"leaf_modules items must be module paths such as 'layer1.0' or "
                          f"nn.Module classes, got {bad!r}")
    names = dict(model.named_modules())
    for p in items:
        if isinstance(p, str) and p not in names:
            close = difflib.get_close_matches(p, list(names), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise OptionError(f"leaf_modules: model has no submodule {p!r}; {hint}known paths "
                              f"start with {sorted(names)[1:6]}")
    return ({m for m in items if isinstance(m, str)},
            tuple(m for m in items if isinstance(m, type)))


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and pqcompile, as 'file:line: code'."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        fname = fr.filename.replace("\\", "/")
        if "/torch/" in fname or "/pqcompile/" in fname:
            continue
        code = (fr.line or linecache.getline(fr.filename, fr.lineno or 0)).strip()
        return f"{fr.filename}:{fr.lineno} in {fr.name}: {code}"
    return "unknown location"


class _ShapeTracer(ShapeTracingMixin, _Tracer):
    """:class:`_Tracer` that runs the example inputs as it traces (shapes are concrete)."""


def _run_trace(model: torch.nn.Module, leaf_paths: set[str], leaf_types: tuple[type, ...],
               example_inputs: Sequence[torch.Tensor] | None = None) -> torch.fx.GraphModule:
    """fx's symbolic trace; with ``example_inputs``, the shape-specialized one."""
    tracer = (_Tracer if example_inputs is None else _ShapeTracer)(leaf_paths, leaf_types)
    try:
        if example_inputs is None:
            graph = tracer.trace(model)
        else:
            with torch.no_grad():
                graph = tracer.trace_with(model, example_inputs)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... by case
        exc.pqc_module_path = tracer.path_stack[-1] if tracer.path_stack else ""
        raise
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    return gm if example_inputs is None else drop_default_arguments(gm, len(example_inputs))


def trace(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
          leaf_modules: Iterable[str | type] = (), fallback: str | None = None,
          check: bool = True, frontend: str = "fx") -> torch.fx.GraphModule:
    """Trace ``model`` (a deep copy of it, in eval mode) to a ``GraphModule``.

    ``leaf_modules``: module paths (``"layer1.0"``) or classes kept as single opaque nodes.
    ``fallback="leaf"``: on a trace failure inside a submodule, make that submodule a leaf and
    retry, repeatedly. ``check``: run the traced graph on ``example_inputs`` and compare with
    the model's own output, so a wrong input shape is reported here with the failing node.
    ``frontend="export"``: capture with ``torch.export`` instead of symbolic tracing
    (:mod:`pqcompile.frontend.torch_export`), the same annotated graph for the passes.
    """
    example_inputs = check_model_and_inputs(model, example_inputs)
    if frontend not in FRONTENDS:
        raise OptionError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
    leaf_paths, leaf_types = check_leaf_modules(model, leaf_modules)
    names = dict(model.named_modules())

    work = copy.deepcopy(model).eval()
    reference = work
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in work.modules()) and \
            torch.nn.MultiheadAttention not in leaf_types:
        reference = copy.deepcopy(work)  # the check compares with the module as written
        decompose_attention(work, skip=leaf_paths)
    if _Tracer((), ()).is_leaf_module(work, ""):
        # A bare torch.nn layer would trace to functional calls; keep it a module node.
        work = torch.nn.Sequential(work)
    specialized = False
    if frontend == "export":
        from .torch_export import export_graph

        gm, specialized = export_graph(work, example_inputs, leaf_paths, leaf_types), True
    while frontend == "fx":
        try:
            try:
                gm = _run_trace(work, leaf_paths, leaf_types)
            except Exception:  # noqa: BLE001 (retried with shapes; its error is reported)
                gm = _run_trace(work, leaf_paths, leaf_types, example_inputs)
                specialized = True
            break
        except Exception as exc:
            path = getattr(exc, "pqc_module_path", "")
            where = _user_frame(exc)
            if fallback == "leaf" and path and path not in leaf_paths:
                leaf_paths.add(path)
                continue
            module = f"submodule {path!r} ({type(names[path]).__name__})" if path \
                else f"the top-level {type(model).__name__}.forward"
            hint = (f"declare it a leaf with leaf_modules=[{path!r}] (an argument of "
                    "pqcompile.compile and trace) or pass trace(..., fallback='leaf') (leaves "
                    "are kept in float and not pruned)") if path else \
                ("make the data-dependent part a submodule and declare it a leaf "
                 "(leaf_modules=[...]), or move it out of forward()")
            raise TraceError(
                f"torch.fx cannot trace {module}: {type(exc).__name__}: {exc}\n"
                f"  at {where}\n  way out: {hint}") from exc

    discover_layers(gm, example_inputs)
    gm.meta[EXAMPLE_INPUTS.name] = ExampleInputs(tuple(t.detach().clone()
                                                       for t in example_inputs))
    gm.meta[SOURCE_MODEL.name] = type(model).__name__
    gm.meta["pqc.leaf_modules"] = sorted(leaf_paths)
    gm.meta["pqc.shape_specialized"] = specialized
    mark_provided(gm, (*TRACE_PROVIDES, LAYER_DISCOVERY))
    if check:
        check_example_inputs(gm, reference, example_inputs)
    return gm


def check_example_inputs(gm: torch.fx.GraphModule, reference: torch.nn.Module | None,
                         example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Run ``gm`` node by node; a failure names the node, its op and the input shapes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise ExampleInputError(
            f"{len(example_inputs)} example inputs given but forward() takes "
            f"{len(placeholders)} ({', '.join(p.name for p in placeholders)})")
    interp = _NamingInterpreter(gm)
    with torch.no_grad():
        try:
            out = interp.run(*example_inputs)
        except ExampleInputError as exc:  # fx appends its own trace to the message: drop it
            raise ExampleInputError(exc.pqc_message) from exc.__cause__
        if reference is not None:
            ref = reference(*example_inputs)
            for a, b in zip(_flat(out), _flat(ref)):
                if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4,
                                                            equal_nan=True):
                    raise TraceError(
                        "the traced graph does not reproduce the model's output: forward() "
                        "has Python-level behaviour tracing cannot capture (e.g. reading "
                        "input values into Python numbers); declare that submodule a leaf")


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat(v)]
    return []


class _NamingInterpreter(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:
            shapes = [tuple(a.shape) for a in self.fetch_args_kwargs_from_env(n)[0]
                      if isinstance(a, torch.Tensor)]
            if n.op == "call_module":
                target = f"{n.target}: {self.module.get_submodule(n.target)}"
            else:
                target = getattr(n.target, "__name__", str(n.target))
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            err = ExampleInputError(
                f"example inputs do not fit the model: node {n.name!r} ({n.op} {target}) "
                f"failed on input shapes {shapes}: {type(exc).__name__}: {first_line}. Give "
                "example inputs with the shape and dtype the model expects (batch dim first)")
            err.pqc_message = err.args[0]
            raise err from exc
