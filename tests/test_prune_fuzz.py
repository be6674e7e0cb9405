"""Random small CNNs + random masks: analysis and pruning never break shapes, and the pruned
model computes what the zeroed original computes, with the predicted MACs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

import pqcompile
from pqcompile.meta import CHANNEL_GROUPS
from pqcompile.passes import (
    ChannelGroupAnalysis,
    PruneChannels,
    ShapeAnalysis,
    analyze_cost,
    predicted_macs,
    zero_channels,
)

HW = 6
ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "none": nn.Identity}


def conv_bn(cin, cout, k=1, groups=1, act="relu"):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups),
                         nn.BatchNorm2d(cout), ACTS[act]())


class Net(nn.Module):
    """Runs ``spec``: a list of (kind, args) blocks, then a head."""

    def __init__(self, spec, head, cin=3):
        super().__init__()
        self.spec, self.head_kind = spec, head
        self.blocks = nn.ModuleList()
        c = cin
        for kind, a in spec:
            self.blocks.append(self._make(kind, a, c))
            c = a["cout"]
        if head == "gap_linear":
            self.head = nn.Sequential(nn.Linear(c, 5), nn.ReLU(), nn.Linear(5, 3))
        elif head in ("flatten_linear", "view_linear"):
            self.head = nn.Linear(c * HW * HW, 3)
        else:
            self.head = nn.Conv2d(c, 3, 1)

    @staticmethod
    def _make(kind, a, c):
        m = nn.ModuleDict()
        if kind == "conv":
            m["f"] = conv_bn(c, a["cout"], a["k"], act=a["act"])
        elif kind == "residual":
            m["f"] = nn.Sequential(conv_bn(c, c, 3), conv_bn(c, c, 1, act="none"))
        elif kind == "concat":
            m["a"], m["b"] = conv_bn(c, a["c1"]), conv_bn(c, a["cout"] - a["c1"], 3)
        elif kind == "dense":
            m["f"] = conv_bn(c, a["cout"] - c, 3)
        elif kind == "depthwise":
            m["f"] = conv_bn(c, a["cout"], 3, groups=c, act=a["act"])
        elif kind == "grouped":
            m["f"] = conv_bn(c, a["cout"], 3, groups=a["g"])
        elif kind == "split":
            m["f"] = conv_bn(c - a["s"], a["cout"] - a["s"], 3)
        elif kind == "se":
            m["a"], m["b"] = nn.Conv2d(c, a["r"], 1), nn.Conv2d(a["r"], c, 1)
        elif kind == "attention":
            m["f"] = nn.Conv2d(c, 1, 3, padding=1)
        return m

    def forward(self, x):
        for (kind, a), m in zip(self.spec, self.blocks):
            if kind in ("conv", "depthwise", "grouped"):
                x = m["f"](x)
            elif kind == "residual":
                x = F.relu(m["f"](x) + x)
            elif kind == "concat":
                x = torch.cat([m["a"](x), m["b"](x)], 1)
            elif kind == "dense":
                x = torch.cat([x, m["f"](x)], 1)
            elif kind == "split":
                if a["how"] == "chunk":
                    x1, x2 = x.chunk(2, dim=1)
                else:
                    x1, x2 = torch.split(x, [a["s"], x.shape[1] - a["s"]], dim=1)
                x = torch.cat([m["f"](x2), x1] if a["swap"] else [x1, m["f"](x2)], 1)
            elif kind == "shuffle":
                x = channel_shuffle(x, a["g"]) if a["view"] else F.channel_shuffle(x, a["g"])
            elif kind == "se":
                s = F.adaptive_avg_pool2d(x, 1)
                x = x * torch.sigmoid(m["b"](F.relu(m["a"](s))))
            elif kind == "attention":
                x = x * torch.sigmoid(m["f"](x))
            elif kind == "pool":
                x = F.max_pool2d(x, 3, 1, 1) if a["max"] else nn.functional.avg_pool2d(x, 3, 1, 1)
            elif kind == "slice":
                x = x[:, a["lo"]:a["lo"] + a["cout"]]
        if self.head_kind == "gap_linear":
            return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.head_kind == "flatten_linear":
            return self.head(torch.flatten(x, 1))
        if self.head_kind == "view_linear":
            return self.head(x.view(x.size(0), -1))
        return self.head(x)


@st.composite
def nets(draw):
    c = draw(st.integers(2, 8))
    c0 = c
    spec = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "residual", "concat", "dense", "depthwise",
                                     "grouped", "split", "shuffle", "se", "attention", "pool",
                                     "slice"]))
        a = {"cout": c}
        if kind == "conv":
            a.update(cout=draw(st.integers(2, 12)), k=draw(st.sampled_from([1, 3])),
                     act=draw(st.sampled_from(sorted(ACTS))))
        elif kind == "concat":
            a.update(c1=draw(st.integers(1, 6)), cout=0)
            a["cout"] = a["c1"] + draw(st.integers(1, 6))
        elif kind == "dense":
            a["cout"] = c + draw(st.integers(1, 6))
        elif kind == "depthwise":
            a.update(cout=c * draw(st.sampled_from([1, 2])), act=draw(st.sampled_from(["relu",
                                                                                       "none"])))
        elif kind in ("grouped", "shuffle") or (kind == "split" and c < 2):
            g = draw(st.sampled_from([2, 3, 4]))
            if c % g or c == g:  # a conv first, so the channels divide into groups
                c = g * draw(st.integers(2, 3))
                spec.append(("conv", {"cout": c, "k": 1, "act": "relu"}))
            if kind == "grouped":
                a.update(g=g, cout=g * draw(st.integers(1, 3)))
            else:
                a.update(g=g, cout=c, view=draw(st.booleans()))
        if kind == "split":
            how = draw(st.sampled_from(["chunk", "split"]))
            if how == "chunk" and c % 2:
                how = "split"
            s = c // 2 if how == "chunk" else draw(st.integers(1, c - 1))
            a.update(how=how, s=s, swap=draw(st.booleans()))
            a["cout"] = s + draw(st.integers(1, 6))
        elif kind == "se":
            a["r"] = draw(st.integers(1, 4))
        elif kind == "pool":
            a["max"] = draw(st.booleans())
        elif kind == "slice":
            if c < 2:
                continue
            a["cout"] = draw(st.integers(1, c - 1))
            a["lo"] = draw(st.integers(0, c - a["cout"]))
        spec.append((kind, a))
        c = a["cout"]
    head = draw(st.sampled_from(["gap_linear", "flatten_linear", "view_linear", "conv"]))
    if not spec or spec[0][0] != "conv":
        spec.insert(0, ("conv", {"cout": c0, "k": 3, "act": "relu"}))
    return spec, head


def build(spec, head, seed):
    torch.manual_seed(seed)
    model = Net(spec, head).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def run_case(data):
    spec, head = data.draw(nets(), label="model")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = build(spec, head, seed)
    x = torch.randn(2, 3, HW, HW, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    gm = pqcompile.trace(model, (x,))
    gm = ChannelGroupAnalysis(strict=True)(ShapeAnalysis()(gm).graph_module).graph_module
    groups = CHANNEL_GROUPS.get(gm)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="mask seed"))
    masks = {}
    for g in groups:
        if g.prunable and g.size > 1:
            keep = rng.random(g.size) < rng.uniform(0.2, 0.9)
            keep[rng.integers(g.size)] = True
            masks[g.id] = keep
    pruned = PruneChannels(masks)(gm).graph_module
    zeroed = zero_channels(model, groups, masks)
    with torch.no_grad():
        ref, out = zeroed(x), pruned(x)
    assert out.shape == ref.shape
    assert (ref - out).abs().max() <= 1e-9 * max(1.0, ref.abs().max().item())
    assert analyze_cost(pruned).macs == predicted_macs(gm, masks)
    removed = sum(int((~m).sum()) for m in masks.values())
    kept_params = sum(p.numel() for p in pruned.parameters())
    assert removed == 0 or kept_params < sum(p.numel() for p in gm.parameters())


COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large]}


@settings(max_examples=50, **COMMON)
@given(st.data())
def test_random_nets_prune_like_zeroing(data):
    run_case(data)


@pytest.mark.slow
@settings(max_examples=300, **COMMON)
@given(st.data())
def test_random_nets_prune_like_zeroing_long(data):
    run_case(data)
