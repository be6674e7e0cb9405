"""Command line.

* ``pqcompile analyze --model pkg.module:factory --input-shape 1,3,224,224``: the per-layer
  cost table (output shape, MACs, parameters, BOPs) and the channel groups found, with what can
  be pruned and why not where it cannot;
* ``pqcompile compile --model ... --input-shape ... --target arm --budget bops=60x --out DIR
  [--data pkg.module:factory --finetune-steps N]``: compress and build an artifact, with the
  stages and fine-tuning progress on stderr (``--quiet`` silences them), ``--plots DIR``
  for the report's plots, ``--onnx PATH`` for an ONNX QDQ export; the artifact is written
  either way, and the exit status is 3 when the built model is over its budget (a baseline
  solver such as ``uniform4`` does not search for it);
* ``pqcompile report DIR [--plots OUT]``: a saved artifact's per-layer table (bits, kept
  channels, MACs, BOPs, bytes, sensitivity) with totals and ratios, and its PNG plots (the
  candidates' accuracy-vs-BOPs Pareto front, per-layer bits and kept channels);
* ``pqcompile demo``: the Fashion-MNIST ResNet-20 end to end;
* ``pqcompile deploy DIR --rpc HOST:PORT``: run an artifact on a board over TVM RPC, check its
  outputs against the reference sample and time it (exit 1 when the outputs differ);
* ``pqcompile board [--emulate aarch64] --port N [--tracker HOST:PORT --key NAME]``: a TVM
  RPC server to deploy to: this machine's, or an emulated aarch64 board (qemu-user with the
  sysroot's Python and TVM), registered with a tracker under a key where given;
* ``pqcompile tracker --port N``: a TVM RPC tracker for a farm of boards (``deploy`` and
  ``compile``'s latency tables take ``--tracker HOST:PORT --key NAME``; docs/scaling.md);
  ``compile --ddp`` under torchrun trains data-parallel (:mod:`pqcompile.distributed`).

torch and TVM are imported by the subcommands, not here: ``--help`` and argument errors answer
at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .cli_farm import add_board_flags, add_tracker_parser, board_flags
from .errors import PQCompileError

# as pqcompile.runtime.rpc_server prints it (not imported: it is a script)
LISTENING = "listening on"

EXIT_OVER_BUDGET = 3  # compile: the artifact was written but misses its budget (2: an error)


def load_factory(spec: str, option: str = "--model") -> Callable[[], Any]:
    """``"package.module:factory"`` to the callable; a clear error for every way it can fail."""
    if ":" not in spec:
        raise ValueError(f"{option} {spec!r}: expected 'package.module:factory', e.g. "
                         "'torchvision.models:resnet18' or 'pqcompile.models:resnet20'")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"{option} {spec!r}: cannot import {mod_name!r}: {exc}") from exc
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"{option} {spec!r}: {mod_name} has no callable {attr!r}")
    return fn


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"--input-shape {text!r}: expected positive integers separated by "
                         "commas, e.g. 1,3,224,224")
    return shape


def warn(message: str) -> None:
    """A warning on stderr, shown whatever --quiet says."""
    print(f"pqcompile: warning: {message}", file=sys.stderr)


def load_model(spec: str) -> Any:
    """The model ``--model`` names, with a warning where its weights are random."""
    model = load_factory(spec, "--model")()
    if spec.split(":", 1)[0].split(".")[0] == "torchvision":
        warn(f"--model {spec} builds the architecture with random weights (torchvision "
             f"loads pretrained ones only when asked, and nothing is downloaded here): "
             f"accuracy and calibration figures mean nothing for a real model; give a factory "
             f"of your own that loads your trained weights")
    return model


def example_input(args: argparse.Namespace, need: bool = True) -> Any:
    """The example input: ``--input FILE.npy``, else a random normal tensor of
    ``--input-shape`` (seeded by ``--seed``; only its shape matters for analysis, and compile
    says loudly when it is calibrated on), else ``None`` when ``need`` is false."""
    import numpy as np
    import torch

    if args.input:
        try:
            array = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--input {args.input!r}: cannot read a .npy array ({exc}); save "
                             f"one with numpy.save(path, array)") from None
        if args.input_shape and tuple(array.shape) != parse_shape(args.input_shape):
            raise ValueError(f"--input {args.input!r} has shape {tuple(array.shape)} and "
                             f"--input-shape says {args.input_shape}; give one of the two")
        return torch.from_numpy(np.ascontiguousarray(array))
    if not args.input_shape:
        if need:
            raise ValueError("give --input FILE.npy (a real input, saved with numpy.save) or "
                             "--input-shape, e.g. 1,3,224,224")
        return None
    torch.manual_seed(args.seed)
    return torch.randn(parse_shape(args.input_shape))


def _analyze(args: argparse.Namespace) -> int:
    from .report import analysis_table, analyze

    model = load_model(args.model)
    example = example_input(args)
    gm = analyze(model, (example,))
    if args.json:
        print(json.dumps(analysis_table(gm, as_dict=True), indent=1))
    else:
        print(analysis_table(gm))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from .api import compile as pq_compile
    from .solvers.verdict import totals_verdict

    from . import distributed

    if args.ddp and not distributed.init("nccl" if args.device and "cuda" in args.device
                                         else "gloo"):
        raise ValueError("--ddp runs under torchrun: torchrun --nproc_per_node N -m "
                         "pqcompile.cli compile ... --ddp")
    quiet = args.quiet or not distributed.builds_here()
    model = load_model(args.model).eval()
    example = example_input(args, need=not args.data)
    data = None
    if args.data:
        data = load_factory(args.data, "--data")()
    elif args.finetune_steps:
        raise ValueError("--finetune-steps needs --data (a factory of (inputs, target) batches)")
    elif args.input:
        if not args.quiet:
            print(f"no --data: data-free sensitivities, activations calibrated on --input "
                  f"{args.input} only; give --data pkg.module:factory returning (inputs, "
                  f"target) batches for calibrated accuracy", file=sys.stderr)
    else:
        warn(f"no --data and no --input: activations are calibrated on a RANDOM normal tensor "
             f"of shape {tuple(example.shape)} (seed {args.seed}), so their ranges are those of "
             f"noise, not of your data, and the artifact's accuracy is unknown; pass --input "
             f"x.npy (a real input saved with numpy.save) or --data pkg.module:factory "
             f"returning (inputs, target) batches")
    finetune = ({"epochs": 1, "max_batches": args.finetune_steps, "lr": args.lr}
                if args.finetune_steps else None)
    rpc = args.latency_rpc
    if args.tracker:
        rpc = f"{args.key}@{args.tracker}"  # the boards of --key from the tracker
    compiled = pq_compile(model, None if example is None else (example,), target=args.target,
                          budget=args.budget, solver=args.solver, seed=args.seed, data=data,
                          finetune=finetune, pareto_points=args.pareto_points, tune=args.tune,
                          latency_rpc=rpc, progress=not quiet, device=args.device)
    if compiled is None:  # a data-parallel rank other than 0: rank 0 builds and saves
        return 0
    path = compiled.save(args.out, overwrite=args.overwrite)
    plots = compiled.plots(args.plots) if args.plots else []
    if args.onnx:
        compiled.export_onnx(args.onnx)
    if args.json:
        print(json.dumps({"artifact": str(path), "totals": compiled.totals,
                          "calibration": compiled.calibration, "timings": compiled.timings,
                          "tuning": vars(compiled.tuning) if compiled.tuning else None,
                          "layers": compiled.layers,
                          "candidates": compiled.artifact.manifest["extra"]["candidates"],
                          "plots": [str(p) for p in plots], "onnx": args.onnx},
                         indent=1, default=float))
    elif not args.quiet:
        print(compiled.report())
        if plots:
            print("plots: " + ", ".join(str(p) for p in plots))
        if args.onnx:
            print(f"ONNX QDQ model written to {args.onnx}")
        if compiled.tuning is not None:
            print(compiled.tuning)
        print(f"artifact written to {path}")
    verdict = totals_verdict(compiled.budget, compiled.totals, compiled.solution)
    if verdict.status == "over":
        print(f"pqcompile compile: the artifact in {path} is {verdict.describe()} (solver "
              f"{args.solver!r}); exit status {EXIT_OVER_BUDGET}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import artifact_report

    out = artifact_report(args.artifact, plots=args.plots, as_dict=args.json)
    print(json.dumps(out, indent=1) if args.json else out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, args.budget, args.finetune_batches,
                      log=(lambda *a, **k: None) if args.quiet or args.json else print,
                      progress=not args.quiet)
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from .runtime.deploy import deploy, parse_address

    if bool(args.rpc) == bool(args.tracker):
        raise ValueError("give the board: --rpc HOST:PORT, or --tracker HOST:PORT --key NAME")
    address = parse_address(args.rpc) if args.rpc else None
    result = deploy(args.artifact, address and address.host, address and address.port,
                    repeat=args.repeat, number=args.number, check=False,
                    session_timeout=args.session_timeout, tracker=args.tracker, key=args.key)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    elif not args.quiet or result.outputs_match is False:
        print(result.summary())
    if result.outputs_match is False:
        print(f"pqcompile deploy: the outputs on the board differ from the reference sample "
              f"(max abs diff {result.max_abs_diff:.6g})", file=sys.stderr)
        return 1
    return 0


def _board(args: argparse.Namespace) -> int:
    """Serve TVM RPC sessions until interrupted: this machine's server, or an emulated
    board."""
    if not args.emulate:
        from .runtime import rpc_server

        print(f"this machine as a board; deploy with `pqcompile deploy DIR --rpc "
              f"HOST:PORT` (the port is on the next line); Ctrl-C stops it", flush=True)
        return rpc_server.main(["--host", args.host, "--port", str(args.port)]
                               + board_flags(args))
    import signal
    import time

    from .runtime.rpc_local import local_server

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and a plain kill both stop the emulated server with this process (SIGINT is
    # ignored in a process started in the background by a non-interactive shell)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with local_server(args.emulate, args.port, host=args.host, tracker=args.tracker,
                      key=args.key, name=args.name) as address:
        print(f"emulated {args.emulate} board (qemu-user, the sysroot's Python and TVM) "
              f"{LISTENING} {address}; deploy with `pqcompile deploy DIR --rpc {address}`; "
              f"latencies are emulation times, not a board's; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pqcompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="trace a model and print its costs and channel groups")
    p.add_argument("--model", required=True, help="package.module:factory returning nn.Module")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (a random "
                   "tensor: costs depend on the shape only)")
    p.add_argument("--input", metavar="FILE.npy", help="the example input as a .npy array "
                   "(instead of --input-shape)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_analyze)
    c = sub.add_parser("compile", help="compress to a budget and build an artifact",
                       epilog=f"exit status: 0 built within the budget, 2 an error (nothing "
                       f"built), {EXIT_OVER_BUDGET} built (artifact written) but over the budget")
    c.add_argument("--model", required=True, help="package.module:factory returning nn.Module")
    c.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224: the "
                   "compiled program's input shape, batch size included; without --data or "
                   "--input its random values are calibrated on (a warning says so)")
    c.add_argument("--input", metavar="FILE.npy", help="a real example input saved with "
                   "numpy.save: its shape is the program's, and without --data the "
                   "activations are calibrated on it")
    c.add_argument("--target", default="arm", help="host, arm, arm-dotprod or a TVM tag")
    c.add_argument("--budget", required=True, help="e.g. bops=60x or bops=60x,weight_bytes=1MB")
    c.add_argument("--solver", default="ilp", help="ilp, greedy, uniform4, uniform8, prune8, "
                   "or a searching solver (sbs, ajpq, fitcompress, picpq; these need --data)")
    c.add_argument("--data", help="package.module:factory returning (inputs, target) batches "
                   "(sensitivity, calibration, fine-tuning); without --input/--input-shape the "
                   "example input is the first sample of its first batch")
    c.add_argument("--finetune-steps", type=int, default=0, help="QAT steps on --data")
    c.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    c.add_argument("--pareto-points", type=int, default=4, help="candidates of the predicted "
                   "front measured on --data for the report's Pareto plot (0: none)")
    c.add_argument("--plots", metavar="DIR", help="write the report's PNG plots to DIR")
    c.add_argument("--tune", type=int, default=0, metavar="TRIALS", help="MetaSchedule trials "
                   "for kernels the target's tuning database lacks (~1.5 s each; 0: reuse only)")
    c.add_argument("--latency-rpc", metavar="HOST:PORT", help="for a latency_ms budget on "
                   "another architecture: the TVM RPC server of the board that times the layers, "
                   "or 'emulator' (qemu-user here: emulated times)")
    c.add_argument("--device", help="where the training side runs (cpu, cuda, cuda:1)")
    c.add_argument("--ddp", action="store_true", help="data-parallel under torchrun")
    c.add_argument("--tracker", metavar="HOST:PORT", help="time the latency table on the "
                   "boards of --key from this TVM RPC tracker, in parallel")
    c.add_argument("--key", default="", help="the boards' key on --tracker")
    c.add_argument("--onnx", metavar="PATH", help="also write the compressed model as an ONNX "
                   "QDQ graph")
    c.add_argument("--quiet", action="store_true", help="no progress on stderr, no table")
    c.add_argument("--out", required=True, help="artifact directory")
    c.add_argument("--overwrite", action="store_true", help="replace what --out holds (an "
                   "artifact, or other files of the same names)")
    c.add_argument("--seed", type=int, default=0, help="seed of the solvers, fine-tuning and "
                   "the random example input (default 0)")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout (totals, "
                   "layers, candidates, timings) instead of the table")
    c.set_defaults(func=_compile)
    d = sub.add_parser("demo", help="Fashion-MNIST ResNet-20: compress, build, measure")
    d.add_argument("--out", default="pqcompile-demo")
    d.add_argument("--budget", default="bops=60x")
    d.add_argument("--finetune-batches", type=int, default=150)
    d.add_argument("--quiet", action="store_true", help="no progress, no log lines")
    d.add_argument("--json", action="store_true", help="the measured figures as JSON")
    d.set_defaults(func=_demo)
    rp = sub.add_parser("report", help="a saved artifact's per-layer table and plots")
    rp.add_argument("artifact", metavar="DIR", help="artifact directory (pqcompile compile --out)")
    rp.add_argument("--plots", metavar="OUT", help="write pareto.png and layers.png to OUT")
    rp.add_argument("--json", action="store_true", help="layers, totals, candidates as JSON")
    rp.set_defaults(func=_report)
    r = sub.add_parser("deploy", help="run an artifact on a board over TVM RPC: check, time")
    r.add_argument("artifact", metavar="DIR", help="artifact directory (pqcompile compile --out)")
    r.add_argument("--rpc", metavar="HOST:PORT", help="the board's TVM RPC "
                   "server, e.g. 192.168.1.20:9090")
    r.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker (instead of "
                   "--rpc): a free board of --key")
    r.add_argument("--key", default="", help="the board's key (on --tracker)")
    r.add_argument("--repeat", type=int, default=10, help="timed repeats (default 10)")
    r.add_argument("--number", type=int, default=10, help="runs averaged per repeat")
    r.add_argument("--session-timeout", type=float, default=600.0, help="seconds, 0: none")
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
    r.add_argument("--quiet", action="store_true", help="print nothing unless outputs differ")
    r.set_defaults(func=_deploy)
    b = sub.add_parser("board", help="a TVM RPC server to deploy to: this machine, or an "
                       "emulated aarch64 board")
    b.add_argument("--emulate", metavar="ARCH", choices=["aarch64"], help="run the server "
                   "for ARCH under qemu-user with the sysroot's Python and TVM (aarch64), a "
                   "stand-in for a board")
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0: every interface, which lets anyone who reaches the "
                   "port run code here)")
    b.add_argument("--port", type=int, default=9090, help="port (default 9090; 0: any free "
                   "one, printed)")
    add_board_flags(b)
    b.set_defaults(func=_board)
    add_tracker_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PQCompileError, ValueError, TypeError) as exc:
        print(f"pqcompile {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
