"""Host latency of CNNs and a BERT encoder against torch, ONNX Runtime and TVM, in one run.

Models (``--models``): resnet18, mobilenet_v2, mobilenet_v3_large, efficientnet_b0 (torchvision)
and ``bert_minilm``, a Hugging Face ``BertModel`` of MiniLM-L6-H384's shape on ``--seq`` (128)
token ids (``bert_base`` too: ``peers.BERT_SHAPES``). Every variant is built, checked and
timed in this one process: batch 1, ``--size`` x ``--size`` (224), ``--threads`` threads for every backend (torch.set_num_threads, ONNX Runtime
intra-op threads, TVM_NUM_THREADS: the pool size each reports is written to the JSON).

Whole model (the peers, built as their users would: ``benchmarks/peers.py``):
  torch eager fp32; torch int8 (FX graph mode static PTQ, x86 engine, per-channel weights;
  for BERT, which FX cannot trace, dynamic int8 Linear layers);
  ONNX Runtime fp32; ONNX Runtime int8 (static QDQ, per-channel int8 weights, uint8
  activations); TVM fp32 (TVM's default untuned pipeline; not for BERT); pqcompile int8 (uniform 8/8) and
  pqcompile mixed+pruned (``presets.mixed_pruned``: 4/8-bit weights, 75% of each prunable
  channel group kept).
Pruned architecture (kernels compared without pruning helping either side): the float graph
  of the mixed+pruned build (channels removed, BN folded) in torch fp32/int8 and ONNX Runtime
  fp32/int8, and pqcompile int8 built from the same masks at uniform 8/8. (BERT: heads and
  FFN channels pruned.)
``--int8-only`` builds and times only the head-to-head: ONNX Runtime int8 and pqcompile int8,
whole and on the pruned architecture (whose float graph then comes from ``build.prepare``).
``--w7`` adds, for the whole model, ONNX Runtime int8 with 7-bit weights (``reduce_range``)
and pqcompile uniform 7/8: on x86 with AVX2 but no VNNI, ONNX Runtime's uint8 x int8 products
go through ``vpmaddubsw``, whose int16 pair sums can saturate at 8-bit weights (ONNX
Runtime's documentation advises ``reduce_range`` then); pqcompile's 8-bit kernels there are
exact (one instruction more per step), and at 7 bits both sides are exact with the same
instructions.

Weights are random (latency does not depend on their values; BatchNorm statistics are set on
random batches so activations keep a sane scale, ``peers.make_model``); calibration uses two
random batches of 4. Before timing, each variant's logits on ``--check-inputs`` random inputs
are compared with its float model's (the torch model, or the pruned float graph): fp32
variants must match to 1e-3 (relative); int8 ones must keep most inputs' outputs nearest to
their own input's reference (``peers.matched``) with a cosine similarity above a floor;
pqcompile's builds must also equal their integer-exact references bit for bit (for the 4/8-bit
mixed build that is the only bar: its float agreement is recorded). A variant that fails is
reported, not timed, and the run exits 1.

Each figure is the median of ``--repeat`` calls after ``--warmup`` calls, timed once every variant
of a model is built and checked, in ``--rounds`` interleaved rounds (so noise on a shared
machine falls on every variant alike, not on whichever ran during it). Each round of a variant
starts once no thread of the process runs (``timing.quiesce``: the previous backend's
spinning pool goes to sleep first; a fixed 0.1 s pause left TVM's spinning and slowed ONNX
Runtime's mobilenet_v2 2.9x) with
``--round-warmup`` untimed calls: after the pause the first few calls of every backend are up
to 2x slower (its threads wake, the core clocks up), and with a few timed calls a round they
would set the median. Ratios are against the fastest whole-model peer (torch and ONNX
Runtime, fp32 or int8) and, for the pruned architecture, the fastest peer on it: the ratio of
the medians, and ``paired``, the median over rounds of each round's ratio (the pruned
architecture's rows against its peer, the others against the whole model's), which load
that comes and goes between rounds affects less.

``--neighbour``: once the quiet rounds are done, the same variants are timed again, the same
way, while another process keeps one core busy (``neighbour.BusyNeighbour``: a tight loop
pinned to the highest-numbered core; this process stays unpinned); that scenario's table and
ratios go under ``"neighbour"`` in each model's JSON, with the neighbour's measured share of
its core. The last lines print pqcompile int8's speedup over ONNX Runtime int8 per model,
architecture and scenario (the project's goal: >= 1.15x). JSON (machine, versions, settings,
every figure and check) goes to ``--out`` (benchmarks/results/latency.json).

    python benchmarks/latency.py [--models resnet18 bert_minilm] [--size 224] [--repeat 50]
    python benchmarks/latency.py --neighbour --int8-only   # the head-to-head, quiet and busy
    python benchmarks/latency.py --quick   # smoke test: 64x64, 3 runs, latency_quick.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402 (benchmarks/ on the path first)
from peers import tvm_fp32  # noqa: E402

from pqcompile import presets  # noqa: E402
from pqcompile.assignment import Assignment  # noqa: E402
from pqcompile.build import analysis, compile_assignment, prepare  # noqa: E402
from pqcompile.lower.kernel_types import isa_for  # noqa: E402
from pqcompile.targets import get_target  # noqa: E402
from neighbour import BusyNeighbour, neighbour_core  # noqa: E402
from timing import (  # noqa: E402,F401  (check: the agreement bar, used by the tests too)
    FP32_REL_TOL,
    INT8_MIN_COSINE,
    MIN_MATCHED,
    Bench,
    check,
    paired_ratio,
    scenario_rows,
)

RESULTS = ROOT / "benchmarks" / "results"

#: the project's latency requirement: these, whole and pruned, quiet and beside a neighbour
MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "bert_minilm")

PEER = "peer"  # whole model, torch or ONNX Runtime: the ratios' base
PRUNED_PEER = "pruned peer"


def run_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    threads, text, full = args.threads, peers.is_text(name), not args.int8_only
    size = args.seq if text else args.size
    model = peers.make_model(name, size)
    g = torch.Generator().manual_seed(0)
    x = peers.draw(name, size, g)
    calib = [peers.draw(name, size, g, 4) for _ in range(2)]
    tests = [peers.draw(name, size, g).numpy() for _ in range(args.check_inputs)]
    b = Bench(args, tests, x.numpy())
    ref = [peers.torch_fp32(model)(t) for t in tests]
    print(f"\n{name}: building, checking and timing", flush=True)

    def torch_int8(m: torch.nn.Module) -> Callable:
        return peers.torch_fp32(peers.torch_int8_dynamic(m) if text else
                                peers.torch_int8(m, x, calib))

    torch_int8_label = "torch int8 (dynamic, Linear)" if text else "torch int8 (FX, x86)"

    # --- whole model ---
    onnx_path = tmp / f"{name}.onnx"
    if full:
        b.add("torch eager fp32", PEER, "fp32", lambda: peers.torch_fp32(model), ref)
        b.add(torch_int8_label, PEER, "int", lambda: torch_int8(model), ref)
        b.add("ORT fp32", PEER, "fp32", lambda: peers.ort_runner(peers.ort_session(
            peers.export_onnx(model, x, onnx_path), threads)), ref)
    else:
        peers.export_onnx(model, x, onnx_path)
    b.add("ORT int8 (QDQ static)", PEER, "int", lambda: peers.ort_runner(peers.ort_session(
        peers.ort_int8(onnx_path, tmp, calib), threads)), ref)
    gc.collect()
    if full and not text:  # TVM's untuned fp32 takes minutes on a BERT encoder
        b.add("TVM fp32 (untuned)", "tvm", "fp32", lambda: tvm_fp32(model, x), ref)
        gc.collect()

    gm = analysis(model, (x,))
    mixed = presets.mixed_pruned(gm)
    builds: dict[str, Any] = {}

    # a BERT trace is specialized to its input's shape: calibrate on the same 8 sequences,
    # one at a time (as ONNX Runtime's calibration reads them)
    pq_calib = [c[i:i + 1] for c in calib for i in range(len(c))] if text else calib

    def pq(key: str, assignment: Assignment):
        def build():
            builds[key] = compile_assignment(model, (x,), assignment, target="host",
                                             calibration=pq_calib)
            return builds[key].artifact
        return build

    def integer_reference(key: str):
        def run(t: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return builds[key].reference(torch.from_numpy(t)).numpy()
        return run

    b.add("pqcompile int8", "pqcompile", "int", pq("int8", presets.uniform(gm, 8)), ref,
          exact=integer_reference("int8"))
    if args.w7:  # 7-bit weights on both sides: exact vpmaddubsw products on AVX2
        b.add("ORT int8 (QDQ static, 7-bit weights)", "ort-w7", "int",
              lambda: peers.ort_runner(peers.ort_session(
                  peers.ort_int8(onnx_path, tmp, calib, reduce_range=True), threads)), ref)
        b.add("pqcompile 7/8", "pqcompile", "int", pq("w7", presets.uniform(gm, 7, 8)), ref,
              exact=integer_reference("w7"))
    # checked against its own pruned float graph, gated on matching its integer reference
    # (its float agreement, 4-bit weights on a random model, is recorded, not gated)
    pref: list[np.ndarray] = []

    def pruned_reference() -> list[np.ndarray]:
        pref[:] = [peers.torch_fp32(builds["mixed"].graph)(t) for t in tests]
        return pref

    if full:
        b.add("pqcompile mixed+pruned", "pqcompile", "exact", pq("mixed", mixed),
              pruned_reference, exact=integer_reference("mixed"), architecture="pruned")
        if "mixed" not in builds:
            return time_scenarios(name, b, builds, args)
        pruned = builds["mixed"].graph
    else:  # the same pruned float graph, without the 4/8-bit build
        pruned = prepare(gm, mixed)
        pref[:] = [peers.torch_fp32(pruned)(t) for t in tests]
    gc.collect()

    # --- the pruned architecture ---
    ponnx = tmp / f"{name}_pruned.onnx"
    if full:
        b.add("torch eager fp32 (pruned)", PRUNED_PEER, "fp32",
              lambda: peers.torch_fp32(pruned), pref, architecture="pruned")
        b.add(f"{torch_int8_label} (pruned)", PRUNED_PEER, "int", lambda: torch_int8(pruned),
              pref, architecture="pruned")
        b.add("ORT fp32 (pruned)", PRUNED_PEER, "fp32", lambda: peers.ort_runner(
            peers.ort_session(peers.export_onnx(pruned, x, ponnx), threads)), pref,
            architecture="pruned")
    else:
        peers.export_onnx(pruned, x, ponnx)
    b.add("ORT int8 (QDQ static) (pruned)", PRUNED_PEER, "int", lambda: peers.ort_runner(
        peers.ort_session(peers.ort_int8(ponnx, tmp, calib), threads)), pref,
        architecture="pruned")
    gc.collect()
    int8_pruned = Assignment(presets.uniform(gm, 8).bits, mixed.masks)
    b.add("pqcompile int8 (pruned)", "pqcompile", "int", pq("int8_pruned", int8_pruned), pref,
          exact=integer_reference("int8_pruned"), architecture="pruned")
    result = time_scenarios(name, b, builds, args)
    if "int8_pruned" in builds:  # the same architecture as the pruned float graph?
        shapes = [tuple(p.shape) for p in builds["int8_pruned"].graph.parameters()]
        result["pruned_graphs_identical"] = shapes == [tuple(p.shape)
                                                       for p in pruned.parameters()]
        if not result["pruned_graphs_identical"]:
            print("  WARNING: the int8 and mixed pruned builds have different shapes")
    return result


def time_scenarios(name: str, b: Bench, builds: dict[str, Any], args: argparse.Namespace
                   ) -> dict[str, Any]:
    """Times the checked variants quiet and, with ``--neighbour``, again beside a busy
    neighbour process on one core (the same builds, the same protocol); the quiet figures
    stay in the rows, the neighbour's go under ``result["neighbour"]``."""
    print(f"{name}: timing {len(b.timed)} variants, interleaved, quiet", flush=True)
    b.time_all(args.rounds)
    neighbour = None
    if args.neighbour:
        print(f"{name}: timing them again beside a busy neighbour on core "
              f"{neighbour_core()}", flush=True)
        with BusyNeighbour(kind=args.neighbour_kind) as n:
            b.time_all(args.rounds, into="neighbour")
        neighbour = summarize(name, scenario_rows(b.rows, "neighbour"), None)
        neighbour["process"] = n.record()
    b.timed.clear()
    result = summarize(name, b.rows, builds)
    if neighbour is not None:
        result["neighbour"] = neighbour
    return result


