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

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx

from . import block_analysis as ba
from .schedule_rules import Rules, num_cores, vector_bytes

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


def loop_kinds(func: tirx.PrimFunc) -> list[str]:
    """The kinds of the non-serial loops in ``func``, in pre-order (``parallel``,
    ``vectorized``, ...)."""
    kinds: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, tirx.For) and int(node.kind) != int(tirx.ForKind.SERIAL):
            kinds.append(tirx.ForKind(int(node.kind)).name.lower())

    tvm_ffi.structural_walk(func.body, visit, order="pre")
    return kinds


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
    rules = Rules(target, min_parallel)
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
