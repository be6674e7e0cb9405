"""Propagation rules for pure data movement: run the op on labels, then keep grids dense.

Views, permutes, cat, split, getitem, flatten, channel shuffle and the like are followed
exactly by running the op on the label tensor. When an op spreads channels over several dims
(``x.view(N, g, C // g, H, W)``), removing channels must remove whole lines of that grid, so
the lines are tied here. A constant-size split of the channel dim into (heads, head width)
that an attention product reads loses whole heads; any other loses entries of its last dim.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx

from .labels import TInfo, ids_of, labels_along, make_info, rule, size_args

_VIEWS = ("view", "reshape")
_SHUFFLES = ("channel_shuffle", "native_channel_shuffle", "ChannelShuffle")


@rule("movement")
def movement(p, n, op, value):
    infos = [i for _, _, i in p.tensor_args(n) if i is not None]
    if not infos:
        return None
    largs, lkwargs = p.label_args(n)
    if n.op == "call_module":
        out = op.module(*largs, **lkwargs)
    elif n.op == "call_method":
        out = getattr(largs[0], n.target)(*largs[1:], **lkwargs)
    else:
        out = n.target(*largs, **lkwargs)
    if op.name.split(".")[-1] in _SHUFFLES:
        _tie_shuffle_groups(p, n, op, largs)
    return _finish(p, n, op, out, infos)


def _tie_shuffle_groups(p, n, op, largs) -> None:
    # channel_shuffle(x, g) reads x as a (g, C/g) grid: channel k of every group goes together.
    groups = op.module.groups if op.module is not None else largs[1]
    lab = labels_along(p.first(n)[2], 1, largs[0].shape[1])
    if lab is None:
        p.state.block(p.all_ids(n), f"{p.where(n, op)} shuffles channels that also vary "
                                      "along other dims")
        return
    _tie_lines(p, n, op, lab.reshape(groups, -1).T)


def _tie_lines(p, n, op, lines: np.ndarray) -> None:
    """Tie every row of ``lines`` together (ids + 1; a row mixing in 0s is fixed)."""
    pos = lines > 0
    rep = lines[np.arange(len(lines)), pos.argmax(1)]
    rows, cols = np.nonzero(pos)
    p.state.tie(lines[rows, cols] - 1, rep[rows] - 1)
    mixed = (~pos).any(1) & pos.any(1)
    p.state.block(lines[mixed][pos[mixed]] - 1,
                  f"{p.where(n, op)} lays channels out in a grid whose lines mix in positions "
                  "without prunable channels")


def _finish(p, n, op, out, infos):
    if isinstance(out, (tuple, list)):
        return tuple(_finish(p, n, op, o, infos) for o in out)
    if not isinstance(out, torch.Tensor):
        return None
    info = make_info(out)
    if info is None or len(info.dims) == 1:
        return info
    where = p.where(n, op)
    if not info.dims:
        if any(np.unique(ids_of(i)).size > 1 for i in infos):
            p.state.block(ids_of(info), f"{where} picks out a single channel, which therefore "
                                        "cannot be removed")
        return info
    if any(len(i.dims) > 1 for i in infos):
        return info  # moves an existing grid; its lines were tied where it was created
    shrink = _shrink_dim(n, op, info)
    if shrink is None:
        p.state.block(ids_of(info), f"{where} spreads channels over dims {info.dims} in a way "
                                    "pruning cannot keep dense")
        return info
    # Removing a channel must remove a whole line along the shrink dim, so the grid stays dense.
    lines = info.lm.movedim(shrink, 0).reshape(info.lm.shape[shrink], -1).numpy()
    _tie_lines(p, n, op, lines)
    return TInfo(info.lm, info.dims, shrink)


def _shrink_dim(n, op, info) -> int | None:
    """Which dim of a new channel grid loses entries when channels are removed.

    For view/reshape/unflatten it is the one size argument computed in the graph (or -1): the
    others are constants the model keeps. With only constants, the last grid dim (the pruner
    rewrites it).
    """
    name = op.name.split(".")[-1]
    if name == "stack":
        return info.dims[-1]
    if name in ("unflatten", "Unflatten"):
        sizes = _unflatten_sizes(n, op, info.lm.dim())
    elif name in _VIEWS:
        sizes = size_args(n)
    else:
        return None
    if sizes is None or len(sizes) != info.lm.dim():
        return None
    dyn = [d for d in info.dims if isinstance(sizes[d], torch.fx.Node) or sizes[d] in (-1, None)]
    if len(dyn) > 1:
        return None
    if dyn:
        return dyn[0]
    # (N, L, heads, head width) read by an attention product: whole heads go.
    return info.dims[0] if len(info.dims) == 2 and _feeds_matmul(n) else info.dims[-1]


_MATMULS = ("matmul", "bmm")
_PASS = ("transpose", "permute", "contiguous", "clone")


def _feeds_matmul(n: torch.fx.Node, depth: int = 4) -> bool:
    """Whether ``n`` reaches a matmul through at most ``depth`` transposes/permutes."""
    for u in n.users:
        name = getattr(u.target, "__name__", u.target) if u.op != "call_module" else ""
        if name in _MATMULS:
            return True
        if name in _PASS and depth and _feeds_matmul(u, depth - 1):
            return True
    return False


def _unflatten_sizes(n, op, out_ndim: int) -> list:
    """Per-output-dim size arguments of an unflatten (``None`` outside the unflattened dims)."""
    if op.module is not None:
        dim, sizes = op.module.dim, list(op.module.unflattened_size)
    else:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        sizes = list(n.kwargs.get("sizes", n.args[2] if len(n.args) > 2 else ()))
    start = dim % (out_ndim - len(sizes) + 1)
    return [None] * start + sizes + [None] * (out_ndim - start - len(sizes))
