"""How an fx node treats channels: the op classification behind channel-group analysis.

Every node is sorted into one *kind*; the analysis has one rule per kind, so supporting a new
op means adding its name to a table here, not writing code.

>>> import torch
>>> from pqcompile import trace
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()),
...            (torch.randn(1, 3, 8, 8),))
>>> [classify(gm, n).kind for n in gm.graph.nodes]
['placeholder', 'conv', 'unary', 'output']
"""

from __future__ import annotations

import builtins
import operator
import re
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# Kinds:
#   conv, linear      producers/consumers of channels (weight rows / input columns)
#   channel_affine    per-channel parameters along dim 1 (BatchNorm, InstanceNorm, PReLU(C))
#   unary             output channel c is a function of input channel c only
#   elementwise       broadcasting op over several tensors: ties their channels position-wise
#   spatial           independent per (N, C) slice over the last ``nd`` dims (pools, resizes)
#   movement          pure data movement: followed exactly by pushing channel labels through it
#                     (only ops that stay right when positions are removed: no roll, no
#                     tensor_split with fixed indices)
#   pad               padding: spatial unless it pads a channel dim (then movement)
#   reduce            reduction over ``dim``; fine unless it reduces a channel dim
#   along_dim         normalizes/accumulates along one dim (softmax, cumsum)
#   layernorm         statistics over the last dims
#   channel_norm      statistics or constants across channels (GroupNorm, F.batch_norm)
#   matmul            contraction of the last dim of a with the second-to-last of b
#   getitem           indexing of a tuple (split pieces) or of a tensor (movement)
#   opaque / unknown  not followed: channels reaching them cannot be pruned


def _names(text: str) -> list[str]:
    return text.split()


_UNARY = _names("""
relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu celu gelu silu mish hardswish hardsigmoid
hardtanh hardtanh_ sigmoid sigmoid_ tanh tanh_ softplus softsign logsigmoid tanhshrink
hardshrink softshrink threshold rrelu exp exp_ log log1p expm1 abs abs_ neg neg_ sqrt rsqrt
square sin cos erf reciprocal sign clamp clamp_ clip clamp_min clamp_max clamp_min_ clamp_max_
floor ceil round trunc frac nan_to_num dropout dropout1d dropout2d dropout3d alpha_dropout
feature_alpha_dropout contiguous clone detach float double half bfloat16 to type type_as pos
stochastic_depth
""")
_ELEMENTWISE = _names("""
add add_ iadd sub sub_ isub rsub mul mul_ imul div div_ truediv itruediv true_divide floordiv
floor_divide pow pow_ maximum minimum fmax fmin where lerp addcmul addcdiv masked_fill
masked_fill_ atan2 hypot remainder fmod eq ne lt le gt ge
""")
_MOVEMENT = _names("""
view reshape flatten unflatten permute transpose t squeeze unsqueeze squeeze_ unsqueeze_ expand
expand_as view_as reshape_as repeat tile narrow select split chunk unbind movedim moveaxis
swapaxes swapdims flip cat concat concatenate stack channel_shuffle native_channel_shuffle
pixel_shuffle pixel_unshuffle
""")
_SPATIAL = _names("""
max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d lp_pool1d lp_pool2d interpolate upsample upsample_nearest upsample_bilinear
""")
_REDUCE = _names("""
mean sum amax amin max min std var prod logsumexp nansum nanmean argmax argmin
""")
_ALONG_DIM = {"softmax": None, "log_softmax": None, "softmin": None, "cumsum": None,
              "cumprod": None, "normalize": 1, "glu": -1}
_CHANNEL_NORM = _names("""
group_norm local_response_norm batch_norm instance_norm
""")
_LAYERNORM = _names("""
layer_norm rms_norm
""")
_MATMUL = _names("""
matmul mm bmm
""")

