"""How ``benchmarks/latency.py`` checks and times its variants: the agreement bar a variant must
pass before it is timed, and interleaved timing rounds (every variant's calls spread over the
whole run, so noise on a shared machine falls on all of them alike), with the paired ratio.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import peers

# The agreement a variant needs before it is timed (see latency.py's docstring). Measured on
# these random-weight models (8 inputs): int8 builds reach cosine 0.75-0.999 and matched 1.0
# (mobilenet_v2 int8 is the lowest: 0.75-0.88 at 64x64, 0.96-0.97 at 224x224); a model that
# ignores its input matches ~1/8. Cosine alone is weak here: two *different* inputs' logits
# have cosine 0.93-0.97 at 224x224 (a large input-independent part), hence ``matched``.
FP32_REL_TOL = 1e-3
INT8_MIN_COSINE = 0.5
MIN_MATCHED = 0.5

#: the figures one timing pass writes into a row (a scenario's copy of them goes elsewhere)
TIMING_KEYS = ("ms", "min_ms", "max_ms", "times_ms", "calls_per_round")


def _process_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def quiesce(window_s: float = 0.02, idle_fraction: float = 0.05, limit_s: float = 5.0) -> float:
    """Sleep until no thread of this process runs: the previous backend's worker threads spin
    after their last task (TVM's pool: up to 300,000 ``sched_yield`` rounds, ~0.2-0.5 s here;
    ONNX Runtime's: a few ms) and, on two cores, a spinning pool takes the core the next
    backend's second thread needs (ONNX Runtime's mobilenet_v2 ran 2.9x slower after a fixed
    0.1 s pause). Returns the seconds waited: once a ``window_s`` sleep costs the process less
    than ``idle_fraction`` of a core, or after ``limit_s``."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        c0 = _process_cpu_s()
        time.sleep(window_s)
        if _process_cpu_s() - c0 < idle_fraction * window_s:
            break
    return time.perf_counter() - start


