"""The joint pruning + mixed-precision problem as pure data, and its exact cost model.

Solvers see only these frozen records, never the graph: per compute layer (conv2d/linear) its
bit options and their sensitivities, and how its MACs and weight count scale with the kept
channels of its groups; per prunable channel group its keep levels and their sensitivities.
:func:`build_problem` (in :mod:`pqcompile.solvers.graph`, which needs torch.fx) derives them from an
analyzed graph; :func:`to_assignment` turns a :class:`Solution` back into keep-masks and bits.

A layer's kept output channels and kept input channels (per conv group) are each an
:class:`Affine` form ``const + sum(per * kept[group])`` of the kept counts, so
``MACs = macs_scale * out * in`` covers a plain layer (product of two groups), a depthwise conv
(one group, ``in == 1``), a layer reading a concat (``in`` sums several groups) and a layer
whose input and output are one group (a square). Costs match ``CostAnalysis`` on the pruned
graph exactly (see ``tests/test_solvers.py``).

A problem may carry a :class:`LatencyModel` (:func:`with_latency_model`; built from a table
measured on the target by :func:`pqcompile.latency.attach_latency`): each layer's latency as a
sum of :class:`LatencyTerm` tables over the keep levels of at most two groups, which the
solvers that bound ``latency_ms`` (``ilp``, ``greedy``) read; bits do not change it.

>>> layer = Layer("fc", fp32_macs=32, weight_numel=32, out_channels=Affine(0, ((0, 1),)),
...               in_channels=Affine(4), macs_scale=1, weight_scale=1,
...               options=((8, 8), (4, 8)), sensitivity=(0.0, 0.3), activation_key="x")
>>> p = Problem((layer,), (Group(0, "fc:out", 8, (8, 4), (0.0, 0.5)),), params32=Affine(8),
...             fixed_macs=0, fixed_bops=0, reference={"bops": 32 * 1024})
>>> s = evaluate(p, {"fc": (4, 8)}, {0: 4})
>>> s.costs, s.objective
({'bops': 512, 'macs': 16, 'weight_bytes': 40.0}, 0.8)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

from ..budget import COST_KEYS, Budget, check_limits, latency_unsupported
from .verdict import budget_verdict

Option = tuple[int, int]  # (weight bits, activation bits)

DEFAULT_WEIGHT_BITS = (2, 4, 8)
DEFAULT_ACTIVATION_BITS = (4, 8)
DEFAULT_BIT_OPTIONS: tuple[Option, ...] = tuple(
    itertools.product(DEFAULT_WEIGHT_BITS, DEFAULT_ACTIVATION_BITS))
DEFAULT_KEEP_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


@dataclass(frozen=True)
class Affine:
    """A channel count after pruning: ``const + sum(per * kept[group_id])``."""

    const: int
    terms: tuple[tuple[int, int], ...] = ()

    def value(self, kept: Mapping[int, int]) -> int:
        return self.const + sum(per * kept[g] for g, per in self.terms)


@dataclass(frozen=True)
class Layer:
    """A conv2d/linear layer: ``MACs = macs_scale * out * in``, weights ``weight_scale * out *
    in`` (``weight_scale == 0`` for a second call of a shared module, counted once)."""

    name: str
    fp32_macs: int
    weight_numel: int
    out_channels: Affine
    in_channels: Affine
    macs_scale: int
    weight_scale: int
    options: tuple[Option, ...]
    sensitivity: tuple[float, ...]  # aligned with ``options``
    activation_key: str  # the input tensor: layers sharing it share activation bits
    weight_key: str = ""  # the module: its calls share weight bits ("" = the layer's own)

    def __post_init__(self) -> None:
        if not self.options or len(self.options) != len(self.sensitivity):
            raise ValueError(f"layer {self.name!r}: give one sensitivity per bit option, got "
                             f"{len(self.options)} options and {len(self.sensitivity)} values")
        _check_sensitivity(f"layer {self.name!r}", self.sensitivity)

    def option_sensitivity(self, option: Option) -> float:
        return self.sensitivity[self.options.index(tuple(option))]

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(sorted({g for g, _ in self.out_channels.terms + self.in_channels.terms}))


@dataclass(frozen=True)
class Group:
    """A prunable channel group: ``levels`` are kept counts, descending, ``levels[0] == size``;
    ``granule``: the count kept counts are rounded to (``keep_count``'s ``multiple``)."""

    id: int
    name: str
    size: int
    levels: tuple[int, ...]
    sensitivity: tuple[float, ...]  # aligned with ``levels``
    granule: int = 1

    def __post_init__(self) -> None:
        lv = self.levels
        if not lv or lv[0] != self.size or lv[-1] < 1 or any(a <= b for a, b in pairwise(lv)):
            raise ValueError(f"group {self.id} {self.name!r}: levels must be kept counts from "
                             f"the size {self.size} strictly down to >= 1, got {lv}")
        if len(self.sensitivity) != len(lv):
            raise ValueError(f"group {self.id} {self.name!r}: give one sensitivity per level")
        if isinstance(self.granule, bool) or not isinstance(self.granule, int) \
                or self.granule < 1:
            raise ValueError(f"group {self.id} {self.name!r}: granule must be a positive int, "
                             f"got {self.granule!r}")
        _check_sensitivity(f"group {self.id} {self.name!r}", self.sensitivity)


@dataclass(frozen=True)
class LatencyTerm:
    """A part of one layer's predicted latency (ms): a table over the keep levels of at most
    two groups, ``values`` row-major over ``groups``' levels (one value for no group)."""

    groups: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.groups) > 2 or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"a latency term depends on at most two distinct groups, got "
                             f"{self.groups}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.values):
            raise ValueError(f"latency term over groups {self.groups}: values must be finite "
                             f"milliseconds, got {self.values[:6]}")


