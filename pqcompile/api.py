"""``pqcompile.compile``: search an assignment under a budget, then build it for a target.

1. analysis: trace, shapes, channel groups, FP32 costs;
2. sensitivity: a criterion scores every layer's bit options and every channel (data-free
   ``weight_error`` / ``magnitude`` without data; FIT ``fisher`` with data);
3. a solver (``ilp`` by default) picks bits per layer and kept channels per group under the
   budget; the groups keep their most important channels;
4. optional QAT fine-tuning on ``data``;
5. calibration, integer lowering and the TVM build (:func:`pqcompile.build.finish`).

Calibration: with ``data``, the inputs of its first ``calibration_batches`` batches; without,
the example inputs themselves (nothing random is ever used; the report says which).

>>> import torch
>>> from torch import nn
>>> from pqcompile.budget import Budget
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
...                       nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
>>> x = torch.randn(8, 3, 8, 8)
>>> c = compile(model.eval(), (x,), target="host", budget=Budget(bops="40x"))
>>> c.totals["bop_reduction"] >= 40
True
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from numbers import Integral, Real
from typing import Any

import torch

from .budget import Budget, BudgetError, UnsupportedBudgetError
from .build import Compiled, analysis, finish, prepare
from .candidates import public, solver_candidates
from .data import LABEL_KEYS, NamedBatches, positional_data
from .errors import DataError, ExampleInputError, NonFiniteWeightError, OptionError
from .finetune import qat_finetune
from .frontend import check_example_inputs, check_leaf_modules, check_model_and_inputs
from .latency import LatencyTable, attach_latency, check_where, measure_latency
from .meta import BITS, EXAMPLE_INPUTS
from .objective import Objective
from .passes import CostAnalysis
from .passes.sensitivity import SensitivityAnalysis, channel_importance, layer_sensitivities
from .progress import Stages, Tracked
from .solvers import build_problem, get_solver, list_solvers, resolve_limits, to_assignment
from .solvers.problem import DEFAULT_BIT_OPTIONS, DEFAULT_KEEP_FRACTIONS
from .solvers.search import SearchContext, needs_context
from .solvers.verdict import solution_notes, warn_budget
from .targets import get_target

_FINETUNE_KEYS = {"epochs", "lr", "distill", "temperature", "max_batches", "optimizer",
                  "weight_decay", "momentum", "distill_weight", "learn_weight_clip",
                  "max_grad_norm"}
_LOWERING_BITS = range(2, 9)  # the weight and activation widths the integer lowering takes
_PINNED_BITS = (8, 8)  # the first and last layers' (weight, activation) bits


def _batches(data: Iterable[Any] | None, n: int,
             graph: torch.fx.GraphModule) -> list[Any] | None:
    if data is None:
        return None
    batches = list(islice(iter(data), n))
    if not batches:
        raise DataError("data is empty: pass a DataLoader (or iterable) of (inputs, target) "
                        "batches, or data=None for the data-free path")
    _check_batches(graph, batches)
    return batches


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"a data batch must be a tensor or an (inputs, target) pair, got "
                    f"{type(batch).__name__}")


def _example_from_data(data: Iterable[Any] | None) -> tuple[tuple[torch.Tensor], str]:
    """The first sample of ``data``'s first batch as the example input (batch size 1, the shape
    the compiled program takes), and the sentence the report gives about it."""
    if data is None:
        raise ExampleInputError("example_inputs is required without data: pass a tuple of "
                                "tensors, one per forward() argument (the shape, batch size "
                                "included, is the compiled program's), or data=... whose "
                                "first batch gives it")
    if iter(data) is data:
        raise DataError("data is a read-once iterator, and without example_inputs its first "
                        "batch would be used up: pass a list of batches or a DataLoader")
    batch = next(iter(data), None)
    if batch is None:
        raise DataError("data is empty: pass a DataLoader (or iterable) of (inputs, target) "
                        "batches, or example_inputs")
    if isinstance(data, NamedBatches) and isinstance(batch, tuple) and all(
            isinstance(t, torch.Tensor) and t.dim() for t in batch):
        raw = next(iter(data.data))  # a dict batch: every input it names, one sample each
        if isinstance(raw, Mapping):
            n = len([k for k in raw if k not in LABEL_KEYS])
            example = tuple(t[:1].detach().clone() for t in batch[:n])
            return example, (f"example inputs: the first sample of data's first batch, shapes "
                             f"{[tuple(t.shape) for t in example]}")
    first = _inputs(batch)
    if first.dim() == 0 or first.shape[0] == 0:
        raise DataError(f"data's first batch holds inputs of shape {tuple(first.shape)}, with "
                        f"no sample to take the example input from; pass example_inputs")
    example = first[:1].detach().clone()
    return (example,), (f"example input: the first sample of data's first batch, shape "
                        f"{tuple(example.shape)}")


def compile(model: torch.nn.Module,
            example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
            target: Any = "arm", budget: Budget | str | None = None,
            data: Iterable[Any] | None = None, solver: Any = "ilp",
            validation: Sequence[Any] | None = None,
            finetune: Mapping[str, Any] | None = None, criterion: Any = None,
            channel_criterion: Any = None, bit_options: Sequence[tuple[int, int]] | None = None,
            keep_levels: Sequence[float] | None = None, multiple: int | None = None,
            calibration_batches: int = 8, sensitivity_batches: int = 16,
            observer: str = "minmax", seed: int = 0, solver_options: Mapping | None = None,
            pareto_points: int = 4, tune: int = 0, latency_table: Any = None,
            latency_rpc: Any = None, leaf_modules: Iterable[str | type] = (),
            progress: bool = False, loss: Any = None) -> Compiled:
    """Compress ``model`` to ``budget`` and build it for ``target`` (module docstring).

    ``example_inputs``: one tensor per ``forward()`` argument, in the shape the compiled
    program takes; without it, the first sample of ``data``'s first batch (batch size 1; the
    report says so).

    ``budget``: a :class:`Budget` or its text form (``"bops=60x,weight_bytes=200KB"``).
    ``solver``: a registered name (``pqcompile.solvers.list_solvers()``) or a solver object.
    Searching solvers (``sbs``, ``ajpq``, ``fitcompress``, ``picpq``) also get the model and
    ``data``, and measure candidates on ``validation`` batches (default: the first few
    batches of ``data``).
    ``finetune``: ``{"epochs": 1, "lr": 1e-3, "distill": True, "max_batches": None, ...}``;
    needs ``data`` (``(inputs, target)`` batches). The result's ``.solution`` holds the
    solver's choice and predicted costs, ``.totals`` the built model's.
    ``.candidates`` lists what the solver saw (:mod:`pqcompile.candidates`; the report's Pareto
    plot): with ``data``, the chosen assignment and up to ``pareto_points`` candidates of the
    predicted front are measured on the validation batches (0: predicted loss only).
    ``tune``: MetaSchedule trials for the kernels the target's tuning database lacks
    (:mod:`pqcompile.tuning`: ~1.5 s a trial; a model is tuned once, later builds for the
    target reuse its records; 0, the default, only reuses). ``.tuning`` reports it.
    ``multiple``: kept channels are rounded up to a multiple of it; ``None`` (the default)
    takes the target's ``capabilities.channel_multiple`` (4 on the built-in targets).

    Latency budgets (``Budget(latency_ms=5)`` or ``"2x"``, against the unpruned table): the
    ``ilp`` and ``greedy`` solvers bound the layers' latency predicted from a per-layer table
    measured on the target (:mod:`pqcompile.latency`). ``latency_table``: a
    :class:`~pqcompile.latency.LatencyTable` (or the path of one saved with ``.save``) measured
    for this model; ``None`` measures it (cached per target: a layer shape is timed once).
    ``latency_rpc``: where that runs for a target of another architecture than this machine:
    ``"HOST:PORT"`` of a TVM RPC server on the board, or ``"emulator"`` (a server under
    qemu-user here: emulated times, a stand-in). ``.latency_table`` holds the table used.

    ``loss``: what every data-driven stage (criteria, searching solvers, the measured Pareto
    front, fine-tuning) measures a compressed model by (:mod:`pqcompile.objective`): ``None``
    or ``"distill"`` (default) distills to the FP32 model's outputs, any structure (tensors,
    tuples, dicts / ``ModelOutput``; normalized MSE per leaf, KL on softened logits where the
    batches carry class labels); ``"cross_entropy"`` the labels of a classifier; or a callable
    ``loss(student_out, teacher_out, target) -> scalar tensor`` (the batch mean; ``target``:
    what a batch holds after the inputs, ``None`` for bare inputs). With it, fine-tuning trains
    on that objective (``finetune``'s ``temperature``/``distill_weight`` do not apply).

    ``leaf_modules``: module paths (``"blocks.3"``) or classes that tracing keeps as single
    opaque nodes: what torch.fx cannot trace (the trace error names the submodule). A leaf
    runs in float and is neither quantized nor pruned; its MACs count at FP32 in the budget.

    A wrong argument fails before any pass runs, with an error of :mod:`pqcompile.errors`
    (``ModelError``, ``NonFiniteWeightError``, ``ExampleInputError``, ``DataError``,
    ``OptionError``, also for ``leaf_modules``), :class:`~pqcompile.budget.BudgetError`,
    :class:`~pqcompile.targets.UnknownTargetError` or
    :class:`~pqcompile.targets.ToolchainError`; data batches that do not fit the model fail
    with ``DataError`` as soon as they are read. A built model over any budget limit, or more
    than 2x below all of them, gets a :class:`~pqcompile.errors.BudgetWarning` (and the
    report's header says so: :mod:`pqcompile.solvers.verdict`).
    """
    # Every argument is checked before the first pass runs, so none fails after minutes of
    # search; data batches are checked against the traced model as they are read.
    example_note = ""
    # dict batches ({"input_ids": ..., "attention_mask": ..., "labels": ...}) by parameter name
    data = positional_data(model, data)
    validation = positional_data(model, validation)
    if example_inputs is None:  # compile(model, target=..., budget=..., data=loader)
        example_inputs, example_note = _example_from_data(data)
    example_inputs = check_model_and_inputs(model, example_inputs)
    _check_finite(model)
    if budget is None:
        raise BudgetError("budget is required, e.g. Budget(bops='60x') (60 times fewer bit "
                          "operations than FP32) or Budget(weight_bytes='200KB')")
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a pqcompile Budget or its text form, got "
                        f"{type(budget).__name__}")
    spec = get_target(target)
    spec.find_cross_compiler()  # an unknown target or a missing linker
    chosen = _check_solver(solver, solver_options)
    multiple = _check_multiple(multiple, spec)
    latency_table = _check_latency(budget, chosen, solver, spec, latency_table, latency_rpc)
    _check_finetune(finetune)
    objective = Objective.resolve(loss)  # OptionError for an unknown name or a non-callable
    _check_data(data, finetune, chosen)
    bit_options = _check_bit_options(bit_options, getattr(chosen, "default_bit_options", None))
    keep_levels = _check_keep_levels(keep_levels)
    check_leaf_modules(model, leaf_modules)
    for name, value in (("calibration_batches", calibration_batches),
                        ("sensitivity_batches", sensitivity_batches)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise OptionError(f"{name} must be a positive int (a number of data batches), got "
                              f"{value!r}")
    if isinstance(tune, bool) or not isinstance(tune, Integral) or tune < 0:
        raise OptionError(f"tune must be an int >= 0 (MetaSchedule trials), got {tune!r}")
    if isinstance(pareto_points, bool) or not isinstance(pareto_points, Integral) \
            or pareto_points < 0:
        raise OptionError(f"pareto_points must be an int >= 0 (candidates measured for the "
                          f"report's Pareto plot), got {pareto_points!r}")
    torch.manual_seed(seed)
    timed = budget.latency_ms is not None or latency_table is not None
    names = ["analysis", "sensitivity"] + (["latency table"] if timed else []) \
        + ["solve", "pareto front"] + (["fine-tune"] if finetune else []) \
        + ["quantize, lower, build"]
    stage = Stages(names, enabled=progress)
    with stage("analysis"):
        fp32 = analysis(model, example_inputs, leaf_modules=leaf_modules)
    sens_batches = _batches(data, sensitivity_batches, fp32)
    with stage("sensitivity", f"{len(sens_batches)} batches" if sens_batches else "data-free"):
        scored = SensitivityAnalysis(
            criterion, Tracked(sens_batches, "sensitivity", progress) if sens_batches else None,
            channel_criterion=channel_criterion,
            bit_options=bit_options, objective=objective)(fp32).graph_module
        importance = channel_importance(scored)
        problem = build_problem(scored, layer_sensitivities(scored), importance,
                                bit_options=bit_options, keep_levels=keep_levels,
                                multiple=multiple)
    if timed:
        where = "given" if latency_table is not None else \
            f"measured {'here' if latency_rpc is None else f'on {latency_rpc}'}"
        with stage("latency table", where):
            if latency_table is None:
                latency_table = measure_latency(problem, scored, spec, rpc=latency_rpc,
                                                progress=progress)
            problem = attach_latency(problem, latency_table)
    teacher = copy.deepcopy(model).eval()  # the user's model keeps its mode and weights
    context = None
    with stage("solve", getattr(chosen, "name", str(solver))):
        if data is not None:
            context = SearchContext(problem, scored, teacher=teacher, data=data,
                                    held_out=validation, channel_scores=importance, seed=seed,
                                    progress=progress, objective=objective)
        if needs_context(chosen):
            solution = chosen.solve(problem, budget, context=context)
        else:
            solution = chosen.solve(problem, budget)
        # A searching solver may say which channels its kept counts keep (e.g. SBS's gates).
        scores = {**(importance or {}), **dict(solution.info.get("channel_scores", {}))}
        assignment = to_assignment(solution, scored, scores or None)
    with stage("pareto front", "measured" if context is not None and pareto_points
               else "predicted"):
        limits = resolve_limits(problem, budget, latency=budget.latency_ms is not None)
        candidates = solver_candidates(problem, chosen, limits, solution, context,
                                       measure=pareto_points, progress=progress)
        notes = solution_notes(solution) + candidates.notes
    sensitivity = {lay.name: lay.option_sensitivity(solution.bits[lay.name])
                   for lay in problem.layers}

    extra: dict[str, Any] = {}
    if finetune is not None:
        opts = dict(finetune)
        with stage("fine-tune"):
            tuned, amax = qat_finetune(fp32, assignment, data, seed=seed,
                                       distill_from=teacher if opts.pop("distill", True)
                                       else None, progress=progress, observer=observer,
                                       calibration_batches=calibration_batches,
                                       objective=objective, **opts)
        for node in tuned.graph.nodes:
            if node.name in assignment.bits:
                BITS.set(node, assignment.bits[node.name])
        prepared = CostAnalysis()(tuned).graph_module
        extra["activation_amax"] = amax
    else:
        prepared = prepare(fp32, assignment)
    calib_batches = _batches(data, calibration_batches, fp32)
    n_inputs = len(example_inputs)  # a batch's first n items are the inputs (checked on read)
    calibration = [_inputs(b) if n_inputs == 1 else tuple(b[:n_inputs]) for b in calib_batches] \
        if calib_batches else [tuple(example_inputs)]
    calibrated_on = (f"{len(calibration)} batches of data" if calib_batches
                     else "the example inputs (no data given)")
    if example_note:
        calibrated_on += f"; {example_note}"
    manifest_extra = {"candidates": public(candidates), "solver": solution.solver or str(solver),
                      "budget": str(budget), "calibration": calibrated_on, "notes": notes}
    if problem.latency is not None:
        manifest_extra["latency"] = {"predicted_ms": solution.costs["latency_ms"],
                                     "unpruned_ms": problem.reference["latency_ms"],
                                     "measured": problem.latency.source}
    with stage("quantize, lower, build", f"{target}, tuning {tune} trials" if tune
               else str(target)):
        compiled = finish(fp32, prepared, assignment, target=target, calibration=calibration,
                          observer=observer, sensitivity=sensitivity,
                          manifest_extra=manifest_extra, tune=tune, **extra)
    warn_budget(compiled.totals, solution, limits)
    compiled.solution = solution
    compiled.candidates = candidates
    compiled.timings = dict(stage.seconds)  # wall seconds per stage
    compiled.budget = budget
    compiled.calibration = calibrated_on
    compiled.latency_table = latency_table
    return compiled


def _check_finite(model: torch.nn.Module) -> None:
    """The module's parameters and normalization statistics are all finite."""
    stats = [(name, buf) for name, buf in model.named_buffers()
             if name.rpartition(".")[2] in ("running_mean", "running_var")]
    for kind, named in (("parameter", model.named_parameters()), ("buffer", stats)):
        for name, tensor in named:
            if not tensor.is_floating_point() or tensor.is_meta:
                continue
            bad = ~torch.isfinite(tensor.detach())
            if bad.any():
                path = name.rpartition(".")[0]
                owner = type(model.get_submodule(path)).__name__
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise NonFiniteWeightError(
                    f"{kind} {name!r} ({owner} {path!r}) holds "
                    f"{int(torch.isnan(tensor).sum())} NaN and {int(torch.isinf(tensor).sum())} "
                    f"inf value(s), the first at index {where}: pqcompile needs finite weights; "
                    "load a checkpoint from before training diverged, or re-initialize or "
                    "retrain that layer")


def _check_solver(solver: Any, options: Mapping | None) -> Any:
    """The solver object: a registered name built with ``options``, or ``solver`` itself."""
    if isinstance(solver, str):
        if solver not in list_solvers():
            close = difflib.get_close_matches(solver, list_solvers(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"unknown solver {solver!r}.{hint} Registered solvers: "
                              f"{', '.join(list_solvers())} (pqcompile.solvers.list_solvers(); "
                              "add one with pqcompile.solvers.register_solver)")
        return get_solver(solver, **dict(options or {}))
    if not callable(getattr(solver, "solve", None)):
        raise OptionError(f"solver must be a registered name such as 'ilp' or an object with a "
                          f"solve(problem, budget) method, got {type(solver).__name__}")
    return solver


def _check_multiple(multiple: Any, spec: Any) -> int:
    """The channel granule: ``multiple``, or the target's when ``None``."""
    if multiple is None:
        return spec.capabilities.channel_multiple
    if isinstance(multiple, bool) or not isinstance(multiple, Integral) or multiple < 1:
        raise OptionError(f"multiple must be a positive int (kept channels are rounded up to a "
                          f"multiple of it) or None for the target's channel_multiple "
                          f"({spec.capabilities.channel_multiple} on {spec.name!r}), got "
                          f"{multiple!r}")
    return int(multiple)


def _check_latency(budget: Budget, chosen: Any, solver: Any, spec: Any, table: Any,
                   rpc: Any) -> Any:
    """The latency table to use (loaded when given as a path), after checking that the solver
    bounds latency and that a table can be measured where it will be."""
    if budget.latency_ms is not None and not getattr(chosen, "bounds_latency", False):
        name = getattr(chosen, "name", solver)
        raise UnsupportedBudgetError(
            f"solver {name!r} cannot bound latency_ms: only 'ilp' and 'greedy' read the measured "
            "latency table; pass solver='ilp', or bound bops, weight_bytes or macs instead")
    if isinstance(table, (str, os.PathLike)):
        table = LatencyTable.load(table)
    if table is not None and not isinstance(table, LatencyTable):
        raise OptionError(f"latency_table must be a pqcompile.latency.LatencyTable, the path of "
                          f"one saved with .save(), or None (measured), got "
                          f"{type(table).__name__}")
    if table is not None and table.target != spec.name:
        raise OptionError(f"latency_table was measured for target {table.target!r}, the model "
                          f"is compiled for {spec.name!r}: measure one for {spec.name!r} (or "
                          "pass latency_table=None)")
    if rpc is not None and (budget.latency_ms is None or table is not None):
        raise OptionError("latency_rpc says where compile() measures a latency table, which it "
                          "does only for a budget with latency_ms and no latency_table; drop it")
    if budget.latency_ms is not None and table is None:
        check_where(spec, rpc, "latency_rpc")
    return table


def _check_finetune(finetune: Any) -> None:
    if finetune is None:
        return
    if not isinstance(finetune, Mapping):
        raise OptionError(f"finetune must be a dict of options such as {{'epochs': 1, 'lr': "
                          f"1e-3}}, got {type(finetune).__name__}")
    unknown = sorted(map(str, set(finetune) - _FINETUNE_KEYS))
    if unknown:
        close = [f"{k!r}: did you mean {m[0]!r}?" for k in unknown
                 if (m := difflib.get_close_matches(k, sorted(_FINETUNE_KEYS), n=1))]
        hint = f" ({'; '.join(close)})" if close else ""
        raise OptionError(f"unknown finetune options {unknown}{hint}; known: "
                          f"{sorted(_FINETUNE_KEYS)}")


def _check_data(data: Any, finetune: Mapping | None, solver: Any) -> None:
    """``data`` is given where an option needs it, and can be read more than once."""
    if data is None:
        if finetune is not None:
            raise DataError("finetune needs data: pass data= (a DataLoader of (inputs, target) "
                            "batches), or finetune=None")
        if needs_context(solver):
            raise DataError(f"solver {getattr(solver, 'name', solver)!r} searches on data: "
                            "pass data= (a DataLoader of (inputs, target) batches), or pick a "
                            "data-free solver such as 'ilp'")
        return
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise DataError(f"data must be an iterable of (inputs, target) batches, such as a "
                        f"DataLoader or a list, got {type(data).__name__}")
    if isinstance(data, Iterator):
        raise DataError(f"data is a {type(data).__name__}, an iterator that can be read only "
                        "once, but compile() reads the data several times (sensitivity, "
                        "calibration, fine-tuning): pass a list of batches or a DataLoader")


def _check_bit_options(bit_options: Any, default: Any = None) -> tuple[tuple[int, int], ...]:
    """The pairs given, checked; ``None``: the solver's own default (PIC-PQ's takes every
    weight width of its per-stage rule), else :data:`DEFAULT_BIT_OPTIONS`."""
    if bit_options is None:
        return DEFAULT_BIT_OPTIONS if default is None else _check_bit_options(default)
    if isinstance(bit_options, (str, bytes)) or not isinstance(bit_options, Iterable):
        raise OptionError(f"bit_options must be a list of (weight bits, activation bits) "
                          f"pairs such as [(8, 8), (4, 8)], got {bit_options!r}")
    options = list(bit_options)
    if not options:
        raise OptionError("bit_options is empty: give (weight bits, activation bits) pairs "
                          "such as [(8, 8), (4, 8)], or None for the default")
    for option in options:
        if isinstance(option, (str, bytes)) or not isinstance(option, Sequence) \
                or len(option) != 2 or not all(isinstance(b, Integral) and not isinstance(
                    b, bool) and b in _LOWERING_BITS for b in option):
            raise OptionError(f"bit_options: {option!r} is not a (weight bits, activation "
                              f"bits) pair of ints in {_LOWERING_BITS.start}.."
                              f"{_LOWERING_BITS.stop - 1}, the widths the integer lowering "
                              f"takes; e.g. (4, 8)")
    pairs = tuple(sorted({(int(w), int(a)) for w, a in options}))
    if _PINNED_BITS not in pairs:
        raise OptionError(f"bit_options {list(pairs)} lack {_PINNED_BITS}: the first and last "
                          f"layers are kept at {_PINNED_BITS[0]}/{_PINNED_BITS[1]} bits; add "
                          f"{_PINNED_BITS}")
    return pairs


def _check_keep_levels(keep_levels: Any) -> tuple[float, ...]:
    if keep_levels is None:
        return DEFAULT_KEEP_FRACTIONS
    levels = list(keep_levels) if isinstance(keep_levels, Iterable) \
        and not isinstance(keep_levels, (str, bytes)) else None
    if not levels or not all(isinstance(f, Real) and not isinstance(f, bool) and 0 < f <= 1
                             for f in levels):
        raise OptionError(f"keep_levels must be fractions in (0, 1] of each channel group's "
                          f"channels, e.g. (1.0, 0.75, 0.5), got {keep_levels!r}; (1.0,) "
                          "keeps every channel (no pruning)")
    return tuple(float(f) for f in levels)


def _check_batches(graph: torch.fx.GraphModule, batches: Sequence[Any]) -> None:
    """Every batch is a tensor or a tuple of tensors (inputs first), and the traced model runs
    on each distinct input shape and dtype (cut to the example inputs' batch size)."""
    examples = EXAMPLE_INPUTS.get(graph).args
    n_inputs = len(examples)
    tried: set[tuple] = set()
    for i, batch in enumerate(batches):
        inputs = (batch,) if isinstance(batch, torch.Tensor) else \
            tuple(batch[:n_inputs]) if isinstance(batch, (tuple, list)) else ()
        if len(inputs) != n_inputs or not all(isinstance(t, torch.Tensor) and t.dim()
                                              for t in inputs):
            got = type(batch).__name__ if not isinstance(batch, (tuple, list)) else \
                f"a {type(batch).__name__} of {[type(t).__name__ for t in batch]}"
            raise DataError(f"data batch {i} is {got}: yield (inputs, target) batches whose "
                            f"first {n_inputs} item(s) are batched input tensors, as a "
                            "DataLoader over a TensorDataset does")
        if graph.meta.get("pqc.shape_specialized") and any(
                tuple(t.shape) != tuple(e.shape) for t, e in zip(inputs, examples)):
            raise DataError(
                f"data batch {i} has inputs of shape "
                f"{[tuple(t.shape) for t in inputs]}; the model was traced for "
                f"{[tuple(e.shape) for e in examples]} exactly (its forward branches on input "
                "shapes, so the trace is specialized to them): give batches of that shape, "
                "e.g. a DataLoader with that batch size and drop_last=True")
        key = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)
        if key in tried:
            continue
        tried.add(key)
        try:
            check_example_inputs(graph, None, tuple(t[:len(e)] if e.dim() else t
                                                    for t, e in zip(inputs, examples)))
        except ExampleInputError as exc:
            where = str(exc).removeprefix("example inputs do not fit the model: ")
            where = where.split(". Give example inputs")[0]
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)
            raise DataError(f"data batch {i} (inputs {shapes}) does not fit the model: {where}. "
                            "Give batches whose inputs have the example inputs' shape (batch "
                            "size aside) and dtype") from exc.__cause__