def summarize(name: str, rows: list[dict[str, Any]], builds: dict[str, Any] | None
              ) -> dict[str, Any]:
    def fastest(group: str) -> dict[str, Any] | None:
        timed = [r for r in rows if r["group"] == group and "ms" in r]
        return min(timed, key=lambda r: r["ms"]) if timed else None

    best, best_pruned = fastest(PEER), fastest(PRUNED_PEER)
    for r in rows:
        r.setdefault("architecture", "full")
        if "ms" in r and best:
            r["x_fastest_peer"] = r["ms"] / best["ms"]
            r["paired_x_fastest_peer"] = paired_ratio(r, best)
        if "ms" in r and best_pruned and r["architecture"] == "pruned":
            r["x_fastest_pruned_peer"] = r["ms"] / best_pruned["ms"]
            r["paired_x_fastest_pruned_peer"] = paired_ratio(r, best_pruned)
    out: dict[str, Any] = {"fastest_peer": best and best["label"],
                           "fastest_pruned_peer": best_pruned and best_pruned["label"],
                           "variants": rows}
    for key, label in (("int8", "pqcompile int8"), ("mixed", "pqcompile mixed+pruned"),
                       ("int8_pruned", "pqcompile int8 (pruned)")):
        if builds and key in builds:
            t = builds[key].totals
            out.setdefault("pqcompile", {})[label] = {
                "bop_reduction": t["bop_reduction"], "macs": t["macs"],
                "fp32_macs": t["fp32_macs"], "mac_fraction": t["macs"] / t["fp32_macs"],
                "weight_bytes": t["weight_bytes"], "float_ops": len(builds[key].float_ops)}
    out["vs_ort_int8"] = versus_ort(rows)
    return out


