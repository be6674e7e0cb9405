"""Inspect what the analysis passes know: shapes, channel groups, costs, sensitivities.

pqcompile traces a model to a ``torch.fx`` graph and its analysis passes write typed records
into ``node.meta`` (per node) and ``graph_module.meta`` (per graph). Every key lives in
``pqcompile.meta``; read them with ``KEY.get(node)`` (raises, naming the pass to run, when
missing) or ``KEY.find(node, default)``. This tutorial

1. traces the shipped Fashion-MNIST ResNet-20 and runs the analysis passes on real images;
2. reads shapes (``SHAPE``) and channel layouts (``NODE_CHANNELS``);
3. lists the channel groups (``CHANNEL_GROUPS``): which channels are pruned together, and why a
   group cannot be pruned (here and in a small model with a LayerNorm);
4. checks the cost annotations (``COST``, ``COST_TOTALS``) against MACs/BOPs/bytes computed by
   hand for one convolution, at FP32 and after setting its bits (``BITS``) to 4/8;
5. reads the sensitivities (``SENSITIVITY``, ``CHANNEL_IMPORTANCE``, ``SENSITIVITY_INFO``).

Run: python tutorials/02_inspect_annotations.py   (about 7 s)
"""

import math

import numpy as np
import torch
from torch import nn

import pqcompile
from pqcompile.data import fashion_mnist_loaders
from pqcompile.meta import (
    BITS,
    CHANNEL_GROUPS,
    CHANNEL_IMPORTANCE,
    COST,
    COST_TOTALS,
    NODE_CHANNELS,
    QPARAMS,
    SENSITIVITY,
    SENSITIVITY_INFO,
    SHAPE,
    BitWidths,
)
from pqcompile.passes import (
    ChannelGroupAnalysis,
    CostAnalysis,
    SensitivityAnalysis,
    ShapeAnalysis,
    describe_groups,
)
from pqcompile.zoo import pretrained_resnet20_fashion

torch.manual_seed(0)

# --- 1. Trace and analyze -------------------------------------------------------------------
model = pretrained_resnet20_fashion()
loaders = fashion_mnist_loaders(32)
train_batches = []  # a few real (images, labels) batches for the data-driven sensitivity
for i, batch in enumerate(loaders.train):
    if i == 4:
        break
    train_batches.append(batch)
example = train_batches[0][0][:8]  # 8 real images: the batch size the costs are counted for

gm = pqcompile.trace(model, (example,))  # a torch.fx.GraphModule; the model is not modified
pipeline = pqcompile.Pipeline([
    ShapeAnalysis(),            # SHAPE: output shape and dtype of every node
    ChannelGroupAnalysis(),     # CHANNEL_GROUPS, NODE_CHANNELS
    CostAnalysis(),             # COST per node, COST_TOTALS for the graph
    # FIT (empirical Fisher) sensitivity from real batches, for four (weight, activation) bit
    # options; without batches the data-free "weight_error" criterion is used instead.
    SensitivityAnalysis("fisher", train_batches,
                        bit_options=[(8, 8), (4, 8), (4, 4), (2, 8)]),
])
gm = pipeline(gm).graph_module
nodes = {n.name: n for n in gm.graph.nodes}

# --- 2. Shapes and channel layouts ------------------------------------------------------------
print("node                 op            output shape      channel dims  groups out/in")
for name in ("x", "conv1", "bn1", "layer1_0_conv1", "add", "layer2_0_shortcut_0", "flatten",
             "fc"):
    n = nodes[name]
    ch = NODE_CHANNELS.get(n)
    print(f"{name:20s} {n.op:13s} {tuple(SHAPE.get(n).shape)!s:17s} {ch.dims!s:13s} "
          f"{ch.out_groups}/{ch.in_groups}")
assert tuple(SHAPE.get(nodes["layer2_0_conv1"]).shape) == (8, 32, 16, 16)  # stride 2 halves H, W

# --- 3. Channel groups ------------------------------------------------------------------------
groups = CHANNEL_GROUPS.get(gm)
print("\nchannel groups (one keep/prune decision per channel of a group):")
print(describe_groups(groups))
# Group 0 is the stage-1 residual trunk: the stem conv's output channels, and every residual
# add after it, must lose the same channels; so do the convs reading the trunk (their inputs).
trunk = groups[0]
print(f"\ngroup 0 '{trunk.name}' spans {len(trunk.nodes)} nodes; its convolutions:")
for m in trunk.members:
    if m.role != "pass":
        print(f"  {m.node:22s} role={m.role:3s} (channel dim {m.dim})")
producers = [m.node for m in trunk.members if m.role == "out"]
assert producers == ["conv1", "layer1_0_conv2", "layer1_1_conv2", "layer1_2_conv2"], producers
# The classifier's output cannot be pruned: those channels are the model's output.
fc_group = groups[-1]
assert not fc_group.prunable and "model output" in fc_group.reason, fc_group
assert sum(g.prunable for g in groups) == 12 and len(groups) == 13

