"""Write your own pass: an analysis and a rewrite, each a few lines, in a checked pipeline.

Run: python tutorials/03_custom_pass.py   (about 6 s)
"""

import torch
import torchvision
from torch import nn

import pqcompile
from pqcompile.meta import COST, COST_TOTALS, MetaKey
from pqcompile.passes import CostAnalysis, PassContext, ShapeAnalysis, TimingInstrument

# 1. Your annotation key: declared once, typed, with the pass that provides it.
MAC_SHARE = MetaKey("tutorial.mac_share", "mac_share", "fraction of the model's MACs")


# 2. An analysis pass: declare what it reads and writes; the pipeline checks the order.
@pqcompile.graph_pass(requires=(COST, COST_TOTALS), provides=(MAC_SHARE,))
def mac_share(gm, ctx):
    total = COST_TOTALS.get(gm).macs
    for node in gm.graph.nodes:
        MAC_SHARE.set(node, COST.get(node).macs / total)


# 3. A rewrite pass: ReLU6 -> ReLU (say, for a runtime without clip), carrying node.meta over.
@pqcompile.graph_pass(invalidates=(COST,))
def relu6_to_relu(gm, ctx):
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU6):
            gm.add_submodule(node.target, nn.ReLU())  # same node, same meta, new module
            changed += 1
    ctx.results["relu6_replaced"] = changed
    return changed > 0


model = torchvision.models.mobilenet_v2()
gm = pqcompile.trace(model, (torch.randn(1, 3, 224, 224),))

timing = TimingInstrument()
ctx = PassContext(instruments=[timing])
pipeline = pqcompile.Pipeline(
    [ShapeAnalysis(), CostAnalysis(), mac_share, relu6_to_relu, CostAnalysis()], name="tutorial")
gm = pipeline(gm, ctx).graph_module

top = sorted(gm.graph.nodes, key=lambda n: MAC_SHARE.find(n, 0.0), reverse=True)[:5]
print("layers with the largest share of MACs:")
for node in top:
    print(f"  {node.target!s:28s} {MAC_SHARE.get(node):6.1%}  {COST.get(node).macs / 1e6:7.2f} M")
print(f"ReLU6 modules replaced: {ctx.results['relu6_replaced']}")
print(timing.summary())

# A wrong order is rejected when the pipeline is built, before any work is done.
try:
    pqcompile.Pipeline([mac_share, ShapeAnalysis()])
except pqcompile.PipelineError as err:
    print(f"rejected as expected: {err}")
else:
    raise AssertionError("mac_share before CostAnalysis must be rejected")

# 4. Check the results: mobilenet_v2 has 35 ReLU6 modules, the shares add up to one, and the
# largest layer's share is its MACs over the model's (300.8 M MACs at 224 x 224).
shares = sum(MAC_SHARE.get(n) for n in gm.graph.nodes)
assert ctx.results["relu6_replaced"] == 35, ctx.results["relu6_replaced"]
assert not any(isinstance(m, nn.ReLU6) for m in gm.modules())
assert abs(shares - 1) < 1e-9, shares
assert COST_TOTALS.get(gm).macs == 300_774_272, COST_TOTALS.get(gm).macs
assert MAC_SHARE.get(top[0]) == COST.get(top[0]).macs / COST_TOTALS.get(gm).macs
print("custom passes OK")
