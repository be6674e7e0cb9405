"""Run a saved artifact on a board over TVM RPC: check its outputs there and time it.

:func:`deploy` loads and verifies an artifact directory (:meth:`Artifact.load`), connects to a
TVM RPC server on the board, uploads ``lib.so``, loads it into a Relax VM on the board's CPU,
copies the weights (``weights.bin``) and the stored reference inputs there, runs the entry
function, compares the outputs with the reference sample (exact for integer outputs, the
manifest's ``rtol``/``atol`` for float ones, as ``runner.py --check-sample`` does) and times the
entry function with the VM's ``time_evaluator`` on the board. The command line is
``pqcompile deploy DIR --rpc HOST:PORT``.

On the board (TVM and numpy installed), either of::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090
    python rpc_server.py --host 0.0.0.0 --port 9090   # pqcompile/runtime/rpc_server.py, copied over

The second also reports the board's machine and library versions, so an artifact built for
another architecture is refused before the upload.
:func:`pqcompile.runtime.rpc_local.local_server` starts that server on this machine, natively or for
aarch64 under qemu-user: a stand-in for a board in tests and tutorials.

>>> parse_address("192.168.1.20:9090")
ServerAddress(host='192.168.1.20', port=9090)
>>> str(parse_address("[::1]:9090"))
'[::1]:9090'
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .artifact import Artifact
from .rpc_client import (
    AddressError,
    DeployError,
    RemoteLoadError,
    RemoteUnreachableError,
    ServerAddress,
    _check_arch,
    _connect,
    _first_line,
    _remote_info,
    parse_address,
)
from . import runner

__all__ = ["AddressError", "DeployError", "DeployResult", "LatencyStats", "OutputMismatchError",
           "RemoteLoadError", "RemoteUnreachableError", "ServerAddress", "deploy",
           "parse_address"]

class OutputMismatchError(DeployError):
    """The outputs on the board differ from the artifact's reference sample; ``result`` holds
    the full :class:`DeployResult` (differences and latency)."""

    def __init__(self, message: str, result: DeployResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class LatencyStats:
    """Latency of the entry function on the board, in milliseconds.

    ``per_repeat`` holds one figure per repeat, each the mean over ``number`` back-to-back runs;
    the statistics are over ``per_repeat``.
    """

    mean: float
    median: float
    std: float
    min: float
    max: float
    per_repeat: list[float]
    number: int

    @classmethod
    def from_seconds(cls, seconds: Sequence[float], number: int) -> LatencyStats:
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(mean=float(ms.mean()), median=float(np.median(ms)), std=float(ms.std()),
                   min=float(ms.min()), max=float(ms.max()), per_repeat=ms.tolist(),
                   number=number)


@dataclass
class DeployResult:
    """What :func:`deploy` did and measured.

    ``outputs_match`` is ``None`` when nothing was compared (the artifact stores no reference
    sample). ``max_lsb_diff`` counts units in the last place: integer steps for integer outputs,
    ULPs of the dtype for float ones. ``remote`` is the board's description when its server
    gives one (``pqcompile.runtime.rpc_server`` does, ``tvm.exec.rpc_server`` does not).
    """

    artifact: str
    address: str
    target: str
    arch: str
    remote: dict[str, Any] | None
    outputs_match: bool | None
    max_abs_diff: float | None
    max_lsb_diff: int | None
    mismatches: list[str]
    latency: LatencyStats
    upload_bytes: int
    upload_s: float
    weights_bytes: int
    weights_s: float
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``pqcompile deploy --json`` prints)."""
        return asdict(self)

    def summary(self) -> str:
        """A few lines for people: target, board, outputs check, latency."""
        board = "board description not available (a stock tvm.exec.rpc_server)"
        if self.remote:
            r = self.remote
            board = (f"{r.get('machine')} {r.get('system')}, {r.get('cpu_count')} CPUs, "
                     f"TVM {r.get('tvm')}")
        if self.outputs_match is None:
            check = "not checked (the artifact stores no reference sample)"
        elif self.outputs_match:
            check = (f"match the reference sample (max abs diff {self.max_abs_diff:.3g}, "
                     f"{self.max_lsb_diff} LSB)")
        else:
            check = "DIFFER from the reference sample:\n  " + "\n  ".join(self.mismatches)
        lat = self.latency
        return "\n".join([
            f"artifact {self.artifact}: target {self.target} ({self.arch})",
            f"board {self.address}: {board}",
            (f"upload: lib.so {self.upload_bytes / 1024:.1f} KiB in {self.upload_s:.2f} s, "
             f"weights {self.weights_bytes / 1024:.1f} KiB in {self.weights_s:.2f} s"),
            f"outputs: {check}",
            (f"latency: mean {lat.mean:.3f} ms, median {lat.median:.3f} ms, "
             f"std {lat.std:.3f} ms, min {lat.min:.3f} ms "
             f"({len(lat.per_repeat)} repeats x {lat.number} runs)"),
        ])