#: the head-to-head pairs: (pqcompile's int8 build, ONNX Runtime int8 on the same architecture)
HEAD_TO_HEAD = {"whole model": ("pqcompile int8", "ORT int8 (QDQ static)"),
                "pruned architecture": ("pqcompile int8 (pruned)",
                                        "ORT int8 (QDQ static) (pruned)"),
                "whole model, 7-bit weights": ("pqcompile 7/8",
                                               "ORT int8 (QDQ static, 7-bit weights)")}


def versus_ort(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """pqcompile int8 against ONNX Runtime int8 on the same architecture: how many times
    faster (ORT's median over pqcompile's; above 1: pqcompile faster) and the paired figure
    (the inverse of the median over rounds of the round ratios)."""
    by_label = {r["label"]: r for r in rows if "ms" in r}
    out = {}
    for arch, (pq, ort) in HEAD_TO_HEAD.items():
        if pq in by_label and ort in by_label:
            out[arch] = {"pqcompile_ms": by_label[pq]["ms"], "ort_ms": by_label[ort]["ms"],
                         "speedup": by_label[ort]["ms"] / by_label[pq]["ms"],
                         "paired_speedup": 1 / paired_ratio(by_label[pq], by_label[ort])}
    return out


def print_versus(name: str, result: dict[str, Any]) -> None:
    """One line per scenario and architecture: pqcompile int8's speedup over ORT int8."""
    for scenario, res in (("quiet", result), ("busy neighbour", result.get("neighbour"))):
        for arch, v in (res or {}).get("vs_ort_int8", {}).items():
            busy = ""
            if scenario != "quiet":
                busy = f" (its core {res['process']['busy_fraction']:.0%} busy)"
            print(f"  {name} {scenario}{busy}, {arch}: pqcompile int8 {v['pqcompile_ms']:.2f} ms,"
                  f" ORT int8 {v['ort_ms']:.2f} ms: {v['speedup']:.2f}x faster "
                  f"(paired {v['paired_speedup']:.2f}x)")


def print_table(name: str, result: dict[str, Any], args: argparse.Namespace,
                scenario: str = "quiet") -> None:
    shape = f"{args.seq} tokens" if peers.is_text(name) else f"{args.size}x{args.size}"
    print(f"\n{name} ({shape}, batch 1, {args.threads} threads, median of {args.repeat} after "
          f"{args.warmup} warm-up, {args.round_warmup} more each round; {scenario})")
    print(f"  {'':36s} {'ms':>9s}  {'x fastest peer':>14s}  {'x fastest pruned peer':>21s}"
          f"  {'paired':>7s}")
    rows = result["variants"]
    for arch, title in (("full", "whole model"), ("pruned", "pruned architecture")):
        extra = ""
        pq = result.get("pqcompile", {}).get("pqcompile mixed+pruned")
        if arch == "pruned" and pq:
            extra = f" ({pq['mac_fraction']:.0%} of the MACs)"
        print(f"  -- {title}{extra}")
        for r in rows:
            if r.get("architecture", "full") != arch:
                continue
            if "ms" not in r:
                print(f"  {r['label']:36s} {'--':>9s}  not timed: {r.get('error')}")
                continue
            pr = f"{r['x_fastest_pruned_peer']:21.2f}" if "x_fastest_pruned_peer" in r else ""
            paired = r.get("paired_x_fastest_pruned_peer", r.get("paired_x_fastest_peer"))
            # no ratio where every peer of the architecture failed its check
            fastest = f"{r['x_fastest_peer']:14.2f}" if "x_fastest_peer" in r else f"{'--':>14s}"
            print(f"  {r['label']:36s} {r['ms']:9.2f}  {fastest}  "
                  f"{pr or ' ' * 21}  {'--' if paired is None else format(paired, '7.2f'):>7s}")
    print(f"  fastest peer: {result['fastest_peer']}; on the pruned architecture: "
          f"{result['fastest_pruned_peer']}")
    for label, t in result.get("pqcompile", {}).items():
        print(f"  {label}: {t['bop_reduction']:.1f}x fewer BOPs than fp32, "
              f"{t['mac_fraction']:.0%} of the MACs")


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    host = get_target("host").tvm_target()
    return {"cpu": cpu, "arch": platform.machine(), "logical_cpus": os.cpu_count(),
            "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
            "host_target": str(host), "kernel_isa": isa_for(host).name,
            "threads": threads, "torch_threads": torch.get_num_threads(),
            "ort_intra_op_threads": threads, "tvm_threads": peers.tvm_threads(),
            "tvm_bind_threads": os.environ.get("TVM_BIND_THREADS", "1 (TVM's default)"),
            "torch_quantized_engine": "x86", "platform": platform.platform()}


def versions() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torchvision
    import tvm

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__,
            "numpy": np.__version__, "pqcompile_commit": commit}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help=f"torchvision names or {sorted(peers.BERT_SHAPES)} ({' '.join(MODELS)})")
    ap.add_argument("--size", type=int, default=None, help="input height and width (224)")
    ap.add_argument("--seq", type=int, default=None, help="a BERT encoder's tokens (128)")
    ap.add_argument("--neighbour", action="store_true",
                    help="time every variant again beside a busy process pinned to one core")
    ap.add_argument("--neighbour-kind", choices=("python", "numpy"), default="python",
                    help="the neighbour's loop: pure Python arithmetic, or small numpy matmuls")
    ap.add_argument("--int8-only", action="store_true",
                    help="only ORT int8 and pqcompile int8, whole and on the pruned "
                         "architecture (the head-to-head; a shorter run)")
    ap.add_argument("--w7", action="store_true",
                    help="also 7-bit weights on both sides: ONNX Runtime's reduce_range, "
                         "pqcompile uniform 7/8 (on AVX2 without VNNI, ORT's default uint8 x "
                         "int8 products may saturate vpmaddubsw; at 7 bits neither side can)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per variant (50)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (5)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds, the calls split among them (10)")
    ap.add_argument("--round-warmup", type=int, default=None,
                    help="untimed calls at the start of each timing round (2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-inputs", type=int, default=8,
                    help="random inputs the agreement checks use")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 64x64, 3 timed calls after 1, latency_quick.json")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (benchmarks/results/latency.json, latency_quick.json "
                         "with --quick)")
    args = ap.parse_args(argv)
    quick = {"size": 64, "seq": 32, "repeat": 3, "warmup": 1, "rounds": 1, "round_warmup": 1}
    full = {"size": 224, "seq": 128, "repeat": 50, "warmup": 5, "rounds": 10,
            "round_warmup": 2}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = RESULTS / ("latency_quick.json" if args.quick else "latency.json")

    peers.set_threads(args.threads)  # before anything starts TVM's thread pool
    info = {"machine": machine(args.threads), "versions": versions(),
            "settings": {"models": args.models, "size": args.size, "seq": args.seq,
                         "batch": 1, "neighbour": args.neighbour and {
                             "core": neighbour_core(), "kind": args.neighbour_kind},
                         "int8_only": args.int8_only,
                         "repeat": args.repeat, "warmup": args.warmup,
                         "rounds": args.rounds, "round_warmup": args.round_warmup,
                         "threads": args.threads, "quick": args.quick,
                         "calibration": "2 random batches of 4",
                         "check_inputs": args.check_inputs,
                         "weights": "random (torchvision init, seed 0), BatchNorm statistics "
                                    "from 4 random batches of 8; BERT: Hugging Face init",
                         "check_floors": {"fp32_rel_max_abs_diff": FP32_REL_TOL,
                                          "int_min_cosine": INT8_MIN_COSINE,
                                          "int_matched": MIN_MATCHED}},
            "load_average_start": os.getloadavg()}
    print(f"{info['machine']['cpu']} ({info['machine']['kernel_isa']} kernels), "
          f"{args.threads} threads (torch "
          f"{info['machine']['torch_threads']}, TVM {info['machine']['tvm_threads']}, ORT "
          f"{args.threads}); load average {info['load_average_start'][0]:.2f}", flush=True)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pqcompile-latency-") as tmp:
        for name in args.models:
            results[name] = run_model(name, args, Path(tmp))
            gc.collect()
    info["load_average_end"] = os.getloadavg()
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    info["models"] = results
    for name, result in results.items():
        print_table(name, result, args)
        if "neighbour" in result:
            print_table(name, result["neighbour"], args, "beside a busy neighbour")
    print("\npqcompile int8 against ONNX Runtime int8 (goal: >= 1.15x faster)")
    for name, result in results.items():
        print_versus(name, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1))
    print(f"\nwrote {args.out} ({info['wall_s']:.0f} s; load average "
          f"{info['load_average_end'][0]:.2f} at the end)")
    failed = [(n, r["label"]) for n, res in results.items() for r in res["variants"]
              if "ms" not in r]
    if failed:
        print(f"not timed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
