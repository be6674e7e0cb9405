"""Tuned kernels: MetaSchedule over the lowered program, with a persistent database.

TVM's default schedules are far slower than hand-written kernels (docs/performance.md, latency);
MetaSchedule searches a schedule per kernel. A search costs ~1.5 s a trial here, so its results
are kept in a database on disk, one per target (``~/.cache/pqcompile/tuning/<target key>/``, or
``$PQCOMPILE_TUNING_DIR``), keyed by each kernel's structure (its TIR workload): a model is tuned
once, and every later build for that target, of that model or any other with the same kernels
(same shapes, bits and layouts), reuses the records for free.

* :func:`tune` tunes the kernels of a program that the database lacks, within ``trials``
  (0: none), and says what it reused, what it tuned and how long it took;
* :func:`apply` schedules a program with the database's best records (kernels without a
  record keep TVM's default schedule); :meth:`pqcompile.runtime.artifact.Artifact.build` calls
  it, so ``compile()`` reuses whatever has been tuned for its target.

Integer kernels give the same integers under any schedule; float kernels (the float islands)
may sum in another order, within the 1-LSB tolerance of float ops.

>>> import numpy as np
>>> from tvm import relax
>>> from pqcompile.targets import get_target
>>> bb = relax.BlockBuilder()
>>> x = relax.Var("x", relax.TensorType((8, 8), "int32"))
>>> with bb.function("main", [x]):
...     _ = bb.emit_func_output(bb.emit(relax.op.add(x, x)))
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     report = tune(bb.get(), get_target("host"), trials=0, directory=tmp)
>>> report.tasks >= 1 and report.tuned == 0 and report.trials == 0
True
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .targets import TargetSpec, get_target

__all__ = ["TuningReport", "apply", "database_dir", "tune"]

DEFAULT_DIR = Path.home() / ".cache" / "pqcompile" / "tuning"


@dataclass
class TuningReport:
    """``tasks``: kernels in the program; ``reused``: those the database already had;
    ``tuned``: those given a record now (``task_names``), by at most ``trials`` measured
    candidates in ``seconds``; kernels left without a record keep TVM's default schedule."""

    target: str
    directory: str
    tasks: int = 0
    reused: int = 0
    tuned: int = 0
    trials: int = 0
    seconds: float = 0.0
    task_names: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"tuning for {self.target}: {self.tasks} kernels, {self.reused} from the "
                f"database, {self.tuned} tuned now (<= {self.trials} trials, {self.seconds:.1f} s)"
                f"; database {self.directory}")


def _stub_gpu_intrinsics() -> None:
    """Keep MetaSchedule's builder processes from importing the GPU tensor intrinsics (~20 s
    each: the builders' timeouts would silently build nothing)."""
    for name in ("cuda", "rocm", "hexagon"):
        sys.modules.setdefault(f"tvm.s_tir.tensor_intrin.{name}", types.ModuleType(name))


def database_dir(target: str | TargetSpec, directory: str | os.PathLike | None = None) -> Path:
    """The database folder of ``target``: ``directory`` if given, else
    ``$PQCOMPILE_TUNING_DIR`` or ``~/.cache/pqcompile/tuning``, then one folder per target
    (a hash of its TVM target: records of one target do not apply to another)."""
    spec = get_target(target)
    if directory is not None:
        return Path(directory)
    root = Path(os.environ.get("PQCOMPILE_TUNING_DIR") or DEFAULT_DIR)
    key = hashlib.sha256(str(spec.tvm_target()).encode()).hexdigest()[:16]
    return root / f"{spec.name.replace('/', '_')}-{key}"


def _database(path: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(path / "workloads.json"),
                                    path_tuning_record=str(path / "records.json"))


def _legalized(mod: Any, tvm_target: Any) -> Any:
    """Legalized and fused as the build does it (:func:`pqcompile.lower.build.legalize`:
    kernels marked ``tirx.is_scheduled`` stay out of fusion, unchanged)."""
    from tvm import relax

    from .lower.build import legalize

    with tvm_target:
        mod = relax.transform.DecomposeOpsForInference()(mod)
    return legalize(mod, tvm_target)


def _has_record(db: Any, task: Any, tvm_target: Any) -> bool:
    mod = task.dispatched[0]
    return db.has_workload(mod) and bool(db.get_top_k(db.commit_workload(mod), 1))


def tune(mod: Any, target: str | TargetSpec, *, trials: int,
         directory: str | os.PathLike | None = None, trials_per_kernel: int = 32,
         seed: int = 0) -> TuningReport:
    """Tune the kernels of ``mod`` (a Relax ``IRModule``) for ``target`` that its database
    lacks, with at most ``trials`` measured candidates in all (at most ``trials_per_kernel``
    each); the records go to the database (:func:`database_dir`). ``trials=0`` only counts."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import (
        extract_tasks,
        extracted_tasks_to_tune_contexts,
    )

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(f"trials must be an int >= 0 (measured candidates), got {trials!r}")
    spec = get_target(target)
    tvm_target = spec.tvm_target()
    path = database_dir(spec, directory)
    report = TuningReport(spec.name, str(path))
    t0 = time.perf_counter()
    db = _database(path)
    # kernels scheduled already (hand-written ones) are not tasks: they stay as they are
    tasks = [t for t in extract_tasks(_legalized(mod, tvm_target), tvm_target)
             if not _is_scheduled(t.dispatched[0]["main"])]
    missing = [t for t in tasks if not _has_record(db, t, tvm_target)]
    report.tasks, report.reused = len(tasks), len(tasks) - len(missing)
    if missing and trials > 0:
        _stub_gpu_intrinsics()
        contexts, weights = extracted_tasks_to_tune_contexts(
            missing, work_dir=str(path / "logs"), seed=seed)
        per_kernel = min(trials_per_kernel, trials)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(path / "logs"),
            max_trials_global=trials, max_trials_per_task=per_kernel,
            num_trials_per_iter=min(16, per_kernel), database=db,
            builder=ms.builder.LocalBuilder(initializer=_stub_gpu_intrinsics,
                                            timeout_sec=60))
        done = [t for t in missing if _has_record(db, t, tvm_target)]
        report.tuned, report.task_names = len(done), [t.task_name for t in done]
        report.trials = min(trials, per_kernel * len(missing))
    report.seconds = time.perf_counter() - t0
    return report


def apply(mod: Any, target: str | TargetSpec,
          directory: str | os.PathLike | None = None) -> tuple[Any, int]:
    """``mod`` scheduled with the database's records for ``target``, and how many kernels got
    one (``mod`` unchanged, 0, when the database is empty or missing)."""
    from tvm import relax

    spec = get_target(target)
    path = database_dir(spec, directory)
    if not (path / "records.json").exists() or (path / "records.json").stat().st_size == 0:
        return mod, 0
    tvm_target = spec.tvm_target()
    db = _database(path)
    legal = _legalized(mod, tvm_target)
    before = {gv.name_hint for gv, f in legal.functions_items() if _is_scheduled(f)}
    with tvm_target, db:
        scheduled = relax.transform.MetaScheduleApplyDatabase()(legal)
    count = sum(1 for gv, f in scheduled.functions_items()
                if _is_scheduled(f) and gv.name_hint not in before)
    return scheduled, count


def _is_scheduled(func: Any) -> bool:
    from .lower.schedule import is_scheduled

    return is_scheduled(func)
