"""Command line.

* ``pqcompile analyze --model pkg.module:factory --input-shape 1,3,224,224``: the per-layer
  cost table (output shape, MACs, parameters, BOPs) and the channel groups found, with what can
  be pruned and why not where it cannot;
* ``pqcompile compile --model ... --input-shape ... --target arm --budget bops=60x --out DIR
  [--data pkg.module:factory --finetune-steps N]``: compress and build an artifact, with the
  stages and fine-tuning progress on stderr (``--quiet`` silences them), ``--plots DIR``
  for the report's plots, ``--onnx PATH`` for an ONNX QDQ export;
* ``pqcompile report DIR [--plots OUT]``: a saved artifact's per-layer table (bits, kept
  channels, MACs, BOPs, bytes, sensitivity) with totals and ratios, and its PNG plots (the
  candidates' accuracy-vs-BOPs Pareto front, per-layer bits and kept channels);
* ``pqcompile demo``: the Fashion-MNIST ResNet-20 end to end;
* ``pqcompile deploy DIR --rpc HOST:PORT``: run an artifact on a board over TVM RPC, check its
  outputs against the reference sample and time it (exit 1 when the outputs differ).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import PQCompileError


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


def _analyze(args: argparse.Namespace) -> int:
    from .report import analysis_table, analyze

    model = load_factory(args.model)()
    torch.manual_seed(args.seed)
    example = torch.randn(parse_shape(args.input_shape))
    gm = analyze(model, (example,))
    if args.json:
        print(json.dumps(analysis_table(gm, as_dict=True), indent=1))
    else:
        print(analysis_table(gm))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from .api import compile as pq_compile

    model = load_factory(args.model, "--model")().eval()
    torch.manual_seed(args.seed)
    example = torch.randn(parse_shape(args.input_shape))
    data = None
    if args.data:
        data = load_factory(args.data, "--data")()
    elif args.finetune_steps:
        raise ValueError("--finetune-steps needs --data (a factory of (inputs, target) batches)")
    elif not args.quiet:
        print("no --data: data-free sensitivities, calibration on the example input only "
              "(a random tensor of --input-shape); give --data pkg.module:factory returning "
              "(inputs, target) batches for calibrated accuracy", file=sys.stderr)
    finetune = ({"epochs": 1, "max_batches": args.finetune_steps, "lr": args.lr}
                if args.finetune_steps else None)
    compiled = pq_compile(model, (example,), target=args.target, budget=args.budget,
                          solver=args.solver, seed=args.seed, data=data, finetune=finetune,
                          pareto_points=args.pareto_points, tune=args.tune,
                          latency_rpc=args.latency_rpc, progress=not args.quiet)
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
    from .deploy import deploy, parse_address

    address = parse_address(args.rpc)
    result = deploy(args.artifact, address.host, address.port, repeat=args.repeat,
                    number=args.number, check=False, session_timeout=args.session_timeout)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    elif not args.quiet or result.outputs_match is False:
        print(result.summary())
    if result.outputs_match is False:
        print(f"pqcompile deploy: the outputs on the board differ from the reference sample "
              f"(max abs diff {result.max_abs_diff:.6g})", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pqcompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="trace a model and print its costs and channel groups")
    p.add_argument("--model", required=True, help="package.module:factory returning nn.Module")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_analyze)
    c = sub.add_parser("compile", help="compress to a budget and build an artifact")
    c.add_argument("--model", required=True, help="package.module:factory returning nn.Module")
    c.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,224,224")
    c.add_argument("--target", default="arm", help="host, arm, arm-dotprod or a TVM tag")
    c.add_argument("--budget", required=True, help="e.g. bops=60x or bops=60x,weight_bytes=1MB")
    c.add_argument("--solver", default="ilp", help="ilp, greedy, uniform4, uniform8, prune8, "
                   "or a searching solver (sbs, ajpq, fitcompress, picpq; these need --data)")
    c.add_argument("--data", help="package.module:factory returning (inputs, target) batches "
                   "(sensitivity, calibration, fine-tuning)")
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
    c.add_argument("--onnx", metavar="PATH", help="also write the compressed model as an ONNX "
                   "QDQ graph")
    c.add_argument("--quiet", action="store_true", help="no progress on stderr, no table")
    c.add_argument("--out", required=True, help="artifact directory")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")
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
    r.add_argument("--rpc", required=True, metavar="HOST:PORT", help="the board's TVM RPC "
                   "server, e.g. 192.168.1.20:9090")
    r.add_argument("--repeat", type=int, default=10, help="timed repeats (default 10)")
    r.add_argument("--number", type=int, default=10, help="runs averaged per repeat")
    r.add_argument("--session-timeout", type=float, default=600.0, help="seconds, 0: none")
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
    r.add_argument("--quiet", action="store_true", help="print nothing unless outputs differ")
    r.set_defaults(func=_deploy)
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
