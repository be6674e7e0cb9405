"""CostAnalysis: MACs against published counts and hand-computed values; BOPs and bytes."""

import pytest
import torch
import torchvision
from torch import nn

import pqcompile
from pqcompile.meta import BITS, COST, COST_TOTALS, BitWidths
from pqcompile.models import resnet20
from pqcompile.passes import CostAnalysis, ShapeAnalysis, analyze_cost, matmul_macs


@pytest.mark.parametrize("name, shape, expected, tol", [
    ("resnet18", (1, 3, 224, 224), 1.814e9, 0.005),
    ("mobilenet_v2", (1, 3, 224, 224), 0.30e9, 0.01),
])
def test_torchvision_macs(name, shape, expected, tol):
    model = getattr(torchvision.models, name)()
    totals = analyze_cost(pqcompile.trace(model, (torch.randn(shape),)))
    assert abs(totals.macs - expected) / expected <= tol
    assert totals.bops == totals.macs * 32 * 32 == totals.fp32_bops
    assert totals.params == sum(p.numel() for p in model.parameters())
    assert totals.weight_bytes == 4 * totals.params


def test_resnet20_macs():
    totals = analyze_cost(pqcompile.trace(resnet20(), (torch.randn(1, 3, 32, 32),)))
    assert abs(totals.macs - 40.8e6) / 40.8e6 <= 0.01
    # Hand count: stem 32*32*16*3*9; stage 1: 6 convs 32*32*16*16*9; stage 2: 16*16*32*16*9,
    # 5 convs 16*16*32*32*9, shortcut 16*16*32*16; stage 3 likewise at 8x8, 64 ch; fc 64*10.
    hand = (32 * 32 * 16 * 3 * 9 + 6 * 32 * 32 * 16 * 16 * 9
            + 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9 + 16 * 16 * 32 * 16
            + 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9 + 8 * 8 * 64 * 32 + 64 * 10)
    assert totals.macs == hand


@pytest.mark.parametrize("conv, hw, expected", [
    # MACs = N * H_out * W_out * C_out * (C_in / groups) * k_h * k_w
    (nn.Conv2d(8, 16, 3, stride=1, padding=1), 10, 10 * 10 * 16 * 8 * 9),
    (nn.Conv2d(8, 16, 3, stride=2, padding=1), 10, 5 * 5 * 16 * 8 * 9),
    (nn.Conv2d(8, 16, 3, stride=1, padding=0), 10, 8 * 8 * 16 * 8 * 9),
    (nn.Conv2d(8, 16, 3, padding=2, dilation=2), 10, 10 * 10 * 16 * 8 * 9),
    (nn.Conv2d(8, 16, (1, 5), padding=(0, 2)), 10, 10 * 10 * 16 * 8 * 5),
    (nn.Conv2d(8, 16, 3, padding=1, groups=4), 10, 10 * 10 * 16 * 2 * 9),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), 10, 10 * 10 * 8 * 1 * 9),  # depthwise
    (nn.Conv2d(8, 24, 3, padding=1, groups=8), 10, 10 * 10 * 24 * 1 * 9),  # multiplier 3
    (nn.ConvTranspose2d(8, 4, 2, stride=2), 10, 10 * 10 * 8 * 4 * 4),
])
def test_conv_macs_by_hand(conv, hw, expected):
    totals = analyze_cost(pqcompile.trace(conv, (torch.randn(2, 8, hw, hw),)))
    assert totals.macs == 2 * expected
    assert totals.bops == 2 * expected * 1024


class Attention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c)
        sdpa = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out) + sdpa.transpose(1, 2).reshape(b, n, c)


def test_attention_macs_by_hand():
    b, n, c, h = 2, 7, 32, 4
    totals = analyze_cost(pqcompile.trace(Attention(c, h), (torch.randn(b, n, c),)))
    d = c // h
    qkv = b * n * 3 * c * c
    scores = b * h * n * d * n
    context = b * h * n * n * d
    proj = b * n * c * c
    assert totals.macs == qkv + 2 * (scores + context) + proj


def test_multihead_attention_module():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    totals = analyze_cost(pqcompile.trace(M(), (torch.randn(3, 5, 16),)))
    n = 3 * 5
    assert totals.macs == 3 * n * 16 * 16 + 2 * n * 5 * 16 + n * 16 * 16


def test_matmul_broadcast_and_errors():
    assert matmul_macs((4, 1, 3, 5), (2, 5, 6)) == 4 * 2 * 3 * 5 * 6
    assert matmul_macs((5,), (5, 6)) == 30
    with pytest.raises(ValueError, match="do not match"):
        matmul_macs((3, 4), (5, 6))


def test_bits_change_bops_and_bytes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    gm = ShapeAnalysis()(pqcompile.trace(model, (torch.randn(1, 3, 8, 8),))).graph_module
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    BITS.set(nodes["0"], BitWidths(4, 8))
    BITS.set(nodes["3"], BitWidths(2, 4))
    gm = CostAnalysis()(gm).graph_module
    conv_macs, fc_macs = 6 * 6 * 8 * 3 * 9, 288 * 10
    assert COST.get(nodes["0"]).bops == conv_macs * 4 * 8
    assert COST.get(nodes["3"]).bops == fc_macs * 2 * 4
    totals = COST_TOTALS.get(gm)
    assert totals.bops == conv_macs * 32 + fc_macs * 8
    assert totals.fp32_bops == (conv_macs + fc_macs) * 1024
    # Weights at their bits; per output channel the program's int32 bias, multiplier, shift.
    assert totals.weight_bytes == 8 * 3 * 9 * 4 / 8 + 8 * 12 + 288 * 10 * 2 / 8 + 10 * 12
    assert totals.bop_reduction == pytest.approx(totals.fp32_bops / totals.bops)


def test_shared_module_params_counted_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    totals = analyze_cost(pqcompile.trace(Shared(), (torch.randn(1, 4),)))
    assert totals.params == 20 and totals.macs == 2 * 16
