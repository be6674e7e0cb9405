"""Pads and nearest resampling of a quantized tensor: data movement on its integers.

These ops produce no new values (a constant pad adds one: the constant), so they share their
input's scale and run on the integers:

* a constant pad (``F.pad``/``torch.constant_pad_nd``, ``nn.ZeroPad*d``, ``nn.ConstantPad*d``)
  pads with the constant's code at the tensor's scale (``0`` for ``0.0``; see :func:`pad_code`);
* reflect, replicate and circular pads, and nearest resampling (``nn.Upsample``,
  ``nn.UpsamplingNearest2d``, ``F.interpolate``/``F.upsample`` with ``mode="nearest"`` or
  ``"nearest-exact"``, ``size`` or ``scale_factor``) are a *gather*: along each resampled axis,
  output position ``i`` reads input position ``index[i]``.

The gather's indices are computed by running the very op, in torch and in float32, on maps of
input coordinates (small exact integers), so both the reference and the compiled program read
exactly the positions torch's own kernel reads, whatever its index rounding (legacy
``floor(dst * in / out)`` with a float scale, ``nearest-exact``'s half-pixel offset,
``recompute_scale_factor``). An op whose map is not one index vector per axis stays in float.

>>> import torch
>>> f = lambda c: torch.nn.functional.interpolate(c, scale_factor=1.5, mode="nearest")
>>> gather_index(f, (1, 3, 2, 3), 2)
[(2, (0, 0, 1)), (3, (0, 0, 1, 2))]
>>> from pqcompile.meta import QParams
>>> pad_code(0.0, QParams(0.1, 8, True), "pad"), pad_code(-float("inf"), QParams(0.1, 8, False),
...                                                       "pad")
(0, 0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import padding as _padding

from ..errors import UnsupportedOpError
from ..meta import QParams

NEAREST_MODES = ("nearest", "nearest-exact")
_PAD_MODULES = ((_padding._ConstantPadNd, "constant"), (_padding._ReflectionPadNd, "reflect"),
                (_padding._ReplicationPadNd, "replicate"), (_padding._CircularPadNd, "circular"))
_INTERPOLATE = (F.interpolate, F.upsample, F.upsample_nearest)


def _arg(n: torch.fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _has_node(value: Any) -> bool:
    found = []
    torch.fx.node.map_arg(value, found.append)
    return bool(found)


def _pad_of(gm: torch.fx.GraphModule, n: torch.fx.Node) -> tuple[Any, str, Any] | None:
    """``(pad, mode, value)`` of a pad node, else None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        for cls, mode in _PAD_MODULES:
            if isinstance(m, cls):
                return m.padding, mode, getattr(m, "value", None)
        return None
    if n.op == "call_function" and n.target is F.pad:
        return _arg(n, 1, "pad"), _arg(n, 2, "mode", "constant"), _arg(n, 3, "value")
    if n.op == "call_function" and n.target is torch.constant_pad_nd:
        return _arg(n, 1, "pad"), "constant", _arg(n, 2, "value", 0)
    return None


def _nearest_fn(gm: torch.fx.GraphModule, n: torch.fx.Node) -> Callable | None:
    """The op as a function of its input, if it is a nearest resampling, else None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Upsample) and m.mode in NEAREST_MODES:
            return m
        return None
    if n.op != "call_function" or n.target not in _INTERPOLATE:
        return None
    mode = "nearest" if n.target is F.upsample_nearest else _arg(n, 3, "mode", "nearest")
    if mode not in NEAREST_MODES or _has_node((n.args[1:], n.kwargs)):
        return None
    args, kwargs, target = n.args[1:], dict(n.kwargs), n.target
    return lambda c: target(c, *args, **kwargs)


def _coordinates(spatial: tuple[int, ...], axis: int) -> torch.Tensor:
    """A ``(1, 1, *spatial)`` float32 map holding each position's coordinate along ``axis``."""
    view = [1] * len(spatial)
    view[axis] = spatial[axis]
    c = torch.arange(spatial[axis], dtype=torch.float32).reshape(view)
    return c.expand(spatial).reshape(1, 1, *spatial).contiguous()


