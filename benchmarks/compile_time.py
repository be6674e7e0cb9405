"""Compile time of the largest graphs: ``pqcompile.compile`` end to end, stage by stage.

    python benchmarks/compile_time.py                    # densenet201 and maxvit_t
    python benchmarks/compile_time.py densenet201

Each model is compiled as a user would (``target="host"``, ``budget="bops=60x"``, 224x224 input,
default solver and pipeline; random weights: this measures the compiler, not accuracy), timed
wall-clock, with the pipeline's per-stage seconds (``Compiled.timings``), and its program is
checked against the integer reference on a fresh input. Writes
``benchmarks/results/compile_time.json`` and prints docs/coverage.md's table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

import pqcompile

ROOT = Path(__file__).resolve().parent
MODELS = ("densenet201", "maxvit_t")


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    example = (torch.randn(1, 3, 224, 224),)
    t0 = time.perf_counter()
    c = pqcompile.compile(model, example, target="host", budget="bops=60x")
    seconds = time.perf_counter() - t0
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    exact = bool(np.array_equal(c(x.numpy()), c.reference(x).numpy()))
    return {"seconds": round(seconds, 1), "program_equals_reference": exact,
            "stages": {k: round(v, 1) for k, v in (c.timings or {}).items()},
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def main(names: list[str]) -> None:
    out = ROOT / "results" / "compile_time.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for name in names:
        rows[name] = measure(name)
        print(name, rows[name], flush=True)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print("\n| model | compile (s) | slowest stages (s) | program vs reference |\n|---|---|---|---|")
    for name, r in sorted(rows.items()):
        top = sorted(r["stages"].items(), key=lambda kv: -kv[1])[:3]
        stages = ", ".join(f"{k} {v}" for k, v in top)
        print(f"| {name} | {r['seconds']} | {stages} | "
              f"{'exact' if r['program_equals_reference'] else 'DIFFERS'} |")


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