# Other reasons a group is unprunable: a LayerNorm normalizes over the channels (removing one
# changes the mean and variance of all the others).
mlp = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                    nn.Linear(24, 4)).eval()
mlp_gm = pqcompile.Pipeline([ShapeAnalysis(), ChannelGroupAnalysis()])(
    pqcompile.trace(mlp, (torch.randn(2, 16),))).graph_module
print("\na small MLP with a LayerNorm:")
print(describe_groups(CHANNEL_GROUPS.get(mlp_gm)))
normed, hidden, out = CHANNEL_GROUPS.get(mlp_gm)
assert not normed.prunable and "normalizes over" in normed.reason, normed.reason
assert hidden.prunable and not out.prunable

# --- 4. Costs: check one convolution by hand ---------------------------------------------------
conv_node = nodes["layer2_0_conv1"]
conv = gm.get_submodule(conv_node.target)  # Conv2d(16, 32, 3, stride=2)
n, c_out, h, w = SHAPE.get(conv_node).shape
kh, kw = conv.kernel_size
macs = n * h * w * c_out * (conv.in_channels // conv.groups) * kh * kw
cost = COST.get(conv_node)
print(f"\n{conv_node.name}: {conv}\n  by hand: {n}x{h}x{w} positions x {c_out} out x "
      f"{conv.in_channels} in x {kh}x{kw} = {macs:,} MACs; annotation: {cost.macs:,} MACs, "
      f"{cost.bops:,} BOPs, {cost.weight_bytes:,.0f} weight bytes at {cost.weight_bits}/"
      f"{cost.activation_bits} bits")
assert cost.macs == macs == 8 * 16 * 16 * 32 * 16 * 9 == 9_437_184
assert cost.bops == macs * 32 * 32  # no bits set yet: FP32, BOPs = MACs x 32 x 32
assert cost.weight_bytes == conv.weight.numel() * 4  # 32-bit weights, no bias in this conv
totals = COST_TOTALS.get(gm)
assert totals.macs == sum(COST.get(x).macs for x in gm.graph.nodes)
assert totals.fp32_bops == totals.macs * 1024
print(f"whole model: {totals.macs:,} MACs, {totals.params:,} parameters, "
      f"{totals.weight_bytes / 1e3:.1f} KB of FP32 weights")

# Bits are an annotation too (a solver writes them): 4-bit weights, 8-bit activations.
BITS.set(conv_node, BitWidths(weight=4, activation=8))
gm = CostAnalysis()(gm).graph_module  # re-run the cost pass
cost4 = COST.get(conv_node)
print(f"  at 4/8 bits: {cost4.bops:,} BOPs (= MACs x 4 x 8), {cost4.weight_bytes:,.0f} weight "
      f"bytes; the model now has {COST_TOTALS.get(gm).bop_reduction:.3f}x fewer BOPs than FP32")
assert cost4.bops == macs * 4 * 8 == 301_989_888
# stored: 4 bits a weight, and per output channel an int32 bias, multiplier and shift
assert cost4.weight_bytes == conv.weight.numel() * 4 / 8 + 32 * 3 * 4 == 2304 + 384
assert COST_TOTALS.get(gm).bops == totals.bops - macs * (32 * 32 - 4 * 8)

# --- 5. Sensitivities -------------------------------------------------------------------------
info = SENSITIVITY_INFO.get(gm)
print(f"\nsensitivity: criterion {info.criterion!r} ({info.units}), channels by "
      f"{info.channel_criterion!r}, data={info.data}")
print("layer                 (8,8)      (4,8)      (4,4)      (2,8)")
for name in ("conv1", "layer1_0_conv1", "layer2_0_conv1", "layer3_2_conv2", "fc"):
    s = SENSITIVITY.get(nodes[name])
    print(f"{name:20s} " + " ".join(f"{s[o]:10.3g}" for o in [(8, 8), (4, 8), (4, 4), (2, 8)]))
    # fewer bits never cost less: the FIT term grows as the quantization step grows
    assert s[(2, 8)] >= s[(4, 8)] >= s[(8, 8)] >= 0 and s[(4, 4)] >= s[(4, 8)]
importance = CHANNEL_IMPORTANCE.get(gm)  # {group id: score per channel}, prunable groups only
assert sorted(importance) == [g.id for g in groups if g.prunable]
scores = importance[trunk.id]
print(f"group 0's channels, least to most important: {np.argsort(scores).tolist()}")
assert scores.shape == (trunk.size,) and np.all(np.isfinite(scores)) and scores.max() > 0

# Annotations that a later stage writes are simply absent here; get() says who writes them.
try:
    QPARAMS.get(conv_node)
except pqcompile.MissingAnnotationError as err:
    print(f"\nas expected: {err}")
else:
    raise AssertionError("QPARAMS is only written by build_reference")
assert math.isclose(sum(COST.get(x).bops for x in gm.graph.nodes), COST_TOTALS.get(gm).bops)
print("annotations OK")
