"""Run Python, and compiled models, for another CPU architecture under qemu-user.

A *sysroot* holds that architecture's CPython with its libraries (``root/``) and the wheels
pqcompile's runtime needs (``site/``: tvm, tvm-ffi, numpy, ml_dtypes). For aarch64 it is built
by ``scripts/build_aarch64_sysroot.sh`` into ``$PQCOMPILE_CACHE/aarch64-sysroot`` (default cache
``~/.cache/pqcompile``); ``PQCOMPILE_AARCH64_SYSROOT`` points elsewhere. Code for the machine's
own architecture runs natively with the current interpreter, so callers need not branch.

Importing tvm under emulation takes 10-15 s, hence the generous default timeout.

>>> default_sysroot_path("aarch64").name
'aarch64-sysroot'
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PQCompileError
from .base import ARCHES, ToolchainError, host_arch

__all__ = ["EmulatorError", "Sysroot", "default_sysroot_path", "find_sysroot", "run_python",
           "run_vm"]

DEFAULT_TIMEOUT_S = 900.0
SYSROOT_SCRIPT = "scripts/build_aarch64_sysroot.sh"
_RUNNER = Path(__file__).with_name("vm_runner.py")
# Variables that tune the TVM runtime and may be forwarded into the emulated process (and
# the output file of the profiling plugin, scripts/qemu_plugin/pqprof.c).
_FORWARDED_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_BIND_THREADS", "PQCOUNT_PROFILE")


class EmulatorError(PQCompileError, RuntimeError):
    """A program run for another architecture failed, timed out or could not start."""


@dataclass(frozen=True)
class Sysroot:
    """A sysroot directory: ``root/`` (the arch's filesystem) and ``site/`` (its wheels)."""

    arch: str
    path: Path

    @property
    def root(self) -> Path:
        """Passed to qemu ``-L``: where the dynamic loader and shared libraries live."""
        return self.path / "root"

    @property
    def site(self) -> Path:
        """Unpacked wheels, put on ``PYTHONPATH``."""
        return self.path / "site"

    @property
    def python(self) -> Path:
        """The sysroot's CPython executable."""
        found = sorted((self.root / "usr" / "bin").glob("python3.[0-9]*"))
        exact = [p for p in found if p.name.replace("python", "").replace(".", "").isdigit()]
        if not exact:
            raise EmulatorError(f"no python3.X executable under {self.root}/usr/bin; rebuild the "
                                f"sysroot with {SYSROOT_SCRIPT}")
        return exact[0]

    def missing(self) -> list[str]:
        """Parts of the sysroot that are absent; empty when it is complete."""
        checks = {".complete (written last by the build script)": self.path / ".complete",
                  "root/usr/bin": self.root / "usr" / "bin", "site/tvm": self.site / "tvm"}
        return [what for what, path in checks.items() if not path.exists()]


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHES)}")


def cache_dir() -> Path:
    """pqcompile's cache of emulation tools (sysroots, the counting plugin, the aarch64 ONNX
    Runtime, guest bytecode): ``PQCOMPILE_CACHE``, default ``~/.cache/pqcompile``."""
    return Path(os.environ.get("PQCOMPILE_CACHE") or Path.home() / ".cache" / "pqcompile")


def default_sysroot_path(arch: str = "aarch64") -> Path:
    """Where the sysroot for ``arch`` is looked for when no environment variable says."""
    _check_arch(arch)
    return cache_dir() / f"{arch}-sysroot"


def find_sysroot(arch: str = "aarch64") -> Sysroot:
    """Locate a complete sysroot for ``arch``.

    ``PQCOMPILE_<ARCH>_SYSROOT`` wins over :func:`default_sysroot_path`. Raises
    :class:`EmulatorError` saying how to build one when it is missing or incomplete.
    """
    _check_arch(arch)
    variable = f"PQCOMPILE_{arch.upper()}_SYSROOT"
    sysroot = Sysroot(arch, Path(os.environ.get(variable) or default_sysroot_path(arch)))
    missing = sysroot.missing()
    if missing:
        raise EmulatorError(
            f"no complete {arch} sysroot at {sysroot.path} (missing: {', '.join(missing)}). "
            f"Build it with `bash {SYSROOT_SCRIPT} {sysroot.path}` from the pqcompile source "
            f"tree (needs root for apt-get, ~3 min, ~450 MB), or point {variable} at one.")
    return sysroot


