"""Guest instructions per inference on aarch64: TVM fp32 against pqcompile's integer builds.

For resnet18 and mobilenet_v2 (torchvision, random weights, batch 1) three artifacts are built
for target ``arm`` (aarch64 +neon, Cortex-A72 class) and counted under qemu-aarch64 with QEMU's
TCG instruction-count plugin (:func:`pqcompile.targets.insn_count.count_instructions`: two
processes calling the model ``--runs`` times, single-threaded; the difference over the
difference in calls is exact to the instruction here):

- TVM fp32: BN folded into the convs (``torch.fx.experimental.optimization.fuse``), the
  torch.export frontend, TVM's default (untuned) pipeline, as ``benchmarks/latency.py`` builds
  its TVM fp32 baseline;
- pqcompile int8: every layer 8/8 (``presets.uniform``), no pruning;
- pqcompile mixed+pruned: ``presets.mixed_pruned`` (4/8-bit, 75% of channel groups kept).

Prints instructions per inference and how many times fewer than TVM fp32 each variant executes,
and writes JSON (default ``benchmarks/results/insn_count.json``). Needs the aarch64 sysroot and
the plugin (``bash scripts/setup.sh``). Emulation runs at ~2e8 guest instructions/s; every count
costs two process start-ups (~12 s each) plus ``runs[0] + runs[1]`` inferences. Both models at
224x224 took 6 min here (5 min of it one core), 64x64 about 4 min.

    python benchmarks/insn_count.py [--models resnet18 mobilenet_v2] [--size 224] [--runs 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pqcompile import presets
from pqcompile.artifact import Artifact
from pqcompile.build import analysis, compile_assignment
from pqcompile.targets.insn_count import count_instructions

TARGETS = ("arm", "arm-dotprod")
BASELINE = "TVM fp32 (untuned)"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "insn_count.json"


def tvm_fp32_artifact(model: torch.nn.Module, x: torch.Tensor, target: str) -> Artifact:
    """TVM's own fp32 build of ``model``: BN folded, torch.export frontend, default pipeline."""
    from torch.fx.experimental.optimization import fuse
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    folded = fuse(model)  # conv+BN pairs folded, eval mode
    with torch.no_grad():
        expected = folded(x).numpy()
    ep = torch.export.export(folded, (x,))
    mod, params = relax.frontend.detach_params(
        from_exported_program(ep, keep_params_as_input=True))
    names = [p.name for p in mod["main"].params[1:]]
    weights = {name: p.numpy() for name, p in zip(names, params["main"])}
    if len(weights) != len(names):
        raise RuntimeError("the exported module's parameter names are not unique; cannot "
                           "package its weights by name")
    return Artifact.build(mod, weights, target, reference_sample=([x.numpy()], [expected]),
                          sample_tolerance=(1e-4, 1e-4), extra={"variant": BASELINE})


def variants(name: str, size: int, target: str) -> dict[str, tuple[Artifact, dict[str, Any]]]:
    """The three artifacts of one model, each with its cost totals (MACs, BOPs, bytes)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, size, size)
    calib = [torch.randn(4, 3, size, size) for _ in range(2)]
    out = {BASELINE: (tvm_fp32_artifact(model, x, target), {})}
    gm = analysis(model, (x,))
    for label, assignment in (("pqcompile int8", presets.uniform(gm, 8)),
                              ("pqcompile mixed+pruned", presets.mixed_pruned(gm))):
        compiled = compile_assignment(model, (x,), assignment, target=target,
                                      calibration=calib)
        out[label] = (compiled.artifact, dict(compiled.totals))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS),
                    help="aarch64 targets (pqcompile names); TVM fp32 is built for each too")
    ap.add_argument("--runs", type=int, nargs=2, default=[1, 2], metavar=("N1", "N2"),
                    help="calls in the two counted processes (default 1 2)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per process")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name, target in [(m, t) for m in args.models for t in args.targets]:
        t0 = time.perf_counter()
        built = variants(name, args.size, target)
        print(f"{name}: built {len(built)} artifacts in {time.perf_counter() - t0:.0f} s",
              flush=True)
        for label, (art, totals) in built.items():
            t1 = time.perf_counter()
            count = count_instructions(art, runs=tuple(args.runs), timeout=args.timeout)
            seconds = time.perf_counter() - t1
            print(f"  {label:26s} {count.per_inference:>16,.0f} instructions/inference "
                  f"(counted in {seconds:.0f} s)", flush=True)
            rows.append({"model": name, "variant": label, **count.to_dict(),
                         "count_seconds": seconds, "macs": totals.get("macs"),
                         "bops": totals.get("bops"),
                         "bop_reduction": totals.get("bop_reduction"),
                         "nbytes": art.nbytes})
    for name, target in [(m, t) for m in args.models for t in args.targets]:
        mine = [r for r in rows if r["model"] == name and r["target"] == target]
        base = next(r["per_inference"] for r in mine if r["variant"] == BASELINE)
        for r in mine:
            r["fewer_than_tvm_fp32"] = base / r["per_inference"]
        print(f"\n{name} ({args.size}x{args.size}, batch 1, target {target!r}, 1 thread, "
              f"qemu-aarch64 guest instructions)")
        print(f"  {'variant':26s} {'instructions/inference':>24s} {'x fewer than TVM fp32':>22s}")
        for r in mine:
            print(f"  {r['variant']:26s} {r['per_inference']:>24,.0f} "
                  f"{r['fewer_than_tvm_fp32']:>21.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "size": args.size, "batch": 1, "targets": args.targets, "runs": args.runs,
        "counter": "qemu-aarch64 -plugin libinsn.so,inline=on (QEMU tests/plugin/insn.c)",
        "numpy": np.__version__, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
