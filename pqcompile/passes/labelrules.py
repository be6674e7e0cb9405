"""One propagation rule per op kind (see :mod:`pqcompile.passes.opinfo`).

A rule gets the propagator, the node, its :class:`~pqcompile.passes.opinfo.Op` and its real
output value, adds ties and blocks to the state and returns the output's channel info.
Reasons for blocks name the node and the op, so an unprunable group explains itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from .labelmoves import movement
from .labels import InRecord, TInfo, describe, ids_of, labels_along, make_info, rule
from .opinfo import along_dim_default


@rule("placeholder", "get_attr")
def _source(p, n, op, value):
    return None


@rule("output")
def _output(p, n, op, value):
    for src, _, info in p.tensor_args(n):
        name = src.name if isinstance(src, torch.fx.Node) else "?"
        p.state.block(ids_of(info), f"channels reach the model output (returned by node {name!r})")


@rule("opaque", "unknown")
def _opaque(p, n, op, value):
    what = ("is opaque (a leaf module channel analysis does not look into)" if op.kind == "opaque"
            else "is an op channel analysis does not know")
    p.state.block(p.all_ids(n), f"{p.where(n, op)} {what}; channels reaching it cannot be "
                                  "pruned")


def _input_labels(p, n, op, xi, dim, size) -> np.ndarray:
    lab = labels_along(xi, dim, size)
    if lab is None:
        p.state.block(ids_of(xi), f"{p.where(n, op)} reads channels along dim {dim}, but they "
                                  f"also vary along dims {xi.dims}")
        lab = np.zeros(size, np.int64)
    return lab


@rule("conv")
def _conv(p, n, op, value):
    m, st, where = op.module, p.state, p.where(n, op)
    src, _x, xi = p.first(n)
    g = m.groups
    ipg, opg = m.in_channels // g, m.out_channels // g
    lab = _input_labels(p, n, op, xi, 1, m.in_channels)
    st.inputs[n.name] = InRecord(n.name, 1, lab)
    info, out = st.producer_info(m.out_channels, value.dim(), 1)
    w_out = st.param_ids(n.target, "out", m.out_channels)
    st.tie(out, w_out)
    if g > 1 and ipg == 1:
        # Depthwise: output channels of group c are a function of input channel c only.
        st.tie_labels(np.repeat(lab, opg), out,
                      f"{where} is depthwise over channels of {describe(src)}")
        return info
    # Dense or grouped: removing in-channel k of one group removes it from every group (and
    # likewise out-channel k), so the conv stays dense with the same ``groups``.
    w_in = st.param_ids(n.target, "in", ipg)
    st.tie_labels(lab, np.tile(w_in, g), _shared_columns(where, src))
    if g > 1:
        st.tie(w_out.reshape(g, opg), w_out[:opg])
    return info


@rule("linear")
def _linear(p, n, op, value):
    m, st = op.module, p.state
    src, x, xi = p.first(n)
    lab = _input_labels(p, n, op, xi, x.dim() - 1, m.in_features)
    st.inputs[n.name] = InRecord(n.name, x.dim() - 1, lab)
    info, out = st.producer_info(m.out_features, value.dim(), value.dim() - 1)
    st.tie(out, st.param_ids(n.target, "out", m.out_features))
    st.tie_labels(lab, st.param_ids(n.target, "in", m.in_features),
                  _shared_columns(p.where(n, op), src))
    return info


def _shared_columns(where: str, src: Any) -> str:
    return (f"{where} reads fixed channels of {describe(src)} through the same weight columns "
            "(channel k of every group of a grouped conv, or another call of the module)")


@rule("channel_affine")
def _channel_affine(p, n, op, value):
    src, x, xi = p.first(n)
    if xi is None:
        return None
    c = x.shape[1]
    lab = labels_along(xi, 1, c)
    if lab is None:
        p.state.block(ids_of(xi), f"{p.where(n, op)} has per-channel parameters along dim 1, but "
                                  f"the channels vary along dims {xi.dims}")
        return xi
    p.state.tie_labels(lab, p.state.param_ids(n.target, "c", c),
                       f"{p.where(n, op)} applies the same per-channel parameters to fixed "
                       f"channels of {describe(src)} (another call of the module)")
    return xi


@rule("unary")
def _unary(p, n, op, value):
    return p.first(n)[2]


@rule("elementwise")
def _elementwise(p, n, op, value):
    if not isinstance(value, torch.Tensor):
        return None
    nd, where, st = value.dim(), p.where(n, op), p.state
    args = p.tensor_args(n)
    labeled = [(s, v, i) for s, v, i in args if i is not None]
    if not labeled:
        return None
    lms = [i.lm.reshape((1,) * (nd - i.lm.dim()) + tuple(i.lm.shape)) for _, _, i in labeled]
    bshape = torch.broadcast_shapes(*(lm.shape for lm in lms))
    vary = {d for d in range(nd) if bshape[d] > 1}
    ids = ids_of([i for _, _, i in labeled])
    for src, v, i in args:
        vs = (1,) * (nd - v.dim()) + tuple(v.shape)
        if i is None and any(vs[d] > 1 for d in vary):
            st.block(ids, f"{where} combines channels with per-channel values of "
                          f"{describe(src)}")
    own = [{d + nd - i.lm.dim() for d in i.dims} for _, _, i in labeled]
    if len(vary) > 1 and any(o != vary for o in own):
        st.block(ids, f"{where} broadcasts channels along dims {sorted(vary)} against each other")
    # An operand of size 1 along the others' channel dim meets all their channels with one of
    # its own: nothing to tie, but that channel must stay.
    kept = []
    for (src, v, i), lm in zip(labeled, lms, strict=True):
        vs = (1,) * (nd - v.dim()) + tuple(v.shape)
        if any(vs[d] == 1 for d in vary):
            st.block(ids_of(i), f"{where} broadcasts channels of node {src.name!r} across all "
                                "channels of its other operand")
        else:
            kept.append(lm)
    if len(kept) <= 1:
        return make_info(kept[0]) if kept else None
    bshape = torch.broadcast_shapes(*(lm.shape for lm in kept))
    lms = kept
    mat = np.stack([lm.expand(bshape).reshape(-1).numpy() for lm in lms])
    pos = mat > 0
    rep = mat[pos.argmax(0), np.arange(mat.shape[1])]
    for r in range(len(mat)):
        st.tie(mat[r][pos[r]] - 1, rep[pos[r]] - 1)
    mixed = (~pos).any(0) & pos.any(0)
    st.block(mat[:, mixed][pos[:, mixed]] - 1,
             f"{where} adds or multiplies these channels with positions that carry no prunable "
             "channel")
    return make_info(torch.from_numpy(rep).reshape(bshape))


@rule("spatial")
def _spatial(p, n, op, value):
    _src, x, xi = p.first(n)
    if xi is None:
        return None
    nd = op.nd or x.dim() - 2
    spatial = set(range(x.dim() - nd, x.dim()))
    if spatial & set(xi.dims):
        p.state.block(ids_of(xi), f"{p.where(n, op)} works over dims {sorted(spatial)}, which "
                                  "carry channels")
        return None
    return tuple(xi for _ in value) if isinstance(value, (tuple, list)) else xi


@rule("pad")
def _pad(p, n, op, value):
    _src, x, xi = p.first(n)
    if xi is None:
        return None
    args, kwargs = p.fetch_args_kwargs_from_env(n)
    pad = kwargs.get("pad", args[1] if len(args) > 1 else ())
    if not set(range(x.dim() - len(pad) // 2, x.dim())) & set(xi.dims):
        return xi
    return movement(p, n, op, value)


@rule("reduce")
def _reduce(p, n, op, value):
    ts = p.tensor_args(n)
    if len(ts) > 1:  # torch.max(a, b) and friends are elementwise
        return _elementwise(p, n, op, value)
    _src, x, xi = ts[0]
    if xi is None:
        return None
    args, kwargs = p.fetch_args_kwargs_from_env(n)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dims = range(x.dim()) if dim is None else [dim] if isinstance(dim, int) else dim
    reduced = {d % max(x.dim(), 1) for d in dims}
    if reduced & set(xi.dims):
        p.state.block(ids_of(xi), f"{p.where(n, op)} reduces over dims "
                                  f"{sorted(reduced & set(xi.dims))}, which carry channels")
        return None
    out = value[0] if isinstance(value, (tuple, list)) else value
    lm = xi.lm
    if out.dim() != lm.dim():
        lm = lm.reshape([s for d, s in enumerate(lm.shape) if d not in reduced])
    info = make_info(lm)
    return tuple(info for _ in value) if isinstance(value, (tuple, list)) else info


@rule("along_dim")
def _along_dim(p, n, op, value):
    _src, x, xi = p.first(n)
    if xi is None:
        return None
    if op.module is not None:
        dim = -3 if op.name == "Softmax2d" else op.module.dim
    else:
        args, kwargs = p.fetch_args_kwargs_from_env(n)
        at = 2 if op.name.endswith("normalize") else 1
        dim = kwargs.get("dim", args[at] if len(args) > at else along_dim_default(op.name))
    if dim is None or dim % x.dim() in xi.dims:
        p.state.block(ids_of(xi), f"{p.where(n, op)} works along dim {dim}, which carries "
                                  "channels: removing one changes the others")
        return xi if value.shape == x.shape else None
    return xi


@rule("layernorm")
def _layernorm(p, n, op, value):
    _src, x, xi = p.first(n)
    if xi is None:
        return None
    if op.module is not None:
        k = len(op.module.normalized_shape)
    else:
        shape = p.fetch_args_kwargs_from_env(n)[0][1]
        k = 1 if isinstance(shape, int) else len(shape)
    normed = set(range(x.dim() - k, x.dim()))
    if normed & set(xi.dims):
        p.state.block(ids_of(xi), f"{p.where(n, op)} normalizes over dims {sorted(normed)}, "
                                  "which carry channels: removing one changes its statistics")
    return xi


@rule("channel_norm")
def _channel_norm(p, n, op, value):
    _src, _x, xi = p.first(n)
    if xi is not None and xi.dims:
        p.state.block(ids_of(xi), f"{p.where(n, op)} mixes statistics or constants across "
                                  "channels, so removing a channel changes the others")
    return xi


def _grid(info: TInfo, t: torch.Tensor, d1: int, d2: int) -> np.ndarray:
    """Labels of ``info`` as a ``(t.shape[d1], t.shape[d2])`` array (they vary along no other
    dim)."""
    lm = info.lm
    idx = [0] * lm.dim()
    idx[d1], idx[d2] = slice(None), slice(None)
    g = lm[tuple(idx)].numpy()
    return np.broadcast_to(g, (t.shape[d1], t.shape[d2])).astype(np.int64)


def _batched_matmul(p, n, op, value, a, ai, b, bi):
    """Channels along one batch dim of both operands: attention heads (``q @ k^T`` and
    ``weights @ v`` with the heads along dim 1). Everything of one head, in both operands,
    is one unit: removing a head removes its query, key and value channels together, which
    is what zeroing them computes (the head's output is then zero). ``None`` when the
    operands do not have that layout."""
    nd = a.dim()
    da, db = set(ai.dims) if ai else set(), set(bi.dims) if bi else set()
    batch = (da | db) - {nd - 2, nd - 1}
    if b.dim() != nd or nd < 3 or len(batch) != 1 or not (ai and bi):
        return None
    (bd,) = batch
    if bd not in da or bd not in db or a.shape[bd] != b.shape[bd]:
        return None
    ra, rb = da - {bd}, db - {bd}
    if ra - {nd - 1, nd - 2} or len(ra) > 1 or rb - {nd - 1, nd - 2} or len(rb) > 1 or \
            (ra == {nd - 2} and rb == {nd - 1}):
        return None
    ga = _grid(ai, a, bd, ra.pop() if ra else nd - 1)
    gb = _grid(bi, b, bd, rb.pop() if rb else nd - 2)
    st, where = p.state, p.where(n, op)
    if not ((ga > 0).any(axis=1) & (gb > 0).any(axis=1)).all():
        return None
    reps = np.zeros(ga.shape[0], np.int64)
    for h in range(ga.shape[0]):
        ids = np.unique(np.concatenate([ga[h][ga[h] > 0], gb[h][gb[h] > 0]])) - 1
        st.tie(ids[0], ids)
        reps[h] = ids[0] + 1
        for g in (ga, gb):
            if (g[h] == 0).any() and da - {bd} and db - {bd}:
                st.block(ids, f"{where} contracts head {h}'s channels with positions that "
                              "carry none")
    shape = [1] * value.dim()
    if da - {bd} == {nd - 2}:        # a's rows carry channels: they index the output's rows
        shape[bd], shape[nd - 2] = ga.shape
        return make_info(torch.from_numpy(ga.copy()).reshape(shape))
    if db - {bd} == {nd - 1}:        # b's columns carry channels: the output's columns
        shape[bd], shape[nd - 1] = gb.shape
        return make_info(torch.from_numpy(gb.copy()).reshape(shape))
    shape[bd] = len(reps)
    return make_info(torch.from_numpy(reps).reshape(shape))


@rule("matmul")
def _matmul(p, n, op, value):
    (sa, a, ai), (sb, b, bi) = p.tensor_args(n)[:2]
    st, where = p.state, p.where(n, op)
    heads = _batched_matmul(p, n, op, value, a, ai, b, bi)
    if heads is not None:
        return heads
    da, db = set(ai.dims) if ai else set(), set(bi.dims) if bi else set()
    ok_a = a.dim() >= 2 and (ai is None or da in ({a.dim() - 1}, {a.dim() - 2}))
    ok_b = b.dim() >= 2 and (bi is None or db in ({b.dim() - 1}, {b.dim() - 2}))
    outer = a.dim() >= 2 and da == {a.dim() - 2} and b.dim() >= 2 and db == {b.dim() - 1}
    if not (ok_a and ok_b) or outer:
        st.block(ids_of([ai, bi]), f"{where} multiplies operands whose channels lie along "
                                   f"dims {sorted(da)} and {sorted(db)}; only one operand may "
                                   "carry channels outside the contracted dim")
        return None
    k = a.shape[-1]
    ka = labels_along(ai, a.dim() - 1, k) if da == {a.dim() - 1} else np.zeros(k, np.int64)
    kb = labels_along(bi, b.dim() - 2, k) if db == {b.dim() - 2} else np.zeros(k, np.int64)
    both = (ka > 0) & (kb > 0)
    st.tie(ka[both] - 1, kb[both] - 1)
    st.block(ka[(ka > 0) & ~both] - 1, f"{where} contracts these channels with rows of "
                                       f"{describe(sb)}")
    st.block(kb[(kb > 0) & ~both] - 1, f"{where} contracts these channels with columns of "
                                       f"{describe(sa)}")
    lab = torch.zeros([1] * value.dim(), dtype=torch.int64)
    if da == {a.dim() - 2}:
        side = torch.from_numpy(labels_along(ai, a.dim() - 2, a.shape[-2]))
        lab = lab + side.reshape([1] * (value.dim() - 2) + [-1, 1])
    if db == {b.dim() - 1}:
        side = torch.from_numpy(labels_along(bi, b.dim() - 1, b.shape[-1]))
        lab = lab + side.reshape([1] * (value.dim() - 1) + [-1])
    return make_info(lab)


@rule("getitem")
def _getitem(p, n, op, value):
    container = n.args[0]
    if isinstance(p.env[container], torch.Tensor):
        if any(isinstance(v, torch.Tensor) for _, v, _ in p.tensor_args(n)[1:]):
            p.state.block(p.all_ids(n), f"{p.where(n, op)} indexes with a tensor, which "
                                          "channel analysis cannot follow")
            return None
        return movement(p, n, op, value)
    ci = p.info(container)
    return ci[n.args[1]] if isinstance(ci, (tuple, list)) else None
