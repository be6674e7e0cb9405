"""SensitivityAnalysis: run a criterion and annotate bit sensitivities and channel importance.

Writes ``SENSITIVITY`` on every conv/linear node (``{(w_bits, a_bits): value}``),
``CHANNEL_IMPORTANCE`` on the graph (``{group id: per-channel scores}`` for every prunable
channel group: the prune sensitivities) and ``SENSITIVITY_INFO`` (criteria, units, options).
Solvers read them back with :func:`layer_sensitivities` and :func:`channel_importance`.

Without data the data-free ``weight_error`` criterion is used for both (weight quantization
error; a channel's squared norm); with data, ``fisher`` (FIT). Either can be chosen by name or
object (:mod:`pqcompile.criteria`); when both criteria are data-driven second-order ones
(``hessian``, ``fisher``, ``channel_fisher``), bits and channels are in the same units.
``objective``: what the data-driven criteria chosen by name measure the model by
(:class:`~pqcompile.objective.Objective`; default: distillation to the float outputs).

A degenerate table -- every value zero, a NaN or infinity, or no layer whose value depends on
its bits -- would let a solver pick any bits at all; it raises
:class:`~pqcompile.errors.DegenerateSensitivityError` naming the criterion and a way out.

>>> import torch
>>> from torch import nn
>>> from pqcompile.build import analysis
>>> gm = analysis(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
...                             nn.Conv2d(8, 4, 1)).eval(), (torch.randn(1, 3, 8, 8),))
>>> gm = SensitivityAnalysis(weight_bits=(4, 8))(gm).graph_module
>>> s = layer_sensitivities(gm)["_0"]
>>> sorted(s), s[(4, 4)] > s[(8, 8)]
([(4, 4), (4, 8), (8, 4), (8, 8)], True)
>>> {gid: v.shape for gid, v in channel_importance(gm).items()}
{0: (8,)}
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from ..criteria import CRITERIA, Criterion, default_criterion, get_criterion
from ..errors import DegenerateSensitivityError
from ..meta import (
    CHANNEL_GROUPS,
    CHANNEL_IMPORTANCE,
    EXAMPLE_INPUTS,
    SENSITIVITY,
    SENSITIVITY_INFO,
    SensitivityInfo,
)
from ..presets import compute_layers
from .base import Pass, PassInfo, PassResult

DEFAULT_BITS = (2, 3, 4, 6, 8)


class SensitivityAnalysis(Pass):
    """Annotate sensitivities from ``criterion`` (see the module docstring).

    ``batches``: calibration data for data-driven criteria, ``(inputs, target)`` pairs (a
    one-shot iterator is read into a list first, since two criteria may each read it).
    ``bit_options``: the ``(w, a)`` pairs to score; by default every pair of ``weight_bits`` x
    ``activation_bits`` (``activation_bits`` defaults to ``weight_bits``). ``layers``: a subset
    of the conv/linear nodes (default: all). ``channels=False`` skips channel importance (and
    the need for ChannelGroupAnalysis).
    """

    def __init__(self, criterion: str | Criterion | None = None,
                 batches: Iterable[Any] | None = None, *,
                 channel_criterion: str | Criterion | None = None,
                 weight_bits: Sequence[int] = DEFAULT_BITS,
                 activation_bits: Sequence[int] | None = None,
                 bit_options: Iterable[tuple[int, int]] | None = None,
                 layers: Sequence[str] | None = None, channels: bool = True,
                 objective: Any = None) -> None:
        if batches is not None and iter(batches) is batches:
            batches = list(batches)
        self.batches = batches
        self.objective = objective
        crit = default_criterion(batches is not None) if criterion is None \
            else _by_name(criterion, objective)
        if criterion is None and crit.needs_data and objective is not None:
            crit = _by_name(crit.name, objective)
        if not crit.scores_layers:
            raise ValueError(f"criterion {crit.name!r} scores channels only; pass it as "
                             "channel_criterion= and choose a layer criterion ('weight_error', "
                             "'hessian' or 'fisher')")
        chan = None
        if channels:
            chan = crit if channel_criterion is None and crit.scores_channels \
                else _by_name(channel_criterion or "magnitude", objective)
            if not chan.scores_channels:
                raise ValueError(f"channel_criterion {chan.name!r} does not score channels; "
                                 "use 'magnitude', 'l1', 'taylor', 'channel_fisher' or 'fisher'")
        for c in (crit, chan):
            if c is not None and c.needs_data and batches is None:
                raise ValueError(f"criterion {c.name!r} needs data: pass batches= (an iterable "
                                 "of (inputs, target) batches), or use a data-free criterion "
                                 "('weight_error', 'magnitude', 'l1')")
        self.criterion, self.channel_criterion = crit, chan
        if bit_options is None:
            acts = weight_bits if activation_bits is None else activation_bits
            bit_options = itertools.product(weight_bits, acts)
        self.bit_options = tuple(sorted({(int(w), int(a)) for w, a in bit_options}))
        if not self.bit_options:
            raise ValueError("no bit options to score: give weight_bits or bit_options")
        self.layers = None if layers is None else list(layers)
        provides = (SENSITIVITY, SENSITIVITY_INFO) + ((CHANNEL_IMPORTANCE,) if channels else ())
        self.info = PassInfo("SensitivityAnalysis",
                             requires=(CHANNEL_GROUPS,) if channels else (EXAMPLE_INPUTS,),
                             provides=provides)

    def run(self, gm, ctx):
        crit, chan = self.criterion, self.channel_criterion
        crit.calibrate(gm, self.batches)
        if chan is not None and chan is not crit:
            chan.calibrate(gm, self.batches)
        all_layers = compute_layers(gm)
        layers = all_layers if self.layers is None else self.layers
        unknown = sorted(set(layers) - set(all_layers))
        if unknown:
            raise ValueError(f"layers {unknown[:5]} are not conv/linear nodes of the graph; "
                             f"those are {all_layers[:6]}")
        nodes = {n.name: n for n in gm.graph.nodes}
        table = {}
        for name in layers:
            table[name] = crit.layer_sensitivity(gm, name, self.bit_options)
            SENSITIVITY.set(nodes[name], table[name])
        scores = {}
        if chan is not None:
            for g in CHANNEL_GROUPS.get(gm):
                if g.prunable:
                    scores[g.id] = np.maximum(np.asarray(chan.channel_scores(gm, g),
                                                         dtype=np.float64), 0.0)
            CHANNEL_IMPORTANCE.set(gm, scores)
        SENSITIVITY_INFO.set(gm, SensitivityInfo(
            crit.name, chan.name if chan is not None else None, crit.units,
            chan.units if chan is not None else None, self.bit_options,
            self.batches is not None))
        check_table(crit, table, scores if chan is crit else {}, self.bit_options)
        ctx.results["sensitivity"] = table
        ctx.results["channel_importance"] = scores
        return PassResult(gm, False)


def _by_name(spec: str | Criterion, objective: Any) -> Criterion:
    """A criterion by name (a data-driven one measuring ``objective``), or ``spec`` itself."""
    if isinstance(spec, str) and objective is not None and spec in CRITERIA \
            and getattr(CRITERIA[spec], "needs_data", False):
        return get_criterion(spec, objective=objective)
    return get_criterion(spec)


def check_table(crit: Criterion, table: dict[str, dict[tuple[int, int], float]],
                channel_scores: dict[int, np.ndarray], options: Sequence[tuple[int, int]]
                ) -> None:
    """Raise :class:`DegenerateSensitivityError` for an all-zero, non-finite or constant
    table (the module docstring): a solver would pick bits on noise."""
    values = np.array([v for row in table.values() for v in row.values()], dtype=np.float64)
    if not values.size:
        return
    way_out = ("criterion='weight_error' (data-free) or criterion='hessian' (curvature of the "
               "objective, which is not zero where its gradient is)")
    bad = [(layer, o) for layer, row in table.items() for o, v in row.items()
           if not np.isfinite(v)]
    if bad:
        raise DegenerateSensitivityError(
            f"criterion {crit.name!r} gave non-finite sensitivities ({len(bad)} of "
            f"{values.size}, e.g. layer {bad[0][0]!r} at bits {bad[0][1]}): the loss or its "
            f"gradients overflow; check the data and the loss, or use {way_out}")
    chans = [np.asarray(v, dtype=np.float64) for v in channel_scores.values()]
    if not np.any(values > 0) and not any(np.any(c > 0) for c in chans):
        objective = getattr(crit, "objective", None)
        what = f" of objective {objective.name!r}" if objective is not None else ""
        raise DegenerateSensitivityError(
            f"criterion {crit.name!r} scored every layer and channel 0: the gradients{what} "
            f"are zero on the data (a loss that is minimal at the float model, such as a "
            f"distillation loss, has no gradient there); use the default objective "
            f"(loss='distill', whose Fisher uses a Gauss-Newton probe), {way_out}")
    if len({o[0] for o in options}) > 1 or len({o[1] for o in options}) > 1:
        if all(len(set(row.values())) == 1 for row in table.values()):
            raise DegenerateSensitivityError(
                f"criterion {crit.name!r} gave every layer the same value at all bit options "
                f"{list(options)}: the bits would be chosen at random; use {way_out}")


def layer_sensitivities(gm: torch.fx.GraphModule) -> dict[str, dict[tuple[int, int], float]]:
    """``{layer: {(w_bits, a_bits): value}}`` from the ``SENSITIVITY`` annotations."""
    if not SENSITIVITY_INFO.has(gm):
        SENSITIVITY_INFO.get(gm)  # raises, naming SensitivityAnalysis
    return {n.name: dict(SENSITIVITY.get(n)) for n in gm.graph.nodes if SENSITIVITY.has(n)}


def channel_importance(gm: torch.fx.GraphModule) -> dict[int, np.ndarray]:
    """``{group id: per-channel prune sensitivity}`` from ``CHANNEL_IMPORTANCE``."""
    return {gid: v.copy() for gid, v in CHANNEL_IMPORTANCE.get(gm).items()}
