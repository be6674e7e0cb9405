"""Fidelity on real pretrained models: compressed and compiled programs against their FP32 model.

For every model, mode and BOPs budget, ``pqcompile.compile`` (ILP, target ``host``) builds the
model, the built program runs on held-out real inputs, and the row records

* ``agreement``: the share of held-out inputs on which the program's top-1 equals FP32's;
* ``task``: top-1 accuracy against true labels where the inputs have them (the 20 labelled
  ImageNet photos; the real Fashion-MNIST test images), beside FP32's;
* ``worst_lsb``: the largest difference, in output steps, between the program's outputs and
  the integer reference's (``compiled.reference``) on the same inputs (0 = bit-exact);
* ``agreement_labelled``: the agreement on the held-out inputs that have a true label alone
  (the 20 labelled ImageNet photos' crops for mobilenet_v2), a column beside ``agreement``;
* ``agreement_clear``: a second figure, never a replacement of ``agreement``: the agreement on
  the held-out inputs whose FP32 top-1 logit leads the runner-up by more than ``CLEAR_MARGIN``
  (1.0) logits (``held_out_clear`` of them). Many held-out crops are near-ties (an interior photo
  has no ImageNet class: its FP32 top-1 often leads by under 0.5), so rounding the weights of an
  8-bit model alone flips some of them; the ``fp32`` block records the margins' quantiles.

Modes: ``data-free`` (no ``data``: data-free criteria, activations calibrated on the example
batch) and ``data`` (FIT sensitivities, calibration and QAT distilled from the FP32 model on
the tuning data). Models:

* ``mobilenet_v2``: torchvision's ImageNet MobileNetV2 on real photos
  (:mod:`real_models`): held out, the 20 labelled ImageNet photos and 13 interior photos;
  tuning data, random resized crops of 34 other photos labelled by the FP32 model;
* ``resnet20_fashion``: the ResNet-20 trained here on the real Fashion-MNIST training set
  (``pqcompile.zoo``), measured on the first ``--fashion-images`` real test images.

    python benchmarks/fidelity.py [--models mobilenet_v2 resnet20_fashion] [--budgets 16 32 48]
        [--modes data-free data] [--steps 300] [--out benchmarks/results]
        [--weight-rounding gptq [--gptq act_order=true clip=mse skip_bits=8]]
    python benchmarks/fidelity.py --transformers [--tokens 128]   # paraphrase-MiniLM-L3-v2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import real_models  # noqa: E402

from pqcompile.api import compile  # noqa: E402
from pqcompile.quant.qmodules import Dequantize  # noqa: E402


@dataclass
class Case:
    """A real model with its held-out inputs and how to tune it.

    ``held_out``: ``N x ...`` inputs; ``labels``: their true labels (-1 where none);
    ``example``: the example batch (its batch size is the program's, and data-free compiles
    calibrate on it); ``data``: builds the tuning loader for a number of QAT steps;
    ``finetune``: the QAT options besides ``max_batches``."""

    name: str
    model: torch.nn.Module
    held_out: torch.Tensor
    labels: np.ndarray
    example: torch.Tensor
    data: Callable[[int], Any]
    finetune: dict[str, Any] = field(default_factory=dict)
    compile_options: dict[str, Any] = field(default_factory=dict)


def mobilenet_v2_case(*, batch: int = 8, crop_batch: int = 16, seed: int = 0) -> Case:
    """ImageNet MobileNetV2 on the real photos of :func:`real_models.photo_split`."""
    model = real_models.mobilenet_v2_imagenet()
    split = real_models.photo_split()
    held = real_models.load_photos(split.held_out, five_crop=True)
    labels = np.repeat([-1 if p.label is None else p.label for p in split.held_out], 5)
    example = real_models.load_photos(split.tuning[:batch])

    def data(steps: int):
        # Enough crops for sensitivity (16 batches), calibration (8) and every QAT step.
        return real_models.CropLoader(split.tuning, model, batches=max(steps, 16),
                                      batch_size=crop_batch, seed=seed)

    return Case("mobilenet_v2", model, held, labels, example, data,
                finetune={"epochs": 1, "lr": 1e-3, "distill": True, "distill_weight": 1.0,
                          "optimizer": "sgd"})


def resnet20_fashion_case(*, images: int = 2000, batch: int = 100, seed: int = 0) -> Case:
    """The Fashion-MNIST ResNet-20 on the first ``images`` real test images."""
    from pqcompile.data import fashion_mnist_loaders
    from pqcompile.zoo import pretrained_resnet20_fashion

    model = pretrained_resnet20_fashion()
    test = fashion_mnist_loaders(batch, eval_batch_size=batch).test
    xs, ys = [], []
    for x, y in test:
        xs.append(x)
        ys.append(y)
        if sum(len(t) for t in ys) >= images:
            break
    example = next(iter(fashion_mnist_loaders(batch, seed=seed).train))[0]

    def data(steps: int):
        return fashion_mnist_loaders(128, augment=True, seed=seed).train

    return Case("resnet20_fashion", model, torch.cat(xs)[:images],
                torch.cat(ys)[:images].numpy(), example, data,
                finetune={"epochs": 1, "lr": 0.01, "distill": True})


CASES = {"mobilenet_v2": mobilenet_v2_case, "resnet20_fashion": resnet20_fashion_case}


def batched(x: torch.Tensor, size: int):
    """``x`` in batches of exactly ``size`` (the last one padded with copies of the first
    rows) and the number of real rows in each."""
    for i in range(0, len(x), size):
        part = x[i:i + size]
        n = len(part)
        if n < size:
            part = torch.cat([part, x[:size - n]])
        yield part, n


def run_program(compiled, x: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of the built program and of the integer reference on ``x``."""
    prog, ref = [], []
    for part, n in batched(x, size):
        prog.append(np.asarray(compiled(part.numpy()))[:n])
        with torch.no_grad():
            ref.append(compiled.reference(part).numpy()[:n])
    return np.concatenate(prog), np.concatenate(ref)