def call_times(fn: Callable[[], Any], calls: int, warmup: int = 2) -> list[float]:
    """The ms of each of ``calls`` calls of ``fn``, once the process's worker threads are idle
    (:func:`quiesce`: the previous backend's spinning pool sleeps first) and after ``warmup``
    untimed calls (which wake its own pool, and the core)."""
    quiesce()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def interleaved_rounds(fns: dict[Any, Callable[[], Any]], rounds: int, calls: int,
                       warmup: int = 2) -> dict[Any, list[list[float]]]:
    """Per key of ``fns``, per round, the ms of its ``calls`` calls (:func:`call_times`): the
    functions take turns round by round, so a burst of load on a shared machine falls on all
    of them alike."""
    out: dict[Any, list[list[float]]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            out[key].append(call_times(fn, calls, warmup))
    return out


def paired(rounds_a: list[list[float]], rounds_b: list[list[float]]) -> float:
    """The median over rounds of ``a``'s round median over ``b``'s in the same round: the two
    ran seconds apart, so load that comes and goes between rounds falls on both."""
    return statistics.median(statistics.median(a) / statistics.median(b)
                             for a, b in zip(rounds_a, rounds_b))


def timings(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> dict[str, Any]:
    """Median, min and max of ``repeat`` calls after ``warmup`` calls, in ms, and every call."""
    times = call_times(fn, repeat, warmup)
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "times_ms": [round(t, 4) for t in times]}


def median_ms(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    return timings(fn, repeat, warmup)["ms"]


def check(kind: str, reference: list[np.ndarray], outputs: list[np.ndarray],
          exact: list[np.ndarray] | None = None) -> tuple[dict[str, Any], str | None]:
    """The agreement figures and, when they fail ``kind``'s bar, why."""
    a = peers.agreement(reference, outputs)
    if exact is not None:
        a["max_abs_diff_vs_integer_reference"] = float(max(
            np.abs(np.asarray(o, np.float64) - np.asarray(e, np.float64)).max()
            for o, e in zip(outputs, exact)))
        if a["max_abs_diff_vs_integer_reference"] != 0:
            return a, "differs from its integer-exact reference"
    if not all(np.isfinite(o).all() for o in outputs):
        return a, "non-finite outputs"
    if kind == "fp32" and a["rel_max_abs_diff"] > FP32_REL_TOL:
        return a, f"relative max abs diff {a['rel_max_abs_diff']:.2e} > {FP32_REL_TOL}"
    if kind == "exact" and exact is None:
        raise ValueError("an 'exact' check needs the integer-exact outputs")
    if kind == "int" and (a["min_cosine"] < INT8_MIN_COSINE or a["matched"] < MIN_MATCHED):
        return a, (f"cosine {a['min_cosine']:.3f} (floor {INT8_MIN_COSINE}), matched "
                   f"{a['matched']:.2f} (floor {MIN_MATCHED})")
    return a, None


class Bench:
    """Builds and checks the variants of one model, in order; :meth:`time_all` times them."""

    def __init__(self, args: argparse.Namespace, tests: list[np.ndarray], x: np.ndarray):
        self.args, self.tests, self.x = args, tests, x
        self.rows: list[dict[str, Any]] = []
        self.timed: list[tuple[dict[str, Any], Callable[[], Any]]] = []

    def add(self, label: str, group: str, kind: str, build: Callable[[], Callable],
            reference: list[np.ndarray] | Callable[[], list[np.ndarray]],
            exact: Callable[[np.ndarray], np.ndarray] | None = None,
            **extra: Any) -> Callable | None:
        row: dict[str, Any] = {"label": label, "group": group, **extra}
        self.rows.append(row)
        print(f"  {label} ...", end="", flush=True)
        try:
            t = time.perf_counter()
            fn = build()
            row["build_s"] = round(time.perf_counter() - t, 2)
            outs = [fn(x) for x in self.tests]
            if callable(reference):  # made from the build
                reference = reference()
            row["check"], row["error"] = check(
                kind, reference, outs, [exact(x) for x in self.tests] if exact else None)
        except Exception as e:  # noqa: BLE001  (a peer that cannot be built is reported)
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f" FAILED: {row['error']}", flush=True)
            return None
        if row["error"]:
            print(f" CHECK FAILED, not timed: {row['error']}", flush=True)
            return None
        x = self.x
        for _ in range(self.args.warmup):
            fn(x)
        self.timed.append((row, lambda: fn(x)))
        print(f" checked (built in {row['build_s']:.1f} s)", flush=True)
        return fn

    def time_all(self, rounds: int, into: str | None = None) -> None:
        """Time every checked variant in ``rounds`` interleaved rounds (each variant's calls
        spread over the whole run, so a burst of noise on a shared machine hits them alike);
        each row gets the median, min and max of its ``repeat`` calls, in the row itself or
        (``into``, a scenario's name) in ``row[into]``. The variants stay, to be timed again."""
        per = max(1, -(-self.args.repeat // rounds))
        times = interleaved_rounds(dict(enumerate(call for _, call in self.timed)), rounds,
                                   per, self.args.round_warmup)
        for i, (row, _) in enumerate(self.timed):
            ts = [t for r in times[i] for t in r]
            target = row if into is None else row.setdefault(into, {})
            target.update({"ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
                           "times_ms": [round(t, 4) for t in ts], "calls_per_round": per})
            print(f"  {row['label']:34s} {target['ms']:9.2f} ms", flush=True)


def paired_ratio(row: dict[str, Any], base: dict[str, Any]) -> float:
    """The median over timing rounds of the row's round median over ``base``'s in the same
    round: the two ran seconds apart, so load that comes and goes between rounds (this
    host's medians move by 10-30% from round to round) falls on both."""
    def rounds(r: dict[str, Any]) -> list[list[float]]:
        per, ts = r["calls_per_round"], r["times_ms"]
        return [ts[i:i + per] for i in range(0, len(ts), per)]

    return paired(rounds(row), rounds(base))


def scenario_rows(rows: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    """Copies of ``rows`` with the timings of ``scenario`` (kept in ``row[scenario]`` by
    :meth:`Bench.time_all`) in place of the quiet ones; rows it did not time lose theirs."""
    out = []
    for r in rows:
        c = {k: v for k, v in r.items() if k not in TIMING_KEYS and k != scenario
             and not k.startswith(("x_fastest", "paired_x"))}
        c.update(r.get(scenario, {}))
        out.append(c)
    return out
