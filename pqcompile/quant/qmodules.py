"""The modules of the integer-exact reference (one per integer op of the scheme).

Between modules, tensors hold integer values in float64 (convolutions of integer-valued float64
tensors are exact below 2^53); requantization runs in int64 with the recorded ``(m, shift)``.
With ``fake = True`` (see :func:`pqcompile.quant.fake_quant_view`) the same modules compute the
standard float fake-quant view instead: tensors hold dequantized float32 values and every
output is ``clamp(round(y / s), lo, hi) * s``.

>>> import torch
>>> from pqcompile.meta import QParams
>>> q = Quantize(QParams(0.5, 8, True))
>>> q(torch.tensor([0.26, -0.74, 100.0])).tolist()
[1.0, -1.0, 127.0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..meta import FixedPoint, QParams, WeightQuant
from .fixedpoint import requantize, rescale_sum
from .qparams import fake_quant


def _long(values, shape=(-1,)) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).reshape(shape)


class QModule(nn.Module):
    """Base: ``out`` is the output tensor's :class:`QParams`, ``lo``/``hi`` its clamp bounds."""

    def __init__(self, out: QParams, lo: int | None = None, hi: int | None = None) -> None:
        super().__init__()
        self.out = out
        self.lo = out.qmin if lo is None else lo
        self.hi = out.qmax if hi is None else hi
        self.fake = False

    def _fq(self, y: torch.Tensor) -> torch.Tensor:
        return fake_quant(y.to(torch.float32), self.out.scale, self.lo, self.hi)


class Quantize(QModule):
    """float -> integers: ``clamp(floor(x / s + 0.5), lo, hi)``, computed in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(x)
        q = torch.floor(x.to(torch.float64) / self.out.scale + 0.5)
        return q.clamp(self.lo, self.hi)


class Dequantize(QModule):
    """integers -> float32: ``float32(q) * float32(s)``."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return q.to(torch.float32)
        return q.to(torch.float32) * torch.tensor(self.out.scale, dtype=torch.float32)


class _QLayer(QModule):
    """Shared state of conv and linear: int8 weight, int32 bias, per-channel (m, shift)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, wq: WeightQuant,
                 fp: FixedPoint, inp: QParams, out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int64))
        self.register_buffer("mult", _long(fp.mult))
        self.register_buffer("shift", _long(fp.shift))
        self.wq, self.fp, self.inp = wq, fp, inp

    def _float_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        s_w = torch.tensor(self.wq.scales, dtype=torch.float64)
        view = (-1,) + (1,) * (self.weight.dim() - 1)
        w = (self.weight.to(torch.float64) * s_w.view(view)).to(torch.float32)
        b = (self.bias.to(torch.float64) * s_w * self.inp.scale).to(torch.float32)
        return w, b

    def _requant(self, acc: torch.Tensor, view) -> torch.Tensor:
        acc = acc.to(torch.int64) + self.bias.view(view)
        y = requantize(acc, self.mult.view(view), self.shift.view(view), self.lo, self.hi)
        return y.to(torch.float64)


class QConv2d(_QLayer):
    def __init__(self, *args, stride, padding, dilation, groups) -> None:
        super().__init__(*args)
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups
        # Input channels per float32 convolution such that every partial sum is an integer
        # below 2^24, hence exact in float32 whatever the summation order.
        w_max = 2 ** (self.wq.bits - 1) - 1
        x_max = max(-self.inp.qmin, self.inp.qmax)
        taps = self.weight.shape[2] * self.weight.shape[3]
        self.chunk = (1 << 24) // (x_max * w_max * taps)

    def _conv(self, x, w, b=None):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _exact_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The integer convolution, exact, mostly in float32 (float64 convs are slow on CPU)."""
        w = self.weight
        cin = w.shape[1]
        if cin <= self.chunk:
            return self._conv(x.to(torch.float32), w.to(torch.float32)).to(torch.float64)
        if self.groups != 1 or self.chunk == 0:
            return self._conv(x, w.to(torch.float64))
        acc = None
        for start in range(0, cin, self.chunk):
            part = F.conv2d(x[:, start:start + self.chunk].to(torch.float32),
                            w[:, start:start + self.chunk].to(torch.float32), None,
                            self.stride, self.padding, self.dilation, 1).to(torch.float64)
            acc = part if acc is None else acc + part
        return acc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(self._conv(x.to(torch.float32), *self._float_params()))
        return self._requant(self._exact_conv(x), (1, -1, 1, 1))


