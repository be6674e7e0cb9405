"""The float islands of an ONNX export: each island of the reference (a small float64
``GraphModule``) exported by ``torch.onnx`` (TorchScript exporter) and spliced into the graph
:mod:`pqcompile.export.onnx_export` builds, in float64 as the reference runs it: hard-swish and
hard-sigmoid are written as torch computes them, and ops ONNX Runtime has no float64 kernel
for run in float32 between casts."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import onnx
import torch
import torch.fx
from onnx import TensorProto, helper

from ..errors import UnsupportedOpError
from ..quant.qmodules import FloatOp

__all__ = ["splice_island"]


def splice_island(ex: Any, node: torch.fx.Node, module: FloatOp, xs: list[str],
                   shapes: list[tuple[int, ...]]) -> str:
    """Export the island with ``torch.onnx`` (float64) and splice its graph into the export
    ``ex`` (:class:`pqcompile.export.onnx_export._Export`): its inputs
    become ``xs``, its other names get the prefix ``<node>/``; returns its float32 output."""
    fn = _decomposed(copy.deepcopy(module.fn))  # the reference's island is never touched
    g = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    names = [f"in{i}" for i in range(len(shapes))]
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(fn, example, buf, dynamo=False, opset_version=ex.opset,
                              input_names=names, output_names=["out"],
                              do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; re-raised
        last = (str(exc).strip().splitlines() or [""])[-1]
        raise UnsupportedOpError(
            f"float op node {node.name!r} ({module.op}) could not be exported to ONNX by "
            f"torch.onnx (TorchScript exporter, opset {ex.opset}): {type(exc).__name__}: "
            f"{last}. Try another opset (export_onnx(..., opset=...)), or replace the op in the "
            "model by one ONNX has") from exc
    sub = _float32_where_needed(onnx.load_from_string(buf.getvalue()))
    if len(sub.graph.output) != 1:
        raise UnsupportedOpError(f"float op node {node.name!r} ({module.op}) exported with "
                                 f"{len(sub.graph.output)} outputs; a float op must return one "
                                 "tensor: make it a module that does")
    prefix = f"{node.name}/"
    rename = {i.name: x for i, x in zip(sub.graph.input, xs)}
    out_name = ex.fresh(f"{node.name}_float")
    rename[sub.graph.output[0].name] = out_name
    for init in sub.graph.initializer:
        rename.setdefault(init.name, ex.fresh(prefix + init.name))
    for n in sub.graph.node:
        for o in n.output:
            if o:
                rename.setdefault(o, ex.fresh(prefix + o.lstrip("/")))
    for init in sub.graph.initializer:
        init.name = rename[init.name]
        ex.inits[init.name] = init
    for n in sub.graph.node:
        _rename_node(n, rename)
        n.name = ex.fresh(prefix + (n.name.lstrip("/") or n.op_type))
        ex.nodes.append(n)
    for imp in sub.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            ex.domains[imp.domain] = imp.version
    if sub.graph.output[0].type.tensor_type.elem_type != TensorProto.DOUBLE:
        out_name = ex.node("Cast", [out_name], f"{node.name}_float64", f"{node.name}/Cast",
                           to=TensorProto.DOUBLE)
    return out_name


# ONNX Runtime's CPU kernels taking float64 (the float islands run in float64 as in the
# reference); any other op of an island runs in float32 between two casts (at most 1 LSB off at
# the island's output, like the float32 float ops of the compiled program).
_FLOAT64_OPS = frozenset({
    "Abs", "Add", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Cos", "Div",
    "Equal", "Exp", "Expand", "Flatten", "Floor", "Gather", "Gemm", "Greater", "Identity",
    "Less", "Log", "LogSoftmax", "MatMul", "Max", "Min", "Mul", "Neg", "Pow", "Range",
    "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape",
    "Shape", "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub",
    "Tanh", "Tile", "Transpose", "Unsqueeze", "Where"})


def _float32_where_needed(sub: onnx.ModelProto) -> onnx.ModelProto:
    """Cast the float64 inputs of ops outside :data:`_FLOAT64_OPS` to float32 and their
    outputs back to float64."""
    inferred = onnx.shape_inference.infer_shapes(sub)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in sub.graph.initializer})
    nodes = []
    for n in sub.graph.node:
        if n.op_type in _FLOAT64_OPS or not any(types.get(i) == TensorProto.DOUBLE
                                                 for i in n.input):
            nodes.append(n)
            continue
        for k, name in enumerate(n.input):
            if types.get(name) == TensorProto.DOUBLE:
                nodes.append(helper.make_node("Cast", [name], [f"{name}__f32_{n.name}"],
                                              name=f"{n.name}/to_float32_{k}",
                                              to=TensorProto.FLOAT))
                n.input[k] = f"{name}__f32_{n.name}"
        nodes.append(n)
        for k, name in enumerate(n.output):
            if types.get(name) == TensorProto.DOUBLE:
                n.output[k] = f"{name}__f32"
                nodes.append(helper.make_node("Cast", [n.output[k]], [name],
                                              name=f"{n.name}/to_float64_{k}",
                                              to=TensorProto.DOUBLE))
    del sub.graph.node[:]
    sub.graph.node.extend(nodes)
    return sub


def _hardswish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0  # torch's own kernel, op for op


def _hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


class _Elementwise(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


_DECOMPOSED = {torch.nn.Hardswish: _hardswish, torch.nn.Hardsigmoid: _hardsigmoid,
               torch.nn.functional.hardswish: _hardswish,
               torch.nn.functional.hardsigmoid: _hardsigmoid}


def _decomposed(fn: torch.nn.Module) -> torch.nn.Module:
    """The island with hard-swish/hard-sigmoid written as torch computes them (ONNX's
    ``HardSwish`` is ``x * max(0, min(1, x / 6 + 0.5))``: other roundings in float64, and no
    float64 kernel in ONNX Runtime), so ONNX's float64 arithmetic repeats the reference's."""
    if not isinstance(fn, torch.fx.GraphModule):
        return fn
    for n in fn.graph.nodes:
        if n.op == "call_module" and type(fn.get_submodule(n.target)) in _DECOMPOSED:
            fn.add_submodule(n.target,
                             _Elementwise(_DECOMPOSED[type(fn.get_submodule(n.target))]))
        elif n.op == "call_function" and n.target in _DECOMPOSED:
            n.target = _DECOMPOSED[n.target]
            n.kwargs = {}  # inplace=... does not apply to the pure function
    fn.recompile()
    return fn


def _rename_node(n: onnx.NodeProto, rename: dict[str, str]) -> None:
    n.input[:] = [rename.get(i, i) for i in n.input]
    n.output[:] = [rename.get(o, o) for o in n.output]
    for attr in n.attribute:  # subgraphs (If, Loop) may read the island's tensors
        for sg in list(attr.g.node if attr.HasField("g") else []) + \
                [m for g in attr.graphs for m in g.node]:
            _rename_node(sg, rename)


