"""Calibration observers: the clipping range ``amax`` of an activation tensor.

An observer sees every calibration value of one tensor (:meth:`Observer.observe`) and then
answers :meth:`Observer.amax` for a grid (``bits``, ``signed``); the tensor's scale is
``amax / qmax``, never below ``SCALE_FLOOR`` (2^-30: a tensor whose values all lie under
~1e-7 would otherwise get a scale that no fixed-point multiplier can reach). Signed grids
clip ``|x|``, unsigned grids clip ``x`` (values below 0 clamp to 0).

* ``minmax``: ``amax = max |x|`` (signed) or ``max x`` (unsigned).
* ``percentile``: ``amax = quantile(|x|, p / 100)`` (signed) or ``quantile(max(x, 0), p / 100)``
  (unsigned), linear interpolation as :func:`numpy.quantile`; ``p = 99.99`` by default.
* ``mse``: ``amax = r * max`` for the ratio ``r`` in ``ratios`` (default 0.20, 0.21, ..., 1.00)
  that minimises ``mean((x - fake_quant(x))^2)``; ties go to the larger ratio.
* ``auto``: per tensor, the quantization MSE (on the values seen) of the three ranges above;
  a clipping range (percentile or MSE search) replaces min/max only where its MSE is at most
  ``margin`` (0.5) times min/max's, i.e. where min/max is fragile: a few outliers stretch the
  range of a heavy-tailed tensor so far that most values fall into a handful of steps. On a
  well-behaved tensor the MSE search gains little (a Gaussian at 8 bits: ~10 %) and clipping
  the largest values costs more than the MSE says where they matter (the top logit of a
  classifier, clipped to its runner-up), so min/max stays. :attr:`AutoObserver.chosen` records
  the pick per grid. Its MSE search is coarse to fine (every 5th ratio, then the best one's
  neighbourhood) on at most 2^17 values per tensor, to keep calibration cheap.

Percentile, MSE and auto keep the values they observe, at most ``max_samples`` per tensor (each
batch then keeps an evenly strided subset), so memory stays bounded on large tensors; ranges
are computed once per grid.

>>> import torch
>>> obs = MinMaxObserver()
>>> obs.observe(torch.tensor([-3.0, 1.0, 2.0]))
>>> obs.amax(bits=8, signed=True), obs.amax(bits=8, signed=False)
(3.0, 2.0)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SCALE_FLOOR = 2.0 ** -30


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a symmetric narrow signed or an unsigned grid of ``bits``."""
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def quantization_mse(x: np.ndarray, amaxes: np.ndarray, bits: int, signed: bool,
                     chunk: int = 1 << 22) -> np.ndarray:
    """``mean((x - fake_quant(x))^2)`` of the values ``x`` for each clipping range in
    ``amaxes`` on the grid (``bits``, ``signed``), rounding as the reference does."""
    qmin, qmax = grid(bits, signed)
    amaxes = np.asarray(amaxes, dtype=np.float64)
    out = np.zeros(len(amaxes))
    rows = max(1, chunk // max(x.size, 1))
    for i in range(0, len(amaxes), rows):
        s = np.where(amaxes[i:i + rows] > 0, amaxes[i:i + rows], 1.0)[:, None] / qmax
        q = np.clip(np.floor(x[None, :] / s + 0.5), qmin, qmax)
        out[i:i + rows] = np.mean((x[None, :] - q * s) ** 2, axis=1)
    return out


class Observer:
    """Base class: subclasses implement :meth:`observe` and :meth:`amax`."""

    name = "observer"

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def amax(self, bits: int, signed: bool) -> float:
        raise NotImplementedError

    def scale(self, bits: int, signed: bool) -> float:
        """``amax / qmax`` (at least ``SCALE_FLOOR``); a tensor that was all zeros gets scale 1
        (any scale is exact)."""
        a = self.amax(bits, signed)
        if not np.isfinite(a):
            raise ValueError(f"{self.name} observer saw a non-finite value (inf or nan)")
        return max(a / grid(bits, signed)[1], SCALE_FLOOR) if a > 0 else 1.0


class MinMaxObserver(Observer):
    name = "minmax"

    def __init__(self) -> None:
        self.lo, self.hi, self.count = np.inf, -np.inf, 0

    def observe(self, x: torch.Tensor) -> None:
        if x.numel():
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            self.count += x.numel()

    def amax(self, bits: int, signed: bool) -> float:
        if not self.count:
            raise ValueError("minmax observer saw no values")
        return max(abs(self.lo), abs(self.hi)) if signed else max(self.hi, 0.0)


class _SampleObserver(Observer):
    """Keeps (a bounded, evenly strided subset of) the observed values; caches answers."""

    def __init__(self, max_samples: int = 1 << 22) -> None:
        self.max_samples = max_samples
        self.samples: list[np.ndarray] = []
        self.seen = 0
        self._cache: dict[tuple[int, bool], float] = {}

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).to(torch.float64).cpu().numpy()
        budget = self.max_samples - sum(s.size for s in self.samples)
        if flat.size > budget > 0:
            flat = flat[:: -(-flat.size // budget)]
        if budget > 0 and flat.size:
            self.samples.append(flat)
        self.seen += x.numel()
        self._cache.clear()

    def raw(self, signed: bool) -> np.ndarray:
        """The kept values as the grid sees them: ``x`` (signed) or ``max(x, 0)``."""
        if not self.samples:
            raise ValueError(f"{self.name} observer saw no values")
        v = np.concatenate(self.samples)
        if not np.isfinite(v).all():
            raise ValueError(f"{self.name} observer saw a non-finite value (inf or nan)")
        return v if signed else np.maximum(v, 0.0)

    def values(self, signed: bool) -> np.ndarray:
        """The magnitudes a range clips: ``|x|`` (signed) or ``max(x, 0)``."""
        v = self.raw(signed)
        return np.abs(v) if signed else v

    def amax(self, bits: int, signed: bool) -> float:
        key = (bits, signed)
        if key not in self._cache:
            self._cache[key] = self._amax(bits, signed)
        return self._cache[key]

    def _amax(self, bits: int, signed: bool) -> float:
        raise NotImplementedError


class PercentileObserver(_SampleObserver):
    name = "percentile"

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 22) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(max_samples)
        self.percentile = percentile

    def _amax(self, bits: int, signed: bool) -> float:
        return float(np.quantile(self.values(signed), self.percentile / 100))


def _ratios(ratios: np.ndarray | None) -> np.ndarray:
    return np.round(np.arange(20, 101) / 100, 2) if ratios is None \
        else np.asarray(ratios, dtype=np.float64)


def _mse_search(x: np.ndarray, top: float, ratios: np.ndarray, bits: int, signed: bool,
                coarse: int = 1) -> tuple[float, float]:
    """``(amax, mse)``: the ratio of ``top`` with the least error (ties: the larger ratio).

    ``coarse > 1`` tries every ``coarse``-th ratio first, then every ratio between the best
    one's neighbours on that coarse grid (~3x fewer evaluations; the error is smooth in the
    ratio, so this finds the full search's answer or one as good up to the grid's step)."""
    if top == 0:
        return 0.0, 0.0
    r = np.sort(ratios)[::-1]
    if coarse > 1 and len(r) > 3 * coarse:
        idx = np.unique(np.r_[np.arange(0, len(r), coarse), len(r) - 1])
        err = quantization_mse(x, r[idx] * top, bits, signed)
        best = int(idx[int(np.argmin(err))])
        r = r[max(best - coarse, 0):best + coarse + 1]
    err = quantization_mse(x, r * top, bits, signed)
    i = int(np.argmin(err))  # the first minimum: the largest ratio among ties
    return float(r[i] * top), float(err[i])


class MseObserver(_SampleObserver):
    name = "mse"

    def __init__(self, ratios: np.ndarray | None = None, max_samples: int = 1 << 20) -> None:
        super().__init__(max_samples)
        self.ratios = _ratios(ratios)

    def _amax(self, bits: int, signed: bool) -> float:
        return _mse_search(self.raw(signed), float(self.values(signed).max()), self.ratios,
                           bits, signed)[0]


class AutoObserver(_SampleObserver):
    """min/max, percentile or MSE search, per tensor and grid (module docstring).

    ``chosen[(bits, signed)]`` names the pick and ``errors[(bits, signed)]`` holds each
    candidate's ``(amax, mse)``, once :meth:`amax` was asked for that grid.
    """

    name = "auto"

    def __init__(self, percentile: float = 99.99, ratios: np.ndarray | None = None,
                 margin: float = 0.5, max_samples: int = 1 << 17) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        super().__init__(max_samples)
        self.percentile, self.ratios, self.margin = percentile, _ratios(ratios), margin
        self.minmax = MinMaxObserver()
        self.chosen: dict[tuple[int, bool], str] = {}
        self.errors: dict[tuple[int, bool], dict[str, tuple[float, float]]] = {}

    def observe(self, x: torch.Tensor) -> None:
        self.minmax.observe(x.detach())
        super().observe(x)

    def _amax(self, bits: int, signed: bool) -> float:
        top = self.minmax.amax(bits, signed)  # every value, not only the kept samples
        x = self.raw(signed)
        if not np.isfinite(top):
            raise ValueError(f"{self.name} observer saw a non-finite value (inf or nan)")
        pct = float(np.quantile(self.values(signed), self.percentile / 100))
        errors = {"minmax": (top, float(quantization_mse(x, [top], bits, signed)[0])),
                  "percentile": (pct, float(quantization_mse(x, [pct], bits, signed)[0])),
                  "mse": _mse_search(x, top, self.ratios, bits, signed, coarse=5)}
        pick = "minmax"
        clip = min(("percentile", "mse"), key=lambda k: errors[k][1])
        if top > 0 and errors[clip][0] > 0 and \
                errors[clip][1] <= self.margin * errors["minmax"][1]:
            pick = clip
        self.chosen[(bits, signed)], self.errors[(bits, signed)] = pick, errors
        return errors[pick][0]


OBSERVERS: dict[str, Callable[[], Observer]] = {
    "minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MseObserver,
    "auto": AutoObserver}


def make_observer(spec: str | Callable[[], Observer]) -> Callable[[], Observer]:
    """An observer factory from a name in :data:`OBSERVERS` or a zero-argument callable."""
    if isinstance(spec, str):
        if spec not in OBSERVERS:
            raise ValueError(f"unknown observer {spec!r}; choose one of {sorted(OBSERVERS)} or "
                             "pass a callable returning an Observer")
        return OBSERVERS[spec]
    if callable(spec):
        return spec
    raise TypeError(f"observer must be a name or a callable returning an Observer, got "
                    f"{type(spec).__name__}")
