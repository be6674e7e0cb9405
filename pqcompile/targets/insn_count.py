"""Count the guest instructions one inference of an artifact executes, under qemu-user.

The counter is pqcompile's TCG plugin ``scripts/qemu_plugin/pqcount.c`` (``libpqcount.so``),
built for the installed qemu-user by ``scripts/build_insn_plugin.sh`` into
``$PQCOMPILE_CACHE/qemu-plugin`` (default cache ``~/.cache/pqcompile``;
``PQCOMPILE_INSN_PLUGIN`` points at another build). It counts every guest instruction and
records the count whenever the guest makes a marker system call. The artifact runs in the
sysroot's Python with the TVM runtime, exactly like its ``runner.py`` (see
:mod:`pqcompile.targets.emulator`), on its reference sample inputs.

One process marks twice (the cost of a mark), then calls the entry function ``runs[1]``
times with a mark after each call: the count of call ``i`` is the difference of its marks
less one mark's cost, and the per-inference count is the mean over calls ``runs[0] + 1`` to
``runs[1]`` (call 1, which does one-time work, left out by the default ``runs=(1, 3)``).
Start-up (~2.5e9 instructions: importing numpy and tvm, loading the library) never enters.
Two processes' totals are not used: their start-up differs by up to ~10^7 instructions with
the command line and the paths (measured), which swamped small models' differences. The
guest runs one thread (``TVM_NUM_THREADS=1``: the counter is shared, and idle workers spin),
with Python's hash seed fixed, bytecode cached between processes, the garbage collector off
during the calls and address space randomization off (``setarch -R``) where the kernel
allows it. Measured: a 32x32 two-conv int8 model's calls after the first count 1,397,661 to
1,399,086 instructions (0.1%) in every process, whatever its paths and bytecode cache.

Usage (an aarch64 artifact directory; ``tests/test_insn_count.py`` runs it under QEMU)::

    count = count_instructions("artifacts/resnet18-arm")
    print(count)  # 379,323,355 guest instructions per inference (aarch64, target 'arm'; ...)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from .base import host_arch
from .emulator import DEFAULT_TIMEOUT_S, EmulatorError, Sysroot, _python_command, cache_dir

__all__ = ["PLUGIN_SCRIPT", "GuestProgram", "InsnCount", "InstructionCountError", "check_runs",
           "count_guest", "count_instructions", "default_plugin_path", "find_plugin",
           "guest_sysroot", "save_inputs"]

PLUGIN_SCRIPT = "scripts/build_insn_plugin.sh"
SETUP_SCRIPT = "scripts/setup.sh"
_COUNT_LINE = re.compile(r"^insns: (\d+)$", re.MULTILINE)
_MARK_LINE = re.compile(r"^mark: (\d+)$", re.MULTILINE)
# Single-threaded, reproducible guest: forwarded on top of the emulator's clean environment.
_GUEST_ENV = {"TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "PYTHONHASHSEED": "0"}

# The marker system call of scripts/qemu_plugin/pqcount.c: lseek(-1, PQCOUNT_MAGIC, SEEK_SET),
# which fails with EBADF and records the instruction count. Guest scripts start with this.
MARK_MAGIC = 0x5051434D
MARK_PRELUDE = f'''\
import os as _os
def mark():
    try:
        _os.lseek(-1, {MARK_MAGIC:#x}, 0)
    except OSError:
        pass
'''

# Runs in the sysroot's Python: imports the artifact's own runner.py (numpy and tvm only).
# ml_dtypes (bfloat16/float8 for numpy) is blocked unless the artifact uses such a dtype: its
# extension's start-up is ~7e9 guest instructions, three quarters of an otherwise idle process.
_GUEST_SCRIPT = MARK_PRELUDE + '''\
import gc, json, sys
from pathlib import Path
import numpy as np
artifact, runs, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
manifest = json.loads((Path(artifact) / "manifest.json").read_text(encoding="utf-8"))
entries = manifest["inputs"] + manifest["outputs"] + manifest["params"]
try:
    [np.dtype(e["dtype"]) for e in entries]
    sys.modules["ml_dtypes"] = None
except TypeError:
    pass
sys.path.insert(0, artifact)
import runner
import tvm
manifest = runner.read_manifest(artifact)
files = runner.read_files(artifact, manifest)
params = runner.read_arrays(files[manifest["weights_file"]], manifest["params"])
if inputs:
    arrays = [np.load(p, allow_pickle=False) for p in inputs]
else:
    sample = manifest["reference_sample"]
    arrays = runner.read_arrays(files[sample["file"]], sample["inputs"])
runner.check_inputs(manifest["inputs"], arrays)
library = tvm.runtime.load_module(str(Path(artifact) / manifest["library"]))
vm = tvm.relax.VirtualMachine(library, tvm.cpu())
entry = vm[manifest["entry"]]
args = runner.to_tensors(arrays) + runner.prepare(vm, manifest, runner.to_tensors(params))
gc.collect()
gc.disable()
mark()
mark()
for _ in range(runs):
    out = entry(*args)
    del out
    mark()
gc.enable()
print("ran", runs)
'''


class InstructionCountError(EmulatorError):
    """The instruction counter is missing, or a counted run failed or printed no count."""


@dataclass(frozen=True)
class InsnCount:
    """Guest instructions per inference, and the counts it was computed from.

    ``calls[i]`` is what call ``i + 1`` of the entry function executed (one process, marks
    around each call); ``per_inference`` is the mean of calls ``runs[0] + 1`` to ``runs[1]``.
    ``totals[i]`` is what the process had executed when call ``runs[i]`` returned (start-up
    included).
    """

    per_inference: float
    runs: tuple[int, int]
    totals: tuple[int, int]
    arch: str
    target: str
    calls: tuple[int, ...] = ()

    @property
    def startup(self) -> float:
        """Instructions of the process outside the counted calls: imports, loading, the
        first calls' one-time work."""
        return self.totals[0] - self.runs[0] * self.per_inference

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"per_inference": self.per_inference, "runs": list(self.runs),
                "calls": list(self.calls), "totals": list(self.totals),
                "startup": self.startup, "arch": self.arch, "target": self.target}

    def __str__(self) -> str:
        counted = self.calls[self.runs[0]:self.runs[1]]
        spread = (f", calls {min(counted):,} to {max(counted):,}"
                  if counted and min(counted) != max(counted) else "")
        return (f"{self.per_inference:,.0f} guest instructions per inference ({self.arch}, "
                f"target {self.target!r}; calls {self.runs[0] + 1} to {self.runs[1]} of one "
                f"process{spread}; {self.totals[1]:,} in the process up to call "
                f"{self.runs[1]})")


