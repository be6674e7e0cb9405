"""The compile context: what ``pqcompile.compile`` was asked for, checked, and what its stages
produce, in one :class:`~pqcompile.passes.PassContext` the pipeline's passes share.

:func:`compile_context` checks every argument before the first stage runs (so none fails after
minutes of search) and returns the context; running a pipeline on it
(``get_pipeline("default")(None, ctx)``) fills the products in, ending with ``ctx.compiled``.
A keyword of ``compile()`` is a field here, with its default; a new one is a new field (and
its check in :func:`compile_context`), read by the stage that uses it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch

from ..budget import Budget, BudgetError
from ..data import positional_data
from ..devices import resolve_device
from ..errors import DataError, OptionError
from ..frontend.tracer import FRONTENDS, check_leaf_modules, check_model_and_inputs
from ..objective import Objective
from ..passes.base import PassContext
from ..quant.gptq import check_weight_rounding
from ..quant.residual import check_residual_bits
from ..targets import get_target
from .checks import (
    check_bit_options,
    check_data,
    check_finetune,
    check_finite,
    check_keep_levels,
    check_latency,
    check_multiple,
    check_solver,
    example_from_data,
)


@dataclass
class CompileContext(PassContext):
    """The arguments of ``compile()`` (checked) and the products of its stages.

    Arguments: as ``pqcompile.compile`` documents them; ``spec`` is the target's
    :class:`~pqcompile.targets.TargetSpec`, ``chosen`` the solver object, ``objective`` the
    resolved :class:`~pqcompile.objective.Objective`.
    Products (``None`` until the stage that makes them ran): ``fp32`` the analyzed float graph
    (costs), ``problem`` and ``importance`` (sensitivity), ``solution``, ``candidates``,
    ``notes``, ``limits`` (solve), ``assignment`` (read from the graph's annotations after the
    solve stage and any pass after it), ``prepared`` the pruned, folded float graph,
    ``reference`` the integer-exact reference, ``program`` ``(mod, params, report)``
    (lower), ``compiled`` (build), ``rounding`` (GPTQ's per-layer results, weight-rounding;
    ``weight_rounding`` is checked into ``None`` for nearest rounding or the GPTQ options).
    """

    model: Any = None
    example_inputs: tuple[torch.Tensor, ...] = ()
    example_note: str = ""
    target: Any = "arm"
    spec: Any = None
    budget: Any = None
    data: Any = None
    validation: Any = None
    solver: Any = "ilp"
    chosen: Any = None
    solver_options: Any = None
    finetune: Any = None
    criterion: Any = None
    channel_criterion: Any = None
    bit_options: Any = None
    keep_levels: Any = None
    multiple: Any = None
    calibration_batches: int = 8
    sensitivity_batches: int = 16
    observer: Any = "minmax"
    seed: int = 0
    pareto_points: int = 4
    tune: int = 0
    latency_table: Any = None
    latency_rpc: Any = None
    leaf_modules: Any = ()
    frontend: str = "fx"
    progress: bool = False
    loss: Any = None
    table_bits: Any = None
    residual_bits: Any = 8
    device: Any = None
    weight_rounding: Any = "nearest"
    objective: Any = None
    # products of the stages
    fp32: Any = None
    problem: Any = None
    importance: Any = None
    teacher: Any = None
    search: Any = None
    solution: Any = None
    candidates: Any = None
    notes: list[str] = field(default_factory=list)
    limits: Any = None
    sensitivity: dict[str, float] = field(default_factory=dict)
    assignment: Any = None
    finetuned: bool = False
    rounding: Any = None
    reference_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None
    calibrated_on: str = ""
    prepared: Any = None
    reference: Any = None
    fidelity: Any = None
    program: Any = None
    tuning: Any = None
    compiled: Any = None

    @property
    def timed(self) -> bool:
        """Whether the solver bounds a predicted latency (a latency table is used)."""
        return self.budget.latency_ms is not None or self.latency_table is not None


_ARGUMENTS = ("target", "budget", "data", "validation", "solver", "solver_options", "finetune",
              "criterion", "channel_criterion", "bit_options", "keep_levels", "multiple",
              "calibration_batches", "sensitivity_batches", "observer", "seed",
              "pareto_points", "tune", "latency_table", "latency_rpc", "leaf_modules",
              "frontend", "progress", "loss", "table_bits", "residual_bits", "device",
              "weight_rounding")


def compile_context(model: torch.nn.Module, example_inputs: Any = None,
                    **arguments: Any) -> CompileContext:
    """A :class:`CompileContext` for ``compile(model, example_inputs, **arguments)``, every
    argument checked (the errors ``pqcompile.compile`` documents); nothing has run yet."""
    unknown = sorted(set(arguments) - set(_ARGUMENTS))
    if unknown:
        close = [f"{k!r}: did you mean {m[0]!r}?" for k in unknown
                 if (m := difflib.get_close_matches(k, _ARGUMENTS, n=1))]
        raise OptionError(f"unknown compile() argument(s) {unknown}"
                          f"{' (' + '; '.join(close) + ')' if close else ''}")
    ctx = CompileContext(model=model, **arguments)
    # dict batches ({"input_ids": ..., "attention_mask": ..., "labels": ...}) by parameter name
    ctx.data = positional_data(model, ctx.data)
    ctx.validation = positional_data(model, ctx.validation)
    if example_inputs is None:  # compile(model, target=..., budget=..., data=loader)
        example_inputs, ctx.example_note = example_from_data(ctx.data)
    ctx.example_inputs = check_model_and_inputs(model, example_inputs)
    check_finite(model)
    budget = ctx.budget
    if budget is None:
        raise BudgetError("budget is required, e.g. Budget(bops='60x') (60 times fewer bit "
                          "operations than FP32) or Budget(weight_bytes='200KB')")
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a pqcompile Budget or its text form, got "
                        f"{type(budget).__name__}")
    ctx.budget = budget
    ctx.spec = get_target(ctx.target)
    ctx.spec.find_cross_compiler()  # an unknown target or a missing linker
    ctx.chosen = check_solver(ctx.solver, ctx.solver_options)
    ctx.multiple = check_multiple(ctx.multiple, ctx.spec)
    ctx.latency_table = check_latency(budget, ctx.chosen, ctx.solver, ctx.spec,
                                      ctx.latency_table, ctx.latency_rpc)
    check_finetune(ctx.finetune)
    ctx.objective = Objective.resolve(ctx.loss)  # OptionError: unknown name, not callable
    check_data(ctx.data, ctx.finetune, ctx.chosen)
    ctx.weight_rounding = check_weight_rounding(ctx.weight_rounding)  # None: nearest
    if ctx.weight_rounding is not None and ctx.data is None:
        raise DataError("weight_rounding='gptq' needs data=: GPTQ rounds each layer against "
                        "its inputs on the calibration batches; pass data= (a DataLoader of "
                        "(inputs, target) batches) or weight_rounding='nearest'")
    ctx.bit_options = check_bit_options(ctx.bit_options,
                                        getattr(ctx.chosen, "default_bit_options", None))
    ctx.keep_levels = check_keep_levels(ctx.keep_levels)
    check_leaf_modules(model, ctx.leaf_modules)
    ctx.residual_bits = check_residual_bits(ctx.residual_bits)
    ctx.device = resolve_device(ctx.device)
    if ctx.frontend not in FRONTENDS:
        raise OptionError(f"frontend must be one of {FRONTENDS} (torch.fx symbolic tracing, "
                          f"or torch.export), got {ctx.frontend!r}")
    for name in ("calibration_batches", "sensitivity_batches"):
        value = getattr(ctx, name)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise OptionError(f"{name} must be a positive int (a number of data batches), got "
                              f"{value!r}")
    if isinstance(ctx.tune, bool) or not isinstance(ctx.tune, Integral) or ctx.tune < 0:
        raise OptionError(f"tune must be an int >= 0 (MetaSchedule trials), got {ctx.tune!r}")
    points = ctx.pareto_points
    if isinstance(points, bool) or not isinstance(points, Integral) or points < 0:
        raise OptionError(f"pareto_points must be an int >= 0 (candidates measured for the "
                          f"report's Pareto plot), got {points!r}")
    return ctx

