"""PruneChannels: physically pruned == zeroed original, predicted MACs == measured MACs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pqcompile
from pqcompile.errors import PipelineError
from pqcompile.meta import CHANNEL_GROUPS, COST_TOTALS, KEPT_CHANNELS, NODE_CHANNELS, SHAPE
from pqcompile.passes import (ChannelGroupAnalysis, CostAnalysis, Pipeline, PruneChannels,
                              ShapeAnalysis, analyze_cost, predicted_macs, zero_channels)

# (model, groups pruned per call): densenet121's 120 groups go ten at a time.
TORCHVISION = [("resnet18", 1), ("mobilenet_v2", 1), ("shufflenet_v2_x1_0", 1),
               ("efficientnet_b0", 1), ("regnet_y_400mf", 1), ("densenet121", 10)]


def randomize_bn(model, gen):
    """Random BN statistics and affine parameters, so BN is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model


def prepare(model, shape, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(model.eval(), torch.Generator().manual_seed(seed))
    x = torch.randn(shape)
    gm = pqcompile.trace(model, (x,))
    gm = ChannelGroupAnalysis(strict=True)(ShapeAnalysis()(gm).graph_module).graph_module
    return gm, CHANNEL_GROUPS.get(gm), x


def random_mask(rng, size):
    keep = np.ones(size, bool)
    k = int(np.clip(round(size * rng.uniform(0.3, 0.5)), 1, size - 1))
    keep[rng.choice(size, k, replace=False)] = False
    return keep


def check(gm, groups, x, masks):
    """Prune and zero with ``masks``; return (relative error, measured MACs, predicted MACs)."""
    pruned = PruneChannels(masks)(gm).graph_module
    zeroed = zero_channels(gm, groups, masks)
    with torch.no_grad():
        ref, out = zeroed(x), pruned(x)
    err = ((ref - out).abs().max() / ref.abs().max()).item()
    return err, analyze_cost(pruned).macs, predicted_macs(gm, masks)


def assert_equivalent(gm, groups, x, masks_list, tol=1e-4):
    failures = []
    for masks in masks_list:
        err, macs, predicted = check(gm, groups, x, masks)
        if not err <= tol or macs != predicted:
            names = [groups[g].name for g in masks]
            failures.append(f"{names}: rel err {err:.2e}, MACs {macs} vs predicted {predicted}")
    assert not failures, "\n".join(failures)


def prunable(groups):
    return [g for g in groups if g.prunable and g.size > 1]


@pytest.mark.parametrize("name, per_call", TORCHVISION)
def test_torchvision_every_group(name, per_call):
    gm, groups, x = prepare(getattr(torchvision.models, name)(), (1, 3, 64, 64))
    rng = np.random.default_rng(0)
    todo = prunable(groups)
    batches = [todo[i:i + per_call] for i in range(0, len(todo), per_call)]
    assert_equivalent(gm, groups, x, [{g.id: random_mask(rng, g.size) for g in b}
                                      for b in batches])


@pytest.mark.parametrize("name", [n for n, _ in TORCHVISION])
def test_torchvision_all_groups_at_once(name):
    gm, groups, x = prepare(getattr(torchvision.models, name)(), (1, 3, 64, 64), seed=1)
    rng = np.random.default_rng(1)
    masks = {g.id: random_mask(rng, g.size) for g in prunable(groups)}
    err, macs, predicted = check(gm, groups, x, masks)
    assert err <= 1e-4 and macs == predicted
    assert macs < 0.8 * analyze_cost(gm).macs


class ResNeXtBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c, self.head = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.b(F.relu(self.a(x))))
        return self.head(F.relu(x + self.c(y)))


def test_grouped_conv_stays_dense_with_same_groups():
    gm, groups, x = prepare(ResNeXtBlock(), (1, 3, 6, 6))
    masks = {"a:out": [True, False, True, True], "b:out": [False, True, True, False]}
    pruned = PruneChannels(masks)(gm).graph_module
    b = pruned.get_submodule("b")
    assert (b.groups, b.in_channels, b.out_channels) == (4, 12, 8)
    assert tuple(b.weight.shape) == (8, 3, 3, 3)
    assert_equivalent(gm, groups, x, [masks])