def output_step(reference) -> float:
    """The output's dequantization step (one LSB) of an integer reference."""
    steps = [float(m.out.scale) for m in reference.modules() if isinstance(m, Dequantize)]
    return steps[-1]


def fp32_logits(model: torch.nn.Module, x: torch.Tensor, size: int = 32) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i:i + size]) for i in range(0, len(x), size)]).numpy()


CLEAR_MARGIN = 1.0


def top1_margin(logits: np.ndarray) -> np.ndarray:
    """How far each input's top logit leads its runner-up."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def measure(case: Case, fp32: np.ndarray, mode: str, budget: float, steps: int,
            options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row: compile ``case.model`` at ``budget``x fewer BOPs in ``mode`` and measure it
    against the FP32 logits ``fp32`` of the held-out inputs."""
    fp32_top1, clear = fp32.argmax(1), top1_margin(fp32) > CLEAR_MARGIN
    kwargs: dict[str, Any] = {**case.compile_options, **(options or {})}
    if mode == "data":
        kwargs["data"] = case.data(steps)
        if steps:
            kwargs["finetune"] = {**case.finetune, "max_batches": steps}
    else:
        kwargs.pop("sensitivity_batches", None)
        kwargs.pop("weight_rounding", None)  # GPTQ needs data
    t = time.perf_counter()
    c = compile(case.model, (case.example,), target="host", budget=f"bops={budget:g}x",
                pareto_points=0, progress=True, **kwargs)
    seconds = time.perf_counter() - t
    prog, ref = run_program(c, case.held_out, len(case.example))
    lsb = float(np.abs(prog - ref).max() / output_step(c.reference))
    top1 = prog.argmax(1)
    labelled = case.labels >= 0
    bits = {k: list(v) for k, v in c.solution.bits.items()}
    return {"model": case.name, "mode": mode, "budget": budget,
            "finetune_steps": steps if mode == "data" else 0,
            "finetune": {k: v for k, v in kwargs.get("finetune", {}).items()
                         if k != "max_batches"},
            "options": {k: v if k != "bit_options" else [f"{w}/{a}" for w, a in v]
                        for k, v in (options or {}).items()},
            "bop_reduction": c.totals["bop_reduction"],
            "agreement": float((top1 == fp32_top1).mean()),
            "agreement_clear": float((top1 == fp32_top1)[clear].mean()),
            "agreement_labelled": float((top1 == fp32_top1)[labelled].mean()),
            "held_out_clear": int(clear.sum()),
            "reference_agreement": float((ref.argmax(1) == fp32_top1).mean()),
            "held_out": int(len(top1)),
            "task": float((top1[labelled] == case.labels[labelled]).mean()),
            "labelled": int(labelled.sum()),
            "worst_lsb": lsb, "compile_seconds": seconds,
            "timings": {k: round(v, 1) for k, v in c.timings.items()},
            "bits_histogram": _histogram(bits),
            "kept_channels": [sum(int(r["kept_channels"]) for r in c.layers),
                              sum(int(r["total_channels"]) for r in c.layers)],
            "calibration": c.calibration,
            "notes": [n for n in c.artifact.manifest["extra"].get("notes", []) if "GPTQ" in n]}


