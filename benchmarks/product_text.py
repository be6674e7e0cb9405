"""Product level on a real pretrained sentence encoder: compressed builds whose accuracy is
measured in the same run, against ONNX Runtime int8 of the whole model, on the host (latency)
and on aarch64 (guest instructions).

The model is paraphrase-MiniLM-L3-v2 (:func:`real_transformers.minilm_l3`: 3 layers, hidden
384, mean pooling), called as deployed: one document a call, ``--tokens`` token ids and their
attention mask (padding masked out). Accuracy is the Pearson correlation of its sentence
similarities with the human ratings of all 1225 pairs of the 50 rated Lee documents
(:func:`real_transformers.lee_corpus`), none of which the compile or the peer reads: they
calibrate, measure sensitivities and distil on the 300 other Lee documents
(:func:`real_transformers.lee_background`), one document a batch.

Each budget is one ``pqcompile.compile`` (ILP on Fisher sensitivities of the distillation
objective, ``--steps`` distillation QAT steps, ``--bit-options``; MAC budgets prune FFN
channels and attention heads), and the row records:

* Pearson on the 1225 pairs, its difference to FP32's, and the mean cosine of the 50 sentence
  embeddings to FP32's; the same for the peer;
* the peer: ONNX Runtime static int8 (QDQ, per-channel int8 weights, uint8 activations) of the
  **whole** FP32 model, calibrated on the first 64 tuning documents;
* host latency: the builds and the peer in ``--rounds`` interleaved rounds on one document,
  ``--threads`` threads; ``x ORT`` the peer's median over the build's, ``paired`` the median
  over rounds of that ratio within a round;
* aarch64: each build lowered again (``Compiled.retarget``: the same integers) and counted under
  qemu against the peer's aarch64 ONNX Runtime 1.18.1, the same document.

    python benchmarks/product_text.py [--budgets bops=16x macs=1.5x macs=2x] [--steps 300]
        [--wait-quiet 2400] [--targets arm arm-dotprod]
        [--out benchmarks/results/product_text.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import peers
import real_transformers as rt
from product import PEER, speed, wait_for_quiet
from timing import interleaved_rounds

from pqcompile.api import compile
from pqcompile.targets.insn_count import count_instructions
from pqcompile.targets.ort_insn_count import count_onnx_instructions, qemu_cpu

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "product_text.json"
INPUTS = ("input_ids", "attention_mask")
CALIBRATION = 64  # tuning documents the peer and each compile calibrate on


def ort_int8(model: torch.nn.Module, example: tuple[torch.Tensor, ...], calibration: list,
             work: Path) -> Path:
    """The peer: static QDQ int8 of the FP32 model (two inputs), calibrated document by
    document as :func:`peers.ort_int8` calibrates images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    fp32, pre, int8 = work / "fp32.onnx", work / "pre.onnx", work / "int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(fp32), dynamo=False, opset_version=17,
                          input_names=list(INPUTS), output_names=["y"],
                          do_constant_folding=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{k: b[k].numpy() for k in INPUTS} for b in calibration])

        def get_next(self):
            return next(self.it, None)

    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return int8


