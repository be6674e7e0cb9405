"""Fuzzing the whole lowering path: random graphs, random bits, random masks, host builds.

Each case draws a small CNN from the generator of ``test_prune_fuzz`` (residual adds, concats,
chunk/split, dense blocks, depthwise and grouped convs, channel shuffles, squeeze-excitation
and spatial attention gates, pooling, slicing; linear, flatten-linear and conv heads), random
weight bits (2/4/8) and activation bits (2..8, equal for layers reading one tensor), and
random keep-masks for every prunable channel group. It is analyzed, pruned, BN-folded,
calibrated into the integer-exact reference, lowered to Relax and built for the host (LLVM
``opt_level=0``), and the program must reproduce the reference's output integers: exactly when
every op is integer (sigmoid, SiLU and hardswish gates are lookup tables); within one LSB
where float ops run in between, since a float64 result may round the other way at a
quantization step.
"""

import os

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from test_prune_fuzz import COMMON, HW, build, nets
from tvm import relax

import pqcompile
from pqcompile.assignment import Assignment
from pqcompile.lower import build as tvm_build
from pqcompile.lower import lower
from pqcompile.lower.build import load
from pqcompile.meta import CHANNEL_GROUPS, BitWidths
from pqcompile.passes import ChannelGroupAnalysis, PruneChannels, ShapeAnalysis
from pqcompile.passes.fold_bn import FoldBatchNorm
from pqcompile.presets import compute_layers
from pqcompile.quant import build_reference, integer_outputs
from pqcompile.quant.lut import QLut
from pqcompile.quant.plan import activation_sources

# CI runs 100 cases of the long run (each run draws new ones); PQCOMPILE_FUZZ_CASES=1000 for more
LONG_CASES = int(os.environ.get("PQCOMPILE_FUZZ_CASES", "100"))
STATS = {"cases": 0, "tables": 0, "pruned": 0, "kernels": 0, "worst": 0}


def compile_case(data):
    spec, head = data.draw(nets(), label="model")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    # batch 1 lowers conv/linear to the host's hand-scheduled kernels, batch 2 to TVM's ops:
    # half the cases each, by the seed's parity (hypothesis's booleans are not a fair coin)
    kernels = seed % 2 == 0
    batch = 1 if kernels else 2
    model = build(spec, head, seed).float()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, HW, HW, generator=gen)
    gm = pqcompile.trace(model, (x,))
    gm = ChannelGroupAnalysis()(ShapeAnalysis()(gm).graph_module).graph_module
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="bits and masks"))
    masks = {}
    for g in CHANNEL_GROUPS.get(gm):
        if g.prunable and g.size > 1 and rng.random() < 0.7:
            keep = rng.random(g.size) < rng.uniform(0.2, 0.9)
            keep[rng.integers(g.size)] = True
            masks[g.id] = keep
    if masks:
        gm = PruneChannels(masks)(gm).graph_module
    gm = FoldBatchNorm()(gm).graph_module
    layers = compute_layers(gm)
    sources = activation_sources(gm, layers)
    act = {src: int(rng.integers(2, 9)) for src in sorted(set(sources.values()))}
    bits = {n: BitWidths(int(rng.choice([2, 4, 8])), act[sources[n]]) for n in layers}
    assignment = Assignment(bits, masks)
    calibration = [torch.randn(4, 3, HW, HW, generator=gen) for _ in range(2)]
    ref = build_reference(gm, assignment, calibration)
    mod, params, report = lower(ref, target="host" if kernels else None)
    assert kernels or not report.kernels
    vm = relax.VirtualMachine(load(tvm_build(mod, opt_level=0)), tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in params.values()]
    worst = 0
    for xs in (x, torch.randn(batch, 3, HW, HW, generator=gen) * 2):
        out = vm["main"](tvm.runtime.tensor(xs.numpy()), *args)
        got = report.output_integers(out.numpy())
        want = [w.numpy() for w in integer_outputs(ref, xs)]
        assert [g.shape for g in got] == [w.shape for w in want]
        worst = max(worst, max(int(np.abs(g - w).max()) for g, w in zip(got, want)))
    STATS["cases"] += 1
    STATS["tables"] += any(isinstance(m, QLut) for m in ref.modules())
    STATS["pruned"] += bool(masks)
    STATS["kernels"] += bool(report.kernels)
    STATS["worst"] = max(STATS["worst"], worst)
    assert worst <= (1 if report.float_ops else 0), (spec, head, worst, report.float_ops)


@settings(max_examples=25, **COMMON)
@given(st.data())
def test_random_graphs_compile_with_parity(data):
    compile_case(data)


@pytest.mark.slow
@settings(max_examples=LONG_CASES, **COMMON)
@given(st.data())
def test_random_graphs_compile_with_parity_long(data):
    compile_case(data)


@pytest.mark.slow
def test_the_long_run_covered_what_it_claims():
    """Runs after the long run in the same session: it really ran them all, and they covered
    lookup tables, pruning and the hand-scheduled kernels."""
    if STATS["cases"] < LONG_CASES:
        pytest.skip("the long run did not run in this session (selected alone)")
    print(f"\n{STATS}")
    n = STATS["cases"]
    assert STATS["tables"] >= 0.1 * n and STATS["pruned"] >= 0.3 * n \
        and STATS["kernels"] >= 0.4 * n, STATS
