"""Product level: compressed builds whose accuracy is measured in the same run, against ONNX
Runtime int8 of the whole model, on the host (latency) and on aarch64 (guest instructions).

For each model of :mod:`fidelity` (pretrained weights, real held-out inputs) and each budget
(``--budgets``: BOPs, MACs or the predicted latency of :mod:`pqcompile.latency`),
``pqcompile.compile`` builds the model for batch 1 with data (FIT sensitivities, calibration
and ``--steps`` distillation QAT steps on the tuning data, as ``fidelity.py --modes data``
does), and the row records, all from this one run:

* accuracy: top-1 agreement with FP32 on the held-out inputs (one call per input through the
  built program) and task top-1 where labels exist; the same for the peer;
* the peer: ONNX Runtime static int8 (QDQ, per-channel int8 weights, uint8 activations,
  ``peers.ort_int8``) of the **whole** FP32 model, calibrated on the first 8 tuning batches;
* host latency: each build and the peer timed in ``--rounds`` interleaved rounds, batch 1,
  ``--threads`` threads; ``x ORT`` is the peer's median over the build's, ``paired`` the
  median over rounds of that ratio within a round;
* aarch64: the build lowered again for ``arm`` and ``arm-dotprod`` (``Compiled.retarget``:
  the same integers) and counted under qemu with the peer's aarch64 ONNX Runtime 1.18.1
  (:func:`pqcompile.targets.insn_count.count_instructions`, one process each, the mean of
  calls 2 to ``--runs[1]``); ``x ORT`` is the peer's count over the build's.

The issue's product goal reads off the table: >= 1.5x the peer's speed on x86 and <= 0.5x its
instructions on aarch64, at a budget whose agreement is in the same row.

    python benchmarks/product.py [--models resnet20_fashion] [--budgets bops=16x macs=1.5x macs=2x]
        [--steps 1000] [--wait-quiet 2400] [--targets arm arm-dotprod]
        [--out benchmarks/results/product.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fidelity
import peers
from timing import interleaved_rounds, paired

from pqcompile.api import compile
from pqcompile.targets.insn_count import count_instructions
from pqcompile.targets.ort_insn_count import count_onnx_instructions, qemu_cpu

PEER = "ORT int8 (whole)"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "product.json"


def top1_rows(run: Callable[[np.ndarray], np.ndarray], held_out: torch.Tensor) -> np.ndarray:
    """Top-1 of ``run`` on every held-out input, one batch-1 call each (as deployed)."""
    return np.array([int(np.asarray(run(x[None].numpy())).argmax()) for x in held_out])


def accuracy(top1: np.ndarray, fp32: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    labelled = labels >= 0
    return {"agreement": float((top1 == fp32.argmax(1)).mean()),
            "task": float((top1[labelled] == labels[labelled]).mean()) if labelled.any()
            else float("nan"), "held_out": len(top1)}


def wait_for_quiet(limit_s: float, load: float = 0.3) -> None:
    """Wait (up to ``limit_s``) until the machine's 1-minute load average falls under
    ``load``: another job sharing the cores (a test run) would time it, not the builds."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s and os.getloadavg()[0] >= load:
        time.sleep(10)
    print(f"load average {os.getloadavg()[0]:.2f} after {time.perf_counter() - start:.0f} s "
          f"of waiting", flush=True)


def speed(times: dict[str, list[list[float]]], label: str) -> dict[str, float]:
    """The build's median ms, the peer's over it, and the paired ratio (median over rounds of
    the peer's round median over the build's)."""
    mine = [t for r in times[label] for t in r]
    peer = [t for r in times[PEER] for t in r]
    return {"ms": statistics.median(mine), "peer_ms": statistics.median(peer),
            "x_peer": statistics.median(peer) / statistics.median(mine),
            "x_peer_paired": paired(times[PEER], times[label])}


