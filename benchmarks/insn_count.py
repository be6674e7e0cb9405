"""Guest instructions per inference on aarch64: ONNX Runtime and TVM against pqcompile.

For resnet18 and mobilenet_v2 (torchvision, random weights, batch 1), for each aarch64 target
(``arm``: +neon, Cortex-A72 class; ``arm-dotprod``: +dotprod, Cortex-A76 class), the variants
below are counted under qemu-aarch64 with pqcompile's TCG instruction-count plugin
(:func:`pqcompile.targets.insn_count.count_instructions` and, for ONNX Runtime,
:func:`pqcompile.targets.ort_insn_count.count_onnx_instructions`: one process calling the
model ``--runs[1]`` times, single-threaded, marks around each call; the mean of calls
``runs[0] + 1`` to ``runs[1]``). Every process runs on the qemu CPU model of the target
(``-cpu cortex-a72`` / ``cortex-a76``): ONNX Runtime picks its kernels from the CPU's features
(sdot on the A76 class), pqcompile's and TVM's code is fixed at compile time.

- TVM fp32: BN folded into the convs (``torch.fx.experimental.optimization.fuse``), the
  torch.export frontend, TVM's default (untuned) pipeline, as ``benchmarks/latency.py`` builds
  its TVM fp32 baseline;
- ONNX Runtime 1.18.1 fp32 and int8 (the peer users would deploy): the model exported to ONNX
  on the host (``peers.export_onnx``) and, for int8, quantized there by
  ``onnxruntime.quantization`` (``peers.ort_int8``: static QDQ, per-channel int8 weights, uint8
  activations, MinMax calibrated on the same batches as pqcompile); the ``.onnx`` files run in
  aarch64 ONNX Runtime in the sysroot's Python, CPU provider, all graph optimizations, 1 thread;
- pqcompile int8: every layer 8/8 (``presets.uniform``), no pruning;
- the pruned architecture: ``presets.mixed_pruned`` keeps 75% of every prunable channel group;
  ONNX Runtime gets that architecture as a physically smaller model (``PruneChannels`` on the
  traced graph, the same kept channels, exported and quantized like the whole model);
  pqcompile mixed+pruned compiles the same assignment (4/8-bit weights, 8-bit activations).

Prints instructions per inference, how many times fewer than ONNX Runtime int8 of the same
architecture (whole or pruned) and than TVM fp32 each variant executes, and writes JSON
(default ``benchmarks/results/insn_count.json``). Needs the aarch64 sysroot, ONNX Runtime for it
and the plugin (``bash scripts/setup.sh``). Emulation runs at ~2e8 guest instructions/s; every
count costs one process start-up (~12 s for TVM, ~3 s for ONNX Runtime) plus ``runs[1]``
inferences.

    nice -n 10 python benchmarks/insn_count.py [--models resnet18 mobilenet_v2] [--size 224]
        [--targets arm arm-dotprod] [--runs 1 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402

from pqcompile import presets  # noqa: E402
from pqcompile.runtime.artifact import Artifact  # noqa: E402
from pqcompile.build import analysis, compile_assignment  # noqa: E402
from pqcompile.passes import PruneChannels  # noqa: E402
from pqcompile.targets.insn_count import count_instructions  # noqa: E402
from pqcompile.targets.ort_insn_count import count_onnx_instructions, qemu_cpu  # noqa: E402

TARGETS = ("arm", "arm-dotprod")
BASELINE = "TVM fp32 (untuned)"
ORT_FP32, ORT_INT8 = "ORT fp32", "ORT int8 QDQ"
PRUNED = " (pruned arch)"
PQ_INT8, PQ_MIXED = "pqcompile int8", "pqcompile mixed+pruned"
# Row order of the printed tables; the ratio column divides by the ORT int8 row of the same
# architecture (whole model or pruned).
ORDER = (BASELINE, ORT_FP32, ORT_INT8, PQ_INT8, ORT_FP32 + PRUNED, ORT_INT8 + PRUNED, PQ_MIXED)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "insn_count.json"


def workload(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """The random-weight model, its batch-1 input and the calibration batches every quantizer
    (pqcompile and ONNX Runtime) uses."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, size, size)
    calib = [torch.randn(4, 3, size, size) for _ in range(2)]
    return model, x, calib


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


