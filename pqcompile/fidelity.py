"""Fidelity: how far the compiled model's outputs are from the float model's.

Every build measures it (:func:`pqcompile.build.finish`), on the calibration inputs: one forward
of the FP32 model (the traced, unpruned original) and one of the integer-exact reference (the
quantized model the compiled program equals) on each batch. Two figures:

* ``sqnr_db``: signal-to-quantization-noise ratio of the outputs, ``10 log10(sum y^2 /
  sum (y - y_q)^2)`` over every element, ``y`` the FP32 output and ``y_q`` the reference's
  (the worst output's when the model has several; ``inf`` when they are equal, ``None`` when
  the FP32 output is all zeros);
* ``top1_agreement``: the fraction of inputs whose argmax over classes is the same, when the
  model has one output that looks like class logits (2-D, more than one class); else ``None``.

``inputs`` counts the samples (the batch dims summed). With ``data=``, these are the first
calibration batches of the data; without, the example inputs. Either way they are the inputs
the activation ranges were calibrated on, so the figure is in-sample: an upper bound of what
held-out data will show, and still a cheap alarm for a broken build. The figure is stored in
the artifact's manifest (``extra["fidelity"]``), printed by ``report()`` and kept as
``Compiled.fidelity``.

:func:`warn_if_poor` issues a :class:`~pqcompile.errors.FidelityWarning` when the SQNR is
below ``SQNR_WARN_DB`` (10 dB: the noise has a tenth of the output's power) or the top-1
agreement is below ``AGREEMENT_WARN`` (50 %: the compressed model disagrees with the float one
on most inputs) over at least ``AGREEMENT_MIN_INPUTS`` (8) inputs. A model at 8 bits is far
above both (classifiers of the tests: 30 dB and more, 95 % agreement and more); a
configuration that destroys the model (2-bit layers without data, a range calibrated on the
wrong inputs) falls below them.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> from pqcompile.quant import build_reference
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> gm = trace(torch.nn.Linear(16, 10), (torch.randn(1, 16),))
>>> batches = [(torch.randn(64, 16),)]
>>> f = measure(gm, build_reference(gm, Assignment.uniform(["_0"], 8, 8), batches), batches)
>>> f["inputs"], f["sqnr_db"] > 30, f["top1_agreement"] > 0.9
(64, True, True)
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .errors import FidelityWarning

SQNR_WARN_DB = 10.0
AGREEMENT_WARN = 0.5
AGREEMENT_MIN_INPUTS = 8


def _tensors(value: Any) -> list[torch.Tensor]:
    """The output tensors of a model's output structure, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def sqnr_db(signal: float, noise: float) -> float | None:
    """``10 log10(signal / noise)``: ``inf`` for no noise, ``None`` for no signal."""
    if signal <= 0:
        return None
    return math.inf if noise <= 0 else 10.0 * math.log10(signal / noise)