@dataclass(frozen=True)
class LatencyModel:
    """Predicted latency of each layer (aligned with ``Problem.layers``) as a sum of terms,
    and where the table behind it was measured (``source``: target and device)."""

    layers: tuple[tuple[LatencyTerm, ...], ...]
    source: str = ""


def needs_context(solver: Any) -> bool:
    """Whether ``solver`` searches with the model and data (takes ``context=``)."""
    return bool(getattr(solver, "needs_context", False))


def _check_sensitivity(what: str, values: tuple[float, ...]) -> None:
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{what}: sensitivities must be finite floats >= 0, got {values}")


@dataclass(frozen=True)
class Problem:
    """Everything a solver needs. ``params32``: what is stored beside the layers' weights, in
    32-bit words, as a function of kept counts (per-channel words of the layers, tables and
    float constants at their stored widths: :mod:`pqcompile.passes.cost`);
    ``fixed_macs``/``fixed_bops``: nodes outside the layers (float MACs at 32 x 32 bits,
    integer activation products at 8 x 8); ``float_macs``: MACs outside the layers that scale
    with kept counts (the integer attention products of a head group), at ``float_mac_bops``
    bit operations a MAC (:data:`pqcompile.quant.matmul.PRODUCT_BITS` squared, set by
    :func:`~pqcompile.solvers.graph.build_problem`; 1024 by default) on top of the fixed ones;
    ``reference``: the FP32 model's bops, macs, bytes (and ``latency_ms``, the unpruned
    total of the latency table, when ``latency`` is set); ``latency``: the layers' predicted
    latency on the target, or ``None`` (set it with :func:`with_latency_model`);
    ``float_nodes``: ``(node, FP32 MACs, why it gets no bits)`` of the nodes outside the
    layers that do MACs in float (not the integer products), for the messages of unreachable
    budgets."""

    layers: tuple[Layer, ...]
    groups: tuple[Group, ...]
    params32: Affine
    fixed_macs: int
    fixed_bops: int
    reference: Mapping[str, float]
    keep_fractions: tuple[float, ...] = DEFAULT_KEEP_FRACTIONS
    multiple: int = 1
    float_macs: Affine = Affine(0)
    latency: LatencyModel | None = None
    float_nodes: tuple[tuple[str, int, str], ...] = ()
    float_mac_bops: int = 32 * 32

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no layer {name!r} in the problem; layers are "
                         f"{[lay.name for lay in self.layers[:4]]}...")

    def activation_sets(self) -> dict[str, tuple[int, ...]]:
        """Layer indices by activation key, for keys read by more than one layer."""
        return self._sets(lambda layer: layer.activation_key)

    def weight_sets(self) -> dict[str, tuple[int, ...]]:
        """Layer indices by weight key, for modules called by more than one layer."""
        return self._sets(lambda layer: layer.weight_key or layer.name)

    def _sets(self, key) -> dict[str, tuple[int, ...]]:
        sets: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers):
            sets.setdefault(key(layer), []).append(i)
        return {k: tuple(v) for k, v in sets.items() if len(v) > 1}