_TABLES = (("unary", _UNARY), ("elementwise", _ELEMENTWISE), ("movement", _MOVEMENT),
           ("spatial", _SPATIAL), ("reduce", _REDUCE), ("along_dim", list(_ALONG_DIM)),
           ("channel_norm", _CHANNEL_NORM), ("layernorm", _LAYERNORM), ("matmul", _MATMUL),
           ("pad", ["pad"]), ("getitem", ["getitem"]))
_METHOD_KIND = {name: kind for kind, names in _TABLES for name in names}


def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional
        return None
    return stochastic_depth


def _function_kinds() -> dict[Any, tuple[str, str]]:
    """function -> (kind, name) for the torch, F and operator functions in the tables."""
    out: dict[Any, tuple[str, str]] = {}
    for kind, names in _TABLES:
        for name in names:
            for ns in (torch, F, operator, torch.special):
                fn = getattr(ns, name, None)
                if callable(fn) and not isinstance(fn, type):
                    out.setdefault(fn, (kind, name))
    sd = _stochastic_depth()
    if sd is not None:
        out[sd] = ("unary", "stochastic_depth")
    return out


_FUNCTION_KIND = _function_kinds()

_MODULE_KINDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
    ("linear", (nn.Linear,)),
    ("channel_affine", (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)),
    ("layernorm", (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))),
    ("channel_norm", (nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)),
    ("unary", (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
               nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink,
               nn.Softshrink, nn.Threshold, nn.RReLU, nn.Identity, nn.Dropout, nn.Dropout1d,
               nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)),
    ("spatial", (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d,
                 nn.LPPool2d, nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                 nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
                 nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                 nn.ReplicationPad2d, nn.ReplicationPad3d)),
    ("movement", (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle,
                  nn.PixelUnshuffle)),
    ("along_dim", (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)),
)


class Op(NamedTuple):
    """The classification of one node: ``kind``, a readable ``name`` and kind-specific data.

    ``module`` is the called module for ``call_module`` nodes; ``nd`` the number of trailing
    spatial dims a ``spatial`` op works on (``None``: all dims after the channel dim).
    """

    kind: str
    name: str
    module: nn.Module | None = None
    nd: int | None = None


def _nd_from_name(name: str) -> int | None:
    m = re.search(r"([123])d$", name.lower())
    return int(m.group(1)) if m else None


def classify(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Op:
    """Sort ``node`` into the kind of rule channel-group analysis applies to it."""
    if node.op in ("placeholder", "get_attr", "output"):
        return Op(node.op, node.op)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        for kind, types in _MODULE_KINDS:
            if isinstance(m, types):
                name = type(m).__name__
                return Op(kind, name, m, _nd_from_name(name))
        if isinstance(m, nn.PReLU):
            return Op("unary" if m.num_parameters == 1 else "channel_affine", "PReLU", m)
        return Op("opaque", f"module {node.target!r} ({type(m).__name__})", m)
    if node.op == "call_method":
        kind = _METHOD_KIND.get(node.target, "unknown")
        return Op(kind, f"Tensor.{node.target}", None, _nd_from_name(node.target))
    target = node.target
    if target is builtins.getattr:
        attr = node.args[1] if len(node.args) > 1 else None
        kind = {"T": "movement", "mT": "movement", "H": "movement", "mH": "movement",
                "data": "unary", "real": "unary"}.get(attr, "unknown")
        return Op(kind, f"getattr .{attr}")
    try:
        kind, name = _FUNCTION_KIND.get(target, ("unknown", None))
    except TypeError:  # an unhashable callable
        kind, name = "unknown", None
    shown = name or getattr(target, "__name__", None) or str(target)
    return Op(kind, shown, None, _nd_from_name(shown))


def along_dim_default(name: str) -> Any:
    """Default ``dim`` of an along-dim op (``None`` where the op requires one)."""
    return _ALONG_DIM.get(name.split(".")[-1])


def is_producer(op: Op) -> bool:
    """Ops whose outputs are new channels with their own weights (conv, linear)."""
    return op.kind in ("conv", "linear")