def measure(fp32: torch.nn.Module, reference: torch.nn.Module,
            batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    """``{"sqnr_db", "top1_agreement", "inputs"}`` of ``reference`` against ``fp32`` on
    ``batches`` (tuples of input tensors, as :func:`pqcompile.quant.calibrate.check_batches`
    returns them); with several outputs, ``"sqnr_db_per_output"`` too (module docstring)."""
    signal: list[float] = []
    noise: list[float] = []
    agree = total = samples = 0
    logits = True
    with torch.no_grad():
        for batch in batches:
            ys, qs = _tensors(fp32(*batch)), _tensors(reference(*batch))
            if len(ys) != len(qs) or any(y.shape != q.shape for y, q in zip(ys, qs)):
                raise ValueError("fidelity: the reference's outputs "
                                 f"{[tuple(q.shape) for q in qs]} do not match the float "
                                 f"model's {[tuple(y.shape) for y in ys]}")
            samples += int(batch[0].shape[0]) if batch and batch[0].dim() else 1
            if not signal:
                signal, noise = [0.0] * len(ys), [0.0] * len(ys)
            for i, (y, q) in enumerate(zip(ys, qs)):
                y64, q64 = y.to(torch.float64), q.to(torch.float64)
                signal[i] += float((y64 ** 2).sum())
                noise[i] += float(((y64 - q64) ** 2).sum())
            logits = logits and len(ys) == 1 and ys[0].dim() == 2 and ys[0].shape[1] > 1 \
                and ys[0].is_floating_point()
            if logits:
                agree += int((ys[0].argmax(1) == qs[0].argmax(1)).sum())
                total += int(ys[0].shape[0])
    per_output = [sqnr_db(s, n) for s, n in zip(signal, noise)]
    finite = [v for v in per_output if v is not None]
    out: dict[str, Any] = {"sqnr_db": min(finite) if finite else None,
                           "top1_agreement": agree / total if logits and total else None,
                           "inputs": samples}
    if len(per_output) > 1:
        out["sqnr_db_per_output"] = per_output
    return out


def to_json(fidelity: Mapping[str, Any]) -> dict[str, Any]:
    """The figure as the manifest stores it (an infinite SQNR, equal outputs, as ``"inf"``)."""

    def num(v):
        return "inf" if isinstance(v, float) and math.isinf(v) else v

    return {k: [num(x) for x in v] if isinstance(v, list) else num(v)
            for k, v in fidelity.items()}


def _db(v: Any) -> float | None:
    return None if v is None else float(v)


def poor(fidelity: Mapping[str, Any]) -> list[str]:
    """What is below the warning thresholds (module docstring), as phrases; empty if nothing."""
    out = []
    sqnr = _db(fidelity.get("sqnr_db"))
    if sqnr is not None and sqnr < SQNR_WARN_DB:
        out.append(f"SQNR {sqnr:.1f} dB (below {SQNR_WARN_DB:g} dB)")
    agreement = fidelity.get("top1_agreement")
    if agreement is not None and fidelity.get("inputs", 0) >= AGREEMENT_MIN_INPUTS \
            and agreement < AGREEMENT_WARN:
        out.append(f"top-1 agreement {agreement:.0%} (below {AGREEMENT_WARN:.0%})")
    return out


def describe(fidelity: Mapping[str, Any] | None) -> str:
    """One report line: ``fidelity vs FP32 on 8 calibration inputs: SQNR 31.2 dB, top-1
    agreement 100%``."""
    if not fidelity:
        return ""
    sqnr = _db(fidelity.get("sqnr_db"))
    parts = ["SQNR " + ("-" if sqnr is None else "exact" if math.isinf(sqnr)
                        else f"{sqnr:.1f} dB")]
    if fidelity.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {fidelity['top1_agreement']:.1%}")
    flag = " (POOR: see the FidelityWarning)" if poor(fidelity) else ""
    return (f"fidelity vs FP32 on the {fidelity.get('inputs', '?')} calibration inputs: "
            + ", ".join(parts) + flag)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside pqcompile: the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith(
            "pqcompile"):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_poor(fidelity: Mapping[str, Any], calibration: str = "") -> bool:
    """Issue a :class:`~pqcompile.errors.FidelityWarning` with advice when the figure is below
    a threshold (pointing at the user's call); returns whether it warned. ``calibration`` says
    what the ranges were calibrated on (the advice then says whether data was given)."""
    below = poor(fidelity)
    if not below:
        return False
    advice = ["raise the budget's bits (a smaller reduction, or bit_options without the "
              "lowest widths)",
              "fine-tune with finetune={'epochs': 1} and data="]
    if "example inputs" in calibration or not calibration:
        advice.insert(0, "give data= (real input batches: calibration and sensitivity on "
                      "the example inputs alone are fragile)")
    warnings.warn(
        f"the compiled model is far from the FP32 model on its {fidelity.get('inputs', '?')} "
        f"calibration inputs: {' and '.join(below)}. Try: " + "; ".join(advice) + ".",
        FidelityWarning, stacklevel=_caller_level())
    return True
