"""Rewrites the graph's hard-coded shape arguments for a pruned graph.

View/reshape/expand sizes, split and chunk sections (rewritten to explicit ``split`` sizes),
tensor indexing, ``narrow``/``select`` positions and ``unflatten`` sizes along channel dims are
recomputed from the kept positions. Sizes the graph computes itself (``x.size(1) // g``) are
left alone: shape propagation afterwards checks they came out right.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.fx

from ..errors import UnsupportedOpError
from ..meta import SHAPE
from .labels import size_args
from .opinfo import classify
from .pruneplan import PrunePlan, tensor_shape


def rewrite_shape_args(gm: torch.fx.GraphModule, plan: PrunePlan) -> None:
    """Adjust every shape argument of ``gm`` (a copy of ``plan.gm``) to the kept channels."""
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        name = classify(gm, n).name.split(".")[-1]
        old = plan.nodes[n.name]  # the unpruned node, whose annotations the plan reads
        if name in ("view", "reshape", "expand"):
            _sizes(n, old, plan)
        elif name in ("split", "chunk"):
            _split(n, old, plan)
        elif name == "getitem" and tensor_shape(old.args[0]) is not None:
            _index(n, old, plan)
        elif name in ("narrow", "select"):
            _narrow_select(n, old, plan, name)
        elif name in ("unflatten", "Unflatten"):
            _unflatten(gm, n, old, plan)


def _new_sizes(sizes: list, old: tuple[int, ...], new: tuple[int, ...]) -> list:
    return [new[j] if isinstance(s, int) and s != -1 and new[j] != old[j] else s
            for j, s in enumerate(sizes)]


def _sizes(n, old, plan) -> None:
    sizes, before, after = size_args(n), tensor_shape(old), plan.shape(old)
    if sizes is None or before == after or len(sizes) != len(before):
        return
    sizes = _new_sizes(sizes, before, after)
    for key in ("size", "shape"):
        if key in n.kwargs:
            n.kwargs = {**n.kwargs, key: tuple(sizes)}
            return
    if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)):
        n.args = (n.args[0], tuple(sizes))
    else:
        n.args = (n.args[0], *sizes)


def _dim_arg(n, default: int = 0) -> Any:
    return n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else default)


def _split(n, old, plan) -> None:
    x = old.args[0]
    dim = _dim_arg(n) % len(tensor_shape(x))
    keep = plan.keep_along(x, dim)
    if keep is None:
        return
    pieces = [t.shape[dim] for t in SHAPE.get(old)]
    bounds = np.cumsum([0] + pieces)
    sizes = [int(keep[a:b].sum()) for a, b in pairwise(bounds)]
    # chunk and split-by-size derive pieces from the total; explicit sizes keep each piece's
    # channels in that piece after pruning.
    n.target = "split" if n.op == "call_method" else torch.split
    n.args, n.kwargs = (n.args[0], sizes), {"dim": dim}


def _remap(entry: Any, keep: np.ndarray, where: str) -> Any:
    newpos = np.cumsum(keep) - 1
    size = keep.size
    if isinstance(entry, bool) or not isinstance(entry, (int, slice, list, tuple)):
        raise UnsupportedOpError(f"{where}: cannot adjust index {entry!r} along a pruned dim")
    if isinstance(entry, int):
        if not keep[entry % size]:
            raise UnsupportedOpError(f"{where}: index {entry} selects a removed channel")
        return int(newpos[entry % size])
    if isinstance(entry, slice):
        if any(isinstance(v, torch.fx.Node) for v in (entry.start, entry.stop, entry.step)):
            raise UnsupportedOpError(f"{where}: cannot adjust a slice computed in the graph "
                                     "along a pruned dim")
        sel = np.arange(size)[entry]
    else:
        sel = np.asarray(entry, np.int64) % size
    kept = newpos[sel[keep[sel]]]
    if not isinstance(entry, slice):
        return [int(v) for v in kept]
    if kept.size <= 1:
        start = int(kept[0]) if kept.size else 0
        return slice(start, start + kept.size)
    step = int(kept[1] - kept[0])
    if step > 0 and (np.diff(kept) == step).all():
        return slice(int(kept[0]), int(kept[-1]) + 1, step if step != 1 else None)
    return [int(v) for v in kept]


def _index(n, old, plan) -> None:
    x = old.args[0]
    ndim = len(tensor_shape(x))
    idx = n.args[1]
    entries = idx if isinstance(idx, tuple) else (idx,)
    consumed = sum(e is not None and e is not Ellipsis for e in entries)
    out, d = [], 0
    for e in entries:
        if e is Ellipsis:
            d += ndim - consumed
        elif e is not None:
            keep = plan.keep_along(x, d)
            if keep is not None:
                e = _remap(e, keep, f"node {n.name!r} (getitem)")
            d += 1
        out.append(e)
    n.args = (n.args[0], tuple(out) if isinstance(idx, tuple) else out[0])


def _narrow_select(n, old, plan, name) -> None:
    x = old.args[0]
    dim = n.args[1] % len(tensor_shape(x))
    keep = plan.keep_along(x, dim)
    if keep is None:
        return
    where = f"node {n.name!r} ({name})"
    if name == "select":
        n.args = (n.args[0], dim, _remap(n.args[2], keep, where))
        return
    start, length = n.args[2], n.args[3]
    new = _remap(slice(start, start + length), keep, where)
    n.args = (n.args[0], dim, new.start, new.stop - new.start)


def _unflatten(gm, n, old, plan) -> None:
    before, after = tensor_shape(old), plan.shape(old)
    if before == after:
        return
    in_ndim = len(tensor_shape(old.args[0]))
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        dim = m.dim % in_ndim
        sizes = list(m.unflattened_size)
        m.unflattened_size = tuple(_new_sizes(sizes, before[dim:dim + len(sizes)],
                                              after[dim:dim + len(sizes)]))
        return
    dim = n.args[1] % in_ndim
    sizes = list(n.args[2])
    new = _new_sizes(sizes, before[dim:dim + len(sizes)], after[dim:dim + len(sizes)])
    n.args = (n.args[0], n.args[1], tuple(new))
