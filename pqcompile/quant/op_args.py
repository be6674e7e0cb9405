"""What the quantization plan reads from an op's arguments: convolution and pooling windows,
splits, basic indexing, ReLU kinds, inert stochastic depth. Each reader returns ``None`` (or
``False``) for a form the integer program does not compute, so the op runs in float instead.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..meta import SHAPE

_RELU_FN = (F.relu, torch.relu)
_SPLIT_FN = (torch.chunk, torch.split, torch.tensor_split, torch.unbind)
_SPLIT_METHODS = ("chunk", "split", "tensor_split", "unbind")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _arg(n: torch.fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _is_tensor(n: torch.fx.Node) -> bool:
    return hasattr(SHAPE.find(n), "shape")


def _shape(n) -> tuple[int, ...]:
    return tuple(SHAPE.get(n).shape)


def _conv_args(m: nn.Conv2d) -> dict | None:
    if m.padding_mode != "zeros":
        return None
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        elif all(m.dilation[i] * (m.kernel_size[i] - 1) % 2 == 0 for i in range(2)):
            pad = tuple(m.dilation[i] * (m.kernel_size[i] - 1) // 2 for i in range(2))
        else:
            return None
    return {"stride": m.stride, "padding": tuple(pad), "dilation": m.dilation, "groups": m.groups}


def _avgpool_args(gm, n) -> dict | None:
    """Window ``(kernel, stride, padding)`` or reduced ``dims`` of an average, else None."""
    x = n.args[0] if n.args else None
    if not (isinstance(x, torch.fx.Node) and _is_tensor(x)):
        return None  # e.g. torch.stack([...]): its first argument is a list, not a tensor
    in_shape = _shape(x)
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.AvgPool2d):
            k, s, p = m.kernel_size, m.stride, m.padding
            extra = (m.ceil_mode, m.count_include_pad, m.divisor_override)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            return _adaptive(in_shape, m.output_size)
        else:
            return None
    elif n.target is F.avg_pool2d:
        k, s, p = _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"), _arg(n, 3, "padding", 0)
        extra = (_arg(n, 4, "ceil_mode", False), _arg(n, 5, "count_include_pad", True),
                 _arg(n, 6, "divisor_override"))
    elif n.target is F.adaptive_avg_pool2d:
        return _adaptive(in_shape, _arg(n, 1, "output_size"))
    elif n.target is torch.mean or (n.op == "call_method" and n.target == "mean"):
        dims = _arg(n, 1, "dim")
        if dims is None or _arg(n, 3, "dtype") is not None:
            return None
        dims = tuple(sorted({d % len(in_shape) for d in _pair(dims)}))
        count = 1
        for d in dims:
            count *= in_shape[d]
        return {"window": None, "dims": dims, "keepdim": bool(_arg(n, 2, "keepdim", False)),
                    "count": count}
    else:
        return None
    k, p = _pair(k), _pair(p)
    s = k if s is None or s == [] else _pair(s)
    ceil_mode, count_include_pad, divisor = extra
    if ceil_mode or divisor is not None or (any(p) and not count_include_pad) or len(in_shape) != 4:
        return None
    return {"window": (k, s, p), "dims": None, "keepdim": True, "count": k[0] * k[1]}


def _adaptive(in_shape, size) -> dict | None:
    h, w = in_shape[-2:]
    oh, ow = _pair(size) if size is not None else (h, w)
    oh, ow = oh or h, ow or w
    if len(in_shape) != 4 or h % oh or w % ow:
        return None
    if (oh, ow) == (1, 1):
        return {"window": None, "dims": (2, 3), "keepdim": True, "count": h * w}
    k = (h // oh, w // ow)
    return {"window": (k, k, (0, 0)), "dims": None, "keepdim": True, "count": k[0] * k[1]}


def _maxpool_args(gm, n) -> dict | None:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if not isinstance(m, nn.MaxPool2d) or m.return_indices:
            return None
        k, s, p, d, c = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
    elif n.target is F.max_pool2d and not _arg(n, 6, "return_indices", False):
        k, s, p = _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"), _arg(n, 3, "padding", 0)
        d, c = _arg(n, 4, "dilation", 1), _arg(n, 5, "ceil_mode", False)
    else:
        return None
    k = _pair(k)
    return {"kernel": k, "stride": k if s is None or s == [] else _pair(s), "padding": _pair(p),
                "dilation": _pair(d), "ceil_mode": bool(c)}


def is_split(n: torch.fx.Node) -> bool:
    """chunk/split/tensor_split/unbind of one tensor, with Python sizes (a tuple of tensors)."""
    if not ((n.op == "call_function" and n.target in _SPLIT_FN) or
            (n.op == "call_method" and n.target in _SPLIT_METHODS)):
        return False
    x = n.args[0] if n.args else None
    return isinstance(x, torch.fx.Node) and all(
        a is x or not _is_tensor(a) for a in n.all_input_nodes)  # sizes may be traced values


def split_dim(n: torch.fx.Node) -> int:
    """The dimension a :func:`is_split` node splits along (not normalized)."""
    i = 1 if n.target in ("unbind", torch.unbind) else 2
    return _arg(n, i, "dim", 0)


def is_basic_index(index) -> bool:
    """Indexing a tensor by integers, slices with steps > 0, ``None`` and ``...`` only."""
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if isinstance(it, slice):
            parts = (it.start, it.stop, it.step)
            if any(p is not None and not isinstance(p, int) for p in parts) or (
                    it.step is not None and it.step <= 0):
                return False
        elif not (it is None or it is Ellipsis or (isinstance(it, int) and
                                                    not isinstance(it, bool))):
            return False
    return True


def _relu_kind(gm, n) -> str | None:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and
                                       (m.min_val, m.max_val) == (0.0, 6.0)):
            return "relu6"
        return "relu" if isinstance(m, nn.ReLU) else None
    if n.op == "call_function":
        return "relu" if n.target in _RELU_FN else "relu6" if n.target is F.relu6 else None
    return "relu" if n.op == "call_method" and n.target in ("relu", "relu_") else None


def _inert_drop(n: torch.fx.Node) -> bool:
    """torchvision's ``stochastic_depth`` outside training (or with ``p == 0``): the identity."""
    return n.op == "call_function" and getattr(n.target, "__name__", "") == "stochastic_depth" \
        and getattr(n.target, "__module__", "").startswith("torchvision") and \
        (_arg(n, 3, "training", True) is False or _arg(n, 1, "p", 1.0) == 0)
