"""Accuracy vs BOP reduction on Fashion-MNIST (ResNet-20, the real 10k test set).

Every point gets the same fine-tune budget (QAT, ``--finetune-batches`` steps of 128 images,
distillation from the FP32 model) and is measured on the compiled host program:
uniform 8-bit, uniform 4-bit (first and last layer 8-bit), structural pruning only (the ILP
over the groups' keep levels, every layer 8-bit), and the ILP's joint bits + pruning at
several BOP budgets (weights 2/4/8 bits, activations 4/5/6/8: activations are stored in 8-bit
bytes whatever their bits, so finer activation options cost nothing in storage and give the
solver finer BOP trade-offs). Prints a table and writes a PNG plot when matplotlib is
installed.

Every point's training data order comes from its seed alone (``--seeds``: one row per seed,
and per method the mean and the range over seeds, plotted as error bars).

    python benchmarks/pareto.py [--budgets 30 60 90] [--finetune-batches 450] [--seeds 0 1 2]
        [--points uniform8 uniform4 prune ilp] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Setup, print_row, run_point, save  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[30, 60, 90])
    ap.add_argument("--prune-budgets", type=float, nargs="+", default=[24])
    ap.add_argument("--finetune-batches", type=int, default=450,
                    help="QAT steps of 128 images for every point (450: about one epoch)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="training data orders: every point is run once per seed")
    ap.add_argument("--points", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--activation-bits", type=int, nargs="+", default=[4, 5, 6, 8],
                    help="the ILP's activation-bit options (weights: 2, 4, 8)")
    ap.add_argument("--program-batches", type=int, default=0,
                    help="run the compiled program on only this many test batches of 100 (its "
                         "agreement with the integer-exact reference, whose accuracy on all "
                         "10k images is then reported); 0 = all")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    setup = Setup()
    fp = setup.fp32
    runs = [("uniform 8-bit", "uniform8", "bops=16x"),
            ("uniform 4-bit (ends 8-bit)", "uniform4", "bops=30x")]
    runs += [(f"pruning only {b:g}x (8-bit)", "prune", f"bops={b:g}x")
             for b in args.prune_budgets]
    runs += [(f"ILP joint {b:g}x", "ilp", f"bops={b:g}x") for b in args.budgets]
    runs = [r for r in runs if r[1] in args.points]
    ilp_bits = [(w, a) for w in (2, 4, 8) for a in args.activation_bits]
    pb = args.program_batches or None
    rows = []
    for label, family, budget in runs:
        for seed in args.seeds:
            rows.append(prune_point(setup, label, budget, args.finetune_batches, pb, seed)
                        if family == "prune" else
                        run_point(setup, label, family, budget, args.finetune_batches,
                                  bit_options=ilp_bits if family == "ilp" else None,
                                  program_batches=pb, seed=seed))
            print_row(rows[-1], fp)
            save(rows, fp, Path(args.out) / "pareto.json")
    print(f"\n| method | BOP reduction | accuracy (seeds) | vs FP32 ({fp:.2%}) | weights |")
    print("|---|---|---|---|---|")
    for method, rs in by_method(rows).items():
        accs = [r["accuracy"] for r in rs]
        mean = sum(accs) / len(accs)
        spread = "" if len(accs) == 1 else \
            f" ({', '.join(f'{a:.2%}' for a in accs)})"
        print(f"| {method} | {rs[0]['bop_reduction']:.1f}x | {mean:.2%}{spread} | "
              f"{100 * (mean - fp):+.2f} pt | {rs[0]['weight_kb']:.1f} KB |")
    plot(rows, fp, Path(args.out) / "pareto.png")
    return 0


FAMILIES = ("uniform8", "uniform4", "prune", "ilp")


def by_method(rows) -> dict[str, list[dict]]:
    """Rows grouped by method (one per seed), in the order they ran."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def prune_point(setup: Setup, label: str, budget: str, steps: int,
                program_batches: int | None = None, seed: int = 0) -> dict:
    """Structural pruning alone: the ILP over the groups' keep levels (FIT channel
    sensitivities) with every layer at 8/8 bits."""
    row = run_point(setup, label, "ilp", budget, steps, bit_options=[(8, 8)],
                    program_batches=program_batches, seed=seed)
    return dict(row, family="prune")


def plot(rows, fp: float, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    families: dict[str, list[tuple[float, list[float]]]] = {}
    for rs in by_method(rows).values():
        families.setdefault(rs[0].get("family", rs[0]["solver"]), []).append(
            (rs[0]["bop_reduction"], [100 * r["accuracy"] for r in rs]))
    names = {"uniform8": "uniform 8-bit", "uniform4": "uniform 4-bit (ends 8)",
             "prune": "pruning only (8-bit)", "ilp": "ILP joint bits + pruning"}
    for solver, points in families.items():
        points.sort()
        x = [p[0] for p in points]
        mean = [sum(a) / len(a) for _, a in points]
        err = [[m - min(a) for m, (_, a) in zip(mean, points)],
               [max(a) - m for m, (_, a) in zip(mean, points)]]
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=names.get(solver, solver))
    ax.axhline(100 * fp, color="gray", linestyle="--", label=f"FP32 {fp:.2%}")
    ax.axhline(100 * fp - 0.5, color="gray", linestyle=":", label="FP32 - 0.5 pt")
    ax.set_xscale("log")
    ax.set_xlabel("BOP reduction vs FP32 (x)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ResNet-20, Fashion-MNIST, compiled integer program")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
