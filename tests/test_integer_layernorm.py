"""Layer norm over the last dim of an integer tensor in fixed point (pqcompile.quant.layernorm).

* the integer square root is exact (``math.isqrt``) on the normalized range, edges included;
* the fixed-point codes against the float64 layer norm quantized the same way: at most one step
  apart, and equal on all but a tiny fraction (8-bit and 16-bit inputs, a constant row);

The builder does not emit the fixed-point layer norm yet (its Relax lowering builds too slowly:
see pqcompile/lower/layernorm.py), so these tests check the reference's arithmetic alone.
"""

import math

import torch
from torch import nn

from pqcompile.meta import QParams
from pqcompile.quant.layernorm import NEWTON_STEPS, POWERS_OF_4, QLayerNorm, make_layer_norm


def test_integer_square_root_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randint(1, 2 ** 62 - 1, (4000,), generator=g),
                   torch.tensor([1, 2, 3, 4, 2 ** 60 + 1, 2 ** 62 - 1, (2 ** 31 - 1) ** 2,
                                 (2 ** 31 - 1) ** 2 - 1, 3 ** 39])])
    e = (w[:, None] >= torch.tensor(POWERS_OF_4)).sum(-1)
    wn = w << (2 * (31 - e))
    assert int(wn.min()) >= 2 ** 60 and int(wn.max()) < 2 ** 62
    x = torch.full_like(wn, 1 << 31)
    for _ in range(NEWTON_STEPS):
        x = (x + torch.div(wn, x, rounding_mode="floor")) >> 1
    x = x - (x * x > wn).to(torch.int64)
    assert x.tolist() == [math.isqrt(int(v)) for v in wn]


def _norm(dim: int, eps: float) -> nn.LayerNorm:
    torch.manual_seed(0)
    ln = nn.LayerNorm(dim, eps=eps)
    with torch.no_grad():
        ln.weight.uniform_(-2, 2)
        ln.bias.uniform_(-1, 1)
    return ln


def test_fixed_point_codes_match_the_float_layer_norm():
    g = torch.Generator().manual_seed(1)
    total = differ = 0
    for bits, s_in, dim, eps in ((8, 0.05, 384, 1e-12), (16, 0.001, 384, 1e-12),
                                 (8, 0.2, 32, 1e-5), (12, 0.01, 64, 1e-2)):
        ln, hi = _norm(dim, eps), 2 ** (bits - 1) - 1
        q = (torch.randn(64, dim, generator=g) * hi / 6).round().clamp(-hi, hi)
        q[0] = 3  # a constant row: the output is the bias
        q[1, 5] = hi  # an outlier
        y = ln.double()(q.double() * s_in).detach()
        out = QParams(float(y.abs().max()) / 127, 8, True)
        module = make_layer_norm(ln, QParams(s_in, bits, True), out, -127, 127)
        assert isinstance(module, QLayerNorm)
        got, want = module(q), torch.floor(y / out.scale + 0.5).clamp(-127, 127)
        assert (got - want).abs().max() <= 1 and got.abs().max() >= 120
        total, differ = total + got.numel(), differ + int((got != want).sum())
    assert differ / total < 1e-3, differ / total
    # an output scale no fixed-point multiplier reaches: the norm stays a float island
    tiny = QParams(1e-16, 8, True)
    assert make_layer_norm(_norm(8, 1e-5), QParams(0.01, 8, True), tiny, -127, 127) is None
