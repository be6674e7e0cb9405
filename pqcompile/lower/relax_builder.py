"""``lower``: the integer-exact reference to an integer-only Relax program.

The program's ``main`` takes the model's float32 inputs followed by the parameters (weights,
biases, per-channel multipliers and shifts, in the order of ``params``), quantizes the inputs
as its first op and returns float32 outputs, so it is called like the torch model. Scalars
(add/concat/pool multipliers, clamp bounds, scales) are constants of the program.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> from pqcompile.quant import build_reference
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()),
...            (torch.randn(1, 3, 8, 8),))
>>> ref = build_reference(gm, Assignment.uniform(["_0"], 4, 8), [torch.randn(2, 3, 8, 8)])
>>> mod, params, report = lower(ref)
>>> list(params), report.weight_storage
(['_0.weight', '_0.bias', '_0.mult', '_0.shift'], {'_0': 'int4 packed 2 per byte'})
>>> params["_0.weight"].nbytes  # 8 * 3 * 3 * 3 weights at 4 bits
108
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.fx.node import map_arg
from tvm import relax
from tvm.relax import op as R

from ..errors import UnsupportedOpError
from ..meta import FLOAT_OPS, QPARAMS, SHAPE, FloatOp, QParams
from ..quant.op_args import is_split
from .kernel_types import KERNEL_ISA_ATTR, LUT_ISA_ATTR
from .movement import movement
from .ops import EMITTERS


@dataclass
class LoweringReport:
    """What :func:`lower` produced.

    ``float_ops``: ops run in float (node name, op); ``outputs``: the quantization of each
    output before dequantization (to recover output integers, see :meth:`output_integers`);
    ``weight_storage``: per layer, how its weight is stored; ``param_bytes``: total bytes of
    ``params``.
    """

    float_ops: tuple[FloatOp, ...]
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    outputs: tuple[QParams, ...]
    param_names: tuple[str, ...]
    param_bytes: int
    weight_bytes: dict[str, int] = field(default_factory=dict)
    weight_storage: dict[str, str] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # layer -> hand-scheduled kernel

    def output_integers(self, outputs: Any) -> list[np.ndarray]:
        """The output integers of a program run: ``round(y / s)`` (exact, as ``|q| < 2^24``)."""
        outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        if len(outs) != len(self.outputs):
            raise ValueError(f"expected {len(self.outputs)} outputs, got {len(outs)}")
        return [np.round(np.asarray(y, dtype=np.float64) / qp.scale).astype(np.int64)
                for y, qp in zip(outs, self.outputs)]

    def summary(self) -> str:
        lines = [f"params: {len(self.param_names)} arrays, {self.param_bytes} bytes"]
        lines += [f"  {n}: {s} ({self.weight_bytes.get(n, 0)} bytes)"
                  for n, s in self.weight_storage.items()]
        lines.append(f"float ops: {len(self.float_ops)}")
        lines += [f"  {f.node}: {f.op}" for f in self.float_ops]
        return "\n".join(lines)


class Lowering:
    """State of one lowering: the block builder, parameters and storage notes."""

    def __init__(self, ref: torch.fx.GraphModule, isa: Any = None, lut: str | None = None,
                 fma: bool = False) -> None:
        self.ref = ref
        self.isa = isa  # pqcompile.lower.kernels.Isa, or None: TVM's portable ops
        self.lut = lut  # the table lookups' flavour (kernels_lut.FLAVOURS), None: TVM's take
        self.fma = fma  # the input quantization without a division (kernels_quantize)
        self.kernels: dict[str, str] = {}
        self.bb = relax.BlockBuilder()
        self.params: dict[str, np.ndarray] = {}
        self.param_vars: list[relax.Var] = []
        self.storage: dict[str, str] = {}
        self.checks: list[tuple[relax.Expr, str]] = []  # (bool scalar, message): run-time checks
        self.islands: dict[tuple, relax.GlobalVar] = {}  # island key -> its function
        self.lut_used: str | None = None  # the lookup flavour a kernel of the program uses

    def param(self, name: str, array: np.ndarray) -> relax.Var:
        if name in self.params:
            raise ValueError(f"parameter {name!r} defined twice")
        array = np.ascontiguousarray(array)
        var = relax.Var(name, relax.TensorType(array.shape, str(array.dtype)))
        self.params[name] = array
        self.param_vars.append(var)
        return var

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        return tuple(int(d) for d in SHAPE.get(node).shape)

    def call_kernel(self, kernel: Any, name: str, args: list, shape: tuple[int, ...],
                    dtype: str) -> relax.Expr:
        """Emit a call of the TIR ``kernel`` (added to the module as ``name``) on ``args``,
        whose output is a ``shape`` tensor of ``dtype``."""
        gv = self.bb.add_func(kernel.without_attr("global_symbol"), name)
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))


def _check_reference(ref: Any) -> None:
    if not isinstance(ref, torch.fx.GraphModule) or not FLOAT_OPS.has(ref):
        raise TypeError("lower takes the GraphModule returned by "
                        "pqcompile.quant.build_reference, got "
                        f"{type(ref).__name__}" + ("" if not isinstance(
                            ref, torch.fx.GraphModule) else " without quantization records"))


def lower(ref: torch.fx.GraphModule, func_name: str = "main", *, target: Any = None
          ) -> tuple[Any, dict[str, np.ndarray], LoweringReport]:
    """Lower the reference to ``(IRModule, params, LoweringReport)`` (see the module doc).

    ``target`` (a registry name, ``TargetSpec``, TVM JSON dict or ``tvm.target.Target``): use
    the hand-scheduled integer kernels of :mod:`pqcompile.lower.kernels` for that target's
    instruction set (weights pre-packed in their layout, so the program then only runs on
    targets with that instruction set); ``None``: TVM's portable Relax ops only.
    """
    _check_reference(ref)
    isa = lut = None
    fma = False
    if target is not None:
        from .build import resolve_target
        from .kernels import isa_for
        from .kernels_lut import lut_flavour
        from .kernels_quantize import has_fma

        tvm_target = resolve_target(target)
        isa, lut, fma = isa_for(tvm_target), lut_flavour(tvm_target), has_fma(tvm_target)
    lw = Lowering(ref, isa, lut, fma)
    bb = lw.bb
    env: dict[str, Any] = {}
    placeholders = [n for n in ref.graph.nodes if n.op == "placeholder"]
    inputs = {n.name: relax.Var(n.name, relax.TensorType(
        lw.shape(n), "float32" if SHAPE.get(n).dtype.is_floating_point
        else str(SHAPE.get(n).dtype).removeprefix("torch."))) for n in placeholders}
    out_qparams: list[QParams] = []
    with bb.function(func_name):
        with bb.dataflow():
            for n in ref.graph.nodes:
                if n.op == "placeholder":
                    env[n.name] = inputs[n.name]
                elif n.op == "output":
                    result = map_arg(n.args[0], lambda a: env[a.name])
                    out_qparams = [QPARAMS.get(a) for a in _flat_nodes(n.args[0])]
                elif is_split(n) and n.args[0].name in env:
                    env[n.name] = env[n.args[0].name]  # its items slice it (getitem)
                elif not hasattr(SHAPE.find(n), "shape"):
                    continue  # sizes and other Python values: shapes are static here
                else:
                    env[n.name] = _emit(lw, n, env)
            result = relax.Tuple(_flat(result)) if isinstance(result, (list, tuple, dict)) \
                else result
            out = bb.emit_output(result)
            checks = [(bb.emit_output(ok), message) for ok, message in lw.checks]
        for ok, message in checks:  # a failed check raises in the VM, on the device too
            bb.emit(R.assert_op(ok, [], message))
        bb.emit_func_output(out, params=list(inputs.values()) + lw.param_vars)
    mod = bb.get()
    if isa is not None:  # Artifact.build refuses a target without these instructions
        mod = mod.with_attr(KERNEL_ISA_ATTR, isa.name)
    if lw.lut_used == "vbmi":
        mod = mod.with_attr(LUT_ISA_ATTR, lw.lut_used)
    weight_bytes = {name: lw.params[f"{name}.weight"].nbytes for name in lw.storage}
    report = LoweringReport(
        float_ops=FLOAT_OPS.get(ref), inputs=tuple((n.name, lw.shape(n)) for n in placeholders),
        outputs=tuple(out_qparams), param_names=tuple(lw.params),
        param_bytes=int(sum(a.nbytes for a in lw.params.values())),
        weight_bytes=weight_bytes, weight_storage=dict(lw.storage), kernels=dict(lw.kernels))
    return mod, lw.params, report


def _emit(lw: Lowering, n: torch.fx.Node, env: dict[str, Any]) -> Any:
    if n.op == "call_module":
        module = lw.ref.get_submodule(n.target)
        emitter = EMITTERS.get(type(module))
        if emitter is not None:
            # positional, not all_input_nodes: ``x + x`` and ``cat([a, b, a])`` repeat inputs
            return emitter(lw, n, module, *(env[a.name] for a in n.args))
    args = [env[a.name] for a in n.all_input_nodes if a.name in env]
    if len(args) != 1:
        raise UnsupportedOpError(f"node {n.name!r} ({n.op} {n.target}) takes {len(args)} "
                                 "integer tensors; only integer ops of the reference lower")
    return movement(lw, n, args[0])


def _flat_nodes(arg) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    map_arg(arg, lambda a: out.append(a))
    return out


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flat(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flat(item)]
    return [value]
