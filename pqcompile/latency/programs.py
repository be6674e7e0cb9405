"""The one-layer programs a latency table times (:mod:`pqcompile.latency`), and where they
run: in this process, on a board's TVM RPC server, or on an RPC server under qemu-user here
(``rpc="emulator"``)."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LatencyError, OptionError
from ..targets import TargetSpec, get_target, host_arch

EMULATOR = "emulator"


# --- one-layer programs ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """What a layer's one-layer program needs besides its channel counts."""

    kind: str  # "conv2d" | "linear"
    input_shape: tuple[int, ...]
    channel_dim: int
    bias: bool
    # kernel, stride, padding, dilation, groups, padding_mode, depthwise, depth multiplier
    conv: tuple = ()

    def program(self, out: int, inp: int) -> tuple[str, Any, tuple[int, ...]]:
        """``(key, module, input shape)`` of the program with ``out`` output channels and
        ``inp`` input channels per conv group."""
        from torch import nn

        shape = list(self.input_shape)
        if self.kind == "linear":
            shape[-1] = inp
            module: Any = nn.Linear(inp, out, bias=self.bias)
            key = f"linear x={'x'.join(map(str, shape))} o={out} b={int(self.bias)}"
            return key, module, tuple(shape)
        kernel, stride, padding, dilation, groups, mode, depthwise, multiplier = self.conv
        if depthwise:  # in == groups: pruning removes whole conv groups (in and out together)
            groups = cin = max(1, out // multiplier)
            out = groups * multiplier
        else:
            out = -(-out // groups) * groups  # a grouped conv's outputs split over its groups
            cin = inp * groups
        shape[self.channel_dim] = cin
        module = nn.Conv2d(cin, out, kernel, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, bias=self.bias, padding_mode=mode)
        key = (f"conv2d x={'x'.join(map(str, shape))} o={out} k={_fmt(kernel)} "
               f"s={_fmt(stride)} p={_fmt(padding)} d={_fmt(dilation)} g={groups} "
               f"b={int(self.bias)} m={mode}")
        return key, module, tuple(shape)


def _fmt(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _geometry(gm: Any, name: str) -> _Geometry:
    from torch import nn

    from ..meta import SHAPE

    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None or node.op != "call_module":
        raise LatencyError(f"layer {name!r} of the problem is not a module call in the graph: "
                           "pass the analyzed graph the problem was built from")
    m = gm.get_submodule(node.target)
    src = node.args[0]
    found = SHAPE.find(src) if hasattr(src, "op") else None
    if found is None:
        raise LatencyError(f"layer {name!r}: its input has no shape annotation; pass the "
                           "analyzed graph (pqcompile.build.analysis) the problem was built from")
    shape = tuple(int(d) for d in found.shape)
    bias = getattr(m, "bias", None) is not None
    if isinstance(m, nn.Linear):
        return _Geometry("linear", shape, len(shape) - 1, bias)
    if isinstance(m, nn.Conv2d):
        depthwise = m.groups > 1 and m.in_channels == m.groups
        return _Geometry("conv2d", shape, 1, bias,
                         (tuple(m.kernel_size), tuple(m.stride),
                          m.padding if isinstance(m.padding, str) else tuple(m.padding),
                          tuple(m.dilation), m.groups, m.padding_mode, depthwise,
                          m.out_channels // m.in_channels if depthwise else 1))
    raise LatencyError(f"layer {name!r} is a {type(m).__name__}; latency tables cover "
                       "Conv2d and Linear layers")


def _lowered(module: Any, shape: tuple[int, ...], spec: TargetSpec
             ) -> tuple[Any, dict, np.ndarray]:
    """The one-layer program as ``compile`` lowers a model: traced, quantized at 8/8 bits
    (calibrated on its own input), lowered to integer Relax with the target's kernels."""
    import torch

    from ..assignment import Assignment
    from ..frontend.tracer import trace
    from ..lower import lower
    from ..presets import compute_layers
    from ..quant import build_reference

    torch.manual_seed(0)
    x = torch.randn(*shape)
    gm = trace(module.eval(), (x,))
    reference = build_reference(gm, Assignment.uniform(compute_layers(gm), 8, 8), [x])
    mod, params, _ = lower(reference, target=spec)
    return mod, params, x.numpy()


def _library(mod: Any, params: Mapping[str, np.ndarray], spec: TargetSpec) -> bytes:
    """The program's shared library for ``spec``, built by :meth:`Artifact.build
    <pqcompile.runtime.artifact.Artifact.build>` as ``compile`` builds a model (the target's tuning
    records applied, its build pipeline, linked by its toolchain)."""
    from ..runtime.artifact import LIBRARY, Artifact

    return Artifact.build(mod, params, spec)._files[LIBRARY]


# --- where the programs run -----------------------------------------------------------------


class _Local:
    """Runs programs in this process on this machine's CPU."""

    def __init__(self) -> None:
        self.device = "local"

    def time(self, library: bytes, spec: TargetSpec, args: list[np.ndarray],
             timing: dict[str, Any]) -> list[float]:
        import tvm
        from tvm import relax

        from ..runtime.artifact import thread_pool_defaults

        thread_pool_defaults()  # the thread pool the artifacts run with
        with tempfile.TemporaryDirectory(prefix="pqcompile-latency-") as tmp:
            path = Path(tmp, "lib.so")
            path.write_bytes(library)
            lib = tvm.runtime.load_module(str(path))  # mapped: the file may go
        dev = tvm.cpu()
        vm = relax.VirtualMachine(lib, dev)
        return _time_vm(vm, dev, [tvm.runtime.tensor(a, device=dev) for a in args], timing)

    def close(self) -> None:
        pass


class _Remote:
    """Runs programs on a TVM RPC server (a board, or a qemu-user server here); every remote
    object is dropped on :meth:`close`, so the server is free for the next session."""

    def __init__(self, address: Any, spec: TargetSpec, key: str, session_timeout: float,
                 connect_timeout: float, device: str | None, remote: Any = None) -> None:
        from ..runtime.rpc_client import _check_arch, _connect, _remote_info

        self.address = address
        self.remote = remote if remote is not None else \
            _connect(address, key, session_timeout, connect_timeout)
        info = _remote_info(self.remote)
        if info is not None:
            _check_arch(info, spec.arch, spec.name, address)
        board = f"{info.get('node')} {info.get('machine')}" if info else str(address)
        self.board = str(info.get("board") or board) if info else board
        self.device = device or f"rpc {board}"
        self.count = 0

    def time(self, library: bytes, spec: TargetSpec, args: list[np.ndarray],
             timing: dict[str, Any]) -> list[float]:
        from tvm import relax
        from tvm.runtime import tensor

        from ..runtime.rpc_client import _first_line

        self.count += 1
        name = f"pqcompile_latency_{os.getpid()}_{self.count}.so"  # a fresh dlopen each time
        try:
            self.remote.upload(bytearray(library), name)
            lib = self.remote.load_module(name)
        except Exception as err:  # noqa: BLE001 (TVM raises many types; re-raised)
            raise LatencyError(f"the RPC server at {self.address} cannot load a program "
                               f"built for {spec.name!r}: {_first_line(err)}") from None
        dev = self.remote.cpu()
        vm = relax.VirtualMachine(lib, dev)
        return _time_vm(vm, dev, [tensor(a, device=dev) for a in args], timing)

    def close(self) -> None:
        self.remote = None
        gc.collect()


def _time_vm(vm: Any, dev: Any, args: list, timing: Mapping[str, Any]) -> list[float]:
    """Milliseconds per repeat of ``main`` after one warm-up run."""
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    timer = vm.time_evaluator("invoke_stateful", dev, number=timing["number"],
                              repeat=timing["repeat"], min_repeat_ms=timing["min_repeat_ms"])
    return [float(t) * 1e3 for t in timer("main").results]


def run_jobs(runner: Any, jobs: list[tuple[str, bytes, list[np.ndarray]]], spec: TargetSpec,
             timing: dict[str, Any], done: Any) -> None:
    """Time every ``(shape key, library, args)`` job with ``runner``, calling ``done(shape
    key, repeats)`` for each; a farm (:mod:`pqcompile.latency.farm`) runs them in parallel."""
    from ..runtime.rpc_client import _first_line

    if hasattr(runner, "run_jobs"):
        runner.run_jobs(jobs, spec, timing, done)
        return
    for shape_key, library, args in jobs:
        failure = None
        try:
            repeats = runner.time(library, spec, args, timing)
        except LatencyError as err:
            failure = str(err)
        except Exception as err:  # noqa: BLE001 (TVM raises many types; re-raised)
            failure = (f"timing the one-layer program {shape_key!r} on {runner.device} "
                       f"failed: {_first_line(err)}")
        if failure is not None:  # raised here: no remote object stays in a traceback
            raise LatencyError(failure)
        done(shape_key, repeats)


def split_farm(rpc: Any) -> tuple[str, Any] | None:
    """``(key, tracker address)`` of ``rpc="KEY@HOST:PORT"`` (a tracker's boards of a key);
    ``None`` for any other ``rpc``."""
    if not isinstance(rpc, str) or "@" not in rpc:
        return None
    from ..runtime.tracker import parse_tracker

    key, _, tracker = rpc.partition("@")
    if not key:
        raise OptionError(f"rpc {rpc!r}: KEY@HOST:PORT names the boards' key before the @ "
                          "(e.g. rpi4@10.0.0.5:9190)")
    return key, parse_tracker(tracker)


def _parse_rpc(rpc: Any) -> Any:
    from ..runtime.rpc_client import ServerAddress, parse_address

    if isinstance(rpc, ServerAddress):
        return rpc
    if isinstance(rpc, tuple) and len(rpc) == 2:
        return ServerAddress(str(rpc[0]), int(rpc[1]))
    if isinstance(rpc, str):
        return parse_address(rpc)
    raise OptionError(f"rpc must be 'HOST:PORT' (a TVM RPC server on the board), "
                      f"'{EMULATOR}' or None, got {rpc!r}")


def check_where(target: Any, rpc: Any, what: str = "rpc") -> None:
    """Fail early, naming ``what``, when a table for ``target`` cannot be measured with
    ``rpc`` (a non-native target needs a server; a malformed address)."""
    spec = get_target(target)
    flag = " (--latency-rpc on the command line)" if what == "latency_rpc" else ""
    if rpc is None:
        if spec.arch != host_arch():
            raise OptionError(
                f"target {spec.name!r} runs on {spec.arch} and this machine is {host_arch()}: "
                f"its latency table is measured there. Give {what}='HOST:PORT'{flag} of a TVM "
                f"RPC server on the board (`python -m pqcompile.runtime.rpc_server --port 9090` "
                f"there), or {what}='{EMULATOR}' to time it under "
                f"{spec.emulator or 'qemu-user'} here "
                f"(emulated times: a stand-in, not the board's speed), or {what}="
                f"'KEY@HOST:PORT' for the boards of a key on a TVM RPC tracker")
        return
    if split_farm(rpc) is not None:
        return
    if rpc == EMULATOR:
        if spec.arch == host_arch():
            raise OptionError(f"{what}='{EMULATOR}' runs another architecture under qemu-user; "
                              f"target {spec.name!r} is this machine's ({spec.arch}): give "
                              f"{what}=None to time it here")
        return
    _parse_rpc(rpc)


@contextmanager
def _runner(spec: TargetSpec, rpc: Any, key: str, session_timeout: float,
            connect_timeout: float) -> Iterator[Any]:
    if rpc is None:
        yield _Local()
        return
    farm = split_farm(rpc)
    if farm is not None:
        from .farm import Farm

        yield Farm(farm[1], farm[0], spec, session_timeout, connect_timeout)
        return
    if rpc == EMULATOR:
        from ..runtime.rpc_local import local_server

        with local_server(spec.arch) as address:
            runner = _Remote(address, spec, key, session_timeout, connect_timeout,
                             f"emulator {spec.emulator or 'qemu-' + spec.arch}")
            try:
                yield runner
            finally:
                runner.close()
        return
    runner = _Remote(_parse_rpc(rpc), spec, key, session_timeout, connect_timeout, None)
    try:
        yield runner
    finally:
        runner.close()
