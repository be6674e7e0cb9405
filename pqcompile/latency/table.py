"""Per-layer latency measured on the target, for latency budgets (``Budget(latency_ms=...)``).

:func:`measure_latency` times every conv/linear layer of a problem on the target at the kept
channel counts the solvers can pick, each as a one-layer program built the way ``compile``
builds a model: a torch module of the pruned shape, quantized by
:func:`pqcompile.quant.build_reference` at 8/8 bits, lowered by :func:`pqcompile.lower.lower`
with the target's integer kernels, scheduled with the target's tuning database where it has
records (kernels it does not schedule itself), built for the target and
timed with the Relax VM's ``time_evaluator`` -- in this process for a target this machine runs,
else over TVM RPC on the board (``rpc="HOST:PORT"``) or on an aarch64/riscv64 server under
qemu-user here (``rpc="emulator"``: emulated times, a stand-in for a board, not its speed).
:func:`attach_latency` turns the table into the problem's latency model, which the ``ilp`` and
``greedy`` solvers bound; ``pqcompile.compile`` does both when the budget sets ``latency_ms``.

What is measured, per layer (``O``/``I``: its kept output channels and input channels per conv
group, ``O_full``/``I_full`` unpruned):

* ``t(O_full, I_full)``, ``t(o, I_full)`` at every keep level ``o`` of its output group and
  ``t(O_full, i)`` at every keep level ``i`` of the group feeding it (its producer's): a cross
  through the unpruned point, ``levels(out) + levels(in) - 1`` one-layer programs;
* each figure is the fastest of ``repeat`` repeats, each the mean of back-to-back runs (at
  least ``min_repeat_ms`` long): the figure least disturbed by other load on the machine. It
  covers the program's whole work: quantizing its float input, the integer layer with bias and
  requantization, and dequantizing its output (elementwise passes over the layer's input and
  output, small against its MACs; inside a model the neighbours' requantization does this).

What is modeled:

* off the cross, ``t(o, i) = t(o, I_full) * t(O_full, i) / t(O_full, I_full)``: the input's
  kept fraction changes the time by the same ratio at every output width (the exact figures
  on the cross, a product of a function of each group's level elsewhere, which is what the
  ILP linearizes for the MACs: one binary per pair of levels);
* a side whose channels come from several groups (a layer reading a concat) gets a straight
  line through its measured points (every group of that side at its j-th level), in the
  channel count: linear in each group, as the MACs are;
* bits do not change latency (sub-8-bit weights run as int8 after unpacking); the model's
  other nodes (pooling, adds, activations) are left out: ``latency_ms`` bounds the summed
  conv/linear layers, and a ratio budget (``"2x"``) is against the table's unpruned total.

Measured latency need not fall with every level (tiles, vector remainders): the tables keep it
as measured, and the ILP picks among the real figures.

Figures are cached per target in ``latency.json`` next to the tuning database
(:func:`pqcompile.tuning.database_dir`: ``$PQCOMPILE_TUNING_DIR`` or
``~/.cache/pqcompile/tuning/<target>``), keyed by the device that ran them, a fingerprint of the
lowering and quantization code (as this process read it), TVM's version and the tuning records,
and the one-layer program's shape: a shape is measured once, by any model that has it, until
the kernels change.

>>> import torch
>>> from torch import nn
>>> from pqcompile.build import analysis
>>> from pqcompile.budget import Budget
>>> from pqcompile.solvers import build_problem, get_solver
>>> gm = analysis(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval(),
...               (torch.randn(1, 3, 8, 8),))
>>> problem = build_problem(gm, None, None, keep_levels=(1.0, 0.5))
>>> table = measure_latency(problem, gm, "host", repeat=2, min_repeat_ms=1, cache=False)
>>> sorted(table.layers["_0"].points)  # (kept out, kept in) measured for the first conv
[(4, 3), (8, 3)]
>>> timed = attach_latency(problem, table)
>>> s = get_solver("ilp").solve(timed, Budget(latency_ms="1x"))
>>> s.costs["latency_ms"] <= timed.reference["latency_ms"] * (1 + 1e-9)
True
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LatencyError, OptionError
from ..targets import TargetSpec, get_target
from .cache import (
    CACHE_FILE,
    FORMAT_VERSION,
    _fingerprint,
    _read_cache,
    _write_cache,
    cache_path,
)
from .programs import _geometry, _library, _lowered, _runner, check_where, run_jobs

__all__ = ["CACHE_FILE", "LatencyError", "LatencyTable", "LayerTable", "attach_latency",
           "cache_path", "check_where", "layer_points", "measure_latency"]



@dataclass(frozen=True)
class LayerTable:
    """One layer's measured figures: ``points[(kept out, kept in)]`` in ms (``in``: input
    channels per conv group), ``full`` the unpruned pair, ``shape`` the unpruned one-layer
    program (its cache key)."""

    shape: str
    full: tuple[int, int]
    points: Mapping[tuple[int, int], float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "full", tuple(int(c) for c in self.full))
        points = {(int(o), int(i)): float(ms) for (o, i), ms in dict(self.points).items()}
        bad = {k: v for k, v in points.items() if not math.isfinite(v) or v <= 0}
        if bad:
            raise ValueError(f"layer {self.shape!r}: latencies must be positive milliseconds, "
                             f"got {bad}")
        if self.full not in points:
            raise ValueError(f"layer {self.shape!r}: the unpruned point {self.full} is missing")
        object.__setattr__(self, "points", points)

    @property
    def unpruned_ms(self) -> float:
        return self.points[self.full]


@dataclass
class LatencyTable:
    """Measured per-layer latencies of one model on one target (see the module docstring).

    ``device`` says what ran them (``local``, ``emulator qemu-aarch64``, ``rpc <board>``);
    :meth:`save`/:meth:`load` keep a table as JSON to reuse with ``compile(latency_table=)``.
    """

    target: str
    device: str
    layers: dict[str, LayerTable] = field(default_factory=dict)
    seconds: float = 0.0  # spent measuring (0 when every figure came from the cache)
    measured: int = 0  # one-layer programs timed now; the rest came from the cache
    boards: dict[str, int] = field(default_factory=dict)  # programs timed per farm board

    @property
    def unpruned_ms(self) -> float:
        """The layers' summed latency with every channel kept: what ``"Nx"`` divides."""
        return sum(t.unpruned_ms for t in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "target": self.target, "device": self.device,
                "boards": dict(self.boards),
                "layers": {name: {"shape": t.shape, "full": list(t.full),
                                  "points": [[o, i, ms] for (o, i), ms in
                                             sorted(t.points.items(), reverse=True)]}
                           for name, t in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        if data.get("format") != FORMAT_VERSION:
            raise LatencyError(f"latency table format is {data.get('format')!r}; this pqcompile "
                               f"reads format {FORMAT_VERSION}: measure it again")
        layers = {name: LayerTable(d["shape"], tuple(d["full"]),
                                   {(o, i): ms for o, i, ms in d["points"]})
                  for name, d in data["layers"].items()}
        return cls(str(data["target"]), str(data["device"]), layers,
                   boards={str(k): int(v) for k, v in data.get("boards", {}).items()})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LatencyError(f"cannot read a latency table from {path}: {err}; write one with "
                               "LatencyTable.save") from None

    def summary(self) -> str:
        """One line per layer: its unpruned figure and the range over its points."""
        lines = [f"latency table for {self.target} on {self.device}: "
                 f"{self.unpruned_ms:.4g} ms unpruned over {len(self.layers)} layers"]
        for name, t in self.layers.items():
            ms = sorted(t.points.values())
            lines.append(f"  {name}: {t.unpruned_ms:.4g} ms at {t.full[0]} out x {t.full[1]} "
                         f"in; {ms[0]:.4g}..{ms[-1]:.4g} ms over {len(ms)} points")
        return "\n".join(lines)


# --- which points ---------------------------------------------------------------------------


def _side_states(problem: Any, affine: Any) -> list[dict[int, int]]:
    """Kept counts stepping a side's groups down together: every group at its j-th level."""
    groups = {g.id: g for g in problem.groups}
    ids = [g for g, _ in affine.terms]
    if not ids:
        return []
    depth = max(len(groups[g].levels) for g in ids)
    return [{g: groups[g].levels[min(j, len(groups[g].levels) - 1)] for g in ids}
            for j in range(depth)]


def layer_points(problem: Any, index: int) -> list[tuple[int, int]]:
    """The ``(kept out, kept in)`` pairs measured for ``problem.layers[index]``: the cross
    through the unpruned point (module docstring), unpruned first."""
    layer = problem.layers[index]
    full = {g.id: g.size for g in problem.groups}
    o_full, i_full = layer.out_channels.value(full), layer.in_channels.value(full)
    points = [(o_full, i_full)]
    for kept in _side_states(problem, layer.out_channels):
        points.append((layer.out_channels.value(full | kept), i_full))
    for kept in _side_states(problem, layer.in_channels):
        points.append((o_full, layer.in_channels.value(full | kept)))
    return list(dict.fromkeys(points))


# --- measuring ------------------------------------------------------------------------------


def measure_latency(problem: Any, graph: Any, target: str | TargetSpec = "host", *,
                    rpc: Any = None, key: str = "", repeat: int = 10, number: int = 1,
                    min_repeat_ms: float = 20.0, directory: str | os.PathLike | None = None,
                    cache: bool = True, progress: bool = False,
                    session_timeout: float = 600.0, connect_timeout: float = 10.0,
                    tracker: Any = None) -> LatencyTable:
    """The latency table of ``problem``'s layers on ``target`` (module docstring).

    ``graph``: the analyzed graph the problem was built from (shapes and modules).
    ``rpc``: ``None`` times in this process (a target of this machine's architecture);
    ``"HOST:PORT"`` on a TVM RPC server (a board: ``python -m pqcompile.runtime.rpc_server`` there;
    ``key`` its key); ``"emulator"`` on a server started here under qemu-user. Each figure is
    the fastest of ``repeat`` repeats of ``number`` runs (raised until a repeat lasts
    ``min_repeat_ms``). ``directory``: where ``latency.json`` caches the figures (default:
    the target's tuning database folder, :func:`pqcompile.tuning.database_dir`);
    ``cache=False`` neither reads nor writes it. ``tracker="HOST:PORT"`` (or ``rpc=
    "KEY@HOST:PORT"``): on every free board of ``key`` that TVM RPC tracker has, in parallel
    (:mod:`pqcompile.latency.farm`; one session per board, each taking the next program as it
    finishes one; ``.boards`` counts the programs each board timed). A farm's boards are one
    kind of board: the cache keys their figures by ``key``.
    """
    from ..progress import Progress

    spec = get_target(target)
    if tracker is not None:
        rpc = f"{key}@{tracker}"
    check_where(spec, rpc)
    for name, value in (("repeat", repeat), ("number", number)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{name} must be a positive int, got {value!r}")
    if isinstance(min_repeat_ms, bool) or not isinstance(min_repeat_ms, (int, float)) \
            or not min_repeat_ms >= 0:
        raise OptionError(f"min_repeat_ms must be a number >= 0, got {min_repeat_ms!r}")
    timing = {"repeat": repeat, "number": number, "min_repeat_ms": int(math.ceil(min_repeat_ms))}
    plans: dict[str, tuple[str, list[tuple[tuple[int, int], str]]]] = {}
    programs: dict[str, tuple[Any, tuple[int, ...]]] = {}
    for index, layer in enumerate(problem.layers):
        geometry = _geometry(graph, layer.name)
        pairs = []
        for point in layer_points(problem, index):
            shape_key, module, shape = geometry.program(*point)
            programs.setdefault(shape_key, (module, shape))
            pairs.append((point, shape_key))
        plans[layer.name] = (pairs[0][1], pairs)
    path = cache_path(spec, directory)
    start = time.perf_counter()
    with _runner(spec, rpc, key, session_timeout, connect_timeout) as runner:
        prefix = f"{runner.device}|{_fingerprint(spec)}|"
        known = _read_cache(path) if cache else {}
        figures = {k: float(known[prefix + k]["ms"]) for k in programs
                   if isinstance(known.get(prefix + k), dict) and "ms" in known[prefix + k]}
        todo = [k for k in programs if k not in figures]
        bar = Progress(len(todo), "latency", enabled=progress and bool(todo))
        jobs = []  # built here first, then timed where the runner runs them (maybe in parallel)
        for shape_key in todo:
            module, shape = programs[shape_key]
            mod, params, x = _lowered(module, shape, spec)
            jobs.append((shape_key, _library(mod, params, spec),
                         [x] + [np.ascontiguousarray(p) for p in params.values()]))
        new: dict[str, Any] = {}

        def done(shape_key: str, repeats: list[float]) -> None:
            figures[shape_key] = min(repeats)
            new[prefix + shape_key] = {"ms": min(repeats), "repeats_ms": repeats,
                                       "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            bar.update(len(new), ms=min(repeats))

        run_jobs(runner, jobs, spec, timing, done)
        device, boards = runner.device, dict(getattr(runner, "counts", {}))
    if new and cache:
        _write_cache(path, new)
    layers = {name: LayerTable(shape_key, pairs[0][0],
                               {point: figures[k] for point, k in pairs})
              for name, (shape_key, pairs) in plans.items()}
    return LatencyTable(spec.name, device, layers,
                        seconds=time.perf_counter() - start if new else 0.0, measured=len(new),
                        boards=boards)


# --- the table as the problem's latency model -----------------------------------------------


def _side_pieces(problem: Any, affine: Any, lookup: Any, what: str
                 ) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """One side of a layer (output or input channels) as pieces ``(groups, values)`` over at
    most one group each, summing to its measured figure at each level (module docstring)."""
    groups = {g.id: g for g in problem.groups}
    full = {g.id: g.size for g in problem.groups}
    if not affine.terms:
        return [((), np.array([lookup(affine.value(full))]))]
    if len(affine.terms) == 1:
        g, per = affine.terms[0]
        return [((g,), np.array([lookup(affine.const + per * lv) for lv in groups[g].levels]))]
    xs = [affine.value(full | kept) for kept in _side_states(problem, affine)]
    ys = [lookup(x) for x in xs]
    if len(set(xs)) < 2:
        raise LatencyError(f"{what}: too few distinct channel counts to fit a line")
    slope, intercept = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    pieces = [((), np.array([intercept + slope * affine.const]))]
    pieces += [((g,), slope * per * np.array(groups[g].levels, float)) for g, per in affine.terms]
    return pieces


def _product(a: tuple[tuple[int, ...], np.ndarray], b: tuple[tuple[int, ...], np.ndarray]
             ) -> tuple[tuple[int, ...], np.ndarray]:
    (ga, va), (gb, vb) = a, b
    if not ga or not gb or ga == gb:
        groups = ga or gb
        return groups, (va * vb).reshape(-1)
    grid = np.outer(va, vb)  # rows: ga's levels, columns: gb's
    if ga[0] > gb[0]:
        return gb + ga, grid.T.reshape(-1)
    return ga + gb, grid.reshape(-1)


def attach_latency(problem: Any, table: LatencyTable) -> Any:
    """``problem`` with the latency model of ``table`` (measured for this problem's layers and
    levels by :func:`measure_latency`), and ``reference["latency_ms"]`` its unpruned total.

    Raises :class:`LatencyError` naming the layer when the table lacks a layer or a level
    (measured for another model, other keep levels or another ``multiple``).
    """
    from ..solvers.problem import LatencyModel, LatencyTerm, with_latency_model

    if not isinstance(table, LatencyTable):
        raise TypeError(f"a latency table is a pqcompile.latency.LatencyTable, got "
                        f"{type(table).__name__}")
    full = {g.id: g.size for g in problem.groups}
    model = []
    for layer in problem.layers:
        entry = table.layers.get(layer.name)
        hint = (f"measure the table for this problem: measure_latency(problem, graph, "
                f"{table.target!r})")
        if entry is None:
            raise LatencyError(f"the latency table has no layer {layer.name!r} (it has "
                               f"{sorted(table.layers)[:4]}...): {hint}")
        o_full, i_full = layer.out_channels.value(full), layer.in_channels.value(full)
        if entry.full != (o_full, i_full):
            raise LatencyError(f"layer {layer.name!r}: the table was measured at {entry.full} "
                               f"(out, in) channels, the problem has {(o_full, i_full)}: {hint}")

        def lookup(point: tuple[int, int], name: str = layer.name,
                   points: Mapping = entry.points) -> float:
            if point not in points:
                raise LatencyError(f"layer {name!r}: the latency table lacks {point[0]} out x "
                                   f"{point[1]} in channels (other keep levels or multiple?): "
                                   f"{hint}")
            return points[point]

        t_full = entry.unpruned_ms
        outs = _side_pieces(problem, layer.out_channels, lambda o: lookup((o, i_full)),
                            f"layer {layer.name!r} output")
        ins = _side_pieces(problem, layer.in_channels, lambda i: lookup((o_full, i)),
                           f"layer {layer.name!r} input")
        merged: dict[tuple[int, ...], np.ndarray] = {}
        for a in outs:
            for b in ins:
                groups, values = _product(a, b)
                merged[groups] = merged.get(groups, 0) + values / t_full
        model.append(tuple(LatencyTerm(g, tuple(float(v) for v in values))
                           for g, values in sorted(merged.items())))
    return with_latency_model(problem, LatencyModel(tuple(model),
                                                    f"{table.target} on {table.device}"))
