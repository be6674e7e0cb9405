"""Rule-based CPU schedules for the kernels nothing else schedules.

After legalization and fusion, TVM's default CPU pipeline compiles every TIR function as the
plain loop nests LegalizeOps wrote: serial, vectorized only where LLVM manages it on its own.
Hand-written kernels and MetaSchedule's records (:mod:`pqcompile.tuning`) cover some functions
and mark them ``tirx.is_scheduled``; :func:`schedule_cpu` gives each remaining function a
schedule by rules:

* **inline**: injective blocks are inlined into their consumers (or their consumers into them),
  except blocks read by a reduction (the padding of a convolution or pooling stays a block of
  its own: inlined, its bounds check would run per multiply-accumulate) and blocks whose float
  value may hold a product (merged into one expression, LLVM may contract a float multiply and
  add into one FMA, which rounds once and could change the float islands' results). Float
  chains of casts, adds, divisions, floor and clamps (the input quantization) are merged: kept
  apart, they were six passes over five float64 buffers, 3x slower;
* **injective blocks** run by rows: the innermost loop of more than one iteration is the row;
  it is vectorized when every load and store is contiguous along it (split by the lanes, a
  divisor of its extent), else left to LLVM's own vectorizer (strided and padded accesses: TVM
  would gather lane by lane, LLVM shuffles). The loops around the rows are fused and run in
  parallel. (Fusing all loops into one was measured 40x slower on a padding copy: the index
  arithmetic of the fused loop keeps LLVM from vectorizing it.)
* **reductions** (convolutions, matmuls, pools, sums, means) run their spatial loops in
  parallel. A window reduction (one operand) whose accesses are contiguous along the innermost
  spatial loop gets that loop moved inside the reduction loops and vectorized (each lane still
  accumulates its own output in the original order: float sums do not change). Otherwise
  (convolutions, matmuls, strided windows) the rows run in parallel and each row keeps its
  legalized loops, which LLVM vectorizes as in the unscheduled build (vectorizing the output
  row of a convolution explicitly was measured up to 2x slower for stride 2 and 7x7 maps). The
  injective consumers (requantization, residual add) are computed row by row at the parallel
  loop and vectorized; the initialization becomes a block of its own.

The vector width comes from the target (64 bytes with AVX-512, 32 with AVX2, 16 for SSE, NEON and
anything else), the lanes from the widest value type a block computes in (int64 requantization:
8 lanes on AVX-512). Kernels with fewer than ``min_parallel`` loop iterations are not run in
parallel, nor anything on a target with ``num-cores`` 1. A block is not vectorized when its body
holds a let-binding (TVM 0.27's VectorizeLoop was seen to compute one scalar for all lanes of a
vectorized let) or an ``if_then_else`` (VectorizeLoop would run it serially anyway). A function
the rules cannot handle, or whose scheduled form fails TVM's TIR lowering, keeps its original
form: scheduling never fails a build. Every scheduled function is marked ``tirx.is_scheduled``;
functions that already carry the mark are left exactly as they are.

Integer kernels compute the same integers under any of these schedules (tests/test_schedule.py
compares whole models bit for bit).

>>> import numpy as np, tvm
>>> from tvm import relax
>>> bb = relax.BlockBuilder()
>>> x = relax.Var("x", relax.TensorType((64, 128), "int32"))
>>> with bb.function("main", [x]):
...     _ = bb.emit_func_output(bb.emit(relax.op.add(x, x)))
>>> target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
>>> with target:
...     legal = relax.transform.LegalizeOps()(bb.get())
>>> report = ScheduleReport()
>>> scheduled = schedule_cpu(legal, target, report=report)
>>> report.scheduled, bool(scheduled["add"].attrs["tirx.is_scheduled"])
(['add'], True)
>>> loop_kinds(scheduled["add"])
['parallel', 'vectorized']
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from . import block_analysis as ba

__all__ = ["SCHEDULED", "ScheduleCPU", "ScheduleReport", "is_scheduled", "loop_kinds",
           "num_cores", "schedule_cpu", "vector_bytes"]

SCHEDULED = "tirx.is_scheduled"
MIN_PARALLEL = 4096  # loop iterations below which a kernel runs serially


@dataclass
class ScheduleReport:
    """What :func:`schedule_cpu` did: the functions it scheduled, and those it left unscheduled
    with the reason (``already`` lists those that were scheduled before)."""

    scheduled: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    already: list[str] = field(default_factory=list)


def is_scheduled(func: Any) -> bool:
    """Whether ``func`` is a TIR function marked ``tirx.is_scheduled``."""
    attrs = getattr(func, "attrs", None)
    return isinstance(func, tirx.PrimFunc) and attrs is not None and SCHEDULED in attrs \
        and bool(attrs[SCHEDULED])


def vector_bytes(target: tvm.target.Target) -> int:
    """The SIMD register width of ``target`` in bytes (16 when unknown)."""
    from tvm.target.codegen import target_has_features

    try:
        if target_has_features("avx512f", target):
            return 64
        if target_has_features("avx2", target) or target_has_features("avx", target):
            return 32
    except Exception:  # not an x86 target, or LLVM does not know the CPU
        pass
    return 16


def num_cores(target: tvm.target.Target) -> int | None:
    """The target's ``num-cores`` attribute (``None`` when unset)."""
    value = target.attrs.get("num-cores") if target.attrs is not None else None
    return int(value) if value is not None else None


