"""Rule-based CPU schedules (pqcompile.lower.schedule): the same integers, parallel and
vectorized kernels, and kernels scheduled elsewhere left alone.

The models are built as the parity tests build them (tests/test_parity.py): outputs are compared
as integers, exactly for integer programs; for the net with float islands the scheduled build's
outputs must equal the unscheduled build's bit for bit (and the reference's within 1 LSB).
"""

import numpy as np
import pytest
import torch
import torchvision
import tvm
import tvm_ffi
from test_parity import PARITY_BITS, batches, mixed_48, parity_net, randomize_bn
from torch import nn
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import pqcompile
from pqcompile.runtime.artifact import Artifact
from pqcompile.assignment import Assignment
from pqcompile.lower import build, lower, resolve_target, run
from pqcompile.lower.build import legalize
from pqcompile.lower.schedule import (
    SCHEDULED,
    ScheduleReport,
    is_scheduled,
    loop_kinds,
    schedule_cpu,
    vector_bytes,
)
from pqcompile.meta import BitWidths
from pqcompile.passes.fold_bn import FoldBatchNorm
from pqcompile.quant import build_reference, integer_outputs

# The loop structure is checked for a fixed target (AVX-512, 2 cores); programs that run are
# built for the machine running the tests ("host").
TARGET = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}


def _scheduled_module(mod, target=TARGET):
    tgt = resolve_target(target)
    report = ScheduleReport()
    return schedule_cpu(legalize(mod, tgt), tgt, report=report), report


def _worst_lsb(ref, report, ex, params, inputs) -> int:
    worst = 0
    for x in inputs:
        got = run(ex, params, [x])
        for r, g in zip(integer_outputs(ref, x), report.output_integers(got)):
            worst = max(worst, int(np.abs(r.numpy() - g).max()))
    return worst


@pytest.fixture(scope="module")
def vision():
    cache: dict = {}

    def get(name: str, config: str):
        if (name, config) not in cache:
            model = randomize_bn(getattr(torchvision.models, name)(), seed=3)
            gm = FoldBatchNorm()(pqcompile.trace(model, (torch.randn(1, 3, 64, 64),))).graph_module
            layers = [n.name for n in gm.graph.nodes if n.op == "call_module" and
                      isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))]
            a = Assignment.uniform(layers, 8, 8) if config == "int8" else mixed_48(gm, layers)
            ref = build_reference(gm, a, batches(4, (1, 3, 64, 64), seed=4))
            cache[(name, config)] = (ref, *lower(ref))
        return cache[(name, config)]

    return get


@pytest.mark.parametrize("name, config", [("resnet18", "int8"), ("resnet18", "mixed48"),
                                          ("mobilenet_v2", "int8"), ("mobilenet_v2", "mixed48")])
def test_scheduled_torchvision_models_are_exact(vision, name, config):
    ref, mod, params, report = vision(name, config)
    schedules = ScheduleReport()
    ex = build(mod, opt_level=0 if config == "mixed48" else None, report=schedules)
    assert len(schedules.scheduled) >= 10 and not schedules.skipped, schedules.skipped
    assert _worst_lsb(ref, report, ex, params, batches(2, (1, 3, 64, 64), seed=5)) == 0


