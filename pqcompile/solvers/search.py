"""What a *searching* solver may use beyond the pure-data :class:`Problem`: the model and data.

ILP, greedy and the uniform baselines decide from the problem's sensitivities alone. The seed
methods (SBS, AJPQ, FITCompress, PIC-PQ) search by training gates, by rewards measured on
held-out batches or by refreshing a Fisher estimate, so they also need the analyzed graph and
data. They declare ``needs_context = True`` and are called as
``solver.solve(problem, budget, context=SearchContext(...))``; they still answer with a
:class:`Solution` over the same problem (bits from each layer's options, kept counts from each
group's levels), so every solver shares one search space, one cost model and one budget.
A solver that decides *which* channels a group keeps (not only how many) puts
``{group id: per-channel scores}`` under ``solution.info["channel_scores"]``; the kept
channels are then the highest-scoring ones by those scores.

The context offers the operations every such method repeats:

* :meth:`SearchContext.assignment`: bits + kept counts -> an :class:`Assignment` (each group
  keeps its highest-scoring channels, by the channel criterion the problem was built with);
* :meth:`SearchContext.fake_quant`: the pruned, BN-folded, fake-quantized training graph of an
  assignment (a fresh copy; training it does not touch the original);
* :meth:`SearchContext.finetune`: a short QAT of an assignment (fitness after fine-tuning);
* :meth:`SearchContext.measure`: mean loss (the compile objective,
  :class:`~pqcompile.objective.Objective`: distillation to the teacher by default) and a score
  (top-1 accuracy for class logits on labelled batches, else ``exp(-loss)``, ``metric`` says
  which) of a module on the held-out batches; :meth:`SearchContext.loss`: the objective of one
  batch, for methods that train on it;
* :meth:`SearchContext.fixed_batches`: the first ``n`` training batches, the same every call;
  :meth:`SearchContext.train_batches`: the next ``n``, cycling through ``data``;
* :meth:`SearchContext.record`: note a candidate measured or walked through (the report's
  Pareto plot shows them);
* :meth:`SearchContext.tighten`: the greedy repair that lowers the cheapest-to-lose settings
  until the budget holds (AMC/HAQ's "tighten actions after each episode").

>>> import torch
>>> from torch import nn
>>> from pqcompile.build import analysis
>>> from pqcompile.solvers.graph import build_problem
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))
>>> data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
>>> gm = analysis(model.eval(), (data[0][0],))
>>> ctx = SearchContext(build_problem(gm, None, None, pin_first_last=False), gm,
...                     teacher=model, data=data)
>>> a = ctx.assignment({"_0": (4, 8), "_3": (8, 8)}, {0: 4})
>>> int(a.masks[0].sum())
4
>>> loss, acc = ctx.measure(ctx.fake_quant(a))
>>> loss > 0 and 0 <= acc <= 1, ctx.metric
(True, 'accuracy')
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from ..assignment import Assignment
from ..devices import is_cpu, resolve_device, to_device
from ..candidates import candidate
from ..meta import EXAMPLE_INPUTS
from ..objective import Objective, split_target
from .greedy import GreedySolver
from .problem import Option, Problem, Solution, evaluate, needs_context, resolve_limits

__all__ = ["SearchContext", "check_int", "check_real", "needs_context"]


def check_int(owner: str, name: str, value: Any, low: int | None = None) -> int:
    """``value`` as an int option of ``owner`` (a solver class name), at least ``low``;
    otherwise a ValueError naming the solver, the option and the bound (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{owner}: {name} must be an int{bound}, got {value!r}")
    return int(value)


def check_real(owner: str, name: str, value: Any, low: float = -math.inf,
               high: float = math.inf, *, low_open: bool = True, high_open: bool = False
               ) -> float:
    """``value`` as a finite real option of ``owner`` in the interval from ``low`` to
    ``high`` (open or closed at each end); otherwise a ValueError naming the solver, the
    option and the interval."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) \
        and (value < high if high_open else value <= high)
    if not ok:
        lo = f" {'>' if low_open else '>='} {low:g}" if math.isfinite(low) else ""
        hi = f"{' and' if lo else ''} {'<' if high_open else '<='} {high:g}" \
            if math.isfinite(high) else ""
        raise ValueError(f"{owner}: {name} must be a finite number{lo}{hi}, got {value!r}")
    return float(value)


class SearchContext:
    """The model, data and helpers a searching solver uses (see the module docstring).

    ``graph``: the analyzed FP32 graph the problem was built from (never changed here);
    ``teacher``: the user's float model (distillation target, never changed);
    ``data``: a re-iterable of ``(inputs, target)`` training batches;
    ``held_out``: batches for rewards and fitness (default: the first ``held_out_batches``
    batches of ``data``, materialized once so every candidate is measured on the same images);
    ``channel_scores``: ``{group id: per-channel scores}`` deciding which channels a kept count
    keeps (default: L1 of the producing weights); ``calibration_batches``: batches the
    activation ranges of a fake-quant candidate are calibrated on; ``objective``: what a
    candidate is measured by (an :class:`~pqcompile.objective.Objective`, a loss name or
    callable; ``None``: the label cross entropy of a classifier, the classic search;
    :func:`pqcompile.compile` passes its ``loss=``, distillation by default). The teacher
    outputs come from ``teacher``, or from ``graph`` when no teacher is given. ``device``:
    where :meth:`measure` runs a candidate (a copy of it; ``None``: the CPU).
    """

    def __init__(self, problem: Problem, graph: torch.fx.GraphModule, *,
                 teacher: nn.Module | None = None, data: Iterable[Any] | None = None,
                 held_out: Sequence[Any] | None = None, held_out_batches: int = 4,
                 channel_scores: Mapping[int, np.ndarray] | None = None,
                 calibration_batches: int = 2, seed: int = 0, progress: bool = False,
                 objective: Any = None, device: Any = None) -> None:
        if data is None:
            raise ValueError("this solver searches on data: pass data= (a DataLoader of "
                             "(inputs, target) batches) to pqcompile.compile, or pick a "
                             "data-free solver ('ilp', 'greedy', 'uniform4')")
        self.problem, self.graph, self.teacher = problem, graph, teacher
        self.objective = Objective.resolve("cross_entropy" if objective is None else objective)
        self._reference = teacher if teacher is not None else copy.deepcopy(graph).eval()
        self._teacher_out: dict[int, Any] = {}  # held-out batch index -> teacher output
        self.data, self.seed, self.progress = data, seed, progress
        self.device = resolve_device(device)  # where measure() runs a candidate (a copy)
        self.channel_scores = channel_scores
        self.n_inputs = len(EXAMPLE_INPUTS.get(graph).args)
        self.held_out = list(held_out) if held_out is not None \
            else list(itertools.islice(iter(data), held_out_batches))
        if not self.held_out:
            raise ValueError("no held-out batches: data is empty; pass a DataLoader of "
                             "(inputs, target) batches")
        self._stream: Any = None
        self._fixed: list[Any] = []
        self._fixed_stream: Any = None
        self._one_pass = 0
        self.candidates: list[dict[str, Any]] = []  # what the search saw (see record)
        self.calibration = [self._inputs(b) for b in self.fixed_batches(calibration_batches)]
        self.metric = "accuracy" if self._classifies() else "exp(-loss)"

    # --- data ----------------------------------------------------------------------------

    def _inputs(self, batch: Any) -> tuple[torch.Tensor, ...]:
        items = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        return tuple(items[:self.n_inputs])

    def _target(self, batch: Any, module: nn.Module | None = None) -> torch.Tensor:
        if isinstance(batch, torch.Tensor) or len(batch) <= self.n_inputs:
            model = module or self.teacher
            if model is None:
                raise ValueError("unlabelled batches need a teacher model to label them")
            with torch.no_grad():
                return model(*self._inputs(batch)).argmax(-1)
        return batch[self.n_inputs]

    def split(self, batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``(inputs, target)`` of a batch of a classifier (unlabelled batches: the teacher's
        argmax); methods that train on any model use :meth:`loss`."""
        return self._inputs(batch), self._target(batch)

    def inputs(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """The model inputs of a batch (its first ``n_inputs`` items)."""
        return self._inputs(batch)

    def probe(self, output: Any, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """What a Fisher estimate differentiates on ``batch``: the objective's Gauss-Newton
        probe (:meth:`pqcompile.objective.Objective.probe`; the loss itself for a label or a
        user loss)."""
        return self.objective.probe(output, self.teacher_output(batch),
                                    split_target(batch, self.n_inputs), generator)

    def teacher_output(self, batch: Any) -> Any:
        """The float model's output on ``batch``'s inputs (no gradient)."""
        was = self._reference.training
        self._reference.eval()
        with torch.no_grad():
            out = self._reference(*self._inputs(batch))
        self._reference.train(was)
        return out

    def loss(self, output: Any, batch: Any, teacher_output: Any = None) -> torch.Tensor:
        """The objective (batch mean, differentiable) of a student's ``output`` on ``batch``."""
        teacher = self.teacher_output(batch) if teacher_output is None else teacher_output
        return self.objective.loss(output, teacher, split_target(batch, self.n_inputs))

    def _classifies(self) -> bool:
        """Whether the objective sees class logits on the held-out batches (top-1 applies)."""
        batch = self.held_out[0]
        teacher = self._held_out_teacher(0)
        return self.objective.correct(teacher, teacher,
                                      split_target(batch, self.n_inputs)) is not None

    def _held_out_teacher(self, i: int) -> Any:
        if i not in self._teacher_out:
            self._teacher_out[i] = self.teacher_output(self.held_out[i])
        return self._teacher_out[i]

    def fixed_batches(self, n: int) -> list[Any]:
        """The first ``n`` training batches, the same ones on every call (read once from one
        pass of ``data``, cycling when it is shorter): candidates fine-tuned or calibrated on
        them are compared on equal terms, and a search repeats exactly."""
        if self._fixed_stream is None:
            self._fixed_stream = iter(self.data)
        while len(self._fixed) < n and self._fixed_stream is not False:
            try:
                self._fixed.append(next(self._fixed_stream))
            except StopIteration:
                self._fixed_stream, self._one_pass = False, len(self._fixed)  # now cycle
        if not self._fixed:
            raise ValueError("data yields no batches")
        while len(self._fixed) < n:
            self._fixed.append(self._fixed[len(self._fixed) % self._one_pass])
        return self._fixed[:n]

    def train_batches(self, n: int) -> list[Any]:
        """The next ``n`` training batches, cycling through ``data`` (re-iterated at its end):
        fresh batches on every call, for methods that train on a stream."""
        out: list[Any] = []
        restarted = False
        while len(out) < n:
            if self._stream is None:
                self._stream = iter(self.data)
            try:
                out.append(next(self._stream))
                restarted = False
            except StopIteration:
                self._stream = None
                if restarted:
                    raise ValueError("data yields no batches") from None
                restarted = True
        return out

    # --- candidates ----------------------------------------------------------------------

    def solution(self, bits: Mapping[str, Option], kept: Mapping[int, int],
                 budget: Any = None, *, solver: str = "", info: Mapping | None = None
                 ) -> Solution:
        """A :class:`Solution` (objective, costs, feasibility under ``budget``)."""
        limits = resolve_limits(self.problem, budget) if budget is not None else None
        return evaluate(self.problem, bits, kept, limits, solver=solver, info=info)

    def record(self, bits: Mapping[str, Option], kept: Mapping[int, int], *,
               accuracy: float | None = None, loss: float | None = None) -> None:
        """Note a candidate the search measured (``accuracy``/``loss`` on the held-out
        batches) or walked through, for the report's Pareto plot (:mod:`pqcompile.candidates`)."""
        if self.metric != "accuracy":
            accuracy = None  # a score, not an accuracy: the record keeps the loss
        self.candidates.append(candidate(self.problem, bits, kept, source="search",
                                         accuracy=accuracy, loss=loss))

    def assignment(self, bits: Mapping[str, Option], kept: Mapping[int, int],
                   channel_scores: Mapping[int, np.ndarray] | None = None) -> Assignment:
        """Bits and keep-masks: each group keeps its highest-scoring channels, by
        ``channel_scores`` where given (``{group id: scores}``), else by the context's."""
        from .graph import to_assignment
        scores = {**(self.channel_scores or {}), **dict(channel_scores or {})}
        return to_assignment(self.solution(bits, kept), self.graph, scores or None)

    def fake_quant(self, assignment: Assignment) -> torch.fx.GraphModule:
        """A fresh fake-quant training graph of ``assignment`` (pruned, BN folded, activation
        steps calibrated on the context's calibration batches)."""
        from ..finetune import calibrate, compressed_graph, fake_quant_model
        work = compressed_graph(self.graph, assignment)
        return fake_quant_model(work, assignment, calibrate(work, assignment, self.calibration))

    def finetune(self, assignment: Assignment, steps: int, *, lr: float = 0.01,
                 distill: bool = True) -> torch.fx.GraphModule:
        """``steps`` QAT steps of ``assignment`` on the first ``steps`` training batches (the
        same for every candidate); returns the fine-tuned fake-quant graph (a fresh copy)."""
        from ..finetune import fake_quant_model, qat_finetune
        batches = self.fixed_batches(steps)
        tuned, amax = qat_finetune(self.graph, assignment, batches, lr=lr, seed=self.seed,
                                   distill_from=self.teacher if distill else None,
                                   progress=False, max_batches=steps,
                                   calibration_batches=min(len(batches), 2),
                                   objective=self.objective)
        return fake_quant_model(tuned, assignment, amax)

    def measure(self, module: nn.Module, batches: Sequence[Any] | None = None
                ) -> tuple[float, float]:
        """The objective's mean loss (per sample) and the score (``metric``: top-1 accuracy
        of a classifier, else ``exp(-loss)``, 1 for the float model's outputs) of ``module``
        (eval mode) on ``batches`` (default: the held-out batches)."""
        was = module.training
        module.eval()
        source, device = module, self.device
        if not is_cpu(device):
            module = copy.deepcopy(module).to(device)
        loss = correct = count = 0.0
        scored = True
        held = batches is None
        with torch.no_grad():
            for i, batch in enumerate(self.held_out if held else batches):
                inputs = self._inputs(batch)
                out = module(*to_device(inputs, device))
                teacher = to_device(self._held_out_teacher(i) if held
                                    else self.teacher_output(batch), device)
                target = to_device(split_target(batch, self.n_inputs), device)
                n = int(inputs[0].shape[0]) if inputs[0].dim() else 1
                loss += float(self.objective.loss(out, teacher, target)) * n
                hits = self.objective.correct(out, teacher, target)
                scored = scored and hits is not None
                correct += hits or 0
                count += n
        source.train(was)
        mean = loss / count
        if self.metric == "accuracy" and scored:
            return mean, correct / count
        return mean, math.exp(-mean) if math.isfinite(mean) else 0.0

    def tighten(self, bits: Mapping[str, Option], kept: Mapping[int, int], budget: Any
                ) -> tuple[dict[str, Option], dict[int, int]]:
        """Lower settings from ``(bits, kept)`` by the greedy's least-sensitivity-per-cost
        rule until ``budget`` holds (unchanged when it already holds)."""
        s = GreedySolver().solve(self.problem, budget, start=(bits, kept))
        return dict(s.bits), dict(s.kept)

    def copy_graph(self) -> torch.fx.GraphModule:
        """A deep copy of the analyzed FP32 graph (for methods that train the float model)."""
        return copy.deepcopy(self.graph)
