"""Host latency of resnet18 and mobilenet_v2 against torch, ONNX Runtime and TVM, in one run.

Every variant is built, checked and timed in this one process: batch 1, ``--size`` x
``--size`` (224), ``--threads`` threads for every backend (torch.set_num_threads, ONNX Runtime
intra-op threads, TVM_NUM_THREADS: the pool size each reports is written to the JSON).

Whole model (the peers, built as their users would: ``benchmarks/peers.py``):
  torch eager fp32; torch int8 (FX graph mode static PTQ, x86 engine, per-channel weights);
  ONNX Runtime fp32; ONNX Runtime int8 (static QDQ, per-channel int8 weights, uint8
  activations); TVM fp32 (TVM's default untuned pipeline); pqcompile int8 (uniform 8/8) and
  pqcompile mixed+pruned (``presets.mixed_pruned``: 4/8-bit weights, 75% of each prunable
  channel group kept).
Pruned architecture (kernels compared without pruning helping either side): the float graph
  of the mixed+pruned build (channels removed, BN folded) in torch fp32/int8 and ONNX Runtime
  fp32/int8, and pqcompile int8 built from the same masks at uniform 8/8.

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
starts after a 0.1 s pause (the previous backend's spinning threads go to sleep) with
``--round-warmup`` untimed calls: after the pause the first few calls of every backend are up
to 2x slower (its threads wake, the core clocks up), and with a few timed calls a round they
would set the median. Ratios are against the fastest whole-model peer (torch and ONNX
Runtime, fp32 or int8) and, for the pruned architecture, the fastest peer on it: the ratio of
the medians, and ``paired``, the median over rounds of each round's ratio (the pruned
architecture's rows against its peer, the others against the whole model's), which load
that comes and goes between rounds affects less. JSON (machine, versions, settings, every figure and
check) goes to ``--out`` (benchmarks/results/latency.json).

    python benchmarks/latency.py [--models resnet18 mobilenet_v2] [--size 224] [--repeat 50]
    python benchmarks/latency.py --quick   # smoke test: 64x64, 3 runs, latency_quick.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
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
from pqcompile.build import analysis, compile_assignment  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# The agreement a variant needs before it is timed (see the module docstring). Measured on
# these random-weight models (8 inputs): int8 builds reach cosine 0.75-0.999 and matched 1.0
# (mobilenet_v2 int8 is the lowest: 0.75-0.88 at 64x64, 0.96-0.97 at 224x224); a model that
# ignores its input matches ~1/8. Cosine alone is weak here: two *different* inputs' logits
# have cosine 0.93-0.97 at 224x224 (a large input-independent part), hence ``matched``.
FP32_REL_TOL = 1e-3
INT8_MIN_COSINE = 0.5
MIN_MATCHED = 0.5

PEER = "peer"  # whole model, torch or ONNX Runtime: the ratios' base
PRUNED_PEER = "pruned peer"


def median_ms(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    return timings(fn, repeat, warmup)["ms"]


def timings(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> dict[str, Any]:
    """Median, min and max of ``repeat`` calls after ``warmup`` calls, in ms, and every call."""
    time.sleep(0.2)  # let the previous backend's spinning worker threads go to sleep
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "times_ms": [round(t, 4) for t in times]}


def check(kind: str, reference: list[np.ndarray], outputs: list[np.ndarray],
          exact: list[np.ndarray] | None = None) -> tuple[dict[str, Any], str | None]:
    """The agreement figures and, when they fail ``kind``'s bar, why."""
    a = peers.agreement(reference, outputs)
    if exact is not None:
        a["max_abs_diff_vs_integer_reference"] = float(max(
            np.abs(np.asarray(o, np.float64) - np.asarray(e, np.float64)).max()
            for o, e in zip(outputs, exact)))
        if a["max_abs_diff_vs_integer_reference"] != 0:
            return a, "differs from its integer-exact reference"
    if not all(np.isfinite(o).all() for o in outputs):
        return a, "non-finite outputs"
    if kind == "fp32" and a["rel_max_abs_diff"] > FP32_REL_TOL:
        return a, f"relative max abs diff {a['rel_max_abs_diff']:.2e} > {FP32_REL_TOL}"
    if kind == "exact" and exact is None:
        raise ValueError("an 'exact' check needs the integer-exact outputs")
    if kind == "int" and (a["min_cosine"] < INT8_MIN_COSINE or a["matched"] < MIN_MATCHED):
        return a, (f"cosine {a['min_cosine']:.3f} (floor {INT8_MIN_COSINE}), matched "
                   f"{a['matched']:.2f} (floor {MIN_MATCHED})")
    return a, None