@dataclass(frozen=True)
class Solution:
    """Bits per layer, kept channels per group, the summed sensitivity and predicted costs."""

    bits: Mapping[str, Option]
    kept: Mapping[int, int]
    objective: float
    costs: Mapping[str, float]
    solver: str = ""
    feasible: bool = True
    info: Mapping[str, Any] = field(default_factory=dict)


def resolve_limits(problem: Problem, budget: Budget | Mapping[str, float], *,
                   latency: bool = False) -> dict[str, float]:
    """Absolute limits from a :class:`Budget` (ratios against ``problem.reference``; a latency
    ratio against the latency table's unpruned total) or a mapping of absolute limits.

    ``latency``: the caller can bound ``latency_ms`` (the ``ilp`` and ``greedy`` solvers); a
    latency limit raises ``UnsupportedBudgetError`` for any other caller, and for a problem
    without a latency model (:func:`with_latency_model`).
    """
    asked = budget.latency_ms is not None if isinstance(budget, Budget) else \
        isinstance(budget, Mapping) and "latency_ms" in budget
    if asked:
        if not latency:
            raise latency_unsupported(solver=True)
        if problem.latency is None:
            raise latency_unsupported()
    if isinstance(budget, Budget):
        budget = budget.resolve(problem.reference)
    return check_limits(budget, COST_KEYS + (("latency_ms",) if asked else ()))


def with_latency_model(problem: Problem, model: LatencyModel) -> Problem:
    """``problem`` with the latency model ``model`` and ``reference["latency_ms"]``, its
    unpruned total. Checks that the terms fit the problem's layers and groups."""
    if not isinstance(model, LatencyModel):
        raise TypeError(f"a latency model is a LatencyModel, got {type(model).__name__}")
    if len(model.layers) != len(problem.layers):
        raise ValueError(f"the latency model has {len(model.layers)} layers, the problem "
                         f"{len(problem.layers)}: build it for this problem")
    groups = {g.id: g for g in problem.groups}
    for layer, terms in zip(problem.layers, model.layers):
        for term in terms:
            if not set(term.groups) <= set(layer.groups):
                raise ValueError(f"layer {layer.name!r}: a latency term depends on groups "
                                 f"{term.groups}, the layer's channels on {layer.groups}")
            size = math.prod(len(groups[g].levels) for g in term.groups)
            if len(term.values) != size:
                raise ValueError(f"layer {layer.name!r}: a latency term over groups "
                                 f"{term.groups} needs {size} values (one per level "
                                 f"combination), got {len(term.values)}")
    out = replace(problem, latency=model)
    full = {g.id: g.size for g in problem.groups}
    total = sum(layer_latency(out, i, full) for i in range(len(problem.layers)))
    return replace(out, reference={**problem.reference, "latency_ms": total})


def _level_weights(group: Group, kept: int) -> list[tuple[int, float]]:
    """Level indices and weights giving ``kept``: the level itself, else linear between the
    neighbouring levels (clamped to the first and last)."""
    levels = group.levels
    if kept in levels:
        return [(levels.index(kept), 1.0)]
    if kept >= levels[0]:
        return [(0, 1.0)]
    if kept <= levels[-1]:
        return [(len(levels) - 1, 1.0)]
    j = next(i for i, lv in enumerate(levels) if lv < kept)  # levels[j - 1] > kept > levels[j]
    w = (kept - levels[j]) / (levels[j - 1] - levels[j])
    return [(j - 1, w), (j, 1.0 - w)]