def default_plugin_path() -> Path:
    """Where ``scripts/build_insn_plugin.sh`` puts ``libpqcount.so`` by default."""
    return cache_dir() / "qemu-plugin" / "libpqcount.so"


def find_plugin() -> Path:
    """The instruction-count plugin: ``PQCOMPILE_INSN_PLUGIN`` or :func:`default_plugin_path`.

    Raises :class:`InstructionCountError` saying how to build it when it is missing.
    """
    path = Path(os.environ.get("PQCOMPILE_INSN_PLUGIN") or default_plugin_path())
    if not path.is_file():
        raise InstructionCountError(
            f"pqcompile's QEMU instruction-count plugin is not at {path}. Build it with `bash "
            f"{SETUP_SCRIPT}` (or just `bash {PLUGIN_SCRIPT}`: needs root for apt-get, ~10 s) "
            f"from the pqcompile source tree, or point PQCOMPILE_INSN_PLUGIN at a libpqcount.so "
            f"built for the installed qemu-user")
    return path.resolve()


def _no_aslr_prefix() -> list[str]:
    """``setarch <machine> -R`` when it works here (containers may forbid personality())."""
    setarch = shutil.which("setarch")
    if setarch is None:
        return []
    prefix = [setarch, os.uname().machine, "-R"]
    try:
        proc = subprocess.run([*prefix, "true"], capture_output=True, timeout=30, check=False)
        ok = proc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else []


def _pycache(sysroot: Sysroot, flavour: str = "") -> Path:
    """The bytecode cache of the counted processes (``PYTHONPYCACHEPREFIX``): one per sysroot
    architecture and ``flavour`` (a guest with other packages on its path, e.g. ONNX
    Runtime's). Compiling numpy's and tvm's modules under qemu takes a minute; the first count
    writes the cache (Python replaces ``.pyc`` files atomically and checks them against their
    sources, so concurrent counts and rebuilt sysroots are safe). Bytecode compiled or read
    during start-up does not change the counts: the calls are counted between marks."""
    return cache_dir() / "guest-pycache" / f"{sysroot.arch}{flavour}"


