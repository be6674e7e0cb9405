"""Every solver on one search space, one cost model, one budget: Fashion-MNIST ResNet-20.

At each BOP budget (default 30x and 60x fewer BOPs than FP32) every solver picks bits per layer
and kept channels per group over the same problem (FIT sensitivities, weights 2/4/8 bits x
activations 4/5/6/8 as in ``pqcompile demo``, keep levels 100/75/50/25 %); every result then
gets the same QAT fine-tune and is measured as the compiled host integer program on the real
10k test set. The searching solvers (SBS, AJPQ,
FITCompress, PIC-PQ) score candidates on a held-out validation split of the training set.
Columns: BOP reduction, accuracy, weight bytes, search wall time (the solve stage only).
Accuracy is the integer-exact reference's on all 10k images; the compiled program is run on
the first ``--program-batches`` hundred and must agree with it (the parity tests show they
agree bit for bit).

    python benchmarks/solvers.py [--budgets 30 60] [--solvers sbs ajpq ...] [--finetune-batches 150]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import json  # noqa: E402

from common import Setup, print_row, run_point, save  # noqa: E402

from pqcompile.demo import BIT_OPTIONS  # noqa: E402

# The searching solvers' knobs for this benchmark (well under a minute of search each here;
# the defaults search longer).
SEARCH_OPTIONS = {
    "sbs": {"steps": 50},
    "ajpq": {"episodes": 14, "warmup": 4},
    "fitcompress": {"fisher_max_batches": 16, "refresh_every": 8, "refresh_batches": 2},
    "picpq": {"population": 6, "tournament": 3, "cycles": 6},
}

SOLVERS = {"sbs": "SBS", "ajpq": "AJPQ", "fitcompress": "FITCompress", "picpq": "PIC-PQ",
           "ilp": "ILP (HAWQ-V3 style)", "greedy": "greedy", "uniform4": "uniform 4-bit"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[30, 60])
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    ap.add_argument("--finetune-batches", type=int, default=150)
    ap.add_argument("--program-batches", type=int, default=10,
                    help="batches of 100 test images run through the compiled program (its "
                         "agreement with the integer-exact reference, whose accuracy on all "
                         "10k images is reported); 0 = all")
    ap.add_argument("--reuse", nargs="+", default=[],
                    help="pareto.json / solvers.json files whose rows (same problem, fine-tune "
                    "and test set) stand for the solver and budget they ran (the first match)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    setup = Setup()
    reused = [r for f in args.reuse for r in json.loads(Path(f).read_text())["rows"]]
    rows = []
    for i, b in enumerate(args.budgets):
        for solver in args.solvers:
            if solver == "uniform4" and i:
                continue  # one point: 4-bit everywhere, ends 8-bit, whatever the budget
            budget = f"bops={b:g}x"
            label = f"{SOLVERS[solver]} @ {b:g}x"
            same = [r for r in reused if r.get("family", r["solver"]) == solver
                    and (solver == "uniform4" or r["budget"] == budget)]
            if same:
                row = dict(same[0], method=label, reused=True)
            else:
                row = run_point(setup, label, solver, budget, args.finetune_batches,
                                solver_options=SEARCH_OPTIONS.get(solver),
                                program_batches=args.program_batches or None,
                                bit_options=BIT_OPTIONS)
            row["target"] = b
            rows.append(row)
            print_row(row, setup.fp32)
            save(rows, setup.fp32, Path(args.out) / "solvers.json")
    print(f"\n| budget | solver | BOP reduction | accuracy | vs FP32 ({setup.fp32:.2%}) "
          f"| weights | search |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']:g}x | {SOLVERS[r['solver']]} | {r['bop_reduction']:.1f}x | "
              f"{r['accuracy']:.2%} | {100 * (r['accuracy'] - setup.fp32):+.2f} pt | "
              f"{r['weight_kb']:.1f} KB | {r['search_seconds']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