class Bench:
    """Builds and checks the variants of one model, in order; :meth:`time_all` times them."""

    def __init__(self, args: argparse.Namespace, tests: list[np.ndarray], x: np.ndarray):
        self.args, self.tests, self.x = args, tests, x
        self.rows: list[dict[str, Any]] = []
        self.timed: list[tuple[dict[str, Any], Callable[[], Any]]] = []

    def add(self, label: str, group: str, kind: str, build: Callable[[], Callable],
            reference: list[np.ndarray] | Callable[[], list[np.ndarray]],
            exact: Callable[[np.ndarray], np.ndarray] | None = None,
            **extra: Any) -> Callable | None:
        row: dict[str, Any] = {"label": label, "group": group, **extra}
        self.rows.append(row)
        print(f"  {label} ...", end="", flush=True)
        try:
            t = time.perf_counter()
            fn = build()
            row["build_s"] = round(time.perf_counter() - t, 2)
            outs = [fn(x) for x in self.tests]
            if callable(reference):  # made from the build
                reference = reference()
            row["check"], row["error"] = check(
                kind, reference, outs, [exact(x) for x in self.tests] if exact else None)
        except Exception as e:  # noqa: BLE001  (a peer that cannot be built is reported)
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f" FAILED: {row['error']}", flush=True)
            return None
        if row["error"]:
            print(f" CHECK FAILED, not timed: {row['error']}", flush=True)
            return None
        x = self.x
        for _ in range(self.args.warmup):
            fn(x)
        self.timed.append((row, lambda: fn(x)))
        print(f" checked (built in {row['build_s']:.1f} s)", flush=True)
        return fn

    def time_all(self, rounds: int) -> None:
        """Time every checked variant in ``rounds`` interleaved rounds (each variant's calls
        spread over the whole run, so a burst of noise on a shared machine hits them alike);
        each row gets the median, min and max of its ``repeat`` calls."""
        per = max(1, -(-self.args.repeat // rounds))
        times: dict[int, list[float]] = {id(row): [] for row, _ in self.timed}
        for _ in range(rounds):
            for row, call in self.timed:
                time.sleep(0.1)  # let the previous backend's spinning worker threads sleep
                for _ in range(self.args.round_warmup):  # then wake its own (and the core)
                    call()
                for _ in range(per):
                    t = time.perf_counter()
                    call()
                    times[id(row)].append((time.perf_counter() - t) * 1e3)
        for row, _ in self.timed:
            ts = times[id(row)]
            row.update({"ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
                        "times_ms": [round(t, 4) for t in ts], "calls_per_round": per})
            print(f"  {row['label']:34s} {row['ms']:9.2f} ms", flush=True)
        self.timed.clear()


def run_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    size, threads = args.size, args.threads
    model = peers.make_model(name, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=g)
    calib = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
    tests = [torch.randn(1, 3, size, size, generator=g).numpy() for _ in range(args.check_inputs)]
    xn = x.numpy()
    b = Bench(args, tests, xn)
    ref = [peers.torch_fp32(model)(t) for t in tests]
    print(f"\n{name}: building, checking and timing", flush=True)

    # --- whole model ---
    b.add("torch eager fp32", PEER, "fp32", lambda: peers.torch_fp32(model), ref)
    b.add("torch int8 (FX, x86)", PEER, "int",
          lambda: peers.torch_fp32(peers.torch_int8(model, x, calib)), ref)
    onnx_path = tmp / f"{name}.onnx"
    b.add("ORT fp32", PEER, "fp32", lambda: peers.ort_runner(peers.ort_session(
        peers.export_onnx(model, x, onnx_path), threads)), ref)
    b.add("ORT int8 (QDQ static)", PEER, "int", lambda: peers.ort_runner(peers.ort_session(
        peers.ort_int8(onnx_path, tmp, calib), threads)), ref)
    gc.collect()
    b.add("TVM fp32 (untuned)", "tvm", "fp32", lambda: tvm_fp32(model, x), ref)
    gc.collect()

    gm = analysis(model, (x,))
    mixed = presets.mixed_pruned(gm)
    builds: dict[str, Any] = {}

    def pq(key: str, assignment: Assignment):
        def build():
            builds[key] = compile_assignment(model, (x,), assignment, target="host",
                                             calibration=calib)
            return builds[key].artifact
        return build

    def integer_reference(key: str):
        def run(t: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return builds[key].reference(torch.from_numpy(t)).numpy()
        return run

    b.add("pqcompile int8", "pqcompile", "int", pq("int8", presets.uniform(gm, 8)), ref,
          exact=integer_reference("int8"))
    # checked against its own pruned float graph, gated on matching its integer reference
    # (its float agreement, 4-bit weights on a random model, is recorded, not gated)
    pref: list[np.ndarray] = []

    def pruned_reference() -> list[np.ndarray]:
        pref[:] = [peers.torch_fp32(builds["mixed"].graph)(t) for t in tests]
        return pref

    b.add("pqcompile mixed+pruned", "pqcompile", "exact", pq("mixed", mixed), pruned_reference,
          exact=integer_reference("mixed"), architecture="pruned")
    if "mixed" not in builds:
        b.time_all(args.rounds)
        return summarize(name, b.rows, builds)
    pruned = builds["mixed"].graph
    gc.collect()

    # --- the pruned architecture ---
    b.add("torch eager fp32 (pruned)", PRUNED_PEER, "fp32", lambda: peers.torch_fp32(pruned),
          pref, architecture="pruned")
    b.add("torch int8 (FX, x86) (pruned)", PRUNED_PEER, "int",
          lambda: peers.torch_fp32(peers.torch_int8(pruned, x, calib)), pref,
          architecture="pruned")
    ponnx = tmp / f"{name}_pruned.onnx"
    b.add("ORT fp32 (pruned)", PRUNED_PEER, "fp32", lambda: peers.ort_runner(peers.ort_session(
        peers.export_onnx(pruned, x, ponnx), threads)), pref, architecture="pruned")
    b.add("ORT int8 (QDQ static) (pruned)", PRUNED_PEER, "int", lambda: peers.ort_runner(
        peers.ort_session(peers.ort_int8(ponnx, tmp, calib), threads)), pref,
        architecture="pruned")
    gc.collect()
    int8_pruned = Assignment(presets.uniform(gm, 8).bits, mixed.masks)
    b.add("pqcompile int8 (pruned)", "pqcompile", "int", pq("int8_pruned", int8_pruned), pref,
          exact=integer_reference("int8_pruned"), architecture="pruned")
    print(f"{name}: timing {len(b.timed)} variants, interleaved", flush=True)
    b.time_all(args.rounds)
    result = summarize(name, b.rows, builds)
    if "int8_pruned" in builds:  # the same architecture as the mixed+pruned build?
        shapes = [tuple(p.shape) for p in builds["int8_pruned"].graph.parameters()]
        result["pruned_graphs_identical"] = shapes == [tuple(p.shape)
                                                       for p in pruned.parameters()]
        if not result["pruned_graphs_identical"]:
            print("  WARNING: the int8 and mixed pruned builds have different shapes")
    return result


def paired_ratio(row: dict[str, Any], base: dict[str, Any]) -> float:
    """The median over timing rounds of the row's round median over ``base``'s in the same
    round: the two ran seconds apart, so load that comes and goes between rounds (this
    host's medians move by 10-30% from round to round) falls on both."""
    def rounds(r: dict[str, Any]) -> list[float]:
        per, ts = r["calls_per_round"], r["times_ms"]
        return [statistics.median(ts[i:i + per]) for i in range(0, len(ts), per)]

    return statistics.median(a / b for a, b in zip(rounds(row), rounds(base)))


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
    return out


def print_table(name: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{name} ({args.size}x{args.size}, batch 1, {args.threads} threads, median of "
          f"{args.repeat} after {args.warmup} warm-up, {args.round_warmup} more each round)")
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
            paired = r.get("paired_x_fastest_pruned_peer", r["paired_x_fastest_peer"])
            print(f"  {r['label']:36s} {r['ms']:9.2f}  {r['x_fastest_peer']:14.2f}  "
                  f"{pr or ' ' * 21}  {paired:7.2f}")
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
    return {"cpu": cpu, "arch": platform.machine(), "logical_cpus": os.cpu_count(),
            "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
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
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--size", type=int, default=None, help="input height and width (224)")
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
    quick = {"size": 64, "repeat": 3, "warmup": 1, "rounds": 1, "round_warmup": 1}
    full = {"size": 224, "repeat": 50, "warmup": 5, "rounds": 10, "round_warmup": 2}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = RESULTS / ("latency_quick.json" if args.quick else "latency.json")

    peers.set_threads(args.threads)  # before anything starts TVM's thread pool
    info = {"machine": machine(args.threads), "versions": versions(),
            "settings": {"models": args.models, "size": args.size, "batch": 1,
                         "repeat": args.repeat, "warmup": args.warmup,
                         "rounds": args.rounds, "round_warmup": args.round_warmup,
                         "threads": args.threads, "quick": args.quick,
                         "calibration": "2 random batches of 4",
                         "check_inputs": args.check_inputs,
                         "weights": "random (torchvision init, seed 0), BatchNorm statistics "
                                    "from 4 random batches of 8",
                         "check_floors": {"fp32_rel_max_abs_diff": FP32_REL_TOL,
                                          "int_min_cosine": INT8_MIN_COSINE,
                                          "int_matched": MIN_MATCHED}},
            "load_average_start": os.getloadavg()}
    print(f"{info['machine']['cpu']}, {args.threads} threads (torch "
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
