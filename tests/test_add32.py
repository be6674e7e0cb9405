"""The residual add in int32 lanes (pqcompile.lower.add32) gives the reference's integers.

The form chosen at lowering is checked against the int64 reference on every pair of input
codes by the chooser itself; here, independently, for multipliers drawn like the quantizer's
(both forms occur), a split form by hand, and the kernel,
on this host and on aarch64 under qemu, on tensors with a tail after the last vector and
large enough to be split among parallel tasks, against numpy's int64 arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from pqcompile.lower import add32
from pqcompile.lower.build import resolve_target
from pqcompile.quant.fixedpoint import shared_shift
from pqcompile.targets import get_target, run_vm

DTYPES = [("int8", "uint8"), ("uint8", "int8"), ("int8", "int8"), ("uint8", "uint8")]


def _reference(a, b, mults, shift, lo, hi):
    return np.clip((a.astype(np.int64) * mults[0] + b.astype(np.int64) * mults[1]
                    + (1 << (shift - 1))) >> shift, lo, hi)


def _draws(n: int, seed: int):
    """``(mults, shift, lo, hi, dtypes)`` as the quantizer makes them: two scale ratios
    sharing one shift (``shared_shift``)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        ratios = rng.uniform(0.2, 1.6, 2) * 2.0 ** rng.integers(-3, 2, 2)
        mults, shift = shared_shift(list(ratios))
        dtypes = DTYPES[i % len(DTYPES)]
        lo, hi = (0, 255) if i % 3 == 0 else (-127, 127)
        yield mults, shift, lo, hi, dtypes


def test_forms_equal_the_int64_reference_on_every_code_pair():
    kinds = []
    for mults, shift, lo, hi, dtypes in _draws(40, 0):
        form = add32.int32_form(mults, shift, lo, hi, dtypes)
        kinds.append(None if form is None else form.kind)
        if form is None:
            continue
        ra, rb = (add32.code_range(d) for d in dtypes)
        a = np.arange(ra[0], ra[1] + 1, dtype=np.int64)[:, None]
        b = np.arange(rb[0], rb[1] + 1, dtype=np.int64)[None, :]
        got = add32.evaluate(form, a, b, mults, shift, lo, hi)  # raises if int32 overflows
        np.testing.assert_array_equal(got, _reference(a, b, mults, shift, lo, hi))
        if form.kind == "single":
            assert form.shift < shift  # smaller multipliers
    assert {"single", "split"} <= set(kinds)


def test_split_form_by_hand_and_overflow_caught():
    # 2^16 h + l: 1414191178 = 21578 * 65536 + 55370, 723401710 = 11038 * 65536 + 15342 (a
    # resnet18 add for which no scaled-down multipliers give every code)
    form = add32.int32_form((1414191178, 723401710), 30, 0, 255, ("int8", "uint8"))
    assert form == add32.Int32Add("split", (21578, 11038), 30, (55370, 15342))
    with pytest.raises(OverflowError):
        add32.evaluate(add32.Int32Add("single", (1 << 30, 1 << 30), 3), np.array([127]),
                       np.array([127]), (0, 0), 3, -127, 127)


def _cases(seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for (mults, shift, lo, hi, dtypes), shape in zip(
            _draws(8, seed), [(1, 3, 5, 7), (1, 64, 56, 56), (2, 17), (1, 16)] * 2):
        form = add32.int32_form(mults, shift, lo, hi, dtypes)
        if form is None:
            continue
        a, b = (rng.integers(*add32.code_range(d), endpoint=True, size=shape).astype(d)
                for d in dtypes)
        out_dt = "uint8" if lo == 0 else "int8"
        kernel = add32.add_kernel(shape, dtypes, out_dt, form, lo, hi)
        out.append((a, b, kernel, _reference(a, b, mults, shift, lo, hi).astype(out_dt)))
    assert len(out) >= 6
    return out


def _module(cases):
    bb = relax.BlockBuilder()
    vs = [relax.Var(f"v{i}", relax.TensorType(x.shape, str(x.dtype)))
          for i, c in enumerate(cases) for x in c[:2]]
    with bb.function("main"):
        with bb.dataflow():
            outs = [bb.emit(relax.call_tir(bb.add_func(k.without_attr("global_symbol"), "add"),
                                           [vs[2 * i], vs[2 * i + 1]],
                                           relax.TensorType(want.shape, str(want.dtype))))
                    for i, (_, _, k, want) in enumerate(cases)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out, params=vs)
    return bb.get(), [x for c in cases for x in c[:2]]


def _check(cases, outputs):
    for (a, _, _, want), got in zip(cases, outputs):
        np.testing.assert_array_equal(got, want, err_msg=str(a.shape))
    assert len({int(v) for c in cases for v in np.unique(c[3])}) > 100  # not all clamped


def test_add_kernel_on_host():
    cases = _cases(1)
    mod, inputs = _module(cases)
    vm = relax.VirtualMachine(tvm.compile(mod, resolve_target("host")), tvm.cpu())
    _check(cases, [o.numpy() for o in vm["main"](*[tvm.runtime.tensor(x) for x in inputs])])


def test_add_kernel_on_aarch64(sysroot, tmp_path):
    spec = get_target("arm")
    cases = _cases(2)
    mod, inputs = _module(cases)
    lib = spec.export(tvm.compile(mod, spec.tvm_target()), tmp_path / "k.so")
    _check(cases, run_vm(lib, inputs, sysroot=sysroot))
