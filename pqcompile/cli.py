"""Command line.

* ``pqcompile analyze --model pkg.module:factory --input-shape 1,3,224,224``: the per-layer
  cost table (output shape, MACs, parameters, BOPs) and the channel groups found, with what can
  be pruned and why not where it cannot;
* ``pqcompile compile --model ... --input-shape ... --target arm --budget bops=60x --out DIR
  [--data pkg.module:factory --finetune-steps N]``: compress and build an artifact, with the
  stages and fine-tuning progress on stderr (``--quiet`` silences them);
* ``pqcompile demo``: the Fashion-MNIST ResNet-20 end to end.
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
                          progress=not args.quiet)
    path = compiled.save(args.out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"artifact": str(path), "totals": compiled.totals,
                          "calibration": compiled.calibration,
                          "layers": compiled.layers}, indent=1, default=float))
    else:
        print(compiled.report())
        print(f"artifact written to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.budget, args.finetune_batches)
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
    c.add_argument("--quiet", action="store_true", help="no progress on stderr")
    c.add_argument("--out", required=True, help="artifact directory")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_compile)
    d = sub.add_parser("demo", help="Fashion-MNIST ResNet-20: compress, build, measure")
    d.add_argument("--out", default="pqcompile-demo")
    d.add_argument("--budget", default="bops=60x")
    d.add_argument("--finetune-batches", type=int, default=150)
    d.set_defaults(func=_demo)
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
