"""``export_onnx``: a compressed model as a standard ONNX QDQ graph (ONNX Runtime, TensorRT, ...).

The graph mirrors the integer-exact reference node for node (as :mod:`pqcompile.lower` does),
in the QDQ form ONNX tools understand, with the scheme of :mod:`pqcompile.quant`:

* **Activations** travel between ops as ``int8`` (signed) or ``uint8`` (unsigned) tensors
  with zero point 0. Every op producing a new integer tensor is ``DequantizeLinear`` of its
  inputs, the float op, then ``QuantizeLinear`` at the output scale. Where the tensor's
  integer range is narrower than its dtype (fewer than 8 bits, the narrow signed range
  ``[-127, 127]``, or the clamp of a folded ReLU6) an integer ``Clip`` follows the quantize
  ("QCDQ"): its bounds are the scheme's ``[lo, hi]``, so each layer's activation bits can be
  read off the graph. A folded ReLU is an explicit ``Relu`` before the quantize (a ReLU6 a
  float ``Clip(0, 6)``), which ONNX Runtime folds into the unsigned quantization.
* **Weights** are ``int8`` initializers ``<layer>.weight`` of the pruned shapes (removed
  channels are gone), with a per-output-channel ``DequantizeLinear`` (axis 0); below 8 bits an
  integer ``Clip`` to ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` sits between the initializer and its
  dequantize. **Biases** are ``int32`` initializers ``<layer>.bias`` dequantized at
  ``s_in * s_w[c]``.
* **Max pooling, views** (reshape, flatten, permute, slicing, splits) and unfolded ReLUs (an
  integer ``Clip``) run on the integers, as in the reference; embeddings are ``Gather`` on an
  integer table.
* **Float ops** (the reference's float islands: layer norm, softmax, GELU, hard-swish, ...)
  are exported by ``torch.onnx`` (TorchScript exporter) as the ordinary ONNX ops they are, in
  float64 as the reference runs them: their inputs are ``float64(q) * s``, their outputs are
  quantized by the reference's arithmetic (``Div, Add 0.5, Floor, Clip, Cast``: rounding half
  up), hard-swish/hard-sigmoid are written as torch computes them. Ops ONNX Runtime has no
  float64 kernel for (``Erf``, ...) run in float32 between casts. The model input is
  quantized the same way (float64, half up).
* Inputs and outputs are float32 with the names of the artifact manifest; shapes are static
  (those of the example inputs), like the artifact's.

Given the same input integers, the input quantization, views, pooling and the float64 float
ops give exactly the reference's integers. Requantizing layers (conv, linear, add, concat,
average pool) are standard QDQ: the reference requantizes with fixed-point multipliers and
rounds half up, ONNX ``QuantizeLinear`` divides in float32 and rounds half to even, so a value
whose ``y / s`` is within float rounding of a half-integer can land 1 LSB away. Through a deep
network those 1-LSB differences can compound (the tests measure both, layer by layer and end
to end).

``model.metadata_props`` carry ``pqcompile.version``, ``pqcompile.assignment`` (the assignment
JSON), ``pqcompile.layers`` and ``pqcompile.totals`` (JSON, as in ``Compiled.layers`` /
``Compiled.totals``), ``pqcompile.float_ops`` and ``pqcompile.outputs`` (per output: name,
scale, bits, signed: ``round(y / scale)`` recovers the output integers).

>>> import numpy as np, onnxruntime, torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> from pqcompile.quant import build_reference, integer_outputs
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
>>> gm = trace(net, (torch.randn(1, 3, 8, 8),))
>>> ref = build_reference(gm, Assignment.uniform(["_0", "_2"], 4, 4), [torch.randn(4, 3, 8, 8)])
>>> model = export_onnx(ref)  # a Compiled (from pqcompile.compile) works the same way
>>> ops = [n.op_type for n in model.graph.node]
>>> i = ops.index("Relu")
>>> ops[i - 1:i + 4]
['Conv', 'Relu', 'QuantizeLinear', 'Clip', 'DequantizeLinear']
>>> clip = model.graph.node[i + 2]  # the ReLU output is read at 4 bits: unsigned [0, 15]
>>> consts = {t.name: int(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer
...           if t.name in clip.input}
>>> [consts[i] for i in clip.input[1:]]
[0, 15]
>>> x = torch.randn(1, 3, 8, 8)
>>> sess = onnxruntime.InferenceSession(model.SerializeToString(),
...                                     providers=["CPUExecutionProvider"])
>>> y = sess.run(None, {"input_1": x.numpy()})[0]
>>> scale = json.loads(model.metadata_props[-1].value)[0]["scale"]  # pqcompile.outputs
>>> q = np.round(y / scale)  # signed 8-bit output integers
>>> int(np.abs(q - integer_outputs(ref, x)[0].numpy()).max()) <= 1
True
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
from onnx import TensorProto, helper, numpy_helper
from torch.fx.node import map_arg

from ..errors import OptionError, UnsupportedOpError
from ..meta import FLOAT_OPS, FUSED_ACTIVATION, QPARAMS, SHAPE, QParams
from .onnx_emitters import EMITTERS, movement
from ..quant.op_args import is_split
from ..quant.qmodules import QConv2d, QLinear

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "export_onnx"]

MIN_OPSET = 13  # per-channel DequantizeLinear (axis), integer Clip
MAX_OPSET = 20  # the newest the TorchScript exporter writes (float ops)
DEFAULT_OPSET = 17

_ONNX_DTYPE = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}
_DTYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


class _Export:
    """State of one export: nodes, initializers, and the integer tensor of each ref node."""

    def __init__(self, ref: torch.fx.GraphModule, opset: int) -> None:
        self.ref, self.opset = ref, opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.names: set[str] = set()
        self.domains: dict[str, int] = {}
        self.dq: dict[str, str] = {}  # integer tensor -> its dequantized float tensor
        self.qp: dict[str, QParams] = {}  # integer tensor -> its quantization

    # --- building blocks ----------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; equal constants under one name are shared."""
        if name in self.inits:
            if np.array_equal(numpy_helper.to_array(self.inits[name]), array) and \
                    self.inits[name].data_type == helper.np_dtype_to_tensor_dtype(array.dtype):
                return name
            name = self.fresh(name)
        else:
            self.names.add(name)
        array = np.asarray(array)  # (np.ascontiguousarray would make scalars 1-D)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        self.inits[name] = numpy_helper.from_array(array, name)
        return name

    def node(self, op: str, inputs: list[str], out: str, name: str, **attrs: Any) -> str:
        out = self.fresh(out)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(name), **attrs))
        return out

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return tuple(int(d) for d in SHAPE.get(node).shape)

    def scale(self, value: float) -> str:
        v = np.float32(value)
        return self.const(f"scale_{float(v):.9g}", np.array(v))

    def zero(self, dtype: str) -> str:
        return self.const(f"zero_point_{dtype}", np.zeros((), dtype))

    def int64s(self, base: str, values) -> str:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def quantize(self, x: str, qp: QParams, lo: int, hi: int, base: str) -> str:
        """float -> integers: ``QuantizeLinear``, and an integer ``Clip`` to ``[lo, hi]`` where
        that is narrower than the dtype."""
        q = self.node("QuantizeLinear", [x, self.scale(qp.scale), self.zero(qp.dtype)],
                      f"{base}_quantized" if (lo, hi) != _DTYPE_RANGE[qp.dtype] else base,
                      f"{base}/QuantizeLinear")
        if (lo, hi) != _DTYPE_RANGE[qp.dtype]:
            q = self.clip_int(q, lo, hi, qp.dtype, base)
        self.qp[q] = qp
        return q

    def quantize_exact(self, y: str, qp: QParams, lo: int, hi: int, base: str) -> str:
        """float64 -> integers as the reference computes them:
        ``clamp(floor(y / s + 0.5), lo, hi)`` in float64 (``Div, Add, Floor, Clip, Cast``)."""
        s = self.const(f"scale64_{qp.scale!r}", np.array(qp.scale, np.float64))
        half = self.const("half64", np.array(0.5, np.float64))
        t = self.node("Div", [y, s], f"{base}_scaled", f"{base}/Div")
        t = self.node("Floor", [self.node("Add", [t, half], f"{base}_shifted", f"{base}/Add")],
                      f"{base}_floor", f"{base}/Floor")
        bounds = [self.const(f"clip64_{v}", np.array(float(v), np.float64)) for v in (lo, hi)]
        t = self.node("Clip", [t] + bounds, f"{base}_clipped", f"{base}/Clip")
        q = self.node("Cast", [t], base, f"{base}/Cast", to=_ONNX_DTYPE[qp.dtype])
        self.qp[q] = qp
        return q

    def dequantize_exact(self, q: str, scale: float) -> str:
        """The float64 tensor ``float64(q) * s`` of an integer tensor, as the reference's float
        ops read it."""
        t = self.node("Cast", [q], f"{q}_float64", f"{q}/Cast", to=TensorProto.DOUBLE)
        s = self.const(f"scale64_{scale!r}", np.array(scale, np.float64))
        return self.node("Mul", [t, s], f"{q}_dequantized64", f"{q}/Mul")

    def clip_int(self, q: str, lo: int, hi: int, dtype: str, base: str) -> str:
        bounds = [self.const(f"clip_{dtype}_{v}", np.array(v, dtype)) for v in (lo, hi)]
        return self.node("Clip", [q] + bounds, base, f"{base}/Clip")

    def dequantize(self, q: str) -> str:
        """The float32 tensor of an integer tensor (one ``DequantizeLinear`` per tensor)."""
        if q not in self.dq:
            qp = self.qp[q]
            self.dq[q] = self.node("DequantizeLinear", [q, self.scale(qp.scale),
                                                        self.zero(qp.dtype)],
                                   f"{q}_dequantized", f"{q}/DequantizeLinear")
        return self.dq[q]

    def activation(self, y: str, node: torch.fx.Node, module: Any) -> str:
        """A folded ReLU/ReLU6 as the float op before the unsigned quantize (ONNX Runtime folds
        it into the quantization; the clamp to ``[lo, hi]`` is what the reference computes)."""
        out = module.out
        if out.signed or module.lo != 0:
            return y
        if module.hi < out.qmax:  # only a folded ReLU6 narrows an unsigned range
            six = [self.const("relu6_min", np.array(0.0, np.float32)),
                   self.const("relu6_max", np.array(6.0, np.float32))]
            return self.node("Clip", [y] + six, f"{node.name}_relu6", f"{node.name}/Relu6")
        if FUSED_ACTIVATION.find(node) is not None:
            return self.node("Relu", [y], f"{node.name}_relu", f"{node.name}/Relu")
        return y

    def requantize(self, y: str, node: torch.fx.Node, module: Any) -> str:
        y = self.activation(y, node, module)
        return self.quantize(y, module.out, module.lo, module.hi, node.name)

    def weight(self, name: str, module: QConv2d | QLinear) -> tuple[str, str]:
        """Dequantized weight and bias: int8 / int32 initializers, per-channel scales."""
        q = module.weight.numpy().astype(np.int8)
        bits = module.wq.bits
        s_w = np.asarray(module.wq.scales, dtype=np.float64)
        channels = q.shape[0]
        w = self.const(f"{name}.weight", q)
        if bits < 8:
            qmax = 2 ** (bits - 1) - 1
            w = self.clip_int(w, -qmax, qmax, "int8", f"{name}.weight_int{bits}")
        w = self.node("DequantizeLinear", [
            w, self.const(f"{name}.weight_scale", s_w.astype(np.float32)),
            self.const(f"{name}.weight_zero_point", np.zeros(channels, np.int8))],
            f"{name}.weight_dequantized", f"{name}.weight/DequantizeLinear", axis=0)
        b = self.node("DequantizeLinear", [
            self.const(f"{name}.bias", module.bias.numpy().astype(np.int32)),
            self.const(f"{name}.bias_scale", (module.inp.scale * s_w).astype(np.float32)),
            self.const(f"{name}.bias_zero_point", np.zeros(channels, np.int32))],
            f"{name}.bias_dequantized", f"{name}.bias/DequantizeLinear", axis=0)
        return w, b

    def reduce_mean(self, x: str, axes, keepdims: bool, base: str) -> str:
        axes = [int(a) for a in axes]
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.int64s(f"{base}_axes", axes)], base,
                             f"{base}/ReduceMean", keepdims=int(keepdims))
        return self.node("ReduceMean", [x], base, f"{base}/ReduceMean", axes=axes,
                         keepdims=int(keepdims))

    def reshape(self, x: str, shape, base: str) -> str:
        out = self.node("Reshape", [x, self.int64s(f"{base}_shape", list(shape))], base,
                        f"{base}/Reshape")
        return self.passthrough(out, x)

    def passthrough(self, out: str, src: str) -> str:
        """``out`` holds (some of) the integers of ``src``: same quantization."""
        if src in self.qp:
            self.qp[out] = self.qp[src]
        return out


