"""The width of residual sums: ``compile(residual_bits=...)``.

A residual sum is an integer ``add`` whose tensor no conv/linear layer reads
(:func:`pqcompile.quant.plan.residual_sums`): in a transformer, the residual stream before each
LayerNorm, read only by the LayerNorm's float island. Its outlier channels grow layer by layer,
and one 8-bit scale spends its levels on them; at 16 bits (int16 tensors) the stream keeps its
small channels. The layers still read 8-bit tensors (the LayerNorm's quantized output), so the
width changes no MAC: BOPs and weight bytes are the same at 8 and 16 bits, only the residual
tensors double in size.

``residual_bits``: an int in 8..16, or ``"auto"``: :func:`choose_residual_bits` builds the
integer reference at 8 and at 16 bits and keeps the one whose outputs are closer to the FP32
model's on the calibration batches (fidelity SQNR; 8 on a tie: the narrower tensors).
:func:`residual_note` is the report's line about it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import OptionError

AUTO_OPTIONS = (8, 16)  # the widths "auto" measures


def check_residual_bits(value: Any) -> int | str:
    """``value`` checked: an int in 8..16 or ``"auto"`` (OptionError otherwise)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, Integral) or not 8 <= value <= 16:
        raise OptionError(f"residual_bits must be an int in 8..16 (the width of integer sums "
                          f"that only float ops read, e.g. a transformer's residual stream) or "
                          f"'auto' (measure 8 and 16 on the calibration batches), got {value!r}")
    return int(value)


def residual_count(gm: torch.fx.GraphModule, assignment: Any) -> int:
    """How many residual sums the quantization of ``gm`` under ``assignment`` has."""
    from ..meta import EXAMPLE_INPUTS
    from .plan import make_plan, residual_sums

    work = copy.deepcopy(gm)
    with torch.no_grad():
        ShapeProp(work).propagate(*EXAMPLE_INPUTS.get(gm).args)
    return len(residual_sums(work, make_plan(work, assignment)))


def choose_residual_bits(fp32: torch.fx.GraphModule, gm: torch.fx.GraphModule, assignment: Any,
                         calibration: Sequence[Any], observer: Any = "minmax",
                         options: Sequence[int] = AUTO_OPTIONS, **reference_kwargs: Any
                         ) -> tuple[int, dict[int, float | None]]:
    """``(bits, {bits: sqnr_db})``: the width in ``options`` whose reference of the prepared
    graph ``gm`` is closest to ``fp32`` on ``calibration`` (module docstring)."""
    from ..fidelity import measure
    from .calibrate import check_batches
    from .reference import build_reference

    batches = check_batches(gm, calibration)
    measured: dict[int, float | None] = {}
    for bits in options:
        ref = build_reference(gm, assignment, batches, observer, residual_bits=bits,
                              **reference_kwargs)
        measured[bits] = measure(fp32, ref, batches)["sqnr_db"]
    best = max(options, key=lambda b: (float("-inf") if measured[b] is None else measured[b],
                                       -b))
    return best, measured


def residual_note(bits: int, count: int, measured: dict[int, float | None] | None = None
                  ) -> str:
    """The report's line: the width, how many sums, and what "auto" measured."""
    if count == 0:
        return f"residual sums: none (residual_bits={bits} changes nothing)"
    text = (f"residual sums: {count} add(s) only float ops read kept at {bits} bits "
            f"({'int16' if bits > 8 else 'int8'}; no MACs, so BOPs and weight bytes do not "
            f"change)")
    if measured:
        figures = ", ".join(f"{b}-bit {'n/a' if s is None else f'{s:.1f} dB'}"
                            for b, s in sorted(measured.items()))
        text += f"; chosen by fidelity SQNR on the calibration batches: {figures}"
    return text