def gather_index(fn: Callable, in_shape: tuple[int, ...], k: int
                 ) -> list[tuple[int, tuple[int, ...]]] | None:
    """Per resampled axis (of the last ``k`` of ``in_shape``), the input position each output
    position reads under ``fn``, as ``[(axis, index), ...]`` (axes left as they are omitted);
    None if ``fn`` is not such a gather or fails on the maps."""
    spatial, ndim = tuple(in_shape[-k:]), len(in_shape)
    if k < 1 or any(s < 1 or s >= 1 << 24 for s in spatial):
        return None
    out = []
    try:
        with torch.no_grad():
            maps = [fn(_coordinates(spatial, d)) for d in range(k)]
    except Exception:  # noqa: BLE001 (torch rejects unusual arguments in many ways)
        return None
    for d, y in enumerate(maps):
        if not isinstance(y, torch.Tensor) or y.dim() != k + 2:
            return None
        line = y[(0, 0) + tuple(slice(None) if e == d else 0 for e in range(k))]
        index = line.to(torch.int64)
        view = [1] * k
        view[d] = -1
        if not (torch.equal(index.to(torch.float32), line) and
                torch.equal(y[0, 0], index.reshape(view).expand(y.shape[2:]).to(y.dtype))
                and (index.numel() == 0 or (int(index.min()) >= 0
                                             and int(index.max()) < spatial[d]))):
            return None
        if not torch.equal(index, torch.arange(spatial[d])):
            out.append((ndim - k + d, tuple(int(i) for i in index)))
    return out


def movement_args(gm: torch.fx.GraphModule, n: torch.fx.Node, in_shape: tuple[int, ...]
                  ) -> tuple[str, dict] | None:
    """``("pad", {"pad", "value"})`` for a constant pad, ``("gather", {"index"})`` for the
    other pads and nearest resampling of a tensor of ``in_shape``, else None (float)."""
    pad = _pad_of(gm, n)
    if pad is not None:
        widths, mode, value = pad
        if _has_node((widths, mode, value)) or not isinstance(widths, (tuple, list)) or \
                len(widths) % 2 or len(widths) // 2 > len(in_shape) or \
                not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            return None
        if mode == "constant":
            value = 0.0 if value is None else value
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return None
            return "pad", {"pad": tuple(widths), "value": float(value)}
        k = len(widths) // 2
        index = gather_index(lambda c: F.pad(c, list(widths), mode), in_shape, k)
        return None if index is None else ("gather", {"index": tuple(index)})
    fn = _nearest_fn(gm, n)
    if fn is None or len(in_shape) not in (3, 4, 5):
        return None
    index = gather_index(fn, in_shape, len(in_shape) - 2)
    return None if index is None else ("gather", {"index": tuple(index)})


def pad_code(value: float, qp: QParams, where: str) -> int:
    """The integer a constant pad of a tensor quantized by ``qp`` pads with: ``value`` rounded
    at the tensor's scale as inputs are (``floor(v / s + 0.5)``); ``-inf``/``inf`` give the
    tensor's smallest/largest code (all a max pool needs). A finite value outside the tensor's
    range is refused: clamping it would pad with another value."""
    if math.isnan(value):
        raise UnsupportedOpError(f"{where} pads with NaN, which has no integer code; pad with a "
                                 "number")
    if math.isinf(value):
        return qp.qmin if value < 0 else qp.qmax
    code = math.floor(value / qp.scale + 0.5)
    if not qp.qmin <= code <= qp.qmax:
        raise UnsupportedOpError(
            f"{where} pads with {value}, outside the range [{qp.qmin * qp.scale:.6g}, "
            f"{qp.qmax * qp.scale:.6g}] of the {qp.bits}-bit {'signed' if qp.signed else 'unsigned'}"
            " tensor it pads (its scale comes from the producer's calibrated range), so the "
            "integer program cannot pad with it: pad with a value inside that range (e.g. 0), "
            "or with -inf/inf before a max pool")
    return code
