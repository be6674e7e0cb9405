"""Calibration observers: the clipping range ``amax`` of an activation tensor.

An observer sees every calibration value of one tensor (:meth:`Observer.observe`) and then
answers :meth:`Observer.amax` for a grid (``bits``, ``signed``); the tensor's scale is
``amax / qmax``. Signed grids clip ``|x|``, unsigned grids clip ``x`` (values below 0 clamp to 0).

* ``minmax``: ``amax = max |x|`` (signed) or ``max x`` (unsigned).
* ``percentile``: ``amax = quantile(|x|, p / 100)`` (signed) or ``quantile(max(x, 0), p / 100)``
  (unsigned), linear interpolation as :func:`numpy.quantile`; ``p = 99.99`` by default.
* ``mse``: ``amax = r * max`` for the ratio ``r`` in ``ratios`` (default 0.20, 0.21, ..., 1.00)
  that minimises ``mean((x - fake_quant(x))^2)``; ties go to the larger ratio.

Percentile and MSE keep the values they observe, at most ``max_samples`` per tensor (each batch
then keeps an evenly strided subset), so memory stays bounded on large tensors.

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


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a symmetric narrow signed or an unsigned grid of ``bits``."""
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


class Observer:
    """Base class: subclasses implement :meth:`observe` and :meth:`amax`."""

    name = "observer"

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def amax(self, bits: int, signed: bool) -> float:
        raise NotImplementedError

    def scale(self, bits: int, signed: bool) -> float:
        """``amax / qmax``; a tensor that was all zeros gets scale 1 (any scale is exact)."""
        a = self.amax(bits, signed)
        if not np.isfinite(a):
            raise ValueError(f"{self.name} observer saw a non-finite value (inf or nan)")
        return a / grid(bits, signed)[1] if a > 0 else 1.0


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
    """Keeps (a bounded, evenly strided subset of) the observed values."""

    def __init__(self, max_samples: int = 1 << 22) -> None:
        self.max_samples = max_samples
        self.samples: list[np.ndarray] = []
        self.seen = 0

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).to(torch.float64).cpu().numpy()
        budget = self.max_samples - sum(s.size for s in self.samples)
        if flat.size > budget > 0:
            flat = flat[:: -(-flat.size // budget)]
        if budget > 0 and flat.size:
            self.samples.append(flat)
        self.seen += x.numel()

    def values(self, signed: bool) -> np.ndarray:
        if not self.samples:
            raise ValueError(f"{self.name} observer saw no values")
        v = np.concatenate(self.samples)
        if not np.isfinite(v).all():
            raise ValueError(f"{self.name} observer saw a non-finite value (inf or nan)")
        return np.abs(v) if signed else np.maximum(v, 0.0)


class PercentileObserver(_SampleObserver):
    name = "percentile"

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 22) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(max_samples)
        self.percentile = percentile

    def amax(self, bits: int, signed: bool) -> float:
        return float(np.quantile(self.values(signed), self.percentile / 100))


class MseObserver(_SampleObserver):
    name = "mse"

    def __init__(self, ratios: np.ndarray | None = None, max_samples: int = 1 << 20) -> None:
        super().__init__(max_samples)
        self.ratios = np.round(np.arange(20, 101) / 100, 2) if ratios is None \
            else np.asarray(ratios, dtype=np.float64)

    def amax(self, bits: int, signed: bool) -> float:
        v = self.values(signed)
        top = float(v.max())
        if top == 0:
            return 0.0
        x = np.concatenate(self.samples) if signed else np.maximum(np.concatenate(self.samples),
                                                                   0.0)
        qmin, qmax = grid(bits, signed)
        best, best_err = top, np.inf
        for r in sorted(self.ratios, reverse=True):
            s = r * top / qmax
            err = float(np.mean((x - np.clip(np.floor(x / s + 0.5), qmin, qmax) * s) ** 2))
            if err < best_err:
                best, best_err = r * top, err
        return best


OBSERVERS: dict[str, Callable[[], Observer]] = {
    "minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MseObserver}


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
