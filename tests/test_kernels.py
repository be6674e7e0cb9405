"""The hand-scheduled integer kernels give the reference's integers on every schedule.

Each kernel (conv, depthwise conv, linear) is checked against an int64 numpy/torch computation
of the same arithmetic (accumulate, add bias, ``(acc * m + 2^(s-1)) >> s``, clamp) on shapes
that hit the edge cases (channels not a multiple of the dot-product depth or the tile, stride 2
phases, pads, output grids smaller than a vector, signed and unsigned inputs), for every
instruction set: on this host (AVX-512 VNNI where the CPU has it, AVX2, the generic path),
and on aarch64 (SDOT and plain NEON) under qemu-aarch64. Whole models compiled for the host
and for an AVX2-only x86 target match their integer references exactly.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from pqcompile.lower import kernels as K
from pqcompile.lower import kernels_linear as KL
from pqcompile.lower import kernels_planar as KP
from pqcompile.lower.build import resolve_target
from pqcompile.lower.tir_macros import NARROW_MIN_SHIFT
from pqcompile.targets import TargetSpec, get_target, run_vm

HOST = resolve_target("host")
_HOST_ISA = K.isa_for(HOST)
#: the host's kernels, the AVX2 ones where the host has AVX-512 VNNI (every such CPU has AVX2),
#: and the generic ones at the width the host's fallback uses (``fit_isa``)
HOST_ISAS = [_HOST_ISA] + ([K.Isa("avx2", 8, 4, 2)] if _HOST_ISA.name == "vnni" else []) \
    + ([K.Isa("avx2u", 8, 4, 2)] if _HOST_ISA.name in ("vnni", "avx2") else []) \
    + ([] if _HOST_ISA.name == "generic" else [K.Isa("generic", _HOST_ISA.generic_lanes, 4, 2)])


def _wmax(isa):
    """The largest weight magnitude the kernels of ``isa`` take (``avx2u``: 7-bit weights)."""
    return K.AVX2U_MAX_WEIGHT if isa.name == "avx2u" else 127


def _bounds(dtype):
    return (0, 255) if dtype == "uint8" else (-127, 127)


def _requant(acc, b, m, s, lo, hi, dtype, axis):
    view = [1] * acc.ndim
    view[axis] = -1
    acc = acc + b.astype(np.int64).reshape(view)
    s64 = s.astype(np.int64).reshape(view)
    y = (acc * m.astype(np.int64).reshape(view) + (np.int64(1) << (s64 - 1))) >> s64
    return np.clip(y, lo, hi).astype(dtype)


def _channel_data(rng, o, seed):
    """Bias, multiplier, shift: even seeds' shifts all allow the 32-bit epilogue
    (``shape.narrow``), odd seeds' mostly do not."""
    return (rng.integers(-2000, 2000, o).astype(np.int32),
            rng.integers(1 << 28, 1 << 31, o).astype(np.int32),
            rng.integers(*((33, 48) if seed % 2 == 0 else (30, 38)), o).astype(np.int32))


def _narrow(s):
    return bool(s.min() >= NARROW_MIN_SHIFT)


def _input(rng, shape, dtype):
    lo, hi = _bounds(dtype)
    return rng.integers(lo, hi + 1, shape).astype(dtype)


def _extremes(rng, a, wmax=None):
    """``a``'s shape and dtype, each element its dtype's lowest or highest kernel value (int8
    weights and inputs: -127 or 127, weights +-``wmax`` where given; uint8 inputs: 0 or 255,
    which the int8 dot products see as -128 or 127): the largest int16 pair sums of the AVX2
    and NEON steps."""
    lo, hi = _bounds(a.dtype.name) if wmax is None else (-wmax, wmax)
    return rng.choice(np.array([lo, hi], a.dtype), a.shape)


