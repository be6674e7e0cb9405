"""Float islands in Relax: TVM's fx frontend, made to keep float64 where the island computes it.

TVM's frontend builds conv, linear and matmul calls with ``out_dtype="float32"`` whatever their
inputs are. A float64 island would then compute those ops in float32 (not what the reference
computes) and fail to build as soon as a float64 operand meets the float32 result (a conv or a
linear with a bias: ``R.add(float32, float64)``). :func:`translate_island` translates with an
importer whose block builder widens such calls to ``float64`` when an input is float64.

Islands repeat (every GELU of a stage, every softmax of a window size): :func:`island_key`
says when two islands translate to the same Relax function (same fx code, input shapes and
constant shapes/dtypes; ``with_values``: and the same constant values), so that the check of
:func:`pqcompile.quant.islands.make_island` runs once per key and the lowering adds one Relax
function per key.

>>> import torch
>>> from pqcompile.quant.islands import Slot, make_island
>>> island = make_island(torch.nn.Linear(3, 2), "call_module", (Slot(0),), {}, [(1, 3)])
>>> island.precision, str(translate_island(island.fn, [(1, 3)]).ret_ty.dtype)
('float64', 'float64')
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch.fx_translator import TorchFXImporter


def _dtype(expr: relax.Expr) -> str | None:
    ty = getattr(expr, "ty", None)
    dtype = getattr(ty, "dtype", None)
    return None if dtype is None else str(dtype)


class _Float64Builder(relax.BlockBuilder):
    """Emits calls that the frontend pinned to ``out_dtype="float32"`` with ``float64`` when
    one of their inputs is float64 (nested calls too: ``relax.op.linear`` is a matmul inside
    an add)."""

    def _widen(self, expr: Any) -> Any:
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return expr
        args = [self.normalize(self._widen(a)) for a in expr.args]
        attrs = expr.attrs
        out = getattr(attrs, "out_dtype", None) if attrs is not None else None
        if out is not None and str(out) == "float32" and \
                any(_dtype(a) == "float64" for a in args):
            info = type(attrs).__tvm_ffi_type_info__
            fields = {f.name: getattr(attrs, f.name) for f in info.fields}
            fields["out_dtype"] = "float64"
            attrs = tvm.ir.make_node(info.type_key, **fields)
        return relax.Call(expr.op, args, attrs, expr.ty_args)

    def emit(self, expr, name_hint: str = ""):
        return super().emit(self._widen(expr), name_hint)


class _Float64Importer(TorchFXImporter):
    """TVM's fx importer with :class:`_Float64Builder` as its block builder (it makes a new
    builder per translation; the property swaps in ours)."""

    @property
    def block_builder(self) -> relax.BlockBuilder:
        return self._builder

    @block_builder.setter
    def block_builder(self, builder: relax.BlockBuilder) -> None:
        self._builder = _Float64Builder() if type(builder) is relax.BlockBuilder else builder


def translate_island(fn: torch.fx.GraphModule, shapes: Sequence[Sequence[int]], *,
                     legalize: bool = False) -> relax.Function:
    """The Relax function of a float island (inputs float64); ``legalize`` also checks that
    TVM has kernels for it at these dtypes (raises what TVM raises)."""
    sub = _Float64Importer().from_fx(fn, [(tuple(s), "float64") for s in shapes], False, False,
                                     False)
    if legalize:
        relax.transform.LegalizeOps()(sub)
    return sub["main"].without_attr("global_symbol")


def island_key(fn: torch.fx.GraphModule, shapes: Sequence[Sequence[int]], *,
               with_values: bool = False) -> tuple:
    """What the Relax translation of ``fn`` depends on: its code, input shapes and the shape
    and dtype of every tensor it reads (``with_values``: their values as well)."""
    tensors = []
    for n in fn.graph.nodes:
        if n.op != "get_attr":
            continue
        t = fn.get_submodule(n.target.rpartition(".")[0]) if "." in n.target else fn
        t = getattr(t, n.target.rpartition(".")[2])
        if not isinstance(t, torch.Tensor):
            tensors.append((n.target, repr(t)))
            continue
        entry = (n.target, tuple(t.shape), str(t.dtype))
        if with_values:
            data = t.detach().contiguous().cpu()
            entry += (hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes())
                      .hexdigest() if data.numel() else "",)
        tensors.append(entry)
    return (fn.code, tuple(tuple(int(d) for d in s) for s in shapes), tuple(tensors))