# --- the export -----------------------------------------------------------------------------


def _emit(ex: _Export, n: torch.fx.Node, env: dict[str, str]) -> str:
    if n.op == "call_module":
        module = ex.ref.get_submodule(n.target)
        emitter = EMITTERS.get(type(module))
        if emitter is not None:
            # positional, not all_input_nodes: ``x + x`` and ``cat([a, b, a])`` repeat inputs
            return emitter(ex, n, module, *(env[a.name] for a in n.args))
    args = [env[a.name] for a in n.all_input_nodes if a.name in env]
    if len(args) != 1:
        op = n.target if n.op != "call_module" else type(ex.ref.get_submodule(n.target)).__name__
        raise UnsupportedOpError(f"node {n.name!r} ({n.op} {getattr(op, '__name__', op)}) takes "
                                 f"{len(args)} integer tensors; only integer ops of the reference "
                                 "export to ONNX: build the reference with "
                                 "pqcompile.quant.build_reference, do not edit it")
    return movement(ex, n, args[0])


def _flat_nodes(arg) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    map_arg(arg, lambda a: out.append(a))
    return out


def _io_names(compiled: Any, ref: torch.fx.GraphModule, n_outputs: int
              ) -> tuple[list[str], list[str]]:
    manifest = getattr(getattr(compiled, "artifact", None), "manifest", None)
    if manifest is not None:
        return [s["name"] for s in manifest["inputs"]], [s["name"] for s in manifest["outputs"]]
    inputs = [n.name for n in ref.graph.nodes if n.op == "placeholder"]
    return inputs, [f"output{i}" if n_outputs > 1 else "output" for i in range(n_outputs)]


