"""The global average pool kernel (pqcompile.lower.kernels_mean) gives the reference's codes.

Each case's channel sums are requantized in int64 numpy with the same multiplier and shift
(``clamp((sum * m + 2^(sh-1)) >> sh, lo, hi)``), on planes smaller than the kernel's 16 lanes,
of whole vectors, with a tail, and large enough to split the channels among parallel tasks,
for every dtype pair, on this host and on aarch64 under qemu-aarch64; inputs at their extremes
give the largest sums.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from pqcompile.lower import kernels_mean as KM
from pqcompile.lower.build import resolve_target
from pqcompile.targets import get_target, run_vm

#: (channels, height, width, in, out, keepdim, extreme)
CASES = [(3, 1, 1, "int8", "int8", True, False), (5, 3, 5, "uint8", "int8", True, False),
         (7, 4, 4, "int8", "uint8", False, False), (4, 7, 7, "uint8", "uint8", True, False),
         (40, 28, 29, "uint8", "int8", True, False), (96, 56, 56, "int8", "int8", False, False),
         (6, 9, 9, "uint8", "uint8", True, True), (6, 9, 9, "int8", "int8", True, True)]


def _case(rng, c, h, w, in_dt, out_dt, keepdim, extreme):
    info = np.iinfo(in_dt)
    x = (rng.choice(np.array([info.min, info.max]), (1, c, h, w)) if extreme
         else rng.integers(info.min, info.max + 1, (1, c, h, w))).astype(in_dt)
    # a multiplier near 1 / (h w) times a spread of output scales: codes at both clamps
    mult, shift = int(rng.integers(1 << 29, 1 << 30)), 30 + int(np.log2(h * w + 1)) - 1
    lo, hi = (0, 255) if out_dt == "uint8" else (-127, 127)
    total = x.astype(np.int64).sum(axis=(2, 3))
    want = np.clip((total * mult + (1 << (shift - 1))) >> shift, lo, hi).astype(out_dt)
    out_shape = (1, c, 1, 1) if keepdim else (1, c)
    kernel = KM.mean_kernel(c, h, w, in_dt, out_dt, out_shape, mult, shift, lo, hi)
    return x, kernel, want.reshape(out_shape)


def _module(cases):
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(x.shape, str(x.dtype)))
          for i, (x, _, _) in enumerate(cases)]
    with bb.function("main"):
        with bb.dataflow():
            outs = [bb.emit(relax.call_tir(bb.add_func(k.without_attr("global_symbol"), "mean"),
                                           [xv], relax.TensorType(want.shape, str(want.dtype))))
                    for (_, k, want), xv in zip(cases, xs)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out, params=xs)
    return bb.get(), [x for x, _, _ in cases]


def _check(cases, outputs):
    spread = set()
    for (x, _, want), got in zip(cases, outputs):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{x.dtype} {x.shape}")
        spread |= set(np.unique(want).tolist())
    assert len(spread) > 10  # not all clamped: the check is not vacuous


def test_mean_on_host():
    cases = [_case(np.random.default_rng(i), *p) for i, p in enumerate(CASES)]
    mod, inputs = _module(cases)
    vm = relax.VirtualMachine(tvm.compile(mod, resolve_target("host")), tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    _check(cases, [o.numpy() for o in outs])


def test_mean_on_aarch64(sysroot, tmp_path):
    spec = get_target("arm")
    cases = [_case(np.random.default_rng(10 + i), *p) for i, p in enumerate(CASES)]
    mod, inputs = _module(cases)
    lib = spec.export(tvm.compile(mod, spec.tvm_target()), tmp_path / "k.so")
    _check(cases, run_vm(lib, inputs, sysroot=sysroot))


def test_mean_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="int8/uint8 codes, got int16"):
        KM.mean_kernel(2, 3, 3, "int16", "int8", (1, 2, 1, 1), 1 << 30, 33, -127, 127)
    with pytest.raises(ValueError, match="shift 63"):
        KM.mean_kernel(2, 3, 3, "int8", "int8", (1, 2, 1, 1), 1 << 30, 63, -127, 127)
    with pytest.raises(ValueError, match="overflow int32"):
        KM.mean_kernel(1, 4096, 4096, "int8", "int8", (1, 1, 1, 1), 1 << 30, 40, -127, 127)