def ort_int8_rows(case: Case, fp32: np.ndarray, *, calibration_batches: int = 8,
                  methods: tuple[str, ...] = ("MinMax", "Percentile")) -> list[dict[str, Any]]:
    """The peer on the same footing: ONNX Runtime static int8 (QDQ, per-channel int8 weights,
    uint8 activations; ``peers.ort_int8``) of the FP32 model, calibrated on the same inputs
    compile calibrates on with data (the first ``calibration_batches`` tuning batches), one row
    per calibration method, measured on the same held-out inputs (16x BOPs: 8/8 everywhere)."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod

    import peers

    fp32_top1, clear = fp32.argmax(1), top1_margin(fp32) > CLEAR_MARGIN
    labelled = case.labels >= 0
    calibration = [x for _, (x, _) in zip(range(calibration_batches),
                                          case.data(calibration_batches))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = peers.export_onnx(case.model.eval(), case.example[:1], Path(tmp) / "fp32.onnx")
        for method in methods:
            q = peers.ort_int8(path, tmp, calibration,
                               calibrate_method=getattr(CalibrationMethod, method))
            run = peers.ort_runner(peers.ort_session(q, 2))
            top1 = np.concatenate([run(x[None].numpy()) for x in case.held_out]).argmax(1)
            same = top1 == fp32_top1
            rows.append({"model": case.name, "mode": f"ort-int8 ({method})", "budget": 16.0,
                         "finetune_steps": 0, "bop_reduction": 16.0,
                         "agreement": float(same.mean()),
                         "agreement_clear": float(same[clear].mean()),
                         "agreement_labelled": float(same[labelled].mean()),
                         "held_out_clear": int(clear.sum()), "held_out": int(len(top1)),
                         "task": float((top1[labelled] == case.labels[labelled]).mean()),
                         "labelled": int(labelled.sum()), "worst_lsb": float("nan"),
                         "calibration": f"{calibration_batches} batches of data (ORT {method})"})
    return rows


def _histogram(bits: dict[str, list[int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for w, a in bits.values():
        key = f"{w}/{a}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['model']:17s} {row['mode']:9s} {row['budget']:4g}x "
          f"(got {row['bop_reduction']:5.1f}x) steps {row['finetune_steps']:4d}  "
          f"agree {row['agreement']:7.2%} "
          f"(ref {row.get('reference_agreement', float('nan')):7.2%}, "
          f"margin>{CLEAR_MARGIN:g}: {row.get('agreement_clear', float('nan')):7.2%}, "
          f"labelled: {row.get('agreement_labelled', float('nan')):7.2%}) "
          f"task {row['task']:7.2%}  worst {row['worst_lsb']:.0f} LSB  "
          f"{row.get('compile_seconds', float('nan')):.0f} s  "
          f"bits {row.get('bits_histogram', {'8/8': 'all'})}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--budgets", type=float, nargs="+", default=[16, 32, 48])
    ap.add_argument("--modes", nargs="*", default=["data-free", "data"],
                    choices=["data-free", "data"])
    ap.add_argument("--steps", type=int, default=300, help="QAT steps with data")
    ap.add_argument("--observer", default=None, help="compile's activation observer")
    ap.add_argument("--bit-options", nargs="+", default=None, metavar="W/A",
                    help="the solver's (weight/activation) bit options, e.g. 8/8 4/8 "
                         "(default: compile's)")
    ap.add_argument("--finetune", nargs="+", default=[], metavar="KEY=VALUE",
                    help="QAT options over the case's, e.g. optimizer=adam lr=1e-4 "
                         "learn_weight_clip=true")
    ap.add_argument("--crop-batch", type=int, default=16,
                    help="crops per tuning batch (sensitivity, calibration, QAT), mobilenet_v2")
    ap.add_argument("--sensitivity-batches", type=int, default=None,
                    help="compile's sensitivity_batches with data (default: compile's)")
    ap.add_argument("--weight-rounding", default="nearest", choices=["nearest", "gptq"],
                    help="compile's weight_rounding with data (GPTQ on the calibration crops)")
    ap.add_argument("--gptq", nargs="+", default=[], metavar="KEY=VALUE",
                    help="GPTQ options, e.g. act_order=true clip=mse skip_bits=8 damp=0.01")
    ap.add_argument("--peer", action="store_true",
                    help="also ONNX Runtime static int8 calibrated on the same tuning inputs")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in the output file and add these")
    ap.add_argument("--transformers", action="store_true",
                    help="only the sentence-encoder rows (transformer_rows)")
    ap.add_argument("--tokens", type=int, default=128, help="sequence length, --transformers")
    args = ap.parse_args(argv)
    if args.transformers:
        return transformer_rows(Path(args.out), args.tokens, args.observer or "minmax")
    options: dict[str, Any] = {"observer": args.observer} if args.observer else {}
    if args.bit_options:
        options["bit_options"] = [tuple(int(b) for b in o.split("/")) for o in args.bit_options]
    if args.sensitivity_batches:
        options["sensitivity_batches"] = args.sensitivity_batches
    if args.weight_rounding != "nearest" or args.gptq:
        options["weight_rounding"] = {"method": args.weight_rounding,
                                      **dict(_option(kv) for kv in args.gptq)}
    qat = dict(_option(kv) for kv in args.finetune)
    out = Path(args.out) / "fidelity.json"
    rows: list[dict[str, Any]] = []
    fp32: dict[str, Any] = {}
    if args.append and out.is_file():
        old = json.loads(out.read_text())
        rows, fp32 = old["rows"], old["fp32"]
    for name in args.models:
        case = CASES[name](crop_batch=args.crop_batch) if name == "mobilenet_v2" \
            else CASES[name]()
        case.finetune.update(qat)
        logits = fp32_logits(case.model, case.held_out)
        top1 = logits.argmax(1)
        labelled = case.labels >= 0
        margin = top1_margin(logits)
        fp32[name] = {"task": float((top1[labelled] == case.labels[labelled]).mean()),
                      "held_out": int(len(top1)), "labelled": int(labelled.sum()),
                      "top1_margin_quantiles": {
                          f"{q:g}": round(float(np.quantile(margin, q)), 3)
                          for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                      "held_out_clear": int((margin > CLEAR_MARGIN).sum())}
        if name == "mobilenet_v2":
            fp32[name]["crop_batch"] = args.crop_batch
        print(f"{name}: FP32 task top-1 {fp32[name]['task']:.2%} on {labelled.sum()} labelled "
              f"of {len(top1)} held-out inputs", flush=True)
        if args.peer:
            for row in ort_int8_rows(case, logits):
                rows.append(row)
                print_row(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=1))
        for mode in args.modes:
            for budget in args.budgets:
                rows.append(measure(case, logits, mode, budget, args.steps, options))
                print_row(rows[-1])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=1))
    print_table(rows, fp32)
    print(f"\nwrote {out}")
    return 0


def _option(text: str) -> tuple[str, Any]:
    """``"lr=1e-4"`` as ``("lr", 0.0001)``: numbers, true/false, else the text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--finetune takes KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def transformer_rows(out_dir: Path, tokens: int, observer: str) -> int:
    """paraphrase-MiniLM-L3-v2 on the Lee corpus's 1225 rated pairs (real_transformers):
    FP32, uniform int8, int8 with 16-bit residual sums (int8 weights: 4x smaller), each with
    Pearson against the human ratings, the cosine to FP32 and program == reference; written to
    ``fidelity_transformers.json``."""
    import real_transformers

    rows = real_transformers.fidelity_rows(tokens, observer=observer)
    for row in rows:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)
    out = out_dir / "fidelity_transformers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


def print_table(rows: list[dict[str, Any]], fp32: dict[str, Any]) -> None:
    """The markdown table of ``rows`` (docs/fidelity.md)."""
    print("\n| model | mode | BOPs | QAT steps | agreement with FP32 | task top-1 (FP32) "
          "| program vs reference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        opts = ", ".join(f"{k} {' '.join(v) if isinstance(v, list) else v}"
                         for k, v in r.get("options", {}).items())
        mode = f"{r['mode']} ({opts})" if opts else r["mode"]
        print(f"| {r['model']} | {mode} | {r['bop_reduction']:.1f}x | "
              f"{r['finetune_steps']} | {r['agreement']:.1%} of {r['held_out']} | "
              f"{r['task']:.1%} ({fp32[r['model']]['task']:.1%}) | "
              f"{_vs_reference(r)} |")


def _vs_reference(row: dict[str, Any]) -> str:
    """The table's last column: the program's worst distance to its reference (none for the
    peer's rows)."""
    return "(peer)" if row["mode"].startswith("ort") else f"{row['worst_lsb']:.0f} LSB"


if __name__ == "__main__":
    sys.exit(main())
