"""Parity: the compiled integer program equals the integer-exact reference, bit for bit.

Outputs are compared as integers before dequantization (``LoweringReport.output_integers``
recovers them exactly from the float32 outputs). Where float ops are involved at most 1 LSB is
allowed; the measured worst case is printed (run with ``-s``). The dense small net is built
with the default LLVM optimization level, the others with ``opt_level=0`` to keep code
generation short (integer results do not depend on it; at the default level they were measured
exact as well).
"""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.lower import build, lower, run
from pqcompile.meta import CHANNEL_GROUPS, BitWidths
from pqcompile.passes import ChannelGroupAnalysis, PruneChannels, ShapeAnalysis
from pqcompile.passes.fold_bn import FoldBatchNorm
from pqcompile.quant import build_reference, integer_outputs


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return model.eval()


def batches(n: int, shape, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def worst_lsb(ref, report, ex, params, inputs) -> int:
    worst = 0
    for x in inputs:
        got = run(ex, params, [x])
        for r, g in zip(integer_outputs(ref, x), report.output_integers(got)):
            worst = max(worst, int(np.abs(r.numpy() - g).max()))
    return worst


def sqnr_db(model: nn.Module, ref, inputs) -> float:
    with torch.no_grad():
        signal = sum(float((model(x) ** 2).sum()) for x in inputs)
        noise = sum(float(((model(x) - ref(x)) ** 2).sum()) for x in inputs)
    return 10 * np.log10(signal / noise)


# --- a net with every op kind, at mixed 2/4/8 bits -------------------------------------------


def cbn(cin, cout, k, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class ParityNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.c1, self.c2 = cbn(3, 16, 3), cbn(16, 16, 3), cbn(16, 16, 3)
        self.dw = cbn(16, 16, 3, groups=16)                       # depthwise
        self.b1, self.b2 = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.se, self.c3 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 32, 3, padding=1)
        self.pool, self.avg, self.gap = nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)
        self.hs, self.relu6 = nn.Hardswish(), nn.ReLU6()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.stem(x)))                       # max pool
        x = F.relu(x + self.c2(torch.relu(self.c1(x))))           # residual add, ReLU folded
        x = self.relu6(self.dw(x))                                # ReLU6
        x = torch.cat([F.relu(self.b1(x)), self.b2(x)], 1)        # concat unsigned + signed
        x = self.hs(x)                                            # a table
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))  # SE gating: table, mul
        x = F.relu(self.c3(self.avg(x)))                          # average pool
        return self.fc(torch.flatten(self.gap(x), 1))             # adaptive pool, linear head


PARITY_BITS = {"stem_0": (8, 8), "c1_0": (4, 4), "c2_0": (2, 2), "dw_0": (8, 4), "b1": (4, 4),
               "b2": (2, 4), "se": (8, 8), "c3": (4, 4), "fc": (8, 8)}
PARITY_FLOAT_OPS = []  # hardswish and sigmoid are tables, the gate an integer product


def parity_net():
    torch.manual_seed(0)
    return randomize_bn(ParityNet())


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_parity_net_mixed_bits(pruned):
    model = parity_net()
    gm = pqcompile.trace(model, (torch.randn(2, 3, 32, 32),))
    masks = {}
    if pruned:
        gm = pqcompile.Pipeline([ShapeAnalysis(), ChannelGroupAnalysis()])(gm).graph_module
        rng = np.random.default_rng(0)
        for g in CHANNEL_GROUPS.get(gm):
            if g.prunable:
                masks[g.id] = rng.random(g.size) < 0.6
                masks[g.id][0] = True
        assert len(masks) >= 4
        gm = PruneChannels(masks)(gm).graph_module
    gm = FoldBatchNorm()(gm).graph_module
    a = Assignment({k: BitWidths(*v) for k, v in PARITY_BITS.items()}, masks)
    ref = build_reference(gm, a, batches(4, (4, 3, 32, 32), seed=1))
    mod, params, report = lower(ref)
    assert [(f.node, f.op) for f in report.float_ops] == PARITY_FLOAT_OPS
    assert {report.weight_storage[k] for k in ("c2_0", "b2")} == {"int2 packed 4 per byte"}
    inputs = batches(4, (2, 3, 32, 32), seed=2)
    t0 = time.perf_counter()
    ex = build(mod, opt_level=0 if pruned else None)  # the dense net takes the default path
    run(ex, params, inputs[:1])  # the first call loads the code (LLVM emits it lazily)
    seconds = time.perf_counter() - t0
    worst = worst_lsb(ref, report, ex, params, inputs)
    print(f"\nParityNet ({'pruned' if pruned else 'dense'}, bits 2/4/8, float ops "
          f"{[f.node for f in report.float_ops]}): max |LSB| = {worst}, "
          f"build+load {seconds:.1f} s, params {report.param_bytes} bytes")
    assert worst <= (1 if report.float_ops else 0)


# --- torchvision models at 1x3x64x64 ------------------------------------------------------


def mixed_48(gm: torch.fx.GraphModule, layers: list[str]) -> Assignment:
    """Weights alternate 8/4 bits; each tensor read by layers gets 8 or 4 activation bits in
    turn (first and last layers 8/8), so layers reading one tensor agree."""
    nodes = {n.name: n for n in gm.graph.nodes}
    act: dict[str, int] = {}
    bits = {}
    for i, name in enumerate(layers):
        src = nodes[name].args[0].name
        act.setdefault(src, (4, 8)[len(act) % 2])
        bits[name] = BitWidths((8, 4)[i % 2], act[src])
    bits[layers[0]] = bits[layers[-1]] = BitWidths(8, 8)
    return Assignment(bits)


@pytest.fixture(scope="module")
def vision():
    """(model, reference, lowered program) per (model name, config), built once."""
    cache: dict = {}

    def get(name: str, config: str):
        key = (name, config)
        if key not in cache:
            model = randomize_bn(getattr(torchvision.models, name)(), seed=3)
            gm = FoldBatchNorm()(pqcompile.trace(model, (torch.randn(1, 3, 64, 64),))).graph_module
            layers = [n.name for n in gm.graph.nodes if n.op == "call_module" and
                      isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))]
            a = Assignment.uniform(layers, 8, 8) if config == "int8" else mixed_48(gm, layers)
            ref = build_reference(gm, a, batches(8, (1, 3, 64, 64), seed=4))
            cache[key] = (model, ref, *lower(ref))
        return cache[key]

    return get


@pytest.mark.parametrize("config", ["int8", "mixed48"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_parity(vision, name, config):
    model, ref, mod, params, report = vision(name, config)
    assert report.float_ops == ()
    t0 = time.perf_counter()
    ex = build(mod, opt_level=0)
    inputs = batches(3, (1, 3, 64, 64), seed=5)
    run(ex, params, inputs[:1])  # the first call loads the code (LLVM emits it lazily)
    seconds = time.perf_counter() - t0
    worst = worst_lsb(ref, report, ex, params, inputs)
    print(f"\n{name} {config}: max |LSB| = {worst}, build+load {seconds:.1f} s, "
          f"params {report.param_bytes} bytes, SQNR vs fp32 {sqnr_db(model, ref, inputs):.1f} dB")
    assert worst == 0  # no float ops: the integer program is exact


def test_resnet18_int8_sqnr(vision):
    model, ref, *_ = vision("resnet18", "int8")
    db = sqnr_db(model, ref, batches(4, (1, 3, 64, 64), seed=6))
    print(f"\nresnet18 8-bit reference vs fp32: SQNR {db:.1f} dB (minmax, 8 calibration batches)")
    assert db >= 20
