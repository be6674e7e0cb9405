"""The byte table lookup kernel (pqcompile.lower.kernels_lut) gives the reference's codes.

Every code of both input dtypes is looked up (tables of both output dtypes, random entries),
on tensors shorter than a vector, of whole vectors, with a tail after the last vector and
large enough to be split among parallel tasks, for every flavour: on this host (VBMI where the
CPU has it, and the scalar loop) and on aarch64 (``tbl``/``tbx``) under qemu-aarch64. The
rotated table is checked entry by entry against hand-computed indices.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax

from pqcompile.lower import kernels_lut as KT
from pqcompile.lower.build import resolve_target
from pqcompile.targets import get_target, run_vm

HOST = resolve_target("host")
HOST_FLAVOURS = sorted({KT.lut_flavour(HOST), "scalar"})
#: tensor shapes: one code short of a NEON vector, whole VBMI vectors, a tail after whole
#: vectors, and more than two parallel tasks' bytes
SHAPES = [(1, 15), (2, 64), (1, 3, 7, 5), (1, 5, 41, 1000)]
DTYPES = [("int8", "int8"), ("int8", "uint8"), ("uint8", "int8"), ("uint8", "uint8")]


def _cases(seed: int = 0):
    """``(x, rotated table, expected)`` for every shape and dtype pair: ``x`` holds every code
    of its dtype where it has room for them (then random codes)."""
    rng = np.random.default_rng(seed)
    cases = []
    for shape in SHAPES:
        for in_dt, out_dt in DTYPES:
            info = np.iinfo(in_dt)
            n = int(np.prod(shape))
            codes = rng.permutation(np.arange(info.min, info.max + 1))
            x = np.concatenate([codes, rng.integers(info.min, info.max + 1, max(0, n - 256))])
            x = x[:n].reshape(shape).astype(in_dt)
            o = np.iinfo(out_dt)
            table = rng.integers(o.min, o.max + 1, 256).astype(out_dt)
            offset = -128 if in_dt == "int8" else 0
            expected = table[x.astype(np.int64) - offset]
            cases.append((x, KT.rotated_table(table, offset), expected))
    return cases


def _module(cases, flavour: str):
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(x.shape, str(x.dtype)))
          for i, (x, _, _) in enumerate(cases)]
    ts = [relax.Var(f"t{i}", relax.TensorType((256,), str(t.dtype)))
          for i, (_, t, _) in enumerate(cases)]
    with bb.function("main"):
        with bb.dataflow():
            outs = []
            for (x, t, want), xv, tv in zip(cases, xs, ts):
                kernel = KT.lut_kernel(x.shape, str(x.dtype), str(t.dtype), flavour)
                gv = bb.add_func(kernel.without_attr("global_symbol"), "lut")
                outs.append(bb.emit(relax.call_tir(gv, [xv, tv], relax.TensorType(
                    x.shape, str(t.dtype)))))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out, params=xs + ts)
    return bb.get(), [x for x, _, _ in cases] + [t for _, t, _ in cases]


def _check(cases, outputs):
    assert len(outputs) == len(cases)
    for (x, _, want), got in zip(cases, outputs):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{x.dtype} {x.shape}")


def test_rotated_table_by_hand():
    table = np.arange(256, dtype=np.int64) * 7 % 256
    # int8 codes: table[q + 128] at index q & 255 (q = 0 -> 128, q = -1 -> 127, q = -128 -> 0)
    r = KT.rotated_table(table, -128)
    assert [int(r[u]) for u in (0, 1, 127, 128, 255)] == \
        [int(table[i]) for i in (128, 129, 255, 0, 127)]
    assert np.array_equal(KT.rotated_table(table, 0), table)  # uint8 codes index as they are
    with pytest.raises(ValueError, match="offset 5"):
        KT.rotated_table(table, 5)
    with pytest.raises(ValueError, match="256 entries"):
        KT.rotated_table(table[:100], 0)


def test_host_flavour_matches_cpu_features():
    features = set(tvm.target.codegen.llvm_get_cpu_features(HOST))
    assert (KT.lut_flavour(HOST) == "vbmi") == ({"avx512vbmi", "avx512bw"} <= features)
    assert KT.lut_flavour(resolve_target("arm")) == "neon"
    assert KT.lut_flavour(resolve_target("arm-dotprod")) == "neon"


def test_kernel_refuses_wider_dtypes():
    with pytest.raises(ValueError, match="int16"):
        KT.lut_kernel((4,), "int16", "int8", "scalar")
    with pytest.raises(ValueError, match="flavour 'avx'"):
        KT.lut_kernel((4,), "int8", "int8", "avx")


@pytest.mark.parametrize("flavour", HOST_FLAVOURS)
def test_lookup_on_host(flavour):
    cases = _cases()
    mod, inputs = _module(cases, flavour)
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    _check(cases, [o.numpy() for o in outs])


def test_lookup_on_aarch64(sysroot, tmp_path):
    spec = get_target("arm")
    cases = _cases(1)
    mod, inputs = _module(cases, "neon")
    lib = spec.export(tvm.compile(mod, spec.tvm_target()), tmp_path / "k.so")
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    # the table really is looked up by vector: one tbl and three tbx a 16-byte step
    assert sum("\ttbl\t" in line for line in text) > 0
    assert sum("\ttbx\t" in line for line in text) >= 3
    _check(cases, run_vm(lib, inputs, sysroot=sysroot))
