"""Host latency of resnet18 and mobilenet_v2, every variant measured in this one run.

Variants: torch eager fp32; TVM fp32 (the torch.export frontend, TVM's default untuned
pipeline); pqcompile uniform int8 (no pruning); pqcompile mixed 4/8-bit with pruned channel
groups. Batch 1, 224x224 by default, the process's threads pinned to ``--threads``. Prints
medians in ms and ratios against torch eager fp32. The weights are random (latency does not
depend on their values); calibration uses random batches for the same reason.

    python benchmarks/latency.py [--models resnet18 mobilenet_v2] [--size 224] [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pqcompile import presets  # noqa: E402
from pqcompile.build import analysis, compile_assignment  # noqa: E402


def median_ms(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def tvm_fp32(model, x):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from pqcompile.targets import get_target

    ep = torch.export.export(model, (x,))
    mod, params = relax.frontend.detach_params(
        from_exported_program(ep, keep_params_as_input=True))
    ex = tvm.compile(mod, get_target("host").tvm_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy())] + list(params["main"])
    return lambda: vm["main"](*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, args.size, args.size)
        calib = [torch.randn(4, 3, args.size, args.size) for _ in range(2)]
        with torch.no_grad():
            eager = median_ms(lambda: model(x), args.repeat)
        t0 = time.perf_counter()
        fp32 = median_ms(tvm_fp32(model, x), args.repeat)
        variants = {"torch eager fp32": eager, "TVM fp32 (untuned)": fp32}
        gm = analysis(model, (x,))
        for label, assignment in (("pqcompile int8", presets.uniform(gm, 8)),
                                  ("pqcompile mixed+pruned", presets.mixed_pruned(gm))):
            compiled = compile_assignment(model, (x,), assignment, target="host",
                                          calibration=calib)
            xn = x.numpy()
            variants[label] = median_ms(lambda: compiled.artifact(xn), args.repeat)
            variants[label + " BOPs x"] = compiled.totals["bop_reduction"]
        rows.append((name, variants, time.perf_counter() - t0))
    for name, v, _ in rows:
        print(f"\n{name} ({args.size}x{args.size}, batch 1, {args.threads} threads)")
        base = v["torch eager fp32"]
        for label, ms in v.items():
            if label.endswith("BOPs x"):
                continue
            print(f"  {label:28s} {ms:10.2f} ms   {ms / base:7.2f}x eager time")
        print(f"  BOP reduction: int8 {v['pqcompile int8 BOPs x']:.1f}x, "
              f"mixed+pruned {v['pqcompile mixed+pruned BOPs x']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
