"""Coverage table: every torchvision architecture of the sweep through ``check_model``.

    python benchmarks/coverage.py            # all of tests/coverage_models.MODELS
    python benchmarks/coverage.py resnet18 vit_b_16

Writes ``benchmarks/results/coverage.json`` and prints docs/coverage.md's markdown table: channel
groups found, prunable share, share of MACs in integer kernels, BOP reduction reached at the
24x budget, float ops, parity of the compiled host program against the integer-exact
reference, status. The same sweep, with assertions, is ``tests/test_coverage.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))

import torch  # noqa: E402
from coverage_models import MODELS, make  # noqa: E402

from pqcompile.coverage import check_model  # noqa: E402


def row_md(name: str, r: dict, side: int) -> str:
    if r["status"] != "ok":
        return (f"| {name} | {side} | {r['groups']} | - | - | - | - | - | refused: "
                f"{r['error_type']} naming `{r['error'].split(' ')[1]}` |")
    parity = "exact" if r["worst_lsb"] == 0 else \
        f"{r['worst_lsb']} LSB, {r['sqnr_db']:.1f} dB"
    return (f"| {name} | {side} | {r['groups']} | "
            f"{100 * r['prunable_groups'] / max(r['groups'], 1):.0f}% | "
            f"{100 * r['integer_mac_share']:.1f}% | {r['bop_reduction']:.1f}x | "
            f"{len(r['float_ops'])} | {parity} | ok |")


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    rows = {}
    for name in names:
        model, example = make(name)
        t0 = time.perf_counter()
        r = check_model(model, example, budget="bops=24x", name=name).as_dict()
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["input"] = list(example[0].shape)
        rows[name] = r
        print(row_md(name, r, example[0].shape[-1]), f"({r['seconds']} s)", flush=True)
    out = ROOT / "results" / "coverage.json"
    out.parent.mkdir(exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    old.update(rows)
    out.write_text(json.dumps(old, indent=1, sort_keys=True, default=str) + "\n")
    print("\n| model | input | groups | prunable | integer MACs | BOP reduction | float ops | "
          "program vs reference | status |\n|---|---|---|---|---|---|---|---|---|")
    for name in sorted(old):
        print(row_md(name, old[name], old[name]["input"][-1]))


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(MODELS))
