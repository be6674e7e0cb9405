"""``check_model``: can pqcompile compress and compile this model, and is the result right?

Runs the whole path on one model (trace, analysis, data-free sensitivity, the ILP at a mixed
budget, pruning, integer lowering, the TVM build for a target) and compares the compiled
program with its integer-exact reference on fresh inputs. The result is one
:class:`CoverageRow`: channel groups found, how many are prunable, the share of MACs that run
as integer kernels, the BOP reduction reached, the parity measured, or the error that stopped
it (always a :class:`~pqcompile.errors.PQCompileError` or a ``ValueError``/``TypeError`` naming
the node or op; anything else is a pqcompile bug and is raised).

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
>>> row = check_model(m.eval(), (torch.randn(2, 3, 8, 8),), budget="bops=8x")
>>> row.status, row.worst_lsb, row.integer_mac_share
('ok', 0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .api import compile as compile_model
from .budget import Budget
from .build import analysis
from .errors import PQCompileError
from .meta import CHANNEL_GROUPS, COST, COST_TOTALS


@dataclass
class CoverageRow:
    """What :func:`check_model` found. ``status`` is ``"ok"`` or ``"error"``."""

    name: str
    status: str = "ok"
    groups: int = 0
    prunable_groups: int = 0
    integer_mac_share: float = 0.0   # MACs in integer conv/linear kernels / all MACs
    float_ops: list[str] = field(default_factory=list)
    bop_reduction: float = 0.0
    worst_lsb: int = 0               # program vs reference, output integers
    sqnr_db: float = math.inf        # program vs reference, dequantized outputs
    error: str = ""
    error_type: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _outputs(y) -> list[np.ndarray]:
    ys = y if isinstance(y, (list, tuple)) else [y]
    return [np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v,
                       dtype=np.float64) for v in ys]


def check_model(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *,
                budget: Budget | str = "bops=24x", target: Any = "host",
                test_inputs: Sequence[Sequence[torch.Tensor]] | None = None,
                name: str | None = None, seed: int = 0, **compile_kwargs: Any) -> CoverageRow:
    """Compress and build ``model`` (see the module doc); never changes ``model``.

    ``test_inputs``: input tuples to compare the program and the reference on (default: two
    draws of standard normal noise shaped like the example inputs, from ``seed``).
    """
    row = CoverageRow(name or type(model).__name__)
    example_inputs = tuple(example_inputs)
    try:
        fp32 = analysis(model, example_inputs)
        groups = CHANNEL_GROUPS.get(fp32)
        row.groups, row.prunable_groups = len(groups), sum(g.prunable for g in groups)
        compiled = compile_model(model, example_inputs, target=target, budget=budget,
                                 seed=seed, **compile_kwargs)
    except (PQCompileError, ValueError, TypeError) as exc:
        row.status, row.error_type = "error", type(exc).__name__
        row.error = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return row
    row.bop_reduction = float(compiled.totals["bop_reduction"])
    row.float_ops = [f"{node} ({op})" for node, op in compiled.float_ops]
    integer = sum(COST.get(n).macs for n in compiled.graph.graph.nodes
                  if n.name in compiled.assignment.bits)
    total = COST_TOTALS.get(compiled.graph).macs
    row.integer_mac_share = integer / total if total else 1.0
    if test_inputs is None:
        g = torch.Generator().manual_seed(seed)
        test_inputs = [tuple(torch.randn(x.shape, generator=g) for x in example_inputs)
                       for _ in range(2)]
    signal = noise = 0.0
    for xs in test_inputs:
        got = compiled(*[x.numpy() for x in xs])
        with torch.no_grad():
            want = compiled.reference(*xs)
        got_int = compiled.lowering.output_integers(got)
        want_int = compiled.lowering.output_integers(_outputs(want))
        row.worst_lsb = max([row.worst_lsb] + [int(np.abs(a - b).max())
                                               for a, b in zip(got_int, want_int)])
        for a, b in zip(_outputs(got), _outputs(want)):
            signal += float((b ** 2).sum())
            noise += float(((a - b) ** 2).sum())
    row.sqnr_db = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    return row