def pruned_architecture(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` with the channels ``presets.mixed_pruned`` drops removed for real: the dense,
    smaller fp32 network pqcompile's mixed+pruned build computes (before quantization)."""
    gm = analysis(model, (x,))
    assignment = presets.mixed_pruned(gm)
    return PruneChannels(assignment.masks)(copy.deepcopy(gm)).graph_module.eval()


def ort_models(model: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor],
               work: Path) -> dict[str, Path]:
    """The ONNX files ONNX Runtime runs: fp32 and int8 QDQ, of the whole and the pruned
    architecture. Each fp32 export is checked on the host against its torch module."""
    out: dict[str, Path] = {}
    for suffix, net in (("", model), (PRUNED, pruned_architecture(model, x))):
        stem = "pruned" if suffix else "whole"
        fp32 = peers.export_onnx(net, x, work / f"{stem}.onnx")
        with torch.no_grad():
            want = net(x).numpy()
        got = peers.ort_runner(peers.ort_session(fp32, 1))(x.numpy())
        if not np.allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max())):
            raise RuntimeError(f"the ONNX export of the {stem} model does not compute it "
                               f"(max |diff| {float(np.abs(got - want).max()):.3g})")
        out[ORT_FP32 + suffix] = fp32
        out[ORT_INT8 + suffix] = peers.ort_int8(fp32, work, calib)
    return out


def variants(model: torch.nn.Module, x: torch.Tensor, calib: list[torch.Tensor], target: str
             ) -> dict[str, tuple[Artifact, dict[str, Any]]]:
    """The TVM and pqcompile artifacts of one model, each with its cost totals."""
    out = {BASELINE: (tvm_fp32_artifact(model, x, target), {})}
    gm = analysis(model, (x,))
    for label, assignment in ((PQ_INT8, presets.uniform(gm, 8)),
                              (PQ_MIXED, presets.mixed_pruned(gm))):
        compiled = compile_assignment(model, (x,), assignment, target=target,
                                      calibration=calib)
        out[label] = (compiled.artifact, dict(compiled.totals))
    return out


def count_model(name: str, size: int, targets: list[str], runs: tuple[int, int],
                timeout: float) -> list[dict[str, Any]]:
    """Every variant of one model, counted for every target (on its qemu CPU model)."""
    model, x, calib = workload(name, size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=f"insn-{name}-") as tmp:
        onnx_files = ort_models(model, x, calib, Path(tmp))
        for target in targets:
            cpu = qemu_cpu(target)
            t0 = time.perf_counter()
            built = variants(model, x, calib, target)
            print(f"{name} [{target}, qemu -cpu {cpu or 'max'}]: built {len(built)} artifacts "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
            jobs = [(label, "artifact", art, totals) for label, (art, totals) in built.items()]
            jobs += [(label, "onnx", path, {}) for label, path in onnx_files.items()]
            for label, kind, what, totals in sorted(jobs, key=lambda j: ORDER.index(j[0])):
                t1 = time.perf_counter()
                if kind == "artifact":
                    count = count_instructions(what, runs=runs, timeout=timeout, cpu=cpu)
                    nbytes = what.nbytes
                else:
                    count = count_onnx_instructions(what, [x.numpy()], runs=runs, cpu=cpu,
                                                    timeout=timeout)
                    nbytes = what.stat().st_size
                seconds = time.perf_counter() - t1
                print(f"  {label:30s} {count.per_inference:>16,.0f} instructions/inference "
                      f"(counted in {seconds:.0f} s)", flush=True)
                rows.append({"model": name, "variant": label, **count.to_dict(),
                             "target": target, "qemu_cpu": cpu or "max",
                             "count_seconds": seconds, "macs": totals.get("macs"),
                             "bops": totals.get("bops"),
                             "bop_reduction": totals.get("bop_reduction"), "nbytes": nbytes})
    return rows


def report(rows: list[dict[str, Any]], models: list[str], targets: list[str], size: int) -> None:
    """Adds the ratio columns to ``rows`` and prints one table per model and target."""
    for name, target in [(m, t) for m in models for t in targets]:
        mine = [r for r in rows if r["model"] == name and r["target"] == target]
        by = {r["variant"]: r["per_inference"] for r in mine}
        for r in mine:
            pruned = r["variant"] == PQ_MIXED or r["variant"].endswith(PRUNED)
            r["fewer_than_ort_int8"] = by[ORT_INT8 + (PRUNED if pruned else "")] \
                / r["per_inference"]
            r["fewer_than_ort_int8_whole"] = by[ORT_INT8] / r["per_inference"]
            r["fewer_than_tvm_fp32"] = by[BASELINE] / r["per_inference"]
        print(f"\n{name} ({size}x{size}, batch 1, target {target!r}, qemu -cpu "
              f"{mine[0]['qemu_cpu']}, 1 thread, qemu-aarch64 guest instructions)")
        print(f"  {'variant':30s} {'instructions/inference':>24s} {'x fewer than ORT int8':>22s}"
              f" {'x fewer than TVM fp32':>22s}")
        for r in mine:
            print(f"  {r['variant']:30s} {r['per_inference']:>24,.0f} "
                  f"{r['fewer_than_ort_int8']:>21.2f}x {r['fewer_than_tvm_fp32']:>21.2f}x")
    print("\n(x fewer than ORT int8: against ONNX Runtime int8 of the same architecture, the "
          "whole model or the pruned one)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS),
                    help="aarch64 targets (pqcompile names); every peer is counted for each")
    ap.add_argument("--runs", type=int, nargs=2, default=[1, 2], metavar=("N1", "N2"),
                    help="the counted process makes N2 calls; the result is the mean of "
                         "calls N1+1 to N2 (default 1 2)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per process")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    import onnxruntime

    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += count_model(name, args.size, args.targets, tuple(args.runs), args.timeout)
    report(rows, args.models, args.targets, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "size": args.size, "batch": 1, "targets": args.targets, "runs": args.runs,
        "counter": "qemu-aarch64 -plugin libpqcount.so (scripts/qemu_plugin/pqcount.c): "
                   "marks around each call in one process",
        "numpy": np.__version__, "onnxruntime_host_quantizer": onnxruntime.__version__,
        "onnxruntime_aarch64": "1.18.1", "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
