"""``pqcompile.compile``: search an assignment under a budget, then build it for a target.

``compile()`` builds the context (model, budget, target, data: every argument checked,
:func:`pqcompile.pipeline.compile_context`) and runs a pipeline of stages on it
(``pqcompile.get_pipeline("default")``; ``pipeline=`` another, ``passes=`` the user's own
passes inserted at named stages):

1. analysis: trace, shapes, channel groups, FP32 costs;
2. sensitivity: a criterion scores every layer's bit options and every channel (data-free
   ``weight_error`` / ``magnitude`` without data; FIT ``fisher`` with data);
3. a solver (``ilp`` by default) picks bits per layer and kept channels per group under the
   budget; the groups keep their most important channels;
4. optional GPTQ weight rounding (``weight_rounding="gptq"``) and QAT fine-tuning on ``data``;
5. prune, fold, calibration and quantization, integer lowering and the TVM build
   (:mod:`pqcompile.pipeline.stages`).

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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .budget import Budget
from .build import Compiled
from .passes.base import Pass, Pipeline
from .pipeline import compile_context, resolve_pipeline, run_pipeline
from .pipeline.checks import check_bit_options as _check_bit_options  # noqa: F401 (tests)


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
            progress: bool = False, loss: Any = None, table_bits: Any = None,
            residual_bits: int | str = 8, device: Any = None, frontend: str = "fx",
            weight_rounding: str | Mapping[str, Any] = "nearest",
            pipeline: Pipeline | str | None = None,
            passes: Mapping[str, Pass | Sequence[Pass]] | None = None) -> Compiled | None:
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

    ``device``: where the training side runs (``"cuda"``, ``"cuda:1"``, a ``torch.device``;
    ``None``: the CPU): the Fisher estimate, the searching solvers' candidate measurements and
    fine-tuning, on copies (:mod:`pqcompile.devices`); the build stays on the CPU and exact.
    Under ``torch.distributed`` those stages run data-parallel and ranks other than 0 return
    ``None`` before the build (:mod:`pqcompile.distributed`).

    ``table_bits``: the bits ``nn.Embedding`` tables are stored at: ``None`` (int8), 4 or 2
    (packed rows with a scale per row; weight-byte budgets count them so:
    :mod:`pqcompile.quant.tables`), or ``{module path: bits}``. ``residual_bits``: the width
    of integer sums that only float ops read (a transformer's residual stream): 8..16, or
    ``"auto"``, the better of 8 and 16 by fidelity on the calibration batches
    (:mod:`pqcompile.quant.residual`); the report says which.

    ``weight_rounding``: how the assigned weights meet their grid: ``"nearest"`` (default),
    or ``"gptq"`` (needs ``data``): GPTQ's second-order rounding on the calibration batches,
    after the solver and before fine-tuning, which then starts from the rounded weights
    (:mod:`pqcompile.quant.gptq`; a dict ``{"method": "gptq", "act_order": True,
    "clip": "mse", "skip_bits": [8], ...}`` sets its options).

    ``frontend``: ``"fx"`` (torch.fx symbolic tracing, retried with the example inputs'
    shapes fixed when forward branches on shapes) or ``"export"`` (``torch.export``: the
    ATen graph mapped back to module calls, :mod:`pqcompile.frontend.torch_export`; for forward code
    fx cannot trace). ``pipeline``: the stages to run, a :class:`~pqcompile.passes.Pipeline`
    or a registered name (default ``"default"``: ``print(pqcompile.get_pipeline())`` lists
    them). ``passes``: the user's passes run inside compile at named stages,
    ``{"after:solve": pin_layer, "before:quantize": [a, b]}``; a pass after ``solve`` that
    changes a layer's ``pqc.bits`` or the graph's ``pqc.keep_masks`` changes what is built.
    ``.timings``: wall seconds per stage.

    A wrong argument fails before any pass runs, with an error of :mod:`pqcompile.errors`
    (``ModelError``, ``NonFiniteWeightError``, ``ExampleInputError``, ``DataError``,
    ``OptionError``, also for ``leaf_modules``), :class:`~pqcompile.budget.BudgetError`,
    :class:`~pqcompile.targets.UnknownTargetError` or
    :class:`~pqcompile.targets.ToolchainError`; data batches that do not fit the model fail
    with ``DataError`` as soon as they are read. A built model over any budget limit, or more
    than 2x below all of them, gets a :class:`~pqcompile.errors.BudgetWarning` (and the
    report's header says so: :mod:`pqcompile.solvers.verdict`).
    """
    arguments = dict(target=target, budget=budget, data=data, solver=solver,
                     validation=validation, finetune=finetune, criterion=criterion,
                     channel_criterion=channel_criterion, bit_options=bit_options,
                     keep_levels=keep_levels, multiple=multiple,
                     calibration_batches=calibration_batches,
                     sensitivity_batches=sensitivity_batches, observer=observer, seed=seed,
                     solver_options=solver_options, pareto_points=pareto_points, tune=tune,
                     latency_table=latency_table, latency_rpc=latency_rpc,
                     leaf_modules=leaf_modules, progress=progress, loss=loss,
                     table_bits=table_bits, residual_bits=residual_bits, device=device,
                     frontend=frontend, weight_rounding=weight_rounding)
    ctx = compile_context(model, example_inputs, **arguments)
    return run_pipeline(resolve_pipeline(pipeline, passes), ctx)