def layer_latency(problem: Problem, index: int, kept: Mapping[int, int]) -> float:
    """Predicted latency (ms) of ``problem.layers[index]`` at ``kept`` channels per group
    (levels read from the tables; kept counts between levels interpolated linearly)."""
    if problem.latency is None:
        raise ValueError("the problem has no latency model; attach one with "
                         "pqcompile.latency.attach_latency(problem, table)")
    groups = {g.id: g for g in problem.groups}
    total = 0.0
    for term in problem.latency.layers[index]:
        sizes = [len(groups[g].levels) for g in term.groups]
        axes = [_level_weights(groups[g], int(kept.get(g, groups[g].size)))
                for g in term.groups]
        for combo in itertools.product(*axes):
            flat, weight = 0, 1.0
            for size, (j, w) in zip(sizes, combo):
                flat, weight = flat * size + j, weight * w
            total += weight * term.values[flat]
    return total


def keep_count(size: int, fraction: float, multiple: int = 1) -> int:
    """Channels kept at ``fraction``, rounded up to ``multiple``, within ``1..size``."""
    kept = math.ceil(size * fraction / multiple - 1e-9) * multiple
    return int(min(max(kept, 1), size))


def layer_costs(layer: Layer, option: Option, kept: Mapping[int, int]) -> tuple[int, int, int]:
    """``(bops, macs, weight bits)`` of one layer."""
    pairs = layer.out_channels.value(kept) * layer.in_channels.value(kept)
    macs = layer.macs_scale * pairs
    return macs * option[0] * option[1], macs, layer.weight_scale * pairs * option[0]


def problem_costs(problem: Problem, solution: Solution | None = None, *,
                  bits: Mapping[str, Option] | None = None,
                  kept: Mapping[int, int] | None = None) -> dict[str, float]:
    """Total ``bops``, ``macs`` and ``weight_bytes`` of a solution (or of ``bits``/``kept``),
    and ``latency_ms`` when the problem has a latency model."""
    if solution is not None:
        bits, kept = solution.bits, solution.kept
    kept = {g.id: g.size for g in problem.groups} | dict(kept or {})
    fm = problem.float_macs.value(kept)
    bops, macs = problem.fixed_bops + problem.float_mac_bops * fm, problem.fixed_macs + fm
    wbits = 32 * problem.params32.value(kept)
    for layer in problem.layers:
        b, m, w = layer_costs(layer, tuple(bits[layer.name]), kept)
        bops, macs, wbits = bops + b, macs + m, wbits + w
    costs = {"bops": bops, "macs": macs, "weight_bytes": wbits / 8}
    if problem.latency is not None:
        costs["latency_ms"] = sum(layer_latency(problem, i, kept)
                                  for i in range(len(problem.layers)))
    return costs


def objective(problem: Problem, bits: Mapping[str, Option], kept: Mapping[int, int]) -> float:
    """Summed sensitivity; NaN where bits or a kept count are not among the options."""
    total = 0.0
    for layer in problem.layers:
        option = tuple(bits[layer.name])
        total += layer.option_sensitivity(option) if option in layer.options else math.nan
    for g in problem.groups:
        k = kept.get(g.id, g.size)
        total += g.sensitivity[g.levels.index(k)] if k in g.levels else math.nan
    return total


def evaluate(problem: Problem, bits: Mapping[str, Option], kept: Mapping[int, int],
             limits: Mapping[str, float] | None = None, *, solver: str = "",
             info: Mapping[str, Any] | None = None) -> Solution:
    """A :class:`Solution` with its objective, costs and whether ``limits`` hold.

    ``feasible`` is False when any cost exceeds its limit; a result far below every limit
    (:mod:`pqcompile.solvers.verdict`) gets ``info["overshoot"]``: how many times below."""
    kept = {g.id: int(kept.get(g.id, g.size)) for g in problem.groups}
    bits = {layer.name: tuple(int(b) for b in bits[layer.name]) for layer in problem.layers}
    costs = problem_costs(problem, bits=bits, kept=kept)
    info = dict(info or {})
    feasible = True
    if limits:
        verdict = budget_verdict(costs, limits)
        feasible = verdict.status != "over" and all(k in costs for k in limits)
        if verdict.status == "far below":
            info["overshoot"] = verdict.slack
    return Solution(bits, kept, objective(problem, bits, kept), costs, solver, feasible, info)
