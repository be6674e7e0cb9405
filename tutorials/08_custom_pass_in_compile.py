"""Your own pass inside pqcompile.compile(): the default pipeline as data, edited by name.

compile() is a registered pipeline of named stages (trace, shapes, groups, costs, sensitivity,
latency, solve, fine-tune, prune, fold, quantize, lower, build). A pass put after "solve" sees
the solver's choice as annotations (each layer's pqc.bits, the graph's pqc.keep_masks) and may
change it: here it pins the layer the solver quantized hardest back to 8-bit weights.

Run: python tutorials/08_custom_pass_in_compile.py   (about 30 s)
"""

import numpy as np
import torch
from torch import nn

import pqcompile
from pqcompile.meta import BITS, BitWidths

# 1. The pipeline compile() runs, printed: each stage with the keys it requires and provides.
default = pqcompile.get_pipeline("default")
print(default)


# 2. A pass that runs inside compile(): after "solve", it pins the layer with the fewest weight
# bits (the first, in graph order, on a tie) to 8-bit weights, keeping its activation bits.
@pqcompile.graph_pass(requires=(BITS,))
def pin_lowest_to_8bit(gm, ctx):
    layers = [n for n in gm.graph.nodes if BITS.find(n) is not None]
    node = min(layers, key=lambda n: BITS.get(n).weight)
    ctx.results["pinned"] = (node.name, BITS.get(node).weight)
    BITS.set(node, BitWidths(8, BITS.get(node).activation))
    return True


torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(32, 10)).eval()  # random weights: parity only
x = torch.randn(1, 3, 16, 16)
options = dict(target="host", budget="bops=20x", bit_options=[(8, 8), (4, 8), (2, 8)])

base = pqcompile.compile(model, (x,), **options)
# The same pass two ways: at a named point (passes=), or in an edited pipeline (pipeline=).
pinned = pqcompile.compile(model, (x,), passes={"after:solve": pin_lowest_to_8bit}, **options)
edited = default.insert_after("solve", pin_lowest_to_8bit)
print(edited.names)
again = pqcompile.compile(model, (x,), pipeline=edited, **options)

name, was = min(base.assignment.bits.items(), key=lambda kv: kv[1].weight)
print(f"default run: {name} at {was.weight}-bit weights; pinned run: "
      f"{pinned.assignment.bits[name].weight}-bit")
print(f"BOP reduction: default {base.totals['bop_reduction']:.1f}x, pinned "
      f"{pinned.totals['bop_reduction']:.1f}x")

# 3. Checks: the pass changed what was built, and only that layer's weight bits.
assert was.weight < 8, base.assignment
assert pinned.assignment.bits[name] == BitWidths(8, was.activation)
layer_row = {r["name"]: r for r in pinned.layers}[name]
assert layer_row["weight_bits"] == 8, layer_row
assert {k: v for k, v in pinned.assignment.bits.items() if k != name} == \
    {k: v for k, v in base.assignment.bits.items() if k != name}
assert pinned.totals["bops"] > base.totals["bops"]  # 8-bit weights cost more bit operations
assert pinned.artifact.manifest["extra"]["assignment"] != base.artifact.manifest["extra"][
    "assignment"]
# both ways of putting the pass in give the same program, equal to its reference bit for bit
assert again.assignment == pinned.assignment
out = pinned(x.numpy())
assert np.array_equal(out, again(x.numpy()))
assert np.array_equal(out, pinned.reference(x).numpy())
print("custom pass inside compile OK")
