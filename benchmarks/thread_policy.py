"""Which TVM thread-pool setting holds up next to a busy neighbour without losing the quiet figure.

TVM's pool reads its settings from the environment once, when it starts (the first parallel
kernel in the process), so each setting runs in a fresh process: it loads the same saved
pqcompile int8 artifact and the same ONNX Runtime int8 (static QDQ) model, and times the two
interleaved (A/B rounds, ``--rounds`` of ``--calls`` calls after 2 untimed ones), first on the
quiet machine, then with a :class:`neighbour.BusyNeighbour` on one core. The figures are the
medians of all calls and ``paired``, the median over rounds of the round's pqcompile / ORT
ratio (below 1: pqcompile faster).

The settings (TVM 0.27's ``src/runtime/thread_pool.cc`` and ``threading_backend.cc``):
``TVM_NUM_THREADS`` (pool size; the main thread runs task 0), ``TVM_BIND_THREADS`` (pin workers
to cores; pqcompile's default is 0), ``TVM_THREAD_POOL_SPIN_COUNT`` (how many ``sched_yield``
rounds an idle worker spins before it sleeps on a condition variable; TVM's default 300000),
``TVM_EXCLUDE_WORKER0`` (0: the main thread only hands out tasks and waits, a worker runs task 0);
and pqcompile's ``PQCOMPILE_THREAD_POLICY`` (``pqcompile/runtime/threads.py``: ``adaptive``, the
default, runs a call on the whole pool or on 1 thread, whichever its probes find faster;
``fixed``: always the whole pool).

    python benchmarks/thread_policy.py [--models resnet18 mobilenet_v2] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: label -> the environment that setting runs under (on top of TVM_NUM_THREADS=2 and
#: pqcompile's defaults)
FIXED = {"PQCOMPILE_THREAD_POLICY": "fixed"}
POLICIES: dict[str, dict[str, str]] = {
    "adaptive (pqcompile's default)": {},
    "fixed: 2 threads, unpinned, spin 300000": FIXED,
    "fixed, pinned (TVM's default)": {**FIXED, "TVM_BIND_THREADS": "1"},
    "fixed, spin 0 (sleep at once)": {**FIXED, "TVM_THREAD_POOL_SPIN_COUNT": "0"},
    "fixed, spin 20000": {**FIXED, "TVM_THREAD_POOL_SPIN_COUNT": "20000"},
    "fixed, main thread only waits": {**FIXED, "TVM_EXCLUDE_WORKER0": "0"},
    "1 thread": {"TVM_NUM_THREADS": "1"},
}


def build(name: str, size: int, work: Path) -> Path:
    """The saved artifact (uniform 8/8), the ORT int8 model and the input, under work/name."""
    import numpy as np
    import torch

    import peers
    from pqcompile import presets
    from pqcompile.build import analysis, compile_assignment

    out = work / name
    if (out / "art").is_dir():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = peers.make_model(name, size)
    x, calib = peers.example_inputs(name, size)
    np.save(out / "x.npy", x.numpy())
    peers.ort_int8(peers.export_onnx(model, x, out / "m.onnx"), out, calib)
    gm = analysis(model, (x,))
    c = compile_assignment(model, (x,), presets.uniform(gm, 8), target="host",
                           calibration=calib)
    c.artifact.save(out / "art")
    return out


def child(directory: Path, rounds: int, calls: int, threads: int) -> dict[str, Any]:
    """Runs in the setting's own process: quiet rounds, then rounds beside a busy neighbour."""
    import numpy as np

    import peers
    from neighbour import BusyNeighbour
    from timing import interleaved_rounds, paired
    from pqcompile.runtime.artifact import Artifact, thread_pool_defaults

    thread_pool_defaults()
    x = np.load(directory / "x.npy")
    art = Artifact.load(directory / "art")
    ort = peers.ort_runner(peers.ort_session(directory / "m.int8.onnx", threads))
    fns = {"pqcompile": lambda: art(x), "ort": lambda: ort(x)}
    for fn in fns.values():
        fn()

    def timed() -> dict[str, Any]:
        per_round = interleaved_rounds(fns, rounds, calls)
        out = {k: statistics.median(t for r in v for t in r) for k, v in per_round.items()}
        out["paired"] = paired(per_round["pqcompile"], per_round["ort"])
        return out

    quiet = timed()
    with BusyNeighbour() as n:
        busy = timed()
    import tvm

    return {"quiet": quiet, "neighbour": busy, "neighbour_process": n.record(),
            "tvm_threads": int(tvm.get_global_func("runtime.NumThreads")())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", nargs="+", default=None, help="labels of POLICIES to run")
    ap.add_argument("--work", type=Path, default=None, help="keep the builds here (reused)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "thread_policy.json")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.calls, args.threads)))
        return 0
    policies = {k: v for k, v in POLICIES.items()
                if args.policies is None or k in args.policies}
    results: dict[str, Any] = {"settings": vars(args) | {"work": str(args.work), "out": None,
                                                         "child": None},
                               "load_average_start": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="pqcompile-pool-") as tmp:
        work = args.work or Path(tmp)
        for name in args.models:
            directory = build(name, args.size, work)
            rows = results["models"][name] = {}
            for label, env in policies.items():
                env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), **env}
                run = subprocess.run(
                    [sys.executable, __file__, "--child", str(directory), "--rounds",
                     str(args.rounds), "--calls", str(args.calls), "--threads",
                     str(args.threads)], env=env, capture_output=True, text=True, check=False)
                if run.returncode:
                    print(f"{name} {label}: failed\n{run.stderr[-2000:]}")
                    return 1
                r = rows[label] = json.loads(run.stdout.strip().splitlines()[-1])
                q, b = r["quiet"], r["neighbour"]
                print(f"{name:14s} {label:54s} quiet {q['pqcompile']:7.2f} / ORT {q['ort']:6.2f}"
                      f" ms (paired {q['paired']:.2f})  neighbour {b['pqcompile']:7.2f} / ORT "
                      f"{b['ort']:6.2f} ms (paired {b['paired']:.2f}; its core "
                      f"{r['neighbour_process']['busy_fraction']:.0%} busy)", flush=True)
    results["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