def _python_command(arch: str, sysroot: Sysroot | None,
                    env: Mapping[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """The interpreter command line and environment for running Python on ``arch``."""
    if arch == host_arch():
        return [sys.executable], {**os.environ, **(env or {})}
    info = ARCHES[arch]
    emulator = shutil.which(info.emulator)
    if emulator is None:
        raise ToolchainError(f"{info.emulator} is not on PATH; install it with "
                             f"`apt-get install -y {info.emulator_package}`")
    sysroot = sysroot or find_sysroot(arch)
    # A clean environment: host site-packages or PYTHONHOME must not leak into the guest.
    guest_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                 "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
                 "PYTHONPATH": str(sysroot.site), "PYTHONNOUSERSITE": "1"}
    guest_env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    guest_env.update(env or {})
    return [emulator, "-L", str(sysroot.root), str(sysroot.python), "-s"], guest_env


def run_python(script_path: str | Path, args: Sequence[str] = (), cwd: str | Path | None = None,
               *, arch: str = "aarch64", timeout: float = DEFAULT_TIMEOUT_S,
               sysroot: Sysroot | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run a Python script for ``arch`` and return its stdout.

    Under ``qemu-<arch> -L ROOT ROOT/usr/bin/python3.X`` with ``PYTHONPATH=SITE``, or natively
    when ``arch`` is this machine's. Raises :class:`EmulatorError` with the script's stderr
    when it fails or runs past ``timeout`` seconds.
    """
    _check_arch(arch)
    script = Path(script_path)
    if not script.is_file():
        raise ValueError(f"script {script} does not exist")
    command, full_env = _python_command(arch, sysroot, env)
    command += [str(script), *map(str, args)]
    try:
        proc = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise EmulatorError(f"{script.name} ran past {timeout:.0f} s for {arch}; command: "
                            f"{' '.join(command)}") from err
    if proc.returncode != 0:
        raise EmulatorError(f"{script.name} failed for {arch} with exit code {proc.returncode}; "
                            f"command: {' '.join(command)}\nstderr:\n{proc.stderr[-6000:]}")
    return proc.stdout


def run_vm(lib_path: str | Path, inputs: Sequence[Any], *, arch: str = "aarch64",
           function: str = "main", timeout: float = DEFAULT_TIMEOUT_S,
           sysroot: Sysroot | None = None) -> list[Any]:
    """Run ``function`` of an exported Relax library for ``arch`` and return numpy outputs.

    ``inputs`` are numpy arrays, passed in order; nested tuple outputs come back flattened
    depth-first. The library must have been exported for ``arch`` (see ``TargetSpec.export``).
    """
    import numpy as np

    lib = Path(lib_path).resolve()
    if not lib.is_file():
        raise ValueError(f"library {lib} does not exist")
    with tempfile.TemporaryDirectory(prefix="pqcompile-run-") as tmp:
        in_dir, out_dir = Path(tmp, "in"), Path(tmp, "out")
        in_dir.mkdir()
        for i, array in enumerate(inputs):
            if not isinstance(array, np.ndarray):
                raise TypeError(f"input {i} must be a numpy array, got {type(array).__name__}")
            np.save(in_dir / f"in{i}.npy", array)
        stdout = run_python(_RUNNER, [str(lib), function, str(in_dir), str(out_dir)], cwd=tmp,
                            arch=arch, timeout=timeout, sysroot=sysroot)
        count = int(stdout.strip().splitlines()[-1])
        return [np.load(out_dir / f"out{i}.npy") for i in range(count)]