@dataclass(frozen=True)
class GuestProgram:
    """What a counted process runs: ``script`` (Python source) with ``args`` after the call
    count, on the sysroot's Python with ``env`` on top of the clean guest environment, under
    ``qemu -cpu <cpu>`` when ``cpu`` is set (the emulated CPU's features, which libraries that
    pick kernels at run time see)."""

    script: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    cpu: str | None = None


def _run_guest(guest: GuestProgram, runs: int, sysroot: Sysroot, timeout: float,
               work: Path, qemu_options: Sequence[str], env: dict[str, str],
               prefix: Sequence[str] = ()) -> None:
    """Run the guest script calling the entry function ``runs`` times."""
    script = work / "count_guest.py"
    if not script.exists():
        script.write_text(guest.script, encoding="utf-8")
    command, full_env = _python_command(sysroot.arch, sysroot, {**guest.env, **env})
    cpu = ["-cpu", guest.cpu] if guest.cpu else []
    command = [*prefix, command[0], *cpu, *qemu_options, *command[1:], str(script),
               guest.args[0], str(runs), *guest.args[1:]]
    try:
        proc = subprocess.run(command, cwd=work, env=full_env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise InstructionCountError(
            f"running {runs} call(s) under qemu ran past {timeout:.0f} s; pass a larger "
            f"timeout (emulated inference is slow); command: {' '.join(command)}") from err
    if proc.returncode != 0:
        raise InstructionCountError(
            f"the run with {runs} call(s) failed with exit code {proc.returncode}; "
            f"command: {' '.join(command)}\nstderr:\n{proc.stderr[-6000:]}")


def _count_marks(guest: GuestProgram, runs: int, sysroot: Sysroot, plugin: Path,
                 timeout: float, work: Path, prefix: Sequence[str],
                 pycache: Path) -> list[int]:
    """The instruction counts at the marks of one process calling the entry ``runs`` times:
    two marks before the first call, then one after each."""
    log = work / f"insns-{runs}.log"
    log.unlink(missing_ok=True)
    env = {**_GUEST_ENV, "PYTHONPYCACHEPREFIX": str(pycache)}
    _run_guest(guest, runs, sysroot, timeout, work,
               ["-plugin", str(plugin), "-d", "plugin", "-D", str(log)], env, prefix)
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    totals = _COUNT_LINE.findall(text)
    marks = [int(m) for m in _MARK_LINE.findall(text)]
    if len(totals) != 1:
        raise InstructionCountError(
            f"qemu printed {len(totals)} instruction counts, not 1, to {log} (is {plugin} "
            f"built for the installed qemu-user? rebuild it with `bash {PLUGIN_SCRIPT}`); "
            f"log:\n{text[-2000:]}")
    if len(marks) != runs + 2:
        raise InstructionCountError(
            f"the counted process made {len(marks)} marks, not {runs + 2} (two, then one per "
            f"call): its script must call mark() twice and then after each call; is {plugin} "
            f"pqcompile's plugin (scripts/qemu_plugin/pqcount.c)?")
    return marks


def check_runs(runs: Sequence[int]) -> tuple[int, int]:
    """``(n1, n2)`` as ints; ``ValueError`` unless ``0 <= n1 < n2``."""
    n1, n2 = (int(n) for n in runs) if len(runs) == 2 else (0, 0)
    if n1 < 0 or n2 <= n1:
        raise ValueError(f"runs must be two call counts (n1, n2) with 0 <= n1 < n2, got {runs!r}")
    return n1, n2


def guest_sysroot(arch: str, sysroot: Sysroot | None) -> Sysroot:
    """``sysroot`` or the one found for ``arch``; a missing one says to run the setup."""
    from .emulator import find_sysroot

    try:
        return sysroot or find_sysroot(arch)
    except EmulatorError as err:
        raise InstructionCountError(f"{err} `bash {SETUP_SCRIPT}` builds it, and the "
                                    f"instruction-count plugin") from None


def save_inputs(inputs: Sequence[Any], work: Path) -> list[str]:
    """Write ``inputs`` (arrays) as ``.npy`` files in ``work`` for the guest; their paths."""
    import numpy as np

    paths = []
    for i, array in enumerate(inputs):
        paths.append(str(work / f"in{i}.npy"))
        np.save(paths[-1], np.asarray(array), allow_pickle=False)
    return paths


def count_guest(make_guest: Callable[[Path], GuestProgram], runs: tuple[int, int],
                sysroot: Sysroot, timeout: float, *, flavour: str = "",
                arch: str | None = None, target: str = "") -> InsnCount:
    """Count a guest (``make_guest(work)``, given the scratch directory its files go in) whose
    script calls ``mark()`` (:data:`MARK_PRELUDE`) twice and then after each of its calls:
    one process making ``runs[1]`` calls, counted with the plugin."""
    n1, n2 = check_runs(runs)
    plugin = find_plugin()
    pycache = _pycache(sysroot, flavour)
    pycache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pqcompile-insns-") as tmp:
        work = Path(tmp)
        marks = _count_marks(make_guest(work), n2, sysroot, plugin, timeout, work,
                             _no_aslr_prefix(), pycache)
    cost = marks[1] - marks[0]  # one mark: the lseek call and its caught OSError
    calls = tuple(after - before - cost for before, after in pairwise(marks[1:]))
    return InsnCount(per_inference=sum(calls[n1:n2]) / (n2 - n1), runs=(n1, n2),
                     totals=(marks[1 + n1], marks[1 + n2]), arch=arch or sysroot.arch,
                     target=target, calls=calls)


def count_instructions(artifact: Any, *, runs: tuple[int, int] = (1, 3),
                       inputs: Sequence[Any] | None = None, sysroot: Sysroot | None = None,
                       timeout: float = DEFAULT_TIMEOUT_S, cpu: str | None = None) -> InsnCount:
    """Guest instructions per inference of ``artifact`` (a directory or an ``Artifact``).

    One process runs under ``qemu-<arch> -plugin libpqcount.so``, single-threaded, calling the
    entry function ``runs[1]`` times on the reference sample inputs (or on ``inputs``, numpy
    arrays) with a mark around each call; the result is the mean count of calls
    ``runs[0] + 1`` to ``runs[1]`` (``runs[0] >= 1`` leaves out the first call's one-time
    work). ``timeout`` applies to the process. The artifact must be for another
    architecture than this machine's: it runs under qemu-user, in the sysroot of
    :func:`pqcompile.targets.find_sysroot` (or ``sysroot``), on qemu's default CPU model or
    ``cpu`` (``qemu-aarch64 -cpu help`` lists them). The first count for a sysroot also
    writes a bytecode cache (~1 min more).

    Raises :class:`InstructionCountError` (a ``pqcompile.targets.EmulatorError``) when the
    plugin or the sysroot is missing or a run fails, and
    ``ValueError`` for bad ``runs`` or an artifact without a reference sample and ``inputs``.
    """
    from ..runtime.artifact import Artifact

    n1, n2 = check_runs(runs)
    if isinstance(artifact, Artifact):
        art, directory = artifact, None
    elif isinstance(artifact, (str, os.PathLike)):
        directory = Path(artifact).resolve()
        art = Artifact.load(directory)  # checks the files before minutes of emulation
    else:
        raise TypeError(f"count_instructions takes an artifact directory or an Artifact, "
                        f"got {type(artifact).__name__}")
    if art.arch == host_arch():
        raise ValueError(
            f"the artifact is for this machine's architecture ({art.arch}); instructions are "
            f"counted under qemu-user: build it for another architecture (e.g. target 'arm')")
    if inputs is None and art.reference_sample is None:
        raise ValueError("the artifact stores no reference sample: pass inputs=[arrays]")
    find_plugin()  # a missing plugin is reported before a missing sysroot
    sysroot = guest_sysroot(art.arch, sysroot)

    def make_guest(work: Path) -> GuestProgram:
        path = directory if directory is not None else art.save(work / "artifact")
        args = (str(path), *save_inputs(inputs or (), work))
        return GuestProgram(_GUEST_SCRIPT, args, {}, cpu)

    return count_guest(make_guest, (n1, n2), sysroot, timeout, arch=art.arch,
                       target=art.target.name)
