"""ChannelGroupAnalysis: group structure of real and hand-built models, checked by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle

import pqcompile
from pqcompile.errors import PipelineError
from pqcompile.meta import CHANNEL_GROUPS, NODE_CHANNELS
from pqcompile.passes import ChannelGroupAnalysis, Pipeline, ShapeAnalysis, describe_groups


def analyze(model, shape=(1, 3, 32, 32), **trace_kw):
    gm = pqcompile.trace(model.eval(), (torch.randn(shape),), **trace_kw)
    return Pipeline([ShapeAnalysis(), ChannelGroupAnalysis(strict=True)])(gm).graph_module


def by_name(gm, name):
    return next(g for g in CHANNEL_GROUPS.get(gm) if g.name == name)


def member(group, node, role):
    return next(m for m in group.members if m.node == node and m.role == role)


def rows(*ranges):
    return np.array(ranges)


@pytest.mark.parametrize("name, total, prunable", [
    ("resnet18", 13, 12), ("mobilenet_v2", 26, 25), ("densenet121", 121, 120),
    ("shufflenet_v2_x1_0", 40, 39), ("efficientnet_b0", 41, 40), ("regnet_y_400mf", 54, 53),
])
def test_torchvision_group_counts(name, total, prunable):
    gm = analyze(getattr(torchvision.models, name)())
    groups = CHANNEL_GROUPS.get(gm)
    assert (len(groups), sum(g.prunable for g in groups)) == (total, prunable)
    # The only unprunable group is the classifier, whose channels are the model output.
    (bad,) = [g for g in groups if not g.prunable]
    assert bad.size == 1000 and "model output" in bad.reason
    assert [g.id for g in groups] == list(range(len(groups)))
    assert len({g.name for g in groups}) == len(groups)


def test_resnet18_residual_ties_stage():
    gm = analyze(torchvision.models.resnet18())
    stem = by_name(gm, "conv1:out")
    assert stem.size == 64 and stem.prunable
    outs = {m.module for m in stem.members if m.role == "out"}
    ins = {m.module for m in stem.members if m.role == "in"}
    # layer1 has no downsample: its block outputs are added to the stem's channels.
    assert outs == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert ins == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    assert all((m.index == np.arange(64)[:, None]).all() for m in stem.members)
    stage2 = by_name(gm, "layer2.0.conv2:out")
    assert {m.module for m in stage2.members if m.role == "out"} == {
        "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    assert by_name(gm, "layer1.0.conv1:out").nodes == (
        "layer1_0_conv1", "layer1_0_bn1", "layer1_0_relu", "layer1_0_conv2")
    rec = NODE_CHANNELS.get(next(n for n in gm.graph.nodes if n.name == "layer1_0_conv2"))
    assert rec.dims == (1,) and rec.in_dim == 1
    assert rec.in_groups == (by_name(gm, "layer1.0.conv1:out").id,)
    assert rec.out_groups == (stem.id,)


def test_densenet_concat_index_ranges():
    gm = analyze(torchvision.models.densenet121())
    blk = "features.denseblock1"
    stem = by_name(gm, "features.conv0:out")
    layer1 = by_name(gm, f"{blk}.denselayer1.conv2:out")
    layer2 = by_name(gm, f"{blk}.denselayer2.conv2:out")
    assert (stem.size, layer1.size, layer2.size) == (64, 32, 32)
    node = "features_denseblock1_denselayer3_conv1"
    # Layer 3 reads cat([stem, layer 1, layer 2]): offsets 0, 64, 96.
    assert (member(stem, node, "in").index[:, 0] == np.arange(0, 64)).all()
    assert (member(layer1, node, "in").index[:, 0] == np.arange(64, 96)).all()
    assert (member(layer2, node, "in").index[:, 0] == np.arange(96, 128)).all()
    assert (member(layer2, "features_transition1_conv", "in").index[:, 0]
            == np.arange(96, 128)).all()
    assert (member(layer2, "features_denseblock1_denselayer2_conv2", "out").index[:, 0]
            == np.arange(32)).all()


def test_mobilenet_v2_depthwise_passes_channels():
    gm = analyze(torchvision.models.mobilenet_v2())
    stem = by_name(gm, "features.0.0:out")
    assert stem.size == 32
    # features.1 is depthwise 3x3 (32) then 1x1 32 -> 16: both see the stem's channels.
    assert (member(stem, "features_1_conv_0_0", "out").index[:, 0] == np.arange(32)).all()
    assert member(stem, "features_1_conv_1", "in").index.shape == (32, 1)
    expand = by_name(gm, "features.2.conv.0.0:out")
    assert expand.size == 96
    assert {(m.module, m.role) for m in expand.members if m.role != "pass"} == {
        ("features.2.conv.0.0", "out"), ("features.2.conv.1.0", "in"),
        ("features.2.conv.1.0", "out"), ("features.2.conv.2", "in")}


def test_depthwise_multiplier_owns_several_outputs():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, groups=8), nn.Conv2d(16, 2, 1))
    gm = analyze(model, (1, 3, 8, 8))
    g = by_name(gm, "0:out")
    assert g.size == 8
    assert (member(g, "_1", "out").index == np.arange(16).reshape(8, 2)).all()
    assert (member(g, "_2", "in").index == np.arange(16).reshape(8, 2)).all()


class Shuffle(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        x = self.a(x)
        if self.how == "view":
            x = channel_shuffle(x, 2)
        elif self.how == "function":
            x = F.channel_shuffle(x, 2)
        else:
            x = self.shuffle(x)
        return self.b(x)


@pytest.mark.parametrize("how", ["view", "function", "module"])
def test_channel_shuffle_permutation(how):
    gm = analyze(Shuffle(how), (1, 3, 4, 4))
    g = by_name(gm, "a:out")
    # Channel k of both shuffle groups goes together (else the halves would misalign), and
    # lands at positions 2k and 2k+1.
    assert g.size == 4
    assert (member(g, "a", "out").index == rows([0, 4], [1, 5], [2, 6], [3, 7])).all()
    assert (member(g, "b", "in").index == rows([0, 1], [2, 3], [4, 5], [6, 7])).all()
    if how == "view":
        views = [m for m in g.members if isinstance(m.dim, tuple)]
        assert views and all(m.dim == (1, 2) for m in views)


def test_shufflenet_shuffle_positions():
    gm = analyze(torchvision.models.shufflenet_v2_x1_0())
    checked = 0
    for g in CHANNEL_GROUPS.get(gm):
        nodes = {(m.node, m.role): m.index for m in g.members}
        key = ("stage2_1_branch2_0", "in")
        if key not in nodes:
            continue
        b1, b2 = nodes[("stage2_0_branch1_2", "out")], nodes[("stage2_0_branch2_5", "out")]
        for r in range(g.size):
            # stage2.0 interleaves branch1 channel k at 2k, branch2 channel k at 2k+1;
            # stage2.1's branch2 reads the second half (from 58 on).
            shuffled = {2 * k for k in b1[r]} | {2 * k + 1 for k in b2[r]}
            assert set(nodes[key][r]) == {p - 58 for p in shuffled if p >= 58}
            checked += len(nodes[key][r])
    assert checked == 58  # every input channel of stage2.1.branch2.0 was accounted for


def test_flatten_linear_block_map():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10),
                          nn.ReLU(), nn.Linear(10, 3))
    gm = analyze(model, (2, 3, 6, 6))
    conv = by_name(gm, "0:out")
    assert conv.size == 4 and conv.prunable
    block = np.arange(64).reshape(4, 16)  # channel c owns features c*16 .. c*16+15
    assert (member(conv, "_2", "pass").index == block).all()
    assert (member(conv, "_3", "in").index == block).all()
    assert member(conv, "_3", "in").dim == 1
    assert by_name(gm, "3:out").prunable and by_name(gm, "3:out").size == 10
    assert not by_name(gm, "5:out").prunable
    assert NODE_CHANNELS.get(next(n for n in gm.graph.nodes if n.name == "_2")).dims == (1,)


class ResNeXtBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.a = nn.Conv2d(16, 16, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.b(F.relu(self.a(x))))
        return self.head(F.relu(x + self.c(y)))


def test_grouped_conv_ties_member_k_of_every_group():
    gm = analyze(ResNeXtBlock(), (1, 3, 6, 6))
    per_group = np.arange(16).reshape(4, 4).T  # row k: channel k of each of the 4 groups
    into_b = by_name(gm, "a:out")
    assert into_b.size == 4
    assert (member(into_b, "a", "out").index == per_group).all()
    assert (member(into_b, "b", "in").index == per_group).all()
    out_of_b = by_name(gm, "b:out")
    assert (member(out_of_b, "b", "out").index == per_group).all()
    assert (member(out_of_b, "c", "in").index == per_group).all()
    residual = by_name(gm, "stem:out")
    assert residual.size == 16
    assert {m.module for m in residual.members if m.role == "out"} == {"stem", "c"}


class Reasons(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 1)
        self.gn = nn.GroupNorm(2, 6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "input":
            y = y + torch.cat([x, x], 1)
        elif self.kind == "input_direct":
            y = torch.cat([y[:, :3] + x, y[:, 3:]], 1)
        elif self.kind == "unknown":
            y = torch.logcumsumexp(y, 1)
        elif self.kind == "groupnorm":
            y = self.gn(y)
        elif self.kind == "softmax":
            y = y.softmax(dim=1)
        elif self.kind == "mean":
            y = y - y.mean(1, keepdim=True)
        elif self.kind == "select":
            y = y * y[:, 2:3]
        return self.head(y)


@pytest.mark.parametrize("kind, words", [
    ("input", ["'cat'", "no prunable channels", "'add'"]),
    ("input_direct", ["graph input 'x'", "'add'"]),
    ("unknown", ["logcumsumexp", "'logcumsumexp'", "does not know"]),
    ("groupnorm", ["GroupNorm", "'gn'"]),
    ("softmax", ["softmax", "dim 1"]),
    ("mean", ["mean", "reduces over dims [1]"]),
    ("select", ["getitem", "single channel"]),
])
def test_unprunable_reasons_name_node_and_op(kind, words):
    gm = analyze(Reasons(kind), (1, 3, 4, 4))
    # The group holding conv channel 2 (every kind blocks at least that one).
    g = next(g for g in CHANNEL_GROUPS.get(gm)
             if any(m.node == "conv" and 2 in m.index for m in g.members))
    assert not g.prunable
    for w in words:
        assert w in g.reason, g.reason
    assert "unprunable" in describe_groups(CHANNEL_GROUPS.get(gm))


def test_broadcast_single_channel_does_not_tie():
    class SpatialAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 1, 3)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.head(y[..., 1:-1, 1:-1] * torch.sigmoid(self.gate(y)))

    gm = analyze(SpatialAttention(), (1, 3, 6, 6))
    assert by_name(gm, "conv:out").size == 6 and by_name(gm, "conv:out").prunable
    gate = by_name(gm, "gate:out")
    assert gate.size == 1 and not gate.prunable and "broadcasts channels" in gate.reason


def test_layernorm_over_channels_only():
    over = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    g = by_name(analyze(over, (2, 5, 8)), "0:out")
    assert not g.prunable and "LayerNorm" in g.reason and "'_1'" in g.reason
    spatial = nn.Sequential(nn.Conv2d(3, 8, 1), nn.LayerNorm([4, 4]), nn.Conv2d(8, 2, 1))
    assert by_name(analyze(spatial, (1, 3, 4, 4)), "0:out").prunable


class Inner(nn.Module):
    def forward(self, x):
        return x * 2


class WithLeaf(nn.Module):
    def __init__(self, share):
        super().__init__()
        self.conv, self.block, self.head = nn.Conv2d(3, 4, 1), Inner(), nn.Conv2d(4, 2, 1)
        self.other, self.head2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        if share:
            self.other.weight = self.conv.weight

    def forward(self, x):
        return self.head(self.block(self.conv(x))) + self.head2(self.other(x))


def test_opaque_module_and_shared_weight():
    gm = analyze(WithLeaf(share=False), (1, 3, 4, 4), leaf_modules=["block"])
    g = by_name(gm, "conv:out")
    assert not g.prunable and "opaque" in g.reason and "'block'" in g.reason
    assert by_name(gm, "other:out").prunable
    gm = analyze(WithLeaf(share=True), (1, 3, 4, 4))
    for name in ("conv:out", "other:out"):
        g = by_name(gm, name)
        assert not g.prunable and "share a parameter" in g.reason


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.a(x)) * self.head(self.b(x))


def test_module_called_twice_ties_its_inputs():
    gm = analyze(Reused(), (1, 3, 4, 4))
    g = by_name(gm, "a:out")
    assert g.prunable and {m.node for m in g.members if m.role == "out"} == {"a", "b"}
    assert {m.node for m in g.members if m.role == "in"} == {"head", "head_1"}
    gm = analyze(Reasons("input"), (1, 3, 4, 4))
    assert "weight columns" not in by_name(gm, "conv:out").reason


def test_analysis_is_deterministic_and_ordered():
    a = CHANNEL_GROUPS.get(analyze(torchvision.models.regnet_y_400mf()))
    b = CHANNEL_GROUPS.get(analyze(torchvision.models.regnet_y_400mf()))
    assert [(g.name, g.size) for g in a] == [(g.name, g.size) for g in b]
    for ga, gb in zip(a, b):
        assert all(ma.node == mb.node and (ma.index == mb.index).all()
                   for ma, mb in zip(ga.members, gb.members))
    assert a[0].name == "stem.0:out"


def test_requires_shapes():
    with pytest.raises(PipelineError, match="ShapeAnalysis"):
        Pipeline([ChannelGroupAnalysis()])