def scores(embeddings: np.ndarray, fp32: np.ndarray, p32: float,
           corpus: rt.LeeCorpus) -> dict[str, float]:
    p = rt.pair_pearson(embeddings, corpus)
    cos = np.sum(fp32 * embeddings, 1) / np.linalg.norm(fp32, axis=1) / \
        np.linalg.norm(embeddings, axis=1)
    return {"pearson": p, "pearson_delta": p - p32, "cosine_to_fp32": float(cos.mean()),
            "pairs": len(corpus.pairs)}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, corpus = rt.minilm_l3(), rt.lee_corpus()
    tok = rt.tokenizer()
    enc = rt.tokenize(list(corpus.documents), args.tokens, tok)
    tuning = rt.tokenize(list(rt.lee_background()), args.tokens, tok)
    docs = [{k: tuning[k][i:i + 1] for k in INPUTS} for i in range(len(tuning["input_ids"]))]
    fp32 = rt.encode(model, enc, 1)
    p32 = rt.pair_pearson(fp32, corpus)
    print(f"FP32 Pearson on {len(corpus.pairs)} pairs: {p32:.4f}", flush=True)
    example = (tuning["input_ids"][:1], tuning["attention_mask"][:1])
    doc = tuple(enc[k][:1].numpy() for k in INPUTS)  # the document every build is timed on
    rows: list[dict[str, Any]] = [{"model": "minilm_l3", "variant": "fp32", "pearson": p32}]
    options = {"bit_options": [tuple(int(b) for b in o.split("/")) for o in args.bit_options]}
    with tempfile.TemporaryDirectory(prefix="product-text-") as tmp:
        int8_path = ort_int8(model, example, docs[:CALIBRATION], Path(tmp))
        session = peers.ort_session(int8_path, args.threads)
        peer_run = lambda i, m: session.run(None, {"input_ids": i, "attention_mask": m})[0]
        peer_row = {"model": "minilm_l3", "variant": PEER, "bop_reduction": 16.0,
                    **scores(rt.encode(lambda i, m: peer_run(i.numpy(), m.numpy()), enc, 1),
                             fp32, p32, corpus)}
        print(f"{PEER}: Pearson {peer_row['pearson']:.4f}", flush=True)
        rows.append(peer_row)
        builds = {}
        for budget in args.budgets:
            t = time.perf_counter()
            data = list(itertools.islice(itertools.cycle(docs), max(args.steps, CALIBRATION)))
            c = compile(model, example, target="host", budget=budget, data=data,
                        calibration_batches=CALIBRATION, sensitivity_batches=32,
                        observer="percentile", pareto_points=0,
                        **({"finetune": {"max_batches": args.steps}} if args.steps else {}),
                        **options)
            label = f"pqcompile {budget}"
            program = rt.encode(lambda i, m, c=c: c(i.numpy(), m.numpy()), enc, 1)
            row = {"model": "minilm_l3", "variant": label, "budget": budget,
                   "finetune_steps": args.steps, "bit_options": args.bit_options,
                   "bop_reduction": float(c.totals["bop_reduction"]),
                   "macs_kept": float(c.totals["macs"]) / float(c.totals["fp32_macs"]),
                   "float_ops": [op for _, op in c.float_ops],
                   "compile_seconds": round(time.perf_counter() - t, 1),
                   **scores(program, fp32, p32, corpus)}
            print(f"{label} ({row['bop_reduction']:.1f}x BOPs, {row['macs_kept']:.0%} of the "
                  f"MACs): Pearson {row['pearson']:.4f} ({row['pearson_delta']:+.4f})",
                  flush=True)
            rows.append(row)
            builds[label] = c
        wait_for_quiet(args.wait_quiet)
        print(f"timing on the host ({args.rounds} rounds)", flush=True)
        times = interleaved_rounds({PEER: lambda: peer_run(*doc),
                                    **{k: (lambda c=c: c(*doc)) for k, c in builds.items()}},
                                   args.rounds, args.calls)
        peer_row["host"] = {"ms": statistics.median([t for r in times[PEER] for t in r])}
        for row in rows[2:]:
            row["host"] = speed(times, row["variant"])
        for target in args.targets:
            cpu = qemu_cpu(target)
            runs = tuple(args.runs)
            peer_row.setdefault("aarch64", {})[target] = count_onnx_instructions(
                int8_path, list(doc), runs=runs, cpu=cpu, timeout=args.timeout).per_inference
            for row in rows[2:]:
                art = builds[row["variant"]].retarget(target)
                n = count_instructions(art, runs=runs, timeout=args.timeout, cpu=cpu,
                                       inputs=list(doc))
                row.setdefault("aarch64", {})[target] = n.per_inference
            print(f"[{target}]: counted", flush=True)
        for row in rows[2:]:
            row["aarch64_x_peer"] = {t: n / peer_row["aarch64"][t]
                                     for t, n in row.get("aarch64", {}).items()}
    return rows


def report(rows: list[dict[str, Any]], targets: list[str]) -> None:
    head = (f"{'variant':24s} {'BOPs':>6s} {'MACs':>5s} {'Pearson':>8s} {'delta':>7s} "
            f"{'host ms':>8s} {'x ORT':>6s} {'paired':>6s}")
    head += "".join(f" {t + ' insns':>18s} {'/ORT':>5s}" for t in targets)
    print("\n" + head)
    for r in rows[1:]:
        line = (f"{r['variant']:24s} {r['bop_reduction']:6.1f} {r.get('macs_kept', 1.0):5.0%} "
                f"{r['pearson']:8.4f} {r['pearson_delta']:+7.4f} {r['host']['ms']:8.3f} "
                f"{r['host'].get('x_peer', 1.0):6.2f} {r['host'].get('x_peer_paired', 1.0):6.2f}")
        for t in targets:
            line += (f" {r['aarch64'][t]:18,.0f} "
                     f"{r.get('aarch64_x_peer', {}).get(t, 1.0):5.2f}")
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=["bops=16x", "macs=1.5x", "macs=2x"],
                    help="compile() budgets, one build each")
    ap.add_argument("--steps", type=int, default=300, help="distillation QAT steps")
    ap.add_argument("--bit-options", nargs="+", default=["8/8"], metavar="W/A",
                    help="the solver's (weight/activation) bit options besides pruning")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--targets", nargs="*", default=["arm", "arm-dotprod"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=30, help="timed calls per variant a round")
    ap.add_argument("--runs", type=int, nargs=2, default=[1, 3], metavar=("N1", "N2"))
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before timing, wait up to this long for a 1-minute load average "
                         "under 0.3")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    peers.set_threads(args.threads)
    rows = measure(args)
    report(rows, args.targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/product_text.py " + " ".join(argv or sys.argv[1:]),
        "threads": args.threads, "batch": 1, "tokens": args.tokens, "rounds": args.rounds,
        "calls": args.calls, "runs": args.runs, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