def deploy(directory: str | os.PathLike, host: str | None = None, port: int | None = None, *,
           repeat: int = 10, number: int = 10, check: bool = True,
           session_timeout: float = 600.0, connect_timeout: float = 10.0, key: str = "",
           tracker: Any = None) -> DeployResult:
    """Run the artifact in ``directory`` on the RPC server at ``host:port``, or with
    ``tracker="HOST:PORT"`` on a free board of ``key`` that the TVM RPC tracker there gives
    (:mod:`pqcompile.runtime.tracker`); see the module docstring for the steps.

    Latency is timed over ``repeat`` repeats of ``number`` runs each, after one warm-up run.
    ``session_timeout`` (seconds, 0: none) bounds the whole session on the server side.
    With ``check=True`` outputs that differ from the reference sample raise
    :class:`OutputMismatchError` (before the timing); with ``check=False`` they are only
    reported in the result.

    Raises :class:`pqcompile.runtime.artifact.ArtifactError` for a damaged artifact,
    :class:`RemoteUnreachableError`, :class:`RemoteLoadError` (the library does not load or
    run there, e.g. built for another architecture) or :class:`DeployError` for the other
    steps. The RPC session is closed when this returns or raises.
    """
    for name, value in (("repeat", repeat), ("number", number)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if tracker is not None:
        from .tracker import parse_tracker, request

        where = parse_tracker(tracker)
        address: Any = f"a board of key {key!r} from the tracker at {where}"

        def connect() -> Any:
            return request(where, key, session_timeout, connect_timeout)
    else:
        if host is None or port is None:
            raise DeployError("deploy needs a board: host and port of its RPC server, or "
                              "tracker='HOST:PORT' and key='NAME' of a TVM RPC tracker")
        address = ServerAddress(host, int(port))

        def connect() -> Any:
            return _connect(address, key, session_timeout, connect_timeout)
    artifact = Artifact.load(directory)
    manifest = artifact.manifest
    sample = artifact.reference_sample
    if sample is None and check:
        raise DeployError(f"the artifact in {directory} stores no reference sample to check "
                          f"the board's outputs against; pass check=False to only time it")
    if manifest.get("prepare") and not manifest.get("prepare_flat"):
        raise DeployError(
            f"the artifact in {directory} stores its weights packed and its library lacks the "
            f"prepare function a board is called with over RPC (it was saved by an older "
            f"pqcompile): compile it again and save it, then deploy")
    meta = manifest["reference_sample"]
    found: dict[str, Any] = {"mismatches": [], "match": None, "max_abs": None, "max_lsb": None}

    def compare(outputs: list[np.ndarray]) -> bool:
        """Record how the outputs differ; whether to go on to the timing."""
        if sample is not None:
            found["mismatches"] = runner.compare(outputs, sample[1], manifest["outputs"],
                                                 meta["rtol"], meta["atol"])
            found["match"] = not found["mismatches"]
            found["max_abs"], found["max_lsb"] = _differences(outputs, sample[1])
        return not (check and found["match"] is False)

    session = _Session(address, artifact, sample[0] if sample is not None else
                       _zero_inputs(manifest["inputs"]), session_timeout)
    # The server serves one session at a time: every remote object must be gone when this
    # returns, or the next client waits until the session times out. An error's traceback would
    # hold the session's frames, hence it is dropped; the collections catch remote objects left
    # in reference cycles (VirtualMachine.get_outputs makes one; _outputs below does not).
    try:
        session.run(connect, compare, repeat, number)
    except DeployError as err:
        err.__context__ = None
        session = None  # type: ignore[assignment]
        gc.collect()
        raise err.with_traceback(None) from None
    gc.collect()

    seconds = session.seconds
    latency = (LatencyStats.from_seconds(seconds, number) if seconds else
               LatencyStats(*(float("nan"),) * 5, per_repeat=[], number=0))
    result = DeployResult(
        artifact=str(directory), address=_board_address(address, session.info),
        target=session.target, arch=artifact.arch,
        remote=session.info, outputs_match=found["match"], max_abs_diff=found["max_abs"],
        max_lsb_diff=found["max_lsb"], mismatches=found["mismatches"], latency=latency,
        upload_bytes=session.upload_bytes, upload_s=session.timings.pop("upload"),
        weights_bytes=session.weights_bytes, weights_s=session.timings.pop("weights"),
        timings_s=session.timings)
    if not seconds:
        raise OutputMismatchError(
            f"the outputs of {session.what} on {address} differ from the artifact's reference "
            f"sample (max abs diff {result.max_abs_diff:.6g}, {result.max_lsb_diff} LSB):\n  "
            + "\n  ".join(result.mismatches) + "\nThe build machine's toolchain and the board "
            "disagree: rebuild the artifact, and check that the board runs the TVM version in "
            f"the manifest's created_with ({manifest['created_with']['tvm']})", result)
    return result


class _Session:
    """One RPC session's work; keeps only numpy data and figures once :meth:`run` returns, so
    no remote object (which would keep the session open) outlives it."""

    def __init__(self, address: ServerAddress, artifact: Artifact, inputs: list[np.ndarray],
                 session_timeout: float) -> None:
        manifest = artifact.manifest
        self.address, self.artifact, self.inputs = address, artifact, inputs
        self.session_timeout = session_timeout
        self.target, self.entry = manifest["target"]["name"], manifest["entry"]
        self.library_name = manifest["library"]
        self.prepare = manifest.get("prepare_flat")
        self.what = f"the artifact's library (target {self.target!r}, built for {artifact.arch})"
        self.info: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        self.seconds: list[float] = []
        self.upload_bytes = self.weights_bytes = 0

    def run(self, connect: Callable[[], Any],
            compare: Callable[[list[np.ndarray]], bool], repeat: int, number: int) -> None:
        """Connect, upload, load, run once, ``compare`` the outputs and, if it says so, time."""
        from tvm import relax
        from tvm.runtime import tensor

        address, entry, arch = self.address, self.entry, self.artifact.arch
        clock = time.perf_counter
        start = clock()
        remote = connect()
        self.timings["connect"] = clock() - start
        self.info = _remote_info(remote)
        if self.info is not None:
            _check_arch(self.info, arch, self.target, address)

        library = self.artifact._files[self.library_name]  # verified by Artifact.load
        self.upload_bytes = len(library)
        try:
            start = clock()
            remote.upload(bytearray(library), self.library_name)
            self.timings["upload"] = clock() - start
            start = clock()
            remote_lib = remote.load_module(self.library_name)
            self.timings["load"] = clock() - start
        except Exception as err:  # noqa: BLE001 (TVM raises many types; reported, re-raised)
            raise RemoteLoadError(
                f"the RPC server at {address} cannot load {self.what}: {_first_line(err)}. "
                f"Deploy an artifact built for the board's architecture (compile with --target "
                f"arm or arm-dotprod for a 64-bit Arm board), or deploy to a server on an "
                f"{arch} machine") from None

        try:
            device = remote.cpu()
            vm = relax.VirtualMachine(remote_lib, device)
            weights = list(self.artifact.params.values())
            self.weights_bytes = int(sum(a.nbytes for a in weights))
            start = clock()
            tensors = [tensor(np.ascontiguousarray(a), device=device) for a in weights]
            if self.prepare:  # weights stored packed: unpacked once on the board, one
                # argument each (an RPC client can pass no tuple), kept there as the outputs
                vm.set_input(self.prepare, *tensors)
                vm.invoke_stateful(self.prepare)
                tensors = _remote_outputs(vm, self.prepare)
            args = [tensor(np.ascontiguousarray(a), device=device)
                    for a in self.inputs] + tensors  # calling convention: inputs_then_params
            self.timings["weights"] = clock() - start
            start = clock()
            vm.set_input(entry, *args)
            vm.invoke_stateful(entry)
            outputs = _outputs(vm, entry)
            self.timings["first_run"] = clock() - start
        except Exception as err:  # noqa: BLE001 (as above)
            raise RemoteLoadError(
                f"running {entry!r} of {self.what} on the RPC server at {address} failed: "
                f"{_first_line(err)}. If the session expired, raise session_timeout (now "
                f"{self.session_timeout:g} s)") from None
        if not compare(outputs):
            return
        try:
            start = clock()
            timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)
            self.seconds = [float(t) for t in timer(entry).results]
            self.timings["timing"] = clock() - start
        except Exception as err:  # noqa: BLE001 (as above)
            raise DeployError(
                f"timing {entry!r} on the RPC server at {address} failed: {_first_line(err)}. "
                f"If the session expired, raise session_timeout (now "
                f"{self.session_timeout:g} s) or lower repeat/number") from None