def test_requantizing_kernels_run_parallel_and_vectorized(vision):
    _, mod, _, _ = vision("resnet18", "int8")
    scheduled, report = _scheduled_module(mod)
    funcs = {gv.name_hint: f for gv, f in scheduled.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert set(report.scheduled) == set(funcs) and all(is_scheduled(f) for f in funcs.values())
    # conv + requantize (+ the residual add: two int64 multiplies), max pool, input quantize
    requant = [n for n in funcs if "conv2d" in n and "right_shift" in n]
    residual = [n for n in requant if n.count("add") >= 3 and n.count("multiply") >= 3]
    assert len(requant) >= 10 and len(residual) >= 4
    for name in [*requant] + [n for n in funcs if "divide" in n]:  # and the input quantize
        kinds = loop_kinds(funcs[name])
        assert "parallel" in kinds and "vectorized" in kinds, (name, kinds)
    # padding (a bounds check) and a stride-2 window: rows in parallel, their loops for LLVM
    assert loop_kinds(funcs["max_pool2d"]) == ["parallel", "parallel"]
    # the requantization after the global pool: 512 values, too few to run in parallel
    (head,) = [n for n in funcs if "right_shift" in n and "conv2d" not in n and "matmul" not in n]
    assert loop_kinds(funcs[head]) == ["vectorized"]
    # the unscheduled functions have neither
    for name, func in legalize(mod, resolve_target(TARGET)).functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert loop_kinds(func) == [], name.name_hint


def test_float_islands_are_bit_identical_to_the_unscheduled_build():
    model = parity_net()  # max/avg/adaptive pools, concat, residual add, hardswish, SE gating
    gm = FoldBatchNorm()(pqcompile.trace(model, (torch.randn(2, 3, 32, 32),))).graph_module
    # the SE conv left out of the assignment: a float64 island (the rest is integer)
    a = Assignment({k: BitWidths(*v) for k, v in PARITY_BITS.items() if k != "se"})
    ref = build_reference(gm, a, batches(4, (4, 3, 32, 32), seed=1))
    mod, params, report = lower(ref)
    assert report.float_ops
    schedules = ScheduleReport()
    ex = build(mod, report=schedules)
    plain = build(mod, schedule=False)
    assert len(schedules.scheduled) >= 10 and not schedules.skipped, schedules.skipped
    scheduled, _ = _scheduled_module(mod)
    assert any("parallel" in loop_kinds(f) for gv, f in scheduled.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "pool" in gv.name_hint)
    inputs = batches(3, (2, 3, 32, 32), seed=2)
    for x in inputs:
        np.testing.assert_array_equal(run(ex, params, [x]), run(plain, params, [x]))
    assert _worst_lsb(ref, report, ex, params, inputs) <= 1


def _blocks(func) -> list[str]:
    names = []
    tvm_ffi.structural_walk(func.body, lambda n: names.append(n.name_hint)
                            if type(n).__name__ == "SBlock" and n.name_hint != "root" else None)
    return names


def test_float_chains_without_products_are_one_loop_and_exact():
    """The input quantization (float64 cast, divide, add 0.5, floor, clamp, cast) is merged
    into one loop nest, not six passes over five float64 buffers, and computes numpy's
    integers (ties at .5 and values past the clamp included); a float product feeding an add
    stays a block of its own (merged, LLVM could contract the two into one FMA)."""
    from pqcompile.lower.ops import quantize
    from pqcompile.meta import QParams

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 224, 224), "float32"))
    y = relax.Var("y", relax.TensorType((1, 3, 224, 224), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            q = bb.emit_output(quantize(bb, x, QParams(0.05, 8, True), -128, 127))
            fma = bb.emit_output(relax.op.add(relax.op.multiply(x, y), y))
        bb.emit_func_output(relax.Tuple([q, fma]))
    mod = bb.get()
    scheduled, _ = _scheduled_module(mod)
    funcs = {gv.name_hint: f for gv, f in scheduled.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    quant = next(f for name, f in funcs.items() if "divide" in name)
    product = next(f for name, f in funcs.items() if "multiply" in name)
    assert len(_blocks(quant)) == 1 and loop_kinds(quant) == ["parallel", "vectorized"]
    assert len(_blocks(product)) == 2
    rng = np.random.default_rng(0)
    xs = (rng.integers(-3000, 3000, (1, 3, 224, 224)) * 0.025).astype(np.float32)  # ties, clamp
    ys = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    got_q, got_fma = run(build(mod), {}, [xs, ys])
    want = np.clip(np.floor(xs.astype(np.float64) / 0.05 + 0.5), -128, 127).astype(np.int8)
    assert np.abs(want.astype(int)).max() == 128 and np.array_equal(got_q, want)
    np.testing.assert_array_equal(got_fma, xs * ys + ys)  # rounded twice, as numpy does


# --- kernels scheduled elsewhere --------------------------------------------------------------


@I.ir_module
class HandScheduled:
    @T.prim_func(private=True, s_tir=True)
    def kernel(a: T.Buffer((T.int64(64), T.int64(128)), "int32"),
               b: T.Buffer((T.int64(64), T.int64(128)), "int32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "pqcompile.kernel": "test.double"})
        for i in T.serial(T.int64(64)):
            for j in T.unroll(T.int64(128)):
                with T.sblock("b"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    b[vi, vj] = a[vi, vj] * 2

    @R.function
    def main(x: R.Tensor((64, 128), "int32"), y: R.Tensor((64, 128), "int32")):
        cls = HandScheduled
        with R.dataflow():
            s = R.add(x, y)
            d = R.call_tir(cls.kernel, (s,), out_ty=R.Tensor((64, 128), "int32"))
            out = R.add(R.multiply(d, y), x)
            R.output(out)
        return out


def test_scheduled_kernels_are_left_as_they_are():
    original = HandScheduled["kernel"]
    scheduled, report = _scheduled_module(HandScheduled)
    assert report.already == ["kernel"] and len(report.scheduled) == 2  # the adds around it
    assert tvm_ffi.structural_equal(scheduled["kernel"], original)  # attributes included
    assert [gv.name_hint for gv in scheduled.get_global_vars()].count("kernel") == 1
    assert loop_kinds(scheduled["kernel"]) == ["unrolled"]
    # legalizing again (tuning.apply returns a legalized program) changes nothing
    again, report2 = _scheduled_module(scheduled)
    assert tvm_ffi.structural_equal(again, scheduled) and report2.scheduled == []
    x, y = (np.random.default_rng(i).integers(-1000, 1000, (64, 128), dtype="int32")
            for i in range(2))
    np.testing.assert_array_equal(run(build(HandScheduled), {}, [x, y]),
                                  (x + y) * 2 * y + x)
    art = Artifact.build(HandScheduled, {}, "host")  # tuning.apply, then the same pipeline
    np.testing.assert_array_equal(art(x, y), (x + y) * 2 * y + x)


@T.prim_func(s_tir=True)
def scatter(a: T.Buffer((T.int64(4096),), "int32"), c: T.Buffer((T.int64(8192),), "int32")):
    T.func_attr({"tirx.noalias": True})
    b = T.sblock_alloc_buffer((T.int64(8192),), "int32")
    for i in range(T.int64(8192)):
        with T.sblock("zero"):
            vi = T.axis.spatial(T.int64(8192), i)
            b[vi] = 0
    for i in range(T.int64(4096)):
        with T.sblock("even"):
            vi = T.axis.spatial(T.int64(4096), i)
            b[vi * T.int64(2)] = a[vi] * 3
    for i in range(T.int64(8192)):
        with T.sblock("out"):
            vi = T.axis.spatial(T.int64(8192), i)
            c[vi] = b[vi] + 1


def test_blocks_the_inliner_cannot_merge_stay_and_compute_the_same():
    """Inlining refuses blocks writing b twice (a scatter to the even elements): the three
    blocks stay, each one scheduled by rows; the strided store is not vectorized."""
    report = ScheduleReport()
    out = schedule_cpu(tvm.IRModule({"scatter": scatter}), resolve_target(TARGET),
                       report=report)["scatter"]
    assert report.scheduled == ["scatter"]
    assert loop_kinds(out) == ["parallel", "vectorized", "parallel", "parallel", "vectorized"]
    a = np.arange(4096, dtype="int32")
    expected = np.ones(8192, dtype="int32")
    expected[::2] += 3 * a
    for func in (scatter, out):
        lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), resolve_target("host"))
        c = tvm.runtime.tensor(np.zeros(8192, dtype="int32"))
        lib["main"](tvm.runtime.tensor(a), c)
        np.testing.assert_array_equal(c.numpy(), expected)


def test_a_kernel_the_rules_cannot_handle_is_kept():
    """A reduction to a single value (no spatial loop) and a let-binding block: the first is
    left serial, the second not vectorized; both still compute the right numbers."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 128), "int32"))
    with bb.function("main", [x]):
        total = bb.emit(relax.op.sum(x))
        _ = bb.emit_func_output(bb.emit(relax.op.add(x, total)))
    scheduled, report = _scheduled_module(bb.get())
    assert not report.skipped
    kinds = {gv.name_hint: loop_kinds(f) for gv, f in scheduled.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(k == [] for k in kinds.values()) and any("parallel" in k for k in kinds.values())
    xs = np.arange(64 * 128, dtype="int32").reshape(64, 128)
    np.testing.assert_array_equal(run(build(bb.get()), {}, [xs]), xs + xs.sum())

    from tvm import te, tirx

    a = te.placeholder((8192,), "int32", name="a")
    v = tirx.Var("v", "int32")
    b = te.compute((8192,), lambda i: tirx.Let(v, a[i] * 3, v + v * v), name="b")
    mod = tvm.IRModule({"let_kernel": te.create_prim_func([a, b])})
    out = schedule_cpu(mod, resolve_target(TARGET))["let_kernel"]
    assert loop_kinds(out) == ["parallel"] and bool(out.attrs[SCHEDULED])
    lib = tvm.tirx.build(out.with_attr("global_symbol", "main"), resolve_target("host"))
    xa = np.arange(8192, dtype="int32") - 4096
    got = tvm.runtime.tensor(np.zeros(8192, dtype="int32"))
    lib["main"](tvm.runtime.tensor(xa), got)
    np.testing.assert_array_equal(got.numpy(), 3 * xa + (3 * xa) ** 2)


def test_vector_width_follows_the_target():
    assert vector_bytes(tvm.target.Target(TARGET)) == 64
    assert vector_bytes(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                           "mcpu": "haswell"})) == 32
    assert vector_bytes(resolve_target("arm")) == 16
