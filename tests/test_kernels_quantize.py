"""The input quantization without a division (pqcompile.lower.kernels_quantize) gives the
reference's codes: ``clamp(floor(float64(x) / s + 0.5), lo, hi)`` as torch computes it.

The inputs sit on every rounding boundary ``(k + 1/2) s`` of each scale and a few float32
ulps to either side, plus random values, infinities, the largest floats and subnormals; the
scales include ones just above small integers (``nextafter(7, inf)``), where the rounded
product ``x * RN(1/s)`` gives other codes than the division (the test checks that the plain
product would fail, so the set is not vacuous). Run on this host (x86 with FMA where it has
it: the kernel is only used there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from pqcompile.lower import kernels_quantize as KQ
from pqcompile.lower.build import resolve_target
from pqcompile.targets import TargetSpec

HOST = resolve_target("host")
SCALES = [0.0186, 1 / 255, 0.1, 2.0 ** -7, 0.0123456789123, 1e-5,
          float(np.nextafter(7.0, np.inf)), float(np.nextafter(3.0, np.inf)),
          float(np.nextafter(3.0, -np.inf)), float(np.nextafter(0.75, np.inf))]


def _inputs(scale: float, rng) -> np.ndarray:
    ks = np.arange(-131, 131, dtype=np.float64)
    edges = [((ks + 0.5) * scale).astype(np.float32),
             ((ks + 0.5) * float(np.float32(scale))).astype(np.float32)]
    xs = list(edges)
    for e in edges:
        up, down = e.copy(), e.copy()
        for _ in range(4):
            up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
            xs += [up, down]
    xs.append(rng.normal(0, 100 * scale, 4001).astype(np.float32))
    xs.append(np.array([np.inf, -np.inf, 0.0, -0.0, 3e38, -3e38, 1e-45, -1e-45], np.float32))
    return np.concatenate(xs)


def _reference(x: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    return torch.floor(torch.from_numpy(x).to(torch.float64) / scale + 0.5).clamp(lo, hi).numpy()


def test_quantize_equals_the_division():
    assert KQ.has_fma(HOST) == ("fma" in set(tvm.target.codegen.llvm_get_cpu_features(HOST)))
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    cases = []
    for i, scale in enumerate(SCALES):
        lo, hi, dt = (-128, 127, "int8") if i % 2 == 0 else (0, 255, "uint8")
        x = _inputs(scale, rng).reshape(1, -1)
        cases.append((x, scale, lo, hi, dt))
    xs = [relax.Var(f"x{i}", relax.TensorType(c[0].shape, "float32")) for i, c in enumerate(cases)]
    with bb.function("main"):
        with bb.dataflow():
            outs = [bb.emit(relax.call_tir(
                bb.add_func(KQ.quantize_kernel(x.shape, s, lo, hi, dt).without_attr(
                    "global_symbol"), "quantize"), [xv], relax.TensorType(x.shape, dt)))
                    for (x, s, lo, hi, dt), xv in zip(cases, xs)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out, params=xs)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), HOST), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(c[0]) for c in cases])
    naive_wrong = 0
    for (x, s, lo, hi, dt), y in zip(cases, got):
        want = _reference(x, s, lo, hi)
        np.testing.assert_array_equal(y.numpy().astype(np.float64), want, err_msg=f"scale {s}")
        x64 = x.astype(np.float64)
        naive_wrong += int((np.clip(np.floor(x64 * (1 / s) + 0.5), lo, hi) != want).sum())
    assert naive_wrong > 0  # the boundaries tell the division from the plain product


def test_quantize_kernel_refuses_bad_arguments():
    with pytest.raises(ValueError, match="int8/uint8 codes, got int16"):
        KQ.quantize_kernel((4,), 0.1, -128, 127, "int16")
    with pytest.raises(ValueError, match="scale 0.0"):
        KQ.quantize_kernel((4,), 0.0, -128, 127, "int8")


def test_used_only_on_x86_with_fma():
    assert not KQ.has_fma(resolve_target("arm"))  # fdiv: fewer aarch64 instructions
    baseline = TargetSpec.from_tvm({"kind": "llvm", "mcpu": "x86-64"}, name="x86-64-test")
    assert not KQ.has_fma(baseline.tvm_target())
    haswell = TargetSpec.from_tvm({"kind": "llvm", "mcpu": "haswell"}, name="haswell-test")
    assert KQ.has_fma(haswell.tvm_target())
