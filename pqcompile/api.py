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
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch

from .budget import Budget
from .build import Compiled, analysis, finish, prepare
from .finetune import qat_finetune
from .meta import BITS
from .passes import CostAnalysis
from .passes.sensitivity import SensitivityAnalysis, channel_importance, layer_sensitivities
from .progress import Stages
from .solvers import build_problem, get_solver, to_assignment
from .solvers.problem import DEFAULT_BIT_OPTIONS, DEFAULT_KEEP_FRACTIONS
from .solvers.search import SearchContext, needs_context

_FINETUNE_KEYS = {"epochs", "lr", "distill", "temperature", "max_batches", "optimizer",
                  "weight_decay", "momentum", "distill_weight", "learn_weight_clip",
                  "max_grad_norm"}


def _batches(data: Iterable[Any] | None, n: int) -> list[Any] | None:
    if data is None:
        return None
    batches = list(islice(iter(data), n))
    if not batches:
        raise ValueError("data is empty: pass a DataLoader (or iterable) of (inputs, target) "
                         "batches, or data=None for the data-free path")
    return batches


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"a data batch must be a tensor or an (inputs, target) pair, got "
                    f"{type(batch).__name__}")


def compile(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
            target: Any = "arm", budget: Budget | str | None = None,
            data: Iterable[Any] | None = None, solver: Any = "ilp",
            validation: Sequence[Any] | None = None,
            finetune: Mapping[str, Any] | None = None, criterion: Any = None,
            channel_criterion: Any = None, bit_options: Sequence[tuple[int, int]] | None = None,
            keep_levels: Sequence[float] | None = None, multiple: int = 1,
            calibration_batches: int = 8, sensitivity_batches: int = 16,
            observer: str = "minmax", seed: int = 0, solver_options: Mapping | None = None,
            progress: bool = False) -> Compiled:
    """Compress ``model`` to ``budget`` and build it for ``target`` (module docstring).

    ``budget``: a :class:`Budget` or its text form (``"bops=60x,weight_bytes=200KB"``).
    ``solver``: a registered name (``pqcompile.solvers.list_solvers()``) or a solver object.
    Searching solvers (``sbs``, ``ajpq``, ``fitcompress``, ``picpq``) also get the model and
    ``data``, and measure candidates on ``validation`` batches (default: the first few
    batches of ``data``).
    ``finetune``: ``{"epochs": 1, "lr": 1e-3, "distill": True, "max_batches": None, ...}``;
    needs ``data`` (``(inputs, target)`` batches). The result's ``.solution`` holds the
    solver's choice and predicted costs, ``.totals`` the built model's.
    """
    if budget is None:
        raise ValueError("budget is required, e.g. Budget(bops='60x') (60 times fewer bit "
                         "operations than FP32) or Budget(weight_bytes='200KB')")
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a pqcompile Budget or its text form, got "
                        f"{type(budget).__name__}")
    if finetune is not None:
        unknown = set(finetune) - _FINETUNE_KEYS
        if unknown:
            raise ValueError(f"unknown finetune options {sorted(unknown)}; known: "
                             f"{sorted(_FINETUNE_KEYS)}")
        if data is None:
            raise ValueError("finetune needs data: pass data= (a DataLoader of (inputs, target) "
                             "batches)")
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) \
        else tuple(example_inputs)
    torch.manual_seed(seed)
    names = ["analysis", "sensitivity", "solve"] + (["fine-tune"] if finetune else []) \
        + ["quantize, lower, build"]
    stage = Stages(names, enabled=progress)
    with stage("analysis"):
        fp32 = analysis(model, example_inputs)
    sens_batches = _batches(data, sensitivity_batches)
    with stage("sensitivity", f"{len(sens_batches)} batches" if sens_batches else "data-free"):
        scored = SensitivityAnalysis(
            criterion, sens_batches, channel_criterion=channel_criterion,
            bit_options=bit_options or DEFAULT_BIT_OPTIONS)(fp32).graph_module
        importance = channel_importance(scored)
        problem = build_problem(scored, layer_sensitivities(scored), importance,
                                bit_options=bit_options or DEFAULT_BIT_OPTIONS,
                                keep_levels=keep_levels or DEFAULT_KEEP_FRACTIONS,
                                multiple=multiple)
    teacher = copy.deepcopy(model).eval()  # the user's model keeps its mode and weights
    chosen = get_solver(solver, **dict(solver_options or {})) if isinstance(solver, str) \
        else solver
    with stage("solve", getattr(chosen, "name", str(solver))):
        if needs_context(chosen):
            if data is None:
                raise ValueError(f"solver {getattr(chosen, 'name', solver)!r} searches on "
                                 "data: pass data= (a DataLoader of (inputs, target) batches), "
                                 "or pick a data-free solver such as 'ilp'")
            context = SearchContext(problem, scored, teacher=teacher, data=data,
                                    held_out=validation, channel_scores=importance, seed=seed,
                                    progress=progress)
            solution = chosen.solve(problem, budget, context=context)
        else:
            solution = chosen.solve(problem, budget)
        # A searching solver may say which channels its kept counts keep (e.g. SBS's gates).
        scores = {**(importance or {}), **dict(solution.info.get("channel_scores", {}))}
        assignment = to_assignment(solution, scored, scores or None)

    extra: dict[str, Any] = {}
    if finetune is not None:
        opts = dict(finetune)
        with stage("fine-tune"):
            tuned, amax = qat_finetune(fp32, assignment, data, seed=seed,
                                       distill_from=teacher if opts.pop("distill", True)
                                       else None, progress=progress, observer=observer,
                                       calibration_batches=calibration_batches, **opts)
        for node in tuned.graph.nodes:
            if node.name in assignment.bits:
                BITS.set(node, assignment.bits[node.name])
        prepared = CostAnalysis()(tuned).graph_module
        extra["activation_amax"] = amax
    else:
        prepared = prepare(fp32, assignment)
    calib_batches = _batches(data, calibration_batches)
    calibration = [_inputs(b) for b in calib_batches] if calib_batches else [example_inputs[0]]
    with stage("quantize, lower, build", str(target)):
        compiled = finish(fp32, prepared, assignment, target=target, calibration=calibration,
                          observer=observer, **extra)
    compiled.solution = solution
    compiled.timings = dict(stage.seconds)  # wall seconds per stage
    compiled.budget = budget
    compiled.calibration = (f"{len(calibration)} batches of data" if calib_batches
                            else "the example inputs (no data given)")
    return compiled
