"""Where a model's time goes, layer by layer: pqcompile int8 against ONNX Runtime int8.

pqcompile's program is timed per Relax VM call (the VM's instrument hook: each kernel, pack,
fused elementwise op and VM builtin; the hook's own cost falls mostly on the short builtins),
ONNX Runtime's per node (``SessionOptions.enable_profiling``). Both run ``--calls`` calls on the
same input, ``--threads`` threads each; each row is the **minimum** over the calls of that
call's time (the least disturbed one on a shared machine) and its median. Rows of one pqcompile
function called several times a call (layers of one shape share a kernel) are summed per call.
Uniform int8 at 224x224 on random weights, as ``latency.py`` builds it (``peers.make_model``).

    python benchmarks/layer_profile.py [--model resnet18] [--threads 1] [--calls 40] [--pruned]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402 (benchmarks/ on the path first)

from pqcompile import presets  # noqa: E402
from pqcompile.assignment import Assignment  # noqa: E402
from pqcompile.build import analysis, compile_assignment, prepare  # noqa: E402


def pqcompile_rows(artifact, x, calls: int) -> list[tuple[str, int, float, float]]:
    """``(function, calls per call, min ms, median ms)`` per VM function, in call order (VM
    builtins together)."""
    for _ in range(5):
        artifact(x)
    vm, _ = artifact._session()
    seq: list[tuple[str, float]] = []
    start = [0.0]

    def hook(func, symbol, before, ret, *args):
        if before:
            start[0] = time.perf_counter()
        else:
            seq.append((symbol, time.perf_counter() - start[0]))
        return 0

    vm.set_instrument(hook)
    runs = []
    for _ in range(calls):
        seq.clear()
        artifact(x)
        runs.append(list(seq))
    vm.set_instrument(lambda *a: 0)
    rows: dict[str, list] = {}
    for i, (symbol, _) in enumerate(runs[0]):
        key = "vm.builtin.*" if symbol.startswith("vm.builtin") else symbol
        times = [r[i][1] * 1e3 for r in runs]
        row = rows.setdefault(key, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += min(times)
        row[2] += statistics.median(times)
    return [(k, n, lo, med) for k, (n, lo, med) in rows.items()]


def ort_rows(model_path: Path, x, threads: int, calls: int, tmp: Path
             ) -> list[tuple[str, str, float, float]]:
    """``(node, op, min ms, median ms)`` per ONNX Runtime node, in run order."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "ort_profile")
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(calls + 5):
        session.run(None, {name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, list] = collections.defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][:-len("_kernel_time")]
            nodes[node].append(e["dur"] / 1e3)
            ops[node] = e["args"].get("op_name", "")
    return [(k, ops[k], min(v[5:] or v), statistics.median(v[5:] or v))
            for k, v in nodes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--pruned", action="store_true",
                        help="the pruned architecture of latency.py (presets.mixed_pruned's "
                             "kept channels, int8), on both sides")
    args = parser.parse_args()
    peers.set_threads(args.threads)
    model = peers.make_model(args.model, args.size)
    g = torch.Generator().manual_seed(0)
    x = peers.draw(args.model, args.size, g)
    calib = [peers.draw(args.model, args.size, g, 4) for _ in range(2)]
    gm = analysis(model, (x,))
    assignment, peer = presets.uniform(gm, 8), model
    if args.pruned:
        mixed = presets.mixed_pruned(gm)
        assignment = Assignment(assignment.bits, mixed.masks)
        peer = prepare(gm, mixed)  # the pruned float graph ONNX Runtime runs
    built = compile_assignment(model, (x,), assignment, target="host", calibration=calib)
    rows = pqcompile_rows(built.artifact, x.numpy(), args.calls)
    print(f"pqcompile int8, {args.model}, {args.threads} thread(s): sum of minima "
          f"{sum(r[2] for r in rows):.3f} ms (medians {sum(r[3] for r in rows):.3f})")
    for key, n, lo, med in rows:
        label = built.lowering.kernels.get(key.rsplit("_", 1)[0], "")
        print(f"  {lo:8.3f} min {med:8.3f} med  x{n:<3d} {key} {label}")
    with tempfile.TemporaryDirectory(prefix="layer-profile-") as tmp:
        tmp_path = Path(tmp)
        fp32 = peers.export_onnx(peer, x, tmp_path / f"{args.model}.onnx")
        int8 = peers.ort_int8(fp32, tmp_path, calib)
        nodes = ort_rows(int8, x.numpy(), args.threads, args.calls, tmp_path)
    print(f"ONNX Runtime int8: sum of minima {sum(r[2] for r in nodes):.3f} ms "
          f"(medians {sum(r[3] for r in nodes):.3f})")
    for node, op, lo, med in nodes:
        print(f"  {lo:8.3f} min {med:8.3f} med  {op:24s} {node}")


if __name__ == "__main__":
    main()