def _reference_of(compiled: Any) -> torch.fx.GraphModule:
    ref = getattr(compiled, "reference", compiled)
    if not isinstance(ref, torch.fx.GraphModule) or not FLOAT_OPS.has(ref):
        raise TypeError("export_onnx takes the Compiled returned by pqcompile.compile / "
                        "pqcompile.build.compile_assignment (or its .reference, from "
                        f"pqcompile.quant.build_reference), got {type(compiled).__name__}")
    return ref


def export_onnx(compiled: Any, path: str | os.PathLike | None = None, *,
                opset: int = DEFAULT_OPSET, check: bool = True) -> onnx.ModelProto:
    """The QDQ ONNX model of ``compiled`` (see the module doc); written to ``path`` if given.

    ``compiled`` is a :class:`~pqcompile.build.Compiled` (its ``reference`` is exported and its
    assignment, layers and totals go into the metadata) or a reference from
    :func:`pqcompile.quant.build_reference` alone. ``opset`` is the ONNX opset, 13..20;
    ``check`` runs ``onnx.checker.check_model(model, full_check=True)``. Raises
    :class:`~pqcompile.errors.UnsupportedOpError` naming a node that has no ONNX export.
    """
    from .. import __version__  # here: pqcompile/__init__ imports the modules this one uses

    if isinstance(opset, bool) or not isinstance(opset, int) or \
            not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptionError(f"opset must be an int in {MIN_OPSET}..{MAX_OPSET} (per-channel "
                          "DequantizeLinear needs 13; the TorchScript exporter that writes the "
                          f"float ops stops at {MAX_OPSET}), got {opset!r}")
    ref = _reference_of(compiled)
    ex = _Export(ref, opset)
    out_node = next(n for n in ref.graph.nodes if n.op == "output")
    outs = _flat_nodes(out_node.args[0])
    in_names, out_names = _io_names(compiled, ref, len(outs))
    placeholders = [n for n in ref.graph.nodes if n.op == "placeholder"]
    if len(in_names) != len(placeholders) or len(out_names) != len(outs):
        raise ValueError(f"the artifact manifest names {len(in_names)} inputs and "
                         f"{len(out_names)} outputs but the reference has {len(placeholders)} "
                         f"and {len(outs)}: the Compiled object was altered; compile again")
    env: dict[str, str] = {}
    graph_inputs = []
    for n, name in zip(placeholders, in_names):
        ex.names.add(name)
        env[n.name] = name
        meta = SHAPE.get(n)
        dtype = TensorProto.FLOAT if meta.dtype.is_floating_point else \
            helper.np_dtype_to_tensor_dtype(np.dtype(str(meta.dtype).removeprefix("torch.")))
        graph_inputs.append(helper.make_tensor_value_info(name, dtype, ex.shape(n)))
    ex.names.update(out_names)
    for n in ref.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if is_split(n) and n.args[0].name in env:
            env[n.name] = env[n.args[0].name]  # its items slice it (getitem)
        elif not hasattr(SHAPE.find(n), "shape"):
            continue  # sizes and other Python values: shapes are static here
        else:
            env[n.name] = _emit(ex, n, env)
    outputs, described = [], []
    for a, name in zip(outs, out_names):  # each output is the reference's Dequantize node
        ex.nodes.append(helper.make_node("Identity", [env[a.name]], [name],
                                         name=ex.fresh(f"{name}/Identity")))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ex.shape(a)))
        qp = QPARAMS.get(a)
        described.append({"name": name, "scale": float(np.float32(qp.scale)), "bits": qp.bits,
                          "signed": qp.signed})
    _fold_output_identities(ex, out_names)
    graph = helper.make_graph(ex.nodes, type(ref).__name__ if type(ref).__name__ !=
                              "QuantizedReference" else "pqcompile_qdq", graph_inputs, outputs,
                              list(ex.inits.values()))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v)
                                                  for d, v in ex.domains.items()]
    model = helper.make_model(graph, opset_imports=imports, producer_name="pqcompile",
                              producer_version=__version__,
                              doc_string="QDQ export of a pqcompile compressed model: int8/uint8 "
                              "activations with zero point 0, per-channel int8 weights, int32 "
                              "biases; integer Clip nodes give each tensor's range")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    meta = {"pqcompile.version": __version__,
            "pqcompile.float_ops": json.dumps([[f.node, f.op] for f in FLOAT_OPS.get(ref)]),
            "pqcompile.outputs": json.dumps(described)}
    if ref is not compiled:
        meta["pqcompile.assignment"] = compiled.assignment.to_json()
        meta["pqcompile.layers"] = json.dumps(compiled.layers, sort_keys=True)
        meta["pqcompile.totals"] = json.dumps(compiled.totals, sort_keys=True)
    helper.set_model_props(model, meta)
    if check:
        onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save_model(model, os.fspath(path))
    return model


def _fold_output_identities(ex: _Export, out_names: list[str]) -> None:
    """Name each output's dequantize after the output instead of adding an ``Identity``, where
    that tensor feeds nothing else (the usual case)."""
    producers = {o: n for n in ex.nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in ex.nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for name in out_names:
        ident = producers[name]
        src = ident.input[0]
        prod = producers.get(src)
        if prod is None or readers.get(src, 0) != 1 or prod.op_type != "DequantizeLinear":
            continue
        prod.output[0] = name
        ex.nodes.remove(ident)
