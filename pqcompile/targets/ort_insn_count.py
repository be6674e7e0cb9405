"""Guest instructions per inference of an ONNX model in ONNX Runtime on aarch64, under qemu-user.

The peer pqcompile's aarch64 builds are counted against: the ``.onnx`` file (fp32, or int8 QDQ
made on the host with ``onnxruntime.quantization``) runs in ONNX Runtime 1.18.1 for aarch64,
in the sysroot's CPython, counted exactly like an artifact by
:func:`pqcompile.targets.insn_count.count_instructions`: one process calling
``InferenceSession.run`` ``runs[1]`` times with a mark around each call, the mean count of
calls ``runs[0] + 1`` to ``runs[1]``, so start-up (importing onnxruntime, building the
session, the first run's one-time work) never enters. The session is ORT's CPU provider with every
graph optimization, one intra-op thread (no thread pool to spin) and sequential execution.

ONNX Runtime picks its int8 kernels at run time from the CPU's features (MLAS reads the
auxiliary vector's HWCAPs), so ``cpu`` (``qemu -cpu``) decides what it may use: qemu's default
``max`` model has sdot and i8mm; ``cortex-a72`` has neither and ``cortex-a76`` has sdot, the
classes of pqcompile's ``arm`` and ``arm-dotprod`` targets (:func:`qemu_cpu`).

ONNX Runtime lives apart from the sysroot's TVM runtime (it needs numpy 1.x):
``scripts/build_aarch64_ort.sh`` (run by ``scripts/setup.sh``) unpacks it into
``$PQCOMPILE_CACHE/aarch64-ort/site``; ``PQCOMPILE_AARCH64_ORT`` points elsewhere.

Usage (``tests/test_insn_count.py`` runs it)::

    count = count_onnx_instructions("model.int8.onnx", [x], cpu="cortex-a72")
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from .emulator import DEFAULT_TIMEOUT_S, Sysroot, cache_dir
from .insn_count import (
    MARK_PRELUDE,
    GuestProgram,
    InsnCount,
    InstructionCountError,
    check_runs,
    count_guest,
    find_plugin,
    guest_sysroot,
    save_inputs,
)

__all__ = ["ORT_SCRIPT", "count_onnx_instructions", "default_ort_path", "find_ort_site",
           "qemu_cpu"]

ORT_SCRIPT = "scripts/build_aarch64_ort.sh"

# Runs in the sysroot's Python with only the ONNX Runtime site on its path.
_ORT_GUEST_SCRIPT = MARK_PRELUDE + '''\
import gc, sys
import numpy as np
import onnxruntime as ort
model, runs, threads, inputs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.log_severity_level = 3
session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
if len(names) != len(inputs):
    sys.exit(f"the model takes {len(names)} inputs ({names}), {len(inputs)} were given")
feeds = {name: np.load(path, allow_pickle=False) for name, path in zip(names, inputs)}
gc.collect()
gc.disable()
mark()
mark()
for _ in range(runs):
    out = session.run(None, feeds)
    del out
    mark()
gc.enable()
print("ran", runs, "onnxruntime", ort.__version__)
'''


def default_ort_path() -> Path:
    """Where ``scripts/build_aarch64_ort.sh`` installs ONNX Runtime by default."""
    return cache_dir() / "aarch64-ort"


def find_ort_site() -> Path:
    """The aarch64 ONNX Runtime install (``PQCOMPILE_AARCH64_ORT`` or
    :func:`default_ort_path`): the directory holding ``site/`` and ``.complete``.

    Raises :class:`InstructionCountError` saying how to install it when it is incomplete.
    """
    path = Path(os.environ.get("PQCOMPILE_AARCH64_ORT") or default_ort_path())
    if not (path / ".complete").is_file() or not (path / "site" / "onnxruntime").is_dir():
        raise InstructionCountError(
            f"no aarch64 ONNX Runtime at {path} (site/onnxruntime and .complete expected). "
            f"Install it with `bash scripts/setup.sh` (or just `bash {ORT_SCRIPT}` once the "
            f"aarch64 sysroot exists, ~30 s) from the pqcompile source tree, or point "
            f"PQCOMPILE_AARCH64_ORT at such a directory")
    return path.resolve()


@lru_cache(maxsize=None)
def _qemu_cpus(emulator: str) -> frozenset[str]:
    """CPU models ``emulator -cpu help`` lists (empty when it cannot say)."""
    exe = shutil.which(emulator)
    if exe is None:
        return frozenset()
    try:
        proc = subprocess.run([exe, "-cpu", "help"], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip())


def qemu_cpu(target: Any) -> str | None:
    """The qemu CPU model of a pqcompile target (a name or ``TargetSpec``): its ``mcpu`` when
    its emulator knows that model (``arm`` -> ``cortex-a72``, ``arm-dotprod`` ->
    ``cortex-a76``), else ``None`` (qemu's default, ``max``)."""
    from .registry import get_target

    spec = get_target(target) if isinstance(target, str) else target
    config = spec.tvm_config
    mcpu = config.get("mcpu") if hasattr(config, "get") else None
    if not mcpu or spec.emulator is None:
        return None
    return str(mcpu) if str(mcpu) in _qemu_cpus(spec.emulator) else None


def count_onnx_instructions(model: str | os.PathLike, inputs: Sequence[Any], *,
                            runs: tuple[int, int] = (1, 3), threads: int = 1,
                            cpu: str | None = None, sysroot: Sysroot | None = None,
                            timeout: float = DEFAULT_TIMEOUT_S) -> InsnCount:
    """Guest instructions per ONNX Runtime inference of ``model`` (an ``.onnx`` file) on
    aarch64, with ``inputs`` (numpy arrays, in the model's input order).

    Counted as :func:`pqcompile.targets.insn_count.count_instructions` counts an artifact;
    ``threads`` intra-op threads (keep 1: the plugin sums every thread, and idle pool workers
    spin), on qemu's CPU model ``cpu`` (default ``max``). The result's ``target`` reads
    ``onnxruntime`` plus the CPU model.

    Raises :class:`InstructionCountError` when the plugin, the sysroot or the aarch64 ONNX
    Runtime is missing or a run fails (e.g. an op ONNX Runtime 1.18 does not know), and
    ``ValueError`` for bad ``runs``/``threads`` or a missing model file.
    """
    n1, n2 = check_runs(runs)
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    path = Path(model).resolve()
    if not path.is_file():
        raise ValueError(f"no ONNX model at {path}")
    find_plugin()
    sysroot = guest_sysroot("aarch64", sysroot)
    ort = find_ort_site()

    def make_guest(work: Path) -> GuestProgram:
        args = (str(path), str(int(threads)), *save_inputs(inputs, work))
        return GuestProgram(_ORT_GUEST_SCRIPT, args, {"PYTHONPATH": str(ort / "site")}, cpu)

    return count_guest(make_guest, (n1, n2), sysroot, timeout, flavour="-ort",
                       arch="aarch64", target=f"onnxruntime ({cpu or 'max'})")