def _remote_outputs(vm: Any, entry: str) -> list[Any]:
    """The outputs of the last ``invoke_stateful(entry)`` as tensors where the VM runs, nested
    tuples flattened depth-first (the manifest's output order)."""
    arity, get = vm["get_output_arity"], vm["get_output"]
    outputs, pending = [], [()]
    while pending:
        index = pending.pop()
        count = arity(entry, *index)
        if count == -1:  # a tensor
            outputs.append(get(entry, *index))
        else:
            pending.extend((*index, i) for i in reversed(range(count)))
    return outputs


def _outputs(vm: Any, entry: str) -> list[np.ndarray]:
    """:func:`_remote_outputs` copied here as numpy arrays."""
    return [t.numpy() for t in _remote_outputs(vm, entry)]


def _zero_inputs(specs: list[dict[str, Any]]) -> list[np.ndarray]:
    symbolic = [s["name"] for s in specs if any(isinstance(d, str) for d in s["shape"])]
    if symbolic:
        raise DeployError(f"inputs {symbolic} have symbolic dimensions and the artifact stores "
                          f"no reference sample: there is nothing to run it on")
    return [np.zeros(s["shape"], dtype=s["dtype"]) for s in specs]


def _differences(outputs: Sequence[np.ndarray],
                 expected: Sequence[np.ndarray]) -> tuple[float, int]:
    """Largest absolute difference and largest difference in LSB (integer steps or ULPs)."""
    max_abs, max_lsb = 0.0, 0
    for got, want in zip(outputs, expected):
        if got.shape != want.shape:
            return float("inf"), -1
        if got.size == 0:
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        max_abs = max(max_abs, float(np.nanmax(diff)) if not np.isnan(diff).all() else 0.0)
        if np.issubdtype(want.dtype, np.floating):
            lsb = _ulp_distance(got.astype(want.dtype), want)
        else:
            lsb = int(diff.max())
        max_lsb = max(max_lsb, lsb)
    return max_abs, max_lsb


def _ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest number of representable floats between ``a`` and ``b``, element-wise."""
    bits = a.dtype.itemsize * 8
    unsigned = np.dtype(f"uint{bits}")
    sign = np.array(1 << (bits - 1), dtype=unsigned)

    def ordered(x: np.ndarray) -> np.ndarray:  # monotonic in the float's value
        u = np.ascontiguousarray(x).view(unsigned)
        return np.where(u & sign, ~u, u | sign).astype(np.uint64)

    ka, kb = ordered(a), ordered(b)
    return int(np.max(np.where(ka >= kb, ka - kb, kb - ka)))


def _board_address(address: Any, info: dict[str, Any] | None) -> str:
    """Where it ran: the server's address, and the board's name from its description."""
    if info and info.get("board") and not isinstance(address, ServerAddress):
        return f"{info['board']} ({address})"
    return str(address)
