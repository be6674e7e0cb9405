"""The modules layer discovery puts in a traced graph (:mod:`.layer_discovery`).

They hold the traced model's own ``nn.Parameter`` objects (a 1-d conv's weight as a view with a
unit height dim), so nothing is copied and the user's model is never touched: a
``Conv2d``/``BatchNorm2d`` computing a 1-d conv/batch norm on a unit height dim, and
:class:`OpaqueLeaf` for a leaf that is a conv/linear by type but not by what it computes.

>>> import torch
>>> conv1d = torch.nn.Conv1d(4, 6, 3, stride=2, padding=1)
>>> conv = conv2d_like(conv1d.weight, conv1d.bias, conv1d.stride, conv1d.padding,
...                    conv1d.dilation, conv1d.groups, nd=1)
>>> x = torch.randn(2, 4, 9)
>>> bool(torch.allclose(conv(x.unsqueeze(2)).squeeze(2), conv1d(x), atol=1e-6))
True
>>> conv.bias is conv1d.bias
True
"""

from __future__ import annotations

from typing import Any

from torch import nn


class OpaqueLeaf(nn.Module):
    """A leaf module kept whole: runs ``module`` as it is, in float.

    Wraps a leaf that *is an* ``nn.Conv2d``/``nn.Linear`` by type but computes something else
    (its class overrides ``forward``), so that no pass treats it as the plain layer.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def computes_as_base(m: nn.Module) -> bool:
    """Whether a conv/linear module computes what its ``torch.nn`` base class computes (its
    class does not override ``forward`` or the conv's ``_conv_forward``)."""
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d,
                 nn.ConvTranspose2d, nn.ConvTranspose3d):
        if isinstance(m, base):
            cls = type(m)
            return cls.forward is base.forward and \
                getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)
    return True


def _tuple(v: Any, nd: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def conv2d_like(weight: nn.Parameter, bias: nn.Parameter | None, stride, padding, dilation,
                 groups: int, nd: int) -> nn.Conv2d:
    """An ``nn.Conv2d`` computing the ``nd``-d conv (``nd == 1``: on a unit height dim),
    holding ``weight`` and ``bias`` (a 1-d conv's weight gets a unit height dim: a view)."""
    if nd == 1:
        stride, dilation = (1, *_tuple(stride, 1)), (1, *_tuple(dilation, 1))
        padding = padding if isinstance(padding, str) else (0, *_tuple(padding, 1))
        weight = nn.Parameter(weight.detach().unsqueeze(2), requires_grad=weight.requires_grad)
    out_c, in_per_group, *kernel = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_c, tuple(kernel), stride=stride,
                     padding=padding, dilation=dilation, groups=groups, bias=bias is not None,
                     device="meta")
    conv.weight = weight
    conv.bias = bias
    return conv


def batchnorm2d_like(bn: nn.BatchNorm1d) -> nn.BatchNorm2d:
    """A ``BatchNorm2d`` holding ``bn``'s parameters and statistics."""
    out = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                         bn.track_running_stats, device="meta")
    for name, p in bn.named_parameters(recurse=False):
        setattr(out, name, p)
    for name, b in bn.named_buffers(recurse=False):
        setattr(out, name, b)
    return out.train(bn.training)
