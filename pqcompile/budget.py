"""The compression budget: upper bounds on BOPs, weight bytes, MACs or latency.

Each bound is absolute (``weight_bytes=200_000``) or a reduction ratio against the FP32
reference written as a string (``bops="60x"``: at most 1/60 of the FP32 BOPs). Several bounds
may be set at once; a solver must meet all of them. :meth:`Budget.resolve` turns a budget into
absolute limits once the FP32 reference costs are known.

>>> b = Budget.parse("bops=60x,weight_bytes=200KB")
>>> b
Budget(bops='60x', weight_bytes=200000)
>>> b.resolve({"bops": 6_000_000, "macs": 100, "weight_bytes": 1e6})
{'bops': 100000.0, 'weight_bytes': 200000}
>>> Budget.from_json(b.to_json()) == b
True
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import PQCompileError

FORMAT_VERSION = 1

# Costs a solver over the shared problem can bound; latency needs a measured table
# (pqcompile.latency) and a solver that reads it.
COST_KEYS = ("bops", "weight_bytes", "macs")
BUDGET_KEYS = COST_KEYS + ("latency_ms",)

_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS = {"bops": _COUNT_UNITS, "macs": _COUNT_UNITS, "weight_bytes": _BYTE_UNITS,
          "latency_ms": {"": 1, "ms": 1, "s": 1000}}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


class BudgetError(PQCompileError, ValueError):
    """A budget is missing or malformed: an unknown key, a bad unit, a limit that is not a
    positive number; the message names the entry and shows the accepted form."""


class InfeasibleBudgetError(PQCompileError, ValueError):
    """No assignment in the search space meets the budget.

    ``minimum`` maps each limited cost to the smallest value reachable in the search space;
    ``limits`` is the budget asked, as absolute limits.
    """

    def __init__(self, message: str, minimum: Mapping[str, float] | None = None,
                 limits: Mapping[str, float] | None = None) -> None:
        super().__init__(message)
        self.minimum = dict(minimum or {})
        self.limits = dict(limits or {})


class UnsupportedBudgetError(PQCompileError, NotImplementedError):
    """The solver cannot bound this cost (a latency budget without a measured latency table,
    or with a solver that does not read one)."""


def _parse_value(key: str, value: Any) -> int | float | str:
    """One budget entry as a positive number or a canonical ratio string ``"<r>x"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"Budget.{key} must be a number or a string such as '60x', got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("x"):
            try:
                ratio = float(text[:-1])
            except ValueError:
                raise BudgetError(f"Budget.{key}={value!r}: a reduction ratio is a number "
                                  "followed by 'x', e.g. '60x'") from None
            if not math.isfinite(ratio) or ratio < 1:
                raise BudgetError(f"Budget.{key}={value!r}: a reduction ratio must be at least "
                                  "1x (1x = the FP32 reference itself)")
            return f"{ratio:g}x"
        match = _NUMBER.match(text)
        units = _UNITS[key]
        unit = match.group(2).lower() if match else None
        if match is None or unit not in units:
            names = ", ".join(repr(u) for u in units if u) or "none"
            raise BudgetError(f"Budget.{key}={value!r}: expected a number with an optional unit "
                              f"({names}) or a reduction ratio such as '60x'")
        value = float(match.group(1)) * units[unit]
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"Budget.{key}={value!r}: a limit must be a positive, finite number")
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class Budget:
    """Upper bounds on the compressed model's costs; ``None`` leaves a cost free.

    ``bops``: MACs x weight bits x activation bits, summed over compute layers;
    ``weight_bytes``: stored parameters (weights at their bits, the rest at 32 bits);
    ``macs``: multiply-accumulates after pruning; ``latency_ms``: the conv/linear layers'
    summed latency, predicted from a per-layer table measured on the target
    (:mod:`pqcompile.latency`; a ratio is against the table's unpruned total).
    """

    bops: int | float | str | None = None
    weight_bytes: int | float | str | None = None
    macs: int | float | str | None = None
    latency_ms: int | float | str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _parse_value(f.name, value))
        if not self.items():
            raise BudgetError("Budget sets no limit: give at least one of "
                              f"{', '.join(BUDGET_KEYS)}, e.g. Budget(bops='60x')")

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.items().items())
        return f"Budget({inner})"

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.items().items())

    def items(self) -> dict[str, int | float | str]:
        """The limits that are set, by name, as given (numbers or ratio strings)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def reduction(cls, **ratios: float) -> Budget:
        """Bounds as reduction ratios: ``Budget.reduction(bops=60) == Budget(bops="60x")``."""
        unknown = sorted(set(ratios) - set(BUDGET_KEYS))
        if unknown:
            raise BudgetError(f"unknown budget key(s) {unknown}: use {', '.join(BUDGET_KEYS)}")
        return cls(**{k: f"{float(v):g}x" if isinstance(v, (int, float))
                      and not isinstance(v, bool) else v for k, v in ratios.items()})

    @classmethod
    def parse(cls, text: str) -> Budget:
        """The command-line form ``"bops=60x,weight_bytes=200KB,macs=5M"`` (``;`` separates
        entries too: ``"bops=8x;macs=2x"``).

        Units: ``B, KB, MB, GB, KiB, MiB, GiB`` for bytes; ``K, M, G, T`` for BOPs and MACs;
        ``ms, s`` for latency; a trailing ``x`` makes a reduction ratio.
        """
        if not isinstance(text, str):
            raise TypeError(f"Budget.parse takes a string, got {type(text).__name__}")
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not value.strip():
                raise BudgetError(f"budget {text!r}: {part!r} is not key=value; write e.g. "
                                  "'bops=60x,weight_bytes=200KB'")
            if key not in BUDGET_KEYS:
                raise BudgetError(f"budget {text!r}: unknown key {key!r}; use "
                                  f"{', '.join(BUDGET_KEYS)}")
            if key in values:
                raise BudgetError(f"budget {text!r}: {key!r} is given twice; give each key "
                                  "once")
            values[key] = value.strip()
        return cls(**values)

    def resolve(self, fp32: Any) -> dict[str, float]:
        """Absolute limits, ratios divided into the FP32 reference ``fp32``.

        ``fp32`` is a mapping with the FP32 ``bops``, ``weight_bytes``, ``macs`` (and
        ``latency_ms`` for a latency ratio: the latency table's unpruned total), or a
        :class:`~pqcompile.meta.CostTotals`.
        """
        reference = _reference(fp32)
        limits: dict[str, float] = {}
        for key, value in self.items().items():
            if isinstance(value, str):
                if key not in reference:
                    raise ValueError(f"budget {key}={value} is a reduction ratio, but the FP32 "
                                     f"reference has no {key!r} (it has {sorted(reference)}); "
                                     "give an absolute limit instead")
                limits[key] = reference[key] / float(value[:-1])
            else:
                limits[key] = value
        return limits

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, **self.items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Budget:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT_VERSION:
            raise BudgetError(f"budget format is not {FORMAT_VERSION}: this pqcompile reads "
                              f"format {FORMAT_VERSION} (got {text[:80]!r})")
        unknown = sorted(set(data) - set(BUDGET_KEYS))
        if unknown:
            raise BudgetError(f"budget JSON has unknown key(s) {unknown}; use "
                              f"{', '.join(BUDGET_KEYS)}")
        return cls(**data)


def _reference(fp32: Any) -> dict[str, float]:
    if isinstance(fp32, Mapping):
        return {k: float(v) for k, v in fp32.items() if v is not None}
    if all(hasattr(fp32, a) for a in ("fp32_bops", "fp32_weight_bytes", "macs")):
        return {"bops": float(fp32.fp32_bops), "weight_bytes": float(fp32.fp32_weight_bytes),
                "macs": float(fp32.macs)}
    raise TypeError("the FP32 reference must be a mapping {'bops': ..., 'weight_bytes': ..., "
                    f"'macs': ...}} or a CostTotals, got {type(fp32).__name__}")


def latency_unsupported(solver: bool = False) -> UnsupportedBudgetError:
    """The error for a latency limit where it cannot be bounded: by a solver that does not
    read latency tables (``solver=True``), or without a measured table."""
    if solver:
        return UnsupportedBudgetError(
            "this solver cannot bound latency_ms: only the 'ilp' and 'greedy' solvers use a "
            "measured latency table; pick one of them, or bound bops, weight_bytes or macs "
            "instead")
    return UnsupportedBudgetError(
        "latency budgets need a measured latency table for the target: compile() measures one "
        "when the budget sets latency_ms (or takes latency_table=); a solver called directly "
        "needs the problem from pqcompile.latency.attach_latency(problem, "
        "measure_latency(problem, graph, target)); or bound bops, weight_bytes or macs instead")


def check_limits(limits: Mapping[str, float], supported: tuple[str, ...] = COST_KEYS
                 ) -> dict[str, float]:
    """Validate absolute limits for a solver that can bound the ``supported`` costs."""
    if not isinstance(limits, Mapping):
        raise TypeError("budget limits must be a dict {cost: absolute limit} (see "
                        f"Budget.resolve), got {type(limits).__name__}")
    if not limits:
        raise ValueError("the budget sets no limit: give at least one of "
                         f"{', '.join(supported)}")
    out = {}
    for key, value in limits.items():
        if key == "latency_ms" and key not in supported:
            raise latency_unsupported()
        if key not in supported:
            raise ValueError(f"unknown budget limit {key!r}: this solver bounds "
                             f"{', '.join(supported)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget limit {key}={value!r} must be a positive number; resolve "
                             "ratio budgets first with Budget.resolve(fp32_totals)")
        out[key] = value
    return out