class Case:
    """One kernel instance: its Relax functions, inputs and expected integers."""

    def __init__(self, kind, isa, seed, **p):
        rng = np.random.default_rng(seed)
        self.kind, self.p = kind, p
        in_dt, out_dt = p["in_dtype"], p["out_dtype"]
        lo, hi = _bounds(out_dt)
        self.narrow = None
        if kind == "linear":
            x = _input(rng, (p["rows"], p["k"]), in_dt)
            wt = rng.integers(-_wmax(isa), _wmax(isa) + 1, (p["k"], p["n"])).astype(np.int8)
            if p.get("extreme"):
                x, wt = _extremes(rng, x), _extremes(rng, wt, _wmax(isa))
            b, m, s = _channel_data(rng, p["n"], seed)
            shape = KL.LinearShape(p["rows"], p["k"], p["n"], in_dt, out_dt, lo, hi)
            isa = KL.linear_tile(shape, isa)
            self.pack, self.kernel, scratch = KL.linear_kernel(shape, isa)
            self.params = [KL.pack_linear_weight(wt, isa),
                           *KL.linear_params(wt, b, m, s, shape, isa)]
            self.expected = _requant(x.astype(np.int64) @ wt.astype(np.int64), b, m, s, lo, hi,
                                     out_dt, 1)
            self.out_shape = (p["rows"], p["n"])
        elif kind == "pool":
            c, h, k, st, pad = p["c"], p["h"], p["k"], p["stride"], p["pad"]
            shape = K.ConvShape(c, h, h + 1, c, (k, k), st, (pad, pad), in_dt, in_dt, 0, 0)
            x = _input(rng, (1, c, h, h + 1), in_dt)
            self.expected = torch.nn.functional.max_pool2d(
                torch.from_numpy(x.astype(np.float64)), k, st, pad).numpy().astype(in_dt)
            self.pack, self.kernel, scratch = KP.maxpool2d_kernel(shape, isa)
            self.params, out_dt = [], in_dt
            self.out_shape = (1, c, *shape.out_hw)
            isa = K.Isa("generic", 1, 1, 1)  # the scratch is the input's dtype
        else:
            c, h, o, k, st, pad = p["c"], p["h"], p["o"], p["k"], p["stride"], p["pad"]
            w_ = p.get("w", h + 1)  # planes h x (h + 1) unless given
            groups = c if kind == "dw" else 1
            o = c if kind == "dw" else o
            x = _input(rng, (1, c, h, w_), in_dt)
            w = rng.integers(-_wmax(isa), _wmax(isa) + 1, (o, c // groups, k, k)).astype(np.int8)
            if p.get("extreme"):
                x, w = _extremes(rng, x), _extremes(rng, w, _wmax(isa))
            b, m, s = _channel_data(rng, o, seed)
            self.narrow = _narrow(s)
            shape = K.ConvShape(c, h, w_, o, (k, k), st, (pad, pad), in_dt, out_dt, lo, hi,
                                self.narrow)
            acc = torch.nn.functional.conv2d(
                torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
                stride=st, padding=pad, groups=groups).numpy().astype(np.int64)
            self.expected = _requant(acc, b, m, s, lo, hi, out_dt, 1)
            if kind == "dw":
                self.pack, self.kernel, scratch = KP.dwconv2d_kernel(shape, isa)
                self.params = [KP.pack_dw_weight(w, shape, isa),
                               *KP.pack_dw_params(w, b, m, s, shape, isa)]
                isa = KP.dw_isa(isa)
            else:
                isa = K.choose_tile(shape, isa) if p.get("tile") is None else \
                    K.Isa(isa.name, isa.lanes, *p["tile"])
                self.pack, self.kernel, scratch = K.conv2d_kernel(shape, isa)
                self.params = [K.pack_weight(w, isa), *K.channel_params(w, b, m, s, shape, isa)]
            self.out_shape = (1, o, *shape.out_hw)
        self.x, self.out_dtype = x, out_dt
        self.scratch = ((scratch,), isa.packed_dtype or in_dt)

    def emit(self, bb, x, params):
        xc = x if self.pack is None else bb.emit(relax.call_tir(
            bb.add_func(self.pack.without_attr("global_symbol"), "pack"), [x],
            relax.TensorType(*self.scratch)))
        return bb.emit(relax.call_tir(bb.add_func(self.kernel.without_attr("global_symbol"),
                                                  "kernel"), [xc, *params],
                                      relax.TensorType(self.out_shape, self.out_dtype)))


def _module(cases):
    """One Relax function running every case: inputs, then each case's params."""
    bb = relax.BlockBuilder()
    args, outs = [], []
    for i, case in enumerate(cases):
        args.append(relax.Var(f"x{i}", relax.TensorType(case.x.shape, str(case.x.dtype))))
    params = [[relax.Var(f"p{i}_{j}", relax.TensorType(a.shape, str(a.dtype)))
               for j, a in enumerate(case.params)] for i, case in enumerate(cases)]
    with bb.function("main"):
        with bb.dataflow():
            for case, x, ps in zip(cases, args, params):
                outs.append(case.emit(bb, x, ps))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out, params=args + [p for ps in params for p in ps])
    inputs = [c.x for c in cases] + [np.ascontiguousarray(a) for c in cases for a in c.params]
    return bb.get(), inputs


CONV = [  # (c, h, o, k, stride, pad, in, out, tile)
    (3, 9, 5, 3, 1, 1, "uint8", "uint8", None),
    (5, 7, 6, 3, 2, 1, "int8", "int8", None),
    (8, 12, 13, 1, 1, 0, "uint8", "int8", None),
    (6, 11, 4, 1, 2, 0, "int8", "uint8", None),
    (3, 17, 7, 7, 2, 3, "int8", "uint8", None),
    (9, 5, 9, 5, 1, 2, "uint8", "uint8", (3, 2)),
    (16, 3, 20, 3, 1, 1, "uint8", "int8", (1, 1)),
    (4, 2, 3, 3, 2, 1, "int8", "int8", None),
    (7, 5, 6, 1, 1, 0, "int8", "uint8", None),   # 1x1: the plane copied as one row
    (10, 7, 9, 1, 1, 0, "uint8", "int8", None),
    # 1x1 without a pack: many pixel blocks (and a channel remainder); few pixel blocks, so
    # the output channels split into chunks
    (11, 20, 37, 1, 1, 0, "uint8", "uint8", None),
    (10, 7, 70, 1, 1, 0, "int8", "int8", None),
    # rows wider than a vector: whole vectors inside a row, and vectors across a row's end
    (6, 40, 5, 3, 1, 1, "uint8", "uint8", None),
    (5, 36, 7, 3, 2, 1, "int8", "int8", None),
]
DW = [(5, 9, 3, 1, 1, "uint8", "uint8"), (7, 12, 3, 2, 1, "int8", "int8"),
      (6, 10, 5, 2, 2, "uint8", "int8"), (9, 3, 3, 1, 1, "int8", "uint8"),
      # rows of 16 pixels or more: the row schedules (VNNI taps where the input is uint8)
      (4, 20, 3, 1, 1, "uint8", "uint8"), (5, 33, 3, 2, 1, "uint8", "int8"),
      (3, 17, 5, 1, 2, "uint8", "uint8"), (3, 33, 5, 2, 2, "uint8", "uint8"),
      (4, 16, 3, 1, 1, "int8", "uint8"),
      # narrow rows: several rows per vector (fewer where the plane has fewer)
      (4, 13, 3, 2, 1, "uint8", "int8"), (3, 3, 7, 2, 3, "uint8", "uint8"),
      # one output row a vector at stride 2 (rows-neon: its taps read past the row's half)
      (3, 19, 3, 2, 1, "uint8", "int8"),
      # planes of at most 8 outputs (rows-neon-group: several channels a vector; the last
      # group part full): 2x2 at strides 1 and 2, 1x1
      (5, 2, 3, 1, 1, "uint8", "int8"), (7, 4, 3, 2, 1, "int8", "uint8"),
      (17, 1, 3, 1, 1, "uint8", "uint8"),
      # 100-pixel rows: tiles of 7 (stride 1) and 4 (stride 2) rows, the last one overlapping
      (2, 99, 3, 1, 1, "uint8", "uint8"), (2, 99, 3, 2, 1, "uint8", "int8"),
      # rows of 256 pixels: a row's tile would be 1 KiB, so the grid
      (2, 255, 3, 1, 1, "uint8", "uint8")]
POOL = [(5, 9, 3, 2, 1, "uint8"), (7, 12, 3, 2, 1, "int8"), (6, 10, 2, 2, 0, "int8"),
        (9, 5, 3, 1, 1, "uint8"), (4, 56, 3, 2, 1, "uint8"),
        # a 1 x 2 image: each output column is at both edges (taps left and right of it)
        (3, 1, 3, 1, 1, "int8"),
        # 3x3 stride 2 pad 1 on even widths of 32 or more: no pack (odd and even heights; the
        # last step of a row overlapping the one before; 16 outputs a step below 64)
        (3, 65, 3, 2, 1, "uint8"), (2, 63, 3, 2, 1, "int8"), (2, 79, 3, 2, 1, "uint8"),
        (3, 39, 3, 2, 1, "int8")]
LINEAR = [(1, 5, 7, "uint8", "uint8"), (3, 9, 33, "int8", "int8"),
          (7, 64, 17, "uint8", "int8"), (1, 70, 300, "int8", "uint8")]


def _cases(isa):
    out = [Case("conv", isa, i, c=c, h=h, o=o, k=k, stride=st, pad=pad, in_dtype=a,
                out_dtype=b, tile=t) for i, (c, h, o, k, st, pad, a, b, t) in enumerate(CONV)]
    out += [Case("dw", isa, 100 + i, c=c, h=h, o=c, k=k, stride=st, pad=pad, in_dtype=a,
                 out_dtype=b) for i, (c, h, k, st, pad, a, b) in enumerate(DW)]
    # a 7x7 plane, one output row a vector at 8 lanes: its junk lane reads on past the row
    out += [Case("dw", isa, 150, c=6, h=7, o=6, k=3, stride=1, pad=1, in_dtype="uint8",
                 out_dtype="uint8", w=7)]
    out += [Case("pool", isa, 300 + i, c=c, h=h, k=k, stride=st, pad=pad, in_dtype=a,
                 out_dtype=a) for i, (c, h, k, st, pad, a) in enumerate(POOL)]
    out += [Case("linear", isa, 200 + i, rows=r, k=kk, n=n, in_dtype=a, out_dtype=b)
            for i, (r, kk, n, a, b) in enumerate(LINEAR)]
    # every product at its extreme: a dot product that saturated its int16 pair sums (as
    # vpmaddubsw on unsigned inputs would: 2 x 255 x 127 > 32767) fails these
    out += [Case("conv", isa, 400 + i, c=16, h=6, o=8, k=3, stride=1, pad=1, in_dtype=a,
                 out_dtype="uint8", tile=None, extreme=True)
            for i, a in enumerate(("uint8", "int8"))]
    out += [Case("linear", isa, 410 + i, rows=2, k=32, n=16, in_dtype=a, out_dtype="int8",
                 extreme=True) for i, a in enumerate(("uint8", "int8"))]
    return out


def _check(cases, outputs):
    assert len(outputs) == len(cases)
    for case, y in zip(cases, outputs):
        assert y.dtype == case.expected.dtype and y.shape == case.expected.shape, case.p
        np.testing.assert_array_equal(y, case.expected, err_msg=f"{case.kind} {case.p}")
        assert np.unique(case.expected).size > 2, case.p  # the check is not vacuous


def _check_on_host(cases):
    mod, inputs = _module(cases)
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    _check(cases, [o.numpy() for o in outs])


@pytest.mark.parametrize("isa", HOST_ISAS, ids=lambda i: i.name)
def test_kernels_on_host(isa):
    _check_on_host(_cases(isa))


def _lowered_kernel_modules():
    import importlib
    import pkgutil

    from pqcompile import lower
    return [importlib.import_module(f"pqcompile.lower.{m.name}")
            for m in pkgutil.iter_modules(lower.__path__) if m.name.startswith("kernels")]


def _parallel(func) -> bool:
    return func is not None and "T.parallel(" in func.script()


@pytest.fixture
def every_kernel_parallel(monkeypatch):
    """Kernels built with a parallel region whatever their size: the cases are small, so by
    default (``kernel_types.parallel_worth``) they run on the calling thread alone."""
    from pqcompile.lower import kernel_types

    def rebuild():
        for module in _lowered_kernel_modules():
            for value in vars(module).values():
                if hasattr(value, "cache_clear"):
                    value.cache_clear()
    monkeypatch.setattr(kernel_types, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(kernel_types, "PARALLEL_MIN_BYTES", 0)
    rebuild()
    yield
    monkeypatch.undo()
    rebuild()


def test_small_kernels_run_serially_and_large_ones_in_parallel():
    cases = [c for c in _cases(_HOST_ISA) if c.kind in ("conv", "dw", "linear")]
    assert not any(_parallel(c.kernel) for c in cases if c.p.get("h", 0) <= 40)
    assert any(_parallel(c.kernel) for c in cases)  # the 256-pixel rows of a dw case
    large = K.ConvShape(64, 56, 56, 64, (3, 3), 1, (1, 1), "uint8", "uint8", 0, 255)
    pack, kernel, _ = K.conv2d_kernel(large, K.choose_tile(large, _HOST_ISA))
    assert _parallel(pack) and _parallel(kernel)


def test_kernels_on_host_in_parallel_regions(every_kernel_parallel):
    """The same cases with every kernel's outer loop split among the pool's threads (the
    tasks' bounds, each task's own scratch): the same integers."""
    cases = _cases(_HOST_ISA)
    assert all(_parallel(c.kernel) for c in cases if c.kind in ("conv", "dw", "linear"))
    _check_on_host(cases)


@pytest.fixture(params=[True, False], ids=["pixel-tiles-outer", "channel-blocks-outer"])
def conv_task_order(request, monkeypatch):
    """Every conv kernel built with one task order (``kernels.pixel_tiles_outer``), whatever
    its operands' sizes, in parallel regions."""
    from pqcompile.lower import kernel_types

    def rebuild():
        for module in _lowered_kernel_modules():
            for value in vars(module).values():
                if hasattr(value, "cache_clear"):
                    value.cache_clear()
    monkeypatch.setattr(K, "pixel_tiles_outer", lambda *a: request.param)
    monkeypatch.setattr(kernel_types, "PARALLEL_MIN_MACS", 0)
    rebuild()
    yield request.param
    monkeypatch.undo()
    rebuild()


def test_conv_cases_in_either_task_order(conv_task_order):
    """The conv cases with their tasks in either order (the tile a task computes, its bounds
    and stores): the same integers."""
    _check_on_host([c for c in _cases(_HOST_ISA) if c.kind == "conv"])


def test_task_order_follows_the_operands():
    """Pixel tiles outer where sweeping the weights once a tile moves fewer bytes than
    sweeping the input once a channel block: an early layer (few weights, a large map) and
    not a late one."""
    def outer(c, hw, o):
        shape = K.ConvShape(c, hw, hw, o, (3, 3), 1, (1, 1), "uint8", "uint8", 0, 255)
        isa = K.choose_tile(shape, _HOST_ISA)
        ob, cb = -(-o // isa.mr), -(-c // isa.depth)
        qb = -(-K.grid_vectors(shape, isa.lanes, isa) // isa.nr)
        _, _, scratch = K.conv2d_kernel(shape, isa)
        return K.pixel_tiles_outer(ob * isa.mr * cb * 9 * isa.depth, scratch, qb, ob)
    assert outer(48, 56, 48) and not outer(384, 7, 384)
    assert K.pixel_tiles_outer(100, 1000, 5, 1) and not K.pixel_tiles_outer(100, 1000, 50, 2)


def test_dw_cases_cover_every_schedule():
    def schedules(isa):
        return {KP.dw_schedule(K.ConvShape(c, h, h + 1, c, (k, k), st, (p, p), a, b, 0, 0), isa)
                for c, h, k, st, p, a, b in DW}
    assert schedules(K.Isa("vnni", 16, 4, 3)) == {"grid", "rows", "rows-vnni"}
    assert schedules(K.Isa("generic", 16, 4, 2)) == {"grid", "rows"}
    for arm in (K.Isa("sdot", 4, 4, 4), K.Isa("neon", 4, 3, 2)):
        assert schedules(arm) == {"grid", "rows-neon", "rows-neon-group"}


def test_pool_cases_cover_both_schedules():
    packs = {KP.maxpool2d_kernel(K.ConvShape(c, h, h + 1, c, (k, k), st, (p, p), a, a, 0, 0),
                                 _HOST_ISA)[0] is None for c, h, k, st, p, a in POOL}
    assert packs == {True, False}


def test_conv_cases_cover_im2col():
    """On aarch64 the conv cases run both from the padded grid and from an im2col copy."""
    def im2col(isa):
        return {K.im2col(K.ConvShape(c, h, h + 1, o, (k, k), st, (p, p), a, b, 0, 0), isa)
                for c, h, o, k, st, p, a, b, _ in CONV if (k, st, p) != (1, 1, 0)}
    for arm in (K.Isa("sdot", 4, 4, 4), K.Isa("neon", 4, 3, 2)):
        assert im2col(arm) == {False, True}
    assert im2col(K.Isa("vnni", 16, 4, 3)) == {False}


def test_neon_depthwise_only_narrow_range_weights():
    """rows-neon sums two weight x input products in int16 lanes: a depthwise layer with a
    -128 weight gets the generic kernels."""
    for arm in (K.Isa("sdot", 4, 4, 4), K.Isa("neon", 4, 3, 2)):
        assert KP.fit_dw_isa(arm, np.array([[-127, 127]], np.int8)) == arm
        assert KP.fit_dw_isa(arm, np.array([[-128, 5]], np.int8)).name == "generic"


@pytest.mark.parametrize("isa", HOST_ISAS, ids=lambda i: i.name)
def test_conv_kernels_write_only_their_output(isa):
    """Convs whose planes end part-way through a vector, run on an output followed by canary
    bytes: the partial vectors' stores must leave them (a store of a narrowed lane as a whole
    int32 once wrote three bytes past a plane's last pixel, into the next channel's plane,
    which only showed as a race between threads)."""
    # (c, h, w, o, k, stride, pad): a 7x7 plane ends one lane into a vector (49 = 3 x 16 + 1)
    shapes = [(960, 7, 7, 160, 1, 1, 0), (10, 7, 7, 70, 1, 1, 0), (9, 5, 6, 9, 5, 1, 2),
              (64, 7, 7, 40, 3, 1, 1), (6, 40, 41, 5, 3, 1, 1), (5, 36, 37, 7, 3, 2, 1)]
    for i, (c, h, w, o, k, st, pad) in enumerate(shapes):
        for seed in (2 * i, 2 * i + 1):  # both epilogues
            case = Case("conv", isa, seed, c=c, h=h, w=w, o=o, k=k, stride=st, pad=pad,
                        in_dtype="uint8", out_dtype="int8")
            funcs = {"kernel": case.kernel.with_attr("global_symbol", "kernel")}
            if case.pack is not None:
                funcs["pack"] = case.pack.with_attr("global_symbol", "pack")
            lib = tvm.compile(tvm.IRModule(funcs), HOST)
            lib = getattr(lib, "mod", lib)
            x = tvm.runtime.tensor(case.x)
            if case.pack is not None:
                xc = tvm.runtime.tensor(np.zeros(*case.scratch))
                lib["pack"](x, xc)
                x = xc
            n = case.expected.size
            base = tvm.runtime.tensor(np.full(n + 64, 0x5A, np.int8))
            lib["kernel"](x, *[tvm.runtime.tensor(np.ascontiguousarray(a))
                               for a in case.params], base._create_view(case.out_shape))
            got = base.numpy()
            np.testing.assert_array_equal(got[:n], case.expected.ravel(), err_msg=str(case.p))
            assert (got[n:] == 0x5A).all(), (case.p, case.narrow, got[n:n + 8])


def test_cases_cover_both_epilogues():
    """Conv and depthwise kernels are checked with the 32-bit epilogue and with the 64-bit
    one (the linear kernel has only the 64-bit one)."""
    kinds = {(c.kind, c.narrow) for c in _cases(K.Isa("generic", 16, 4, 2))}
    assert {(k, n) for k in ("conv", "dw") for n in (False, True)} <= kinds


def test_host_isa_matches_cpu_features():
    features = set(tvm.target.codegen.llvm_get_cpu_features(HOST))
    assert (K.isa_for(HOST).name == "vnni") == ({"avx512vnni", "avx512bw"} <= features)
    assert K.isa_for(resolve_target("arm-dotprod")).name == "sdot"
    assert K.isa_for(resolve_target("arm")).name == "neon"


@pytest.mark.parametrize("target", ["arm-dotprod", "arm"])
def test_kernels_on_aarch64(target, sysroot, tmp_path):
    spec = get_target(target)
    isa = K.isa_for(spec.tvm_target())
    cases = _cases(isa)
    mod, inputs = _module(cases)
    lib = spec.export(tvm.compile(mod, spec.tvm_target()), tmp_path / "k.so")
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True,
                          text=True, check=True).stdout
    sdots = sum("\tsdot\t" in line for line in text.splitlines())
    assert (sdots > 0) == (isa.name == "sdot")  # the dot-product instruction is really used
    indexed = sum("\tsdot\t" in line and ".4b[" in line for line in text.splitlines())
    assert (indexed > 0) == (isa.name == "sdot")  # one weight load for 4 output channels
    if isa.name == "neon":  # pair sums, and weight words broadcast from a loaded vector's lane
        assert sum("\tsadalp\t" in line for line in text.splitlines()) > 0
        assert sum("\tdup\t" in line and ".s[" in line for line in text.splitlines()) > 0
    _check(cases, run_vm(lib, inputs, sysroot=sysroot))


def test_avx2_dot_products_only_narrow_range_weights():
    """The AVX2 step gives each weight its input's sign (``vpsignb``), which leaves -128 at
    -128: a layer with a -128 weight (outside the quantizer's narrow range) gets the generic
    kernels, conv and linear alike."""
    avx2 = K.isa_for(resolve_target(TargetSpec.from_tvm(
        {"kind": "llvm", "mcpu": "haswell"}, name="avx2-isa")))
    assert avx2.name == "avx2" and avx2.offset("uint8") == -128 and avx2.packed_dtype == "int8"
    assert K.fit_isa(avx2, np.array([[-127, 127]], np.int8)) == avx2
    assert K.fit_isa(avx2, np.array([[-128, 5]], np.int8)).name == "generic"
    # |input| <= 128 and |weight| <= 127: a pair of products fits int16
    assert 2 * 128 * 127 <= np.iinfo(np.int16).max < 2 * 255 * 127
    # 7-bit weights (and fewer): unsigned inputs straight into vpmaddubsw
    for q in ([[-64, 64]], [[-63, 7]], [[0, 0]]):
        fit = K.fit_isa(avx2, np.array(q, np.int8))
        assert fit.name == "avx2u" and fit.offset("int8") == 128 and fit.packed_dtype == "uint8"
    assert K.fit_isa(avx2, np.array([[-65, 3]], np.int8)) == avx2
    assert 2 * 255 * 64 <= np.iinfo(np.int16).max < 2 * 255 * 65


def test_neon_pairs_only_narrow_range_weights():
    """The neon kernels sum two weight x input products in int16: a -128 weight (outside the
    quantizer's narrow range) could overflow it, so such a layer gets the generic kernels."""
    neon = K.isa_for(resolve_target("arm"))
    assert K.fit_isa(neon, np.array([[-127, 127]], np.int8)) == neon
    assert K.fit_isa(neon, np.array([[-128, 5]], np.int8)).name == "generic"
    assert (-128 * -127) * 2 <= np.iinfo(np.int16).max < (-128 * -128) * 2


def test_tile_must_fit_the_stack():
    with pytest.raises(ValueError, match="1 KiB"):
        K.Isa("vnni", 16, 4, 4)


@pytest.mark.parametrize("target", ["host", "avx2", "x86-64"])
def test_whole_model_matches_reference(target):
    """mobilenet_v2 at mixed 4/8-bit weights, pruned: stride-2 stem, depthwise, pointwise
    convs with signed and unsigned inputs, the classifier; the artifact's outputs are the
    reference's (dequantized) integers exactly, with this host's kernels, with the AVX2
    kernels of an AVX2-only x86 target (Haswell) and with the generic kernels of the baseline
    x86-64 (SSE2)."""
    import torchvision

    from pqcompile import presets
    from pqcompile.build import analysis, compile_assignment

    expected_isa = {"host": HOST_ISAS[0].name, "avx2": "avx2", "x86-64": "generic"}[target]
    if target != "host":
        target = TargetSpec.from_tvm({"kind": "llvm", "num-cores": 2,
                                      "mcpu": "haswell" if target == "avx2" else "x86-64"},
                                     name=f"{target}-test")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=g)
    calib = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)]
    gm = analysis(model, (x,))
    compiled = compile_assignment(model, (x,), presets.mixed_pruned(gm), target=target,
                                  calibration=calib)
    kinds = {k.split()[0] for k in compiled.lowering.kernels.values()}
    # mobilenet_v2 has no max pool; its global average pool is the mean kernel, its residual
    # adds in int32, its input quantized without a division where the CPU has FMA (not the
    # baseline x86-64)
    assert kinds == {"conv2d", "dwconv2d", "linear", "mean", "add"} | (
        set() if expected_isa == "generic" else {"quantize"})
    isa = K.isa_for(resolve_target(target))
    assert isa.name == expected_isa
    assert all(isa.name in k or k.startswith(("dwconv2d", "maxpool2d", "mean", "quantize", "add"))
               for k in compiled.lowering.kernels.values())
    # 4-bit weights stay packed in weights.bin and are unpacked once at load
    assert compiled.artifact.manifest["prepare"] == "main_transform_params"
    assert any("packed" in v for v in compiled.lowering.weight_storage.values())
    for t in [x] + [torch.randn(1, 3, 64, 64, generator=g) for _ in range(3)]:
        with torch.inference_mode():
            expected = compiled.reference(t).numpy()
        got = compiled.artifact(t.numpy())
        got = got[0] if isinstance(got, list) else got
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_packed_weights_prepared_once_by_the_device_runner(tmp_path):
    """The standalone runner (numpy + TVM runtime only) prepares the packed weights the same
    way: its sample check passes on a saved mixed-bit artifact."""
    import sys

    from pqcompile import presets
    from pqcompile.build import analysis, compile_assignment

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 7 * 7, 5)).eval()
    x = torch.randn(1, 3, 16, 16)
    gm = analysis(model, (x,))
    compiled = compile_assignment(model, (x,), presets.uniform(gm, 4, 8), target="host",
                                  calibration=[torch.randn(8, 3, 16, 16)])
    assert compiled.artifact.manifest["prepare"]
    out = compiled.save(tmp_path / "art")
    proc = subprocess.run([sys.executable, str(out / "runner.py"), str(out), "--check-sample"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
