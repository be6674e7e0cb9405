"""Accuracy vs BOP reduction on Fashion-MNIST (ResNet-20, the real 10k test set).

Every point gets the same fine-tune budget (QAT, ``--finetune-batches`` steps of 128 images,
distillation from the FP32 model) and is measured on the compiled host program:
uniform 8-bit, uniform 4-bit (first and last layer 8-bit), pruning only (then 8-bit), and the
ILP's joint bits + pruning at several BOP budgets. Prints a table and writes a PNG plot when
matplotlib is installed.

    python benchmarks/pareto.py [--budgets 30 60 90] [--finetune-batches 150] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pqcompile.api import compile  # noqa: E402
from pqcompile.budget import Budget  # noqa: E402
from pqcompile.data import fashion_mnist_loaders  # noqa: E402
from pqcompile.demo import BATCH, artifact_predictions  # noqa: E402
from pqcompile.zoo import evaluate, pretrained_resnet20_fashion  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[30, 60, 90])
    ap.add_argument("--finetune-batches", type=int, default=150)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    model = pretrained_resnet20_fashion()
    loaders = fashion_mnist_loaders(128, augment=True, eval_batch_size=BATCH)
    correct, total = evaluate(model, loaders.test)
    fp = correct / total
    example = next(iter(loaders.test))[0]
    ft = {"epochs": 1, "max_batches": args.finetune_batches, "lr": 0.01, "distill": True}
    runs = [("uniform 8-bit", "uniform8", "bops=16x"),
            ("uniform 4-bit (ends 8-bit)", "uniform4", "bops=30x"),
            ("pruning only, 8-bit", "prune8", "bops=24x")]
    runs += [(f"ILP joint {b:g}x", "ilp", f"bops={b:g}x") for b in args.budgets]
    rows = []
    for label, solver, budget in runs:
        t = time.perf_counter()
        c = compile(model, (example,), target="host", budget=Budget.parse(budget),
                    data=loaders.train, solver=solver, finetune=ft)
        art, ref, labels = artifact_predictions(c, loaders.test)
        rows.append({"method": label, "bop_reduction": c.totals["bop_reduction"],
                     "accuracy": float((art == labels).mean()),
                     "reference_accuracy": float((ref == labels).mean()),
                     "agreement": float((art == ref).mean()),
                     "weight_kb": c.totals["weight_bytes"] / 1e3,
                     "seconds": time.perf_counter() - t})
        r = rows[-1]
        print(f"{label:28s} {r['bop_reduction']:6.1f}x  acc {r['accuracy']:.2%} "
              f"(FP32 {fp:.2%}, {100 * (r['accuracy'] - fp):+.2f} pt)  agree {r['agreement']:.2%}"
              f"  {r['weight_kb']:.1f} KB  {r['seconds']:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps({"fp32_accuracy": fp, "rows": rows}, indent=1))
    print(f"\n| method | BOP reduction | accuracy | vs FP32 ({fp:.2%}) | weights |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bop_reduction']:.1f}x | {r['accuracy']:.2%} | "
              f"{100 * (r['accuracy'] - fp):+.2f} pt | {r['weight_kb']:.1f} KB |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["bop_reduction"], 100 * r["accuracy"], label=r["method"])
    ax.axhline(100 * fp, color="gray", linestyle="--", label="FP32")
    ax.set_xscale("log")
    ax.set_xlabel("BOP reduction vs FP32 (x)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    print(f"plot: {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
