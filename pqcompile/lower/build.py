"""Build a lowered program for a target and run it with the TVM Relax VM.

Targets come from the registry, :func:`pqcompile.targets.get_target` (``"host"``, ``"arm"``,
... or any TVM tag), or are given as a ``TargetSpec``, a TVM target JSON dict or a
``tvm.target.Target``.

>>> import numpy as np, torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> from pqcompile.quant import build_reference
>>> from pqcompile.lower import lower
>>> gm = trace(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
>>> ref = build_reference(gm, Assignment.uniform(["_0"], 8, 8), [torch.randn(8, 4)])
>>> mod, params, report = lower(ref)
>>> x = torch.randn(2, 4)
>>> y = run(build(mod), params, [x.numpy()])
>>> bool(np.array_equal(y, ref(x).numpy()))
True
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_passes

from ..targets import TargetSpec, get_target
from .schedule import ScheduleReport, is_scheduled, schedule_cpu

_OPAQUE = 8  # relax op_pattern kOpaque: FuseOps fuses nothing with such a call


def resolve_target(target: Any = "host") -> tvm.target.Target:
    """A ``tvm.target.Target`` from a registry name, ``TargetSpec``, JSON dict or Target."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if isinstance(target, (str, TargetSpec)):
        return get_target(target).tvm_target()
    raise TypeError(f"target must be a target name (e.g. 'host'), a TargetSpec, a TVM target "
                    f"dict or a tvm.target.Target, got {type(target).__name__}")


def legalize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """TVM's CPU legalization (LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps,
    FuseTIR) with every TIR function marked ``tirx.is_scheduled`` (hand-written kernels,
    MetaSchedule records) kept out of fusion and left exactly as it was.

    Unprotected, FuseOps would merge such a kernel with its neighbours into a new, unscheduled
    function. Running it again on its own output changes nothing that matters (``tuning.apply``
    returns a legalized program, which the build legalizes again).
    """
    kept = {gv.name_hint: f for gv, f in mod.functions_items() if is_scheduled(f)}
    if kept:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for name, func in kept.items():
            mod[mod.get_global_var(name)] = func.with_attr("op_pattern", _OPAQUE)
    with target:
        mod = tvm.transform.Sequential(cpu_passes.legalize_passes(target))(mod)
    present = {gv.name_hint for gv in mod.get_global_vars()}
    for name, func in kept.items():
        if name in present:
            mod[mod.get_global_var(name)] = func
    return mod


def pipeline(target: tvm.target.Target, *, schedule: bool = True,
             report: ScheduleReport | None = None) -> tvm.transform.Pass:
    """The Relax pipeline of every pqcompile build (``tvm.compile(..., relax_pipeline=)``):
    TVM's library dispatch, :func:`legalize`, the rule-based CPU schedules of
    :func:`pqcompile.lower.schedule.schedule_cpu` for the functions nothing scheduled
    (``schedule=False``: none; ``report`` says what it did), then TVM's dataflow lowering and
    finalization passes."""

    @tvm.transform.module_pass(opt_level=0, name="pqcompile.Pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(cpu_passes.library_dispatch_passes(target))(mod)
            mod = legalize(mod, target)
            if schedule:
                mod = schedule_cpu(mod, target, report=report)
            return tvm.transform.Sequential(cpu_passes.dataflow_lower_passes(target)
                                            + cpu_passes.finalize_passes(target))(mod)

    return _pipeline


def build(mod: tvm.IRModule, target: Any = "host", *, opt_level: int | None = None,
          schedule: bool = True, report: ScheduleReport | None = None
          ) -> relax.VMExecutable:
    """Compile ``mod`` for ``target`` with :func:`pipeline` (untuned kernels get the rule-based
    CPU schedules; ``schedule=False`` leaves them as TVM's legalization wrote them).

    ``opt_level`` (0..3) overrides LLVM's optimization level: 0 cuts code generation ~5x
    (e.g. mobilenet_v2 at 64x64: ~24 s -> ~5 s) for programs that run a few times, such as
    parity checks; the integer results do not depend on it.
    """
    tgt = resolve_target(target)
    if opt_level is not None:
        if opt_level not in (0, 1, 2, 3):
            raise ValueError(f"opt_level must be 0, 1, 2 or 3, got {opt_level!r}")
        config = dict(tgt.export())
        config["opt-level"] = opt_level
        tgt = tvm.target.Target({k: v for k, v in config.items() if k != "tag" or v})
    return tvm.compile(mod, tgt, relax_pipeline=pipeline(tgt, schedule=schedule, report=report))


def _tensors(arrays: Sequence[Any]) -> list:
    out = []
    for a in arrays:
        if hasattr(a, "detach"):  # torch tensors
            a = a.detach().cpu().numpy()
        out.append(tvm.runtime.tensor(np.ascontiguousarray(a)))
    return out


_LOADED: OrderedDict[int, tuple[Any, Any]] = OrderedDict()


def load(executable: relax.VMExecutable) -> tvm.runtime.Module:
    """The executable as a loaded shared library (linked by the host compiler).

    A VM made straight from an in-memory executable compiles its code at that moment, ~0.7 s
    even for a tiny program; linking it and loading the library takes ~0.2 s. The last few
    loaded executables are kept, so repeated :func:`run` calls load once.
    """
    key = id(executable)
    if key in _LOADED and _LOADED[key][0] is executable:
        _LOADED.move_to_end(key)
        return _LOADED[key][1]
    with tempfile.TemporaryDirectory(prefix="pqcompile-") as tmp:
        path = os.path.join(tmp, "lib.so")
        executable.export_library(path)
        module = tvm.runtime.load_module(path)
    _LOADED[key] = (executable, module)
    while len(_LOADED) > 8:
        _LOADED.popitem(last=False)
    return module


def run(executable: relax.VMExecutable, params: dict[str, np.ndarray],
        inputs: Sequence[Any], func_name: str = "main") -> np.ndarray | list[np.ndarray]:
    """Run ``func_name`` on the host CPU: ``inputs`` (numpy or torch) then ``params``.

    Returns one array, or a list for a program with several outputs.
    """
    vm = relax.VirtualMachine(load(executable), tvm.cpu())
    out = vm[func_name](*_tensors(list(inputs)), *_tensors(list(params.values())))
    if isinstance(out, (list, tuple)) or type(out).__name__ == "Array":
        return [o.numpy() for o in out]
    return out.numpy()
