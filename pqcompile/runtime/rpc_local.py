"""An RPC server on this machine standing in for a board: natively, or for aarch64 under
qemu-user with the sysroot's Python and TVM (:mod:`pqcompile.targets.emulator`). Used by the
tests and tutorials of :mod:`pqcompile.runtime.deploy`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from contextlib import contextmanager
from pathlib import Path

from . import rpc_server
from .rpc_client import DeployError, ServerAddress, parse_address
from ..targets import host_arch
from ..targets.emulator import _python_command

__all__ = ["SERVER_SCRIPT", "local_server"]

SERVER_SCRIPT = Path(rpc_server.__file__)


@contextmanager
def local_server(arch: str = "aarch64", port: int = 0, *, host: str = "127.0.0.1",
                 startup_timeout: float = 120.0, tracker: Any = None, key: str = "",
                 name: str | None = None) -> Iterator[ServerAddress]:
    """Run ``pqcompile/runtime/rpc_server.py`` here while the ``with`` block runs; yields its
    address.

    ``arch="host"`` (or this machine's architecture) runs it with this interpreter; another
    architecture runs the sysroot's Python under qemu-user (see
    :func:`pqcompile.targets.find_sysroot`; aarch64 starts in ~10 s). ``port=0`` takes a free
    port. Raises :class:`DeployError` with the server's log when it does not start within
    ``startup_timeout`` seconds. The server and its sessions are killed on exit; on Linux the
    server also ends when this process does, however it ends. ``tracker`` (``"HOST:PORT"``
    or a :class:`ServerAddress`) registers the server with that TVM RPC tracker under ``key``
    (:mod:`pqcompile.runtime.tracker`); ``name``: the board's name in its ``device_info``.
    """
    arch = host_arch() if arch == "host" else arch
    command, env = _python_command(arch, None, None)
    command += [str(SERVER_SCRIPT), "--host", host, "--port", str(port)]
    if tracker is not None:
        if not key:
            raise DeployError("a board registered with a tracker needs a key (key='NAME'): "
                              "the name clients ask the tracker for")
        address = tracker if isinstance(tracker, ServerAddress) else parse_address(tracker)
        command += ["--tracker", str(address), "--key", key]
    elif key:
        command += ["--key", key]
    if name:
        command += ["--name", name]
    with tempfile.TemporaryDirectory(prefix="pqcompile-rpc-") as tmp:
        out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # Its own process group: the sessions it forks go with it. The preexec_fn only
            # calls prctl (no import, no lock), which is safe in a process with threads.
            death_signal = _parent_death_signal()
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=env, cwd=tmp, start_new_session=True,
                                    preexec_fn=death_signal)  # noqa: PLW1509
        try:
            address = _wait_listening(proc, out_path, err_path, host, startup_timeout, arch)
            yield address
        finally:
            _stop(proc)


def _parent_death_signal() -> Callable[[], None] | None:
    """For ``preexec_fn``: the child gets SIGTERM when this process ends, even if killed
    (Linux ``prctl(PR_SET_PDEATHSIG)``); looked up here, as the child must not import."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, pr_set_pdeathsig = ctypes.CDLL(None, use_errno=True).prctl, 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_listening(proc: subprocess.Popen, out_path: Path, err_path: Path, host: str,
                    timeout: float, arch: str) -> ServerAddress:
    deadline = time.monotonic() + timeout
    while True:
        for line in out_path.read_text(errors="replace").splitlines():
            if line.startswith(rpc_server.LISTENING):
                return ServerAddress(host, int(line.rsplit(":", 1)[1]))
        failed = proc.poll() is not None
        if failed or time.monotonic() > deadline:
            log = err_path.read_text(errors="replace")[-3000:]
            why = f"exited with code {proc.returncode}" if failed else \
                f"did not listen within {timeout:g} s"
            raise DeployError(f"the {arch} RPC server ({' '.join(proc.args)}) {why}; its "
                              f"log:\n{log}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """End the server's process group (it and its session processes)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        print(f"warning: RPC server process {proc.pid} did not exit", file=sys.stderr)