def loop_kinds(func: tirx.PrimFunc) -> list[str]:
    """The kinds of the non-serial loops in ``func``, in pre-order (``parallel``,
    ``vectorized``, ...)."""
    kinds: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, tirx.For) and int(node.kind) != int(tirx.ForKind.SERIAL):
            kinds.append(tirx.ForKind(int(node.kind)).name.lower())

    tvm_ffi.structural_walk(func.body, visit, order="pre")
    return kinds


# --- the rules -------------------------------------------------------------------------------


class _Rules:
    def __init__(self, target: tvm.target.Target, min_parallel: int) -> None:
        self.vector_bytes = vector_bytes(target)
        self.cores = num_cores(target) or 1
        self.parallel = num_cores(target) is None or self.cores > 1
        self.min_parallel = min_parallel

    def lanes(self, info: ba.Body) -> int:
        return max(2, self.vector_bytes * 8 // info.value_bits)

    def vector_width(self, block: Any, var: Any, extent: int) -> int:
        """How many lanes to vectorize ``var`` (of ``extent``) by: 1 when it must not be."""
        info = ba.body(block)
        if info.has_let or info.has_if_then_else or not ba.contiguous(block, info, var):
            return 1
        return ba.largest_divisor(extent, self.lanes(info))

    # A function: inline, then schedule every block left at the root.
    def apply(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        self.inline(sch, root)
        blocks = sch.get_child_blocks(root)
        if not blocks:
            raise ba.Unsupported("no blocks")
        names = [sch.get(b).name_hint for b in blocks]
        done: set[str] = set()
        for name in names:  # reductions first: their consumers move under their loops
            block = sch.get_sblock(name)
            kinds = ba.iter_kinds(sch.get(block))
            if "O" in kinds:
                raise ba.Unsupported(f"block {name} has an opaque iterator")
            if "R" in kinds:
                done |= self.reduction(sch, block)
        for name in names:
            if name not in done and "R" not in ba.iter_kinds(sch.get(sch.get_sblock(name))):
                self.injective(sch, sch.get_sblock(name))
        return sch.mod["main"]

    def inline(self, sch: s_tir.Schedule, root: Any) -> None:
        """Inline injective blocks into their consumers, or consumers into their producer,
        until nothing changes; see the module docstring for the blocks kept."""
        progress = True
        while progress:
            progress = False
            for block in sch.get_child_blocks(root):
                stmt = sch.get(block)
                if ba.iter_kinds(stmt) != "S" * len(stmt.iter_vars) or len(stmt.writes) != 1:
                    continue
                consumers = sch.get_consumers(block)
                if ba.fma_safe(stmt) and consumers and all(
                        "R" not in ba.iter_kinds(sch.get(c)) for c in consumers):
                    try:
                        sch.compute_inline(block)
                        progress = True
                        break
                    except RuntimeError:  # a refused primitive (ScheduleError) or a TVM check
                        pass
                producers = sch.get_producers(block)
                if len(producers) == 1 and "R" not in ba.iter_kinds(sch.get(producers[0])) \
                        and ba.fma_safe(sch.get(producers[0])):
                    try:
                        sch.reverse_compute_inline(block)
                        progress = True
                        break
                    except RuntimeError:  # a refused primitive (ScheduleError) or a TVM check
                        pass

    def injective(self, sch: s_tir.Schedule, block: Any) -> None:
        """Rows: the innermost loop of more than one iteration is the row, vectorized where
        all accesses are contiguous along it (else left to LLVM); the loops around it are
        fused and run in parallel."""
        loops = sch.get_loops(block)
        if not loops:
            return
        extents = [ba.extent(sch, lp) for lp in loops]
        total = math.prod(extents)
        stmt = sch.get(block)
        wide = [i for i, e in enumerate(extents) if e > 1]
        if not wide:
            return
        i = wide[-1]
        row, outer = loops[i], [*loops[:i], *loops[i + 1:]]  # unit loops after the row move out
        width = 1
        if ba.trivially_bound(sch, block, loops):
            width = self.vector_width(stmt, stmt.iter_vars[i].var, extents[i])
        if outer:
            sch.reorder(*outer, row)
        if width >= 2:
            if width < extents[i]:
                row_outer, row = sch.split(row, factors=[None, width])
                if math.prod(extents[:i]) < 2 * self.cores:
                    outer = [*outer, row_outer]  # too few rows: their vectors in parallel
            sch.vectorize(row)
        elif math.prod(extents[:i]) < 2 * self.cores:
            # too few rows: chunks of the row in parallel, each chunk's loop left to LLVM
            chunk = ba.largest_divisor(extents[i], max(1, extents[i] // (4 * self.cores)))
            if chunk >= 2:
                row_outer, _ = sch.split(row, factors=[None, chunk])
                outer = [*outer, row_outer]
        if outer and self.parallel and total >= self.min_parallel:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])

    def reduction(self, sch: s_tir.Schedule, block: Any) -> set[str]:
        """Spatial loops in parallel; for a window reduction (pools, sums) whose accesses are
        contiguous along the innermost spatial loop, that loop moves inside the reduction loops
        and is vectorized; a contraction (convolution, matmul: two operands) keeps its
        innermost spatial loop and the reduction loops below it as they were. Injective
        consumers are computed at the parallel loop. Returns the blocks it scheduled."""
        stmt = sch.get(block)
        name = stmt.name_hint
        kinds = ba.iter_kinds(stmt)
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or not ba.trivially_bound(sch, block, loops):
            raise ba.Unsupported(f"reduction {name} is not a plain loop nest")
        if "S" not in kinds:
            return {name}  # a reduction to one value: left serial
        s_idx = [i for i, k in enumerate(kinds) if k == "S"]
        s_loops = [loops[i] for i in s_idx]
        r_loops = [lp for lp, k in zip(loops, kinds) if k == "R"]
        if kinds != "S" * len(s_loops) + "R" * len(r_loops):
            sch.reorder(*s_loops, *r_loops)
        s_extents = [ba.extent(sch, lp) for lp in s_loops]
        work = math.prod(ba.extent(sch, lp) for lp in loops)
        vec = None
        wide = [i for i, e in enumerate(s_extents) if e > 1]
        if wide and ba.reads(stmt) == 1:
            i = wide[-1]
            width = self.vector_width(stmt, stmt.iter_vars[s_idx[i]].var, s_extents[i])
            if width >= 2:
                if width < s_extents[i]:
                    so, vec = sch.split(s_loops[i], factors=[None, width])
                    s_loops[i] = so
                else:
                    vec = s_loops.pop(i)
                sch.reorder(*s_loops, *r_loops, vec)
        outer = s_loops
        if vec is None and wide and math.prod(s_extents[:wide[-1]]) >= 2 * self.cores:
            # rows in parallel; each row's loops (the row loop and the reduction loops inside
            # it) as legalized, for LLVM to vectorize
            i = wide[-1]
            outer = [*s_loops[:i], *s_loops[i + 1:]]
            if i < len(s_loops) - 1:
                sch.reorder(*outer, s_loops[i])
        done = {name}
        epilogues = []
        for consumer in sch.get_consumers(block):
            c_stmt = sch.get(consumer)
            if "R" in ba.iter_kinds(c_stmt):
                continue
            try:
                sch.reverse_compute_at(consumer, outer[-1], preserve_unit_loops=True)
            except RuntimeError:  # a refused primitive (ScheduleError) or a TVM check
                continue
            epilogues.append(c_stmt.name_hint)
            done.add(c_stmt.name_hint)
        shared = len(outer)
        if self.parallel and work >= self.min_parallel:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            shared = 1
        if vec is not None:
            sch.vectorize(vec)
        # After the loop annotations: a decomposed update is no longer a reduction block.
        init = sch.decompose_reduction(block, r_loops[0])
        done.add(sch.get(init).name_hint)
        if vec is not None:
            self.vectorize_inner(sch, init, shared)
        for e_name in epilogues:
            self.vectorize_inner(sch, sch.get_sblock(e_name), shared)
        return done

    def vectorize_inner(self, sch: s_tir.Schedule, block: Any, shared: int) -> None:
        """Vectorize the innermost loop below the ``shared`` outer loops of ``block`` when it
        is bound to the block's innermost iterator of more than one iteration."""
        loops = sch.get_loops(block)
        inner = loops[shared:]
        if not inner:
            return
        stmt = sch.get(block)
        extents = [ba.extent(sch, lp) for lp in inner]
        wide = [i for i, e in enumerate(extents) if e > 1]
        if not wide or any(e > 1 for e in extents[wide[-1] + 1:]):
            return
        loop = inner[wide[-1]]
        realize = sch.get(inner[-1]).body
        if type(realize).__name__ != "SBlockRealize":
            return
        # the iterator bound to exactly this loop
        var = sch.get(loop).loop_var
        bound = [iv.var for iv, v in zip(stmt.iter_vars, realize.iter_values) if v.same_as(var)]
        if len(bound) != 1:
            return
        width = self.vector_width(stmt, bound[0], extents[wide[-1]])
        if width < 2:
            return
        if width < extents[wide[-1]]:
            _, loop = sch.split(loop, factors=[None, width])
        rest = [lp for lp in sch.get_loops(block)[shared:]
                if not sch.get(lp).same_as(sch.get(loop))]
        if rest:
            sch.reorder(*rest, loop)  # unit loops inside it move out
        sch.vectorize(loop)


# --- checking a scheduled function -----------------------------------------------------------


def _lowers(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether TVM's TIR pipeline (vectorization included) accepts ``func``."""
    try:
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        host = target if target.host is None else target.host
        mod = tirx.transform.BindTarget(target.with_host(host))(mod)
        with target:
            tirx.get_tir_pipeline("s_tir")[0](mod)
        return True
    except Exception:
        return False


# --- the pass --------------------------------------------------------------------------------


def schedule_cpu(mod: tvm.IRModule, target: tvm.target.Target | None = None, *,
                 min_parallel: int = MIN_PARALLEL, report: ScheduleReport | None = None,
                 only: Iterable[str] | None = None) -> tvm.IRModule:
    """``mod`` with every TIR function that is not ``tirx.is_scheduled`` scheduled by the rules
    (module docstring). ``target`` defaults to the current one; a non-LLVM target leaves
    ``mod`` as it is. ``only``: schedule just the functions of these names. ``report`` (a
    :class:`ScheduleReport`) is filled in."""
    target = target if target is not None else tvm.target.Target.current(allow_none=False)
    report = report if report is not None else ScheduleReport()
    if target.kind.name != "llvm":
        return mod
    rules = _Rules(target, min_parallel)
    names = set(only) if only is not None else None
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (names is not None and
                                                   gv.name_hint not in names):
            continue
        if is_scheduled(func):
            report.already.append(gv.name_hint)
            continue
        try:
            new = rules.apply(func)
        except ba.Unsupported as err:
            report.skipped[gv.name_hint] = str(err)
            continue
        except Exception as err:  # a schedule primitive refused: keep the original
            report.skipped[gv.name_hint] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            continue
        if not _lowers(new, target):
            report.skipped[gv.name_hint] = "the scheduled function fails TIR lowering"
            continue
        updates[gv] = new.with_attr(SCHEDULED, True)
        report.scheduled.append(gv.name_hint)
    if not updates:
        return mod
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="pqcompile.ScheduleCPU")
class ScheduleCPU:
    """:func:`schedule_cpu` as a module pass (the current target when ``target`` is None)."""

    def __init__(self, target: tvm.target.Target | None = None, *,
                 min_parallel: int = MIN_PARALLEL, report: ScheduleReport | None = None):
        self.target = target
        self.min_parallel = min_parallel
        self.report = report

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        return schedule_cpu(mod, self.target, min_parallel=self.min_parallel,
                            report=self.report)