def test_depthwise_groups_follow_kept_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, groups=8),
                          nn.ReLU6(), nn.Conv2d(16, 2, 1))
    gm, groups, x = prepare(model, (1, 3, 8, 8))
    masks = {0: np.arange(8) >= 3}
    pruned = PruneChannels(masks)(gm).graph_module
    dw = pruned.get_submodule("2")
    assert (dw.groups, dw.in_channels, dw.out_channels) == (5, 5, 10)
    assert pruned.get_submodule("1").num_features == 5
    assert pruned.get_submodule("4").in_channels == 10
    assert_equivalent(gm, groups, x, [masks])


def test_copy_meta_and_kept_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16, 4))
    gm, _groups, _x = prepare(model, (2, 3, 6, 6))
    for n in gm.graph.nodes:
        n.meta["test.mark"] = n.name
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    pruned = PruneChannels({0: keep})(gm).graph_module
    assert pruned is not gm
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert gm.get_submodule("4").in_features == 128
    assert pruned.get_submodule("4").in_features == 6 * 16
    nodes = {n.name: n for n in pruned.graph.nodes}
    assert all(n.meta["test.mark"] == n.name for n in pruned.graph.nodes)
    assert tuple(SHAPE.get(nodes["_2"]).shape) == (2, 6, 4, 4)
    assert list(KEPT_CHANNELS.get(nodes["_0"]).indices) == [0, 2, 3, 5, 6, 7]
    flat = KEPT_CHANNELS.get(nodes["_3"])
    assert flat.original_size == 128 and len(flat.indices) == 96 and flat.indices[16] == 32
    assert not CHANNEL_GROUPS.has(pruned) and not NODE_CHANNELS.has(nodes["_0"])
    again = ChannelGroupAnalysis()(pruned).graph_module  # the pruned graph analyzes again
    assert CHANNEL_GROUPS.get(again)[0].size == 6
    same = PruneChannels({0: keep}, inplace=True)(gm).graph_module
    assert same is gm and gm.get_submodule("0").out_channels == 6


