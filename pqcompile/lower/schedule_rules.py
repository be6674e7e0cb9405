"""The scheduling rules of :func:`pqcompile.lower.schedule.schedule_cpu` (inline, injective
rows, reductions; the module doc of :mod:`pqcompile.lower.schedule` says what each does and
why), and the target facts they read: the SIMD width and the core count.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import s_tir, tirx

from . import block_analysis as ba

__all__ = ["Rules", "num_cores", "vector_bytes"]


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


# --- the rules -------------------------------------------------------------------------------


class Rules:
    """The rules of :mod:`pqcompile.lower.schedule` for one target: :meth:`apply` schedules a
    function (raises :class:`~pqcompile.lower.block_analysis.Unsupported` where they do not
    cover it)."""

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