class QLinear(_QLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(F.linear(x.to(torch.float32), *self._float_params()))
        return self._requant(F.linear(x, self.weight.to(torch.float64)), (-1,))


class QAdd(QModule):
    """``a + b``: both operands rescaled into one int64 accumulator, one rounding shift."""

    def __init__(self, mults: list[int], shift: int, out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.mults, self.shift = list(mults), shift

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(a + b)
        return rescale_sum([a, b], self.mults, self.shift, self.lo, self.hi).to(torch.float64)


class QCat(QModule):
    """``cat(xs, dim)``: each input requantized to the output scale (copied when equal)."""

    def __init__(self, dim: int, fps: list[FixedPoint | None], out: QParams, lo: int,
                 hi: int) -> None:
        super().__init__(out, lo, hi)
        self.dim, self.fps = dim, list(fps)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(torch.cat(xs, self.dim))
        parts = [x if fp is None else requantize(x, fp.mult[0], fp.shift[0], self.lo,
                                                 self.hi).to(torch.float64)
                 for x, fp in zip(xs, self.fps)]
        return torch.cat(parts, self.dim)


class QSumPool(QModule):
    """Average pooling as an integer window sum requantized by ``s_in / (s_out * count)``.

    ``window`` is ``(kernel, stride, padding)`` (zero padding counted, as torch's
    ``count_include_pad=True``), or ``None`` for a mean over ``dims``.
    """

    def __init__(self, window, dims, keepdim: bool, count: int, fp: FixedPoint,
                 out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.window, self.dims, self.keepdim = window, dims, keepdim
        self.count, self.fp = count, fp

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is not None:
            k, s, p = self.window
            return F.avg_pool2d(x, k, s, p, ceil_mode=False, count_include_pad=True,
                                divisor_override=1)
        return x.sum(dim=self.dims, keepdim=self.keepdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(self._sum(x.to(torch.float32)) / self.count)
        return requantize(self._sum(x), self.fp.mult[0], self.fp.shift[0], self.lo,
                          self.hi).to(torch.float64)


class QEmbedding(QModule):
    """Integer ids -> integers: a lookup in the table quantized at the output's scale (the
    rounding of :class:`Quantize`), so the compiled lookup is exact."""

    def __init__(self, table: torch.Tensor, out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.register_buffer("table", table.to(torch.int8 if out.signed else torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return F.embedding(ids, self.table.to(torch.float32) * self.out.scale)
        return F.embedding(ids, self.table.to(torch.float64))


class QClip(QModule):
    """A ReLU/ReLU6 that could not be folded: a clamp on the integers, scale unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return x.clamp(self.lo * self.out.scale, self.hi * self.out.scale)
        return x.clamp(self.lo, self.hi)


class FloatOp(QModule):
    """An op with no integer lowering: dequantize (float64) -> ``fn`` -> quantize.

    ``fn`` is a small ``GraphModule`` in float64 holding just the op, so the compiled program
    can translate the very same graph; float64 keeps the two within ~1e-16 of each other.
    """

    def __init__(self, fn: nn.Module, op: str, ins: list[QParams | None], out: QParams) -> None:
        super().__init__(out)
        self.fn, self.op, self.ins = fn, op, list(ins)

    def forward(self, *qs: torch.Tensor) -> torch.Tensor:
        if self.fake:
            return self._fq(self.fn(*(q.to(torch.float64) for q in qs)))
        # an input without qparams is an unquantized integer-derived value (a mask): as it is
        xs = [q.to(torch.float64) * p.scale if p is not None else q.to(torch.float64)
              for q, p in zip(qs, self.ins)]
        y = self.fn(*xs).to(torch.float64)
        return torch.floor(y / self.out.scale + 0.5).clamp(self.lo, self.hi)


class QMaxPool(nn.Module):
    """Max pooling directly on the integers (identical in the fake-quant view)."""

    def __init__(self, kernel, stride, padding, dilation, ceil_mode: bool) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode
        self.fake = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation,
                            self.ceil_mode)


class QPad(nn.Module):
    """A constant pad on the integers: with ``code``, the constant quantized at the tensor's
    ``scale`` (``scale * code`` in the fake-quant view). ``pad`` is in ``F.pad``'s order."""

    def __init__(self, pad: tuple[int, ...], code: int, scale: float) -> None:
        super().__init__()
        self.pad, self.code, self.scale = tuple(pad), int(code), scale
        self.fake = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.code * self.scale if self.fake else float(self.code)
        return F.pad(x, self.pad, "constant", value)


class QGather(nn.Module):
    """Reflect/replicate/circular pads and nearest resampling: along each listed axis, output
    position ``i`` reads input position ``index[i]`` (identical in the fake-quant view)."""

    def __init__(self, index: tuple[tuple[int, tuple[int, ...]], ...]) -> None:
        super().__init__()
        self.axes = tuple(axis for axis, _ in index)
        for i, (_, idx) in enumerate(index):
            self.register_buffer(f"index{i}", torch.tensor(idx, dtype=torch.int64))
        self.fake = False

    def indices(self) -> list[tuple[int, torch.Tensor]]:
        return [(axis, getattr(self, f"index{i}")) for i, axis in enumerate(self.axes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for axis, idx in self.indices():
            x = x.index_select(axis, idx)
        return x