class ShapeArgs(nn.Module):
    """Hard-coded shape arguments of every kind the pruner rewrites."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.p, self.q = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 3, 1)
        self.fc = nn.Linear(8 * 16, 3)
        self.lin, self.lin2 = nn.Linear(3, 12), nn.Linear(12, 2)
        self.se = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        k = self.kind
        if k == "view":
            return self.fc(y.view(-1, 8 * 16))
        if k == "grid":
            g = y.reshape(2, 2, 4, 4, 4).transpose(1, 2).reshape(2, 8, 4, 4)
            return self.head(g)
        if k == "chunk":
            u, v = y.chunk(2, dim=1)
            s1, s2 = torch.split(self.b(x), [3, 5], dim=1)
            w = torch.cat([self.p(u) + self.q(v), s2, s1], 1)
            return self.head(w[:, :8]) + w[:, 8:].sum()
        if k == "split":
            parts = y.split(4, 1)
            return self.head(torch.cat([self.q(parts[1]), self.p(parts[0])], 1))
        if k == "slice":
            return self.head(torch.cat([y[:, 1:7:2], y[:, 2:6], y.narrow(1, 0, 1)], 1))
        if k == "expand":
            s = torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
            return self.head(y * s.expand(2, 8, 4, 4))
        if k == "unflatten":
            t = self.lin(x.flatten(2).transpose(1, 2)).unflatten(-1, (3, 4))
            return self.lin2(F.gelu(t).flatten(-2))
        if k == "matmul":
            t = x.flatten(2).transpose(1, 2)
            return (self.lin(t) @ self.lin(t * 2).transpose(1, 2)).mean()
        if k == "pad":
            return self.head(F.pad(y, (0, 0, 0, 0, 0, 0))[:, :8] + F.pad(y, (1, 1, 1, 1))[..., 1:5,
                                                                                      1:5])
        raise ValueError(k)


@pytest.mark.parametrize("kind", ["view", "grid", "chunk", "split", "slice", "expand",
                                  "unflatten", "matmul", "pad"])
def test_shape_arguments_are_rewritten(kind):
    gm, groups, x = prepare(ShapeArgs(kind), (2, 3, 4, 4), seed=3)
    rng = np.random.default_rng(3)
    todo = prunable(groups)
    assert todo, [(g.name, g.reason) for g in groups]
    masks = [{g.id: random_mask(rng, g.size)} for g in todo]
    masks.append({g.id: random_mask(rng, g.size) for g in todo})
    assert_equivalent(gm, groups, x, masks, tol=1e-5)


def test_prelu_instancenorm_and_reused_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
            self.act, self.norm = nn.PReLU(6), nn.InstanceNorm2d(6, affine=True)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(self.act(self.a(x))) - self.head(self.norm(self.b(x)))

    gm, groups, x = prepare(M(), (2, 3, 5, 5))
    masks = {"a:out": [True, False, True, False, True, True]}
    pruned = PruneChannels(masks)(gm).graph_module
    assert pruned.get_submodule("act").weight.numel() == 4
    assert pruned.get_submodule("norm").weight.numel() == 4
    assert_equivalent(gm, groups, x, [masks], tol=1e-5)


@pytest.fixture(scope="module")
def small():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    return prepare(model, (1, 3, 4, 4))


@pytest.mark.parametrize("masks, error, words", [
    ({7: [True] * 4}, ValueError, ["no channel group 7", "'0:out'"]),
    ({"nope": [True] * 4}, ValueError, ["no channel group 'nope'"]),
    ({0: [True] * 3}, ValueError, ["group 0 '0:out'", "4 channels"]),
    ({0: [False] * 4}, ValueError, ["removes all 4 channels", "'0:out'"]),
    ({1: [True, False]}, ValueError, ["'2:out' cannot be pruned", "model output", "'_2'"]),
    ({0: [0.5] * 4}, TypeError, ["booleans"]),
    ({0: [True] * 4, "0:out": [True] * 4}, ValueError, ["two masks"]),
    ([True] * 4, TypeError, ["dict"]),
])
def test_bad_masks(small, masks, error, words):
    gm, groups, _ = small
    for call in (lambda: PruneChannels(masks)(gm), lambda: predicted_macs(gm, masks),
                 lambda: zero_channels(gm, groups, masks)):
        with pytest.raises(error) as info:
            call()
        for w in words:
            assert w in str(info.value)


def test_keep_all_is_a_noop_even_on_unprunable(small):
    gm, _groups, x = small
    pruned = PruneChannels({1: [True, True]})(gm).graph_module
    assert torch.equal(pruned(x), gm(x))
    assert predicted_macs(gm, {}) == analyze_cost(gm).macs


def test_pipeline_prune_then_cost():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    gm = pqcompile.trace(model, (torch.randn(1, 3, 8, 8),))
    masks = {"0:out": np.arange(8) < 5}
    pipe = Pipeline([ShapeAnalysis(), ChannelGroupAnalysis(), PruneChannels(masks),
                     CostAnalysis()])
    out = pipe(gm).graph_module
    assert COST_TOTALS.get(out).macs == 6 * 6 * 5 * 27 + 4 * 4 * 4 * 5 * 9
    with pytest.raises(PipelineError, match="ChannelGroupAnalysis"):
        Pipeline([ShapeAnalysis(), ChannelGroupAnalysis(), PruneChannels(masks),
                  PruneChannels(masks)])


def test_prune_requires_groups():
    gm = ShapeAnalysis()(pqcompile.trace(nn.Conv2d(3, 4, 1), (torch.randn(1, 3, 4, 4),)))
    with pytest.raises(PipelineError, match="ChannelGroupAnalysis"):
        PruneChannels({})(gm.graph_module)
