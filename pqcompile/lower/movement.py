"""Lowering of data movement: views, permutes, channel shuffles and basic indexing.

:func:`movement` lowers a node that moves integer values without computing, as
:func:`view_op` classifies it (reshape to the recorded shape, permute, shuffle, identity, or
indexing); :func:`getitem` and :func:`item_box` read basic indexing as strided slices. The ONNX
export reads :func:`view_op` and :func:`item_box` too, so both programs move values alike.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from tvm import relax
from tvm.relax import op as R

from ..errors import UnsupportedOpError
from ..meta import SHAPE
from ..quant.op_args import is_split, split_dim

if TYPE_CHECKING:
    from .relax_builder import Lowering

_IDENTITY_MODULES = (torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout1d,
                     torch.nn.Dropout2d, torch.nn.Dropout3d)


def _index_box(shape: tuple[int, ...], index) -> list[tuple[int, int, int]]:
    """``(begin, end, stride)`` per input axis of basic indexing (ints, slices, None, ...)."""
    items = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for it in items if it is not None and it is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - used)
    items += [slice(None)] * (len(shape) - sum(1 for it in items if it is not None))
    box, axis = [], 0
    for it in items:
        if it is None:
            continue
        size = shape[axis]
        if isinstance(it, int):
            i = it % size
            box.append((i, i + 1, 1))
        else:
            box.append(it.indices(size))
        axis += 1
    return box


def item_box(node, shape_of) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The input shape and the ``(begin, end, step)`` box per axis a getitem node reads: one
    item of a split (a slice along its dim) or basic indexing; ``shape_of(node)`` is a node's
    static shape. Shared by the lowering and the ONNX export."""
    src, index = node.args
    if is_split(src):
        in_shape = list(shape_of(src.args[0]))
        dim = split_dim(src) % len(in_shape)
        items = SHAPE.get(src)
        drop = src.target in ("unbind", torch.unbind)
        begin = index if drop else sum(int(items[j].shape[dim]) for j in range(index))
        end = begin + (1 if drop else int(items[index].shape[dim]))
        box = [(0, s, 1) for s in in_shape]
        box[dim] = (begin, end, 1)
        return in_shape, box
    in_shape = list(shape_of(src))
    return in_shape, _index_box(in_shape, index)


def getitem(lw: Lowering, node, x) -> relax.Expr:
    """One item of a split (a slice along its dim), or basic indexing of a tensor: a strided
    slice, then a reshape to the recorded shape (ints drop axes, ``None`` adds them)."""
    in_shape, box = item_box(node, lw.shape)
    if any(b != (0, s, 1) for b, s in zip(box, in_shape)):
        x = lw.bb.emit(R.strided_slice(x, axes=list(range(len(in_shape))),
                                       begin=[b[0] for b in box], end=[b[1] for b in box],
                                       strides=[b[2] for b in box]))
    return lw.bb.emit(R.reshape(x, lw.shape(node)))


def view_op(ref: torch.fx.GraphModule, node, ndim: int) -> tuple[str, Any]:
    """What a movement node does to the integers it moves, for the lowering and the ONNX export:
    ``("index", None)`` (getitem), ``("identity", None)``, ``("permute", axes)``,
    ``("shuffle", groups)`` (channel shuffle) or ``("reshape", None)`` (flatten/reshape/view/
    squeeze/unsqueeze: to the recorded shape); ``ndim`` is the output's rank."""
    if node.op == "call_function" and node.target is operator.getitem:
        return "index", None
    target = node.target
    if node.op == "call_module":
        module = ref.get_submodule(target)
        if isinstance(module, _IDENTITY_MODULES):
            return "identity", None
        target = type(module).__name__.lower()
    name = getattr(target, "__name__", target)
    if name in ("contiguous", "clone", "stochastic_depth"):  # the latter only outside training
        return "identity", None
    if name in ("permute", "transpose", "swapaxes", "swapdims"):
        rest = [a for a in node.args[1:]] or list(node.kwargs.values())
        if name == "permute":
            axes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) \
                else list(rest)
        else:
            d0, d1 = (int(d) % ndim for d in rest[:2])
            axes = list(range(ndim))
            axes[d0], axes[d1] = axes[d1], axes[d0]
        return "permute", [int(a) % ndim for a in axes]
    if name in ("channel_shuffle", "native_channel_shuffle", "channelshuffle"):
        return "shuffle", (ref.get_submodule(node.target).groups if node.op == "call_module"
                           else int(node.args[1] if len(node.args) > 1
                                    else node.kwargs["groups"]))
    if name in ("flatten", "reshape", "view", "squeeze", "unsqueeze"):
        return "reshape", None
    raise UnsupportedOpError(f"node {node.name!r} ({name}) has no integer lowering and was "
                             "not planned as a float op; this is a pqcompile bug, please report")


def movement(lw: Lowering, node, x) -> relax.Expr:
    """Flatten/reshape/view/squeeze/unsqueeze (to the recorded shape), permute, transpose,
    channel shuffle, indexing (:func:`view_op`)."""
    kind, arg = view_op(lw.ref, node, len(lw.shape(node)))
    if kind == "index":
        return getitem(lw, node, x)
    if kind == "identity":
        return x
    if kind == "permute":
        return lw.bb.emit(R.permute_dims(x, arg))
    if kind == "shuffle":
        n, c, *rest = lw.shape(node)
        y = lw.bb.emit(R.reshape(x, (n, arg, c // arg, *rest)))
        y = lw.bb.emit(R.permute_dims(y, [0, 2, 1, *range(3, 3 + len(rest))]))
        return lw.bb.emit(R.reshape(y, (n, c, *rest)))
    return lw.bb.emit(R.reshape(x, lw.shape(node)))