def measure_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    case = fidelity.CASES[name]()
    fp32 = fidelity.fp32_logits(case.model, case.held_out)
    x1 = case.example[:1]
    rows: list[dict[str, Any]] = []
    options = {"bit_options": [tuple(int(b) for b in o.split("/")) for o in args.bit_options]
               } if args.bit_options else {}
    with tempfile.TemporaryDirectory(prefix=f"product-{name}-") as tmp:
        work = Path(tmp)
        fp32_path = peers.export_onnx(case.model.eval(), x1, work / "fp32.onnx")
        calibration = [x for _, (x, _) in zip(range(8), case.data(8))]
        int8_path = peers.ort_int8(fp32_path, work, calibration)
        peer_run = peers.ort_runner(peers.ort_session(int8_path, args.threads))
        peer_row = {"model": name, "variant": PEER, "bop_reduction": 16.0,
                    **accuracy(top1_rows(peer_run, case.held_out), fp32, case.labels)}
        print(f"{name}: {PEER} agreement {peer_row['agreement']:.4f}", flush=True)
        rows.append(peer_row)
        builds = {}
        for budget in args.budgets:
            t = time.perf_counter()
            finetune = {**case.finetune, "max_batches": args.steps} if args.steps else None
            c = compile(case.model, (x1,), target="host", budget=budget,
                        data=case.data(args.steps), pareto_points=0,
                        **({"finetune": finetune} if finetune else {}),
                        **{**case.compile_options, **options})
            label = f"pqcompile {budget}"
            row = {"model": name, "variant": label, "budget": budget,
                   "finetune_steps": args.steps, "bit_options": args.bit_options,
                   "bop_reduction": float(c.totals["bop_reduction"]),
                   "macs_kept": float(c.totals["macs"]) / float(c.totals["fp32_macs"]),
                   "compile_seconds": round(time.perf_counter() - t, 1),
                   **accuracy(top1_rows(c, case.held_out), fp32, case.labels)}
            print(f"{name}: {label} ({row['bop_reduction']:.1f}x BOPs, "
                  f"{row['macs_kept']:.0%} of the MACs) agreement {row['agreement']:.4f}, task "
                  f"{row['task']:.4f}",
                  flush=True)
            rows.append(row)
            builds[label] = c
        x = x1.numpy()
        wait_for_quiet(args.wait_quiet)
        print(f"{name}: timing on the host ({args.rounds} rounds)", flush=True)
        times = interleaved_rounds({PEER: lambda: peer_run(x),
                             **{k: (lambda c=c: c(x)) for k, c in builds.items()}},
                            args.rounds, args.calls)
        peer_row["host"] = {"ms": statistics.median([t for r in times[PEER] for t in r])}
        for row in rows[1:]:
            row["host"] = speed(times, row["variant"])
        for target in args.targets:
            cpu = qemu_cpu(target)
            runs = tuple(args.runs)
            peer_row.setdefault("aarch64", {})[target] = count_onnx_instructions(
                int8_path, [x], runs=runs, cpu=cpu, timeout=args.timeout).per_inference
            for row in rows[1:]:
                art = builds[row["variant"]].retarget(target)
                n = count_instructions(art, runs=runs, timeout=args.timeout, cpu=cpu)
                row.setdefault("aarch64", {})[target] = n.per_inference
            print(f"{name} [{target}]: counted", flush=True)
        for row in rows[1:]:
            row["aarch64_x_peer"] = {t: n / peer_row["aarch64"][t]
                                     for t, n in row.get("aarch64", {}).items()}
    return rows


def report(rows: list[dict[str, Any]], targets: list[str]) -> None:
    head = (f"{'model':18s} {'variant':24s} {'BOPs':>6s} {'MACs':>5s} {'agree':>6s} "
            f"{'task':>6s} {'host ms':>8s} {'x ORT':>6s} {'paired':>6s}")
    head += "".join(f" {t + ' insns':>18s} {'/ORT':>5s}" for t in targets)
    print("\n" + head)
    for r in rows:
        line = (f"{r['model']:18s} {r['variant']:24s} {r['bop_reduction']:6.1f} "
                f"{r.get('macs_kept', 1.0):5.0%} {r['agreement']:6.3f} {r['task']:6.3f} "
                f"{r['host']['ms']:8.3f} {r['host'].get('x_peer', 1.0):6.2f} "
                f"{r['host'].get('x_peer_paired', 1.0):6.2f}")
        for t in targets:
            line += (f" {r['aarch64'][t]:18,.0f} "
                     f"{r.get('aarch64_x_peer', {}).get(t, 1.0):5.2f}")
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20_fashion"],
                    choices=sorted(fidelity.CASES))
    ap.add_argument("--budgets", nargs="+", default=["bops=16x", "macs=1.5x", "macs=2x"],
                    help="compile() budgets, one build each")
    ap.add_argument("--steps", type=int, default=1000, help="distillation QAT steps")
    ap.add_argument("--bit-options", nargs="+", default=None, metavar="W/A",
                    help="the solver's (weight/activation) bit options besides pruning, e.g. "
                         "8/8 (default: compile's)")
    ap.add_argument("--targets", nargs="*", default=["arm", "arm-dotprod"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=200, help="timed calls per variant a round")
    ap.add_argument("--runs", type=int, nargs=2, default=[1, 3], metavar=("N1", "N2"))
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before timing, wait up to this long for a 1-minute load average "
                         "under 0.3 (the compiles may share the machine with other jobs)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    peers.set_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += measure_model(name, args)
    report(rows, args.targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/product.py " + " ".join(argv or sys.argv[1:]),
        "threads": args.threads, "batch": 1, "rounds": args.rounds, "calls": args.calls,
        "runs": args.runs, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
