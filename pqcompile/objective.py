"""The one objective every stage measures a compressed model by: criteria, searching solvers,
the measured Pareto front and QAT.

A model's output may be any structure: a tensor, tuples and lists, dicts (Hugging Face's
``ModelOutput`` is one), nested. :func:`leaves` flattens it to its floating-point tensors, in
order (dict keys in insertion order; non-float and ``None`` leaves are skipped).

Built-in objectives (``compile(loss=...)``):

* ``"distill"`` (the default): distillation to the FP32 model's outputs, summed over the
  leaves. A leaf is treated as *class logits* when it is ``(N, C)`` with ``C >= 2`` and the
  batch carries an integer target of shape ``(N,)`` with values in ``[0, C)`` (the data says
  it is a classifier): its term is ``T^2 * KL(softmax(t/T) || softmax(s/T))`` at temperature
  ``T`` (Hinton's softened logits; the labels themselves are not used). Every other leaf's
  term is its normalized mean squared error ``mean((s - t)^2) / mean(t^2)`` (one over the
  leaf's SQNR; plain MSE when the teacher's leaf is all zero), so leaves of different scales
  weigh alike and the value is unit-free.
* ``"cross_entropy"``: the classic classification loss on the batch's labels (the teacher's
  argmax where a batch has none); the output must be one ``(N, C)`` tensor of logits.
* a callable ``loss(student_out, teacher_out, target) -> scalar tensor``: the user's own, the
  *batch mean* (the data-driven criteria turn batch gradients into per-sample ones by it).
  ``student_out`` and ``teacher_out`` are the compressed and the FP32 model's outputs (the
  model's own structure); ``target`` is what the batch holds after the model's inputs: ``None``
  for bare inputs, the one item of an ``(inputs, target)`` batch, a tuple for several.

Curvature (:meth:`Objective.probe`). Every built-in distillation term is zero, with a zero
gradient, at the teacher, which is where the sensitivity criteria evaluate it: an empirical
Fisher of it is all zero. The Fisher-type criteria therefore use the Gauss-Newton form: for a
per-sample output Hessian ``H_n`` of the loss, the probe ``(1/N) sum_n <s_n, r_n>`` with random
``r_n`` of covariance ``H_n`` has gradients ``g`` with ``E[N g^2] = mean_n diag(J_n^T H_n J_n)``
(the Gauss-Newton diagonal, which equals the Hessian at the teacher). For an NMSE leaf ``r_n``
is Gaussian scaled by ``sqrt(2 / (M * mean(t^2)))`` (``M``: the leaf's elements per sample);
for a logits leaf ``r_n = p_n - onehot(y_n)`` with ``y_n`` drawn from ``p_n = softmax(t_n/T)``
(the "true Fisher" with sampled labels). The cross entropy and user losses are probed by their
own gradient (the empirical Fisher); a user loss that is zero at the teacher therefore scores
nothing, which :class:`~pqcompile.passes.sensitivity.SensitivityAnalysis` reports as an error
pointing to ``criterion="hessian"`` (Hutchinson needs no non-zero gradient).

>>> import torch
>>> obj = Objective.resolve(None)
>>> s = {"a": torch.ones(4, 3), "b": (torch.zeros(4, 2), None)}
>>> float(obj.loss(s, s, None)), len(leaves(s))
(0.0, 2)
>>> t = {"a": torch.ones(4, 3), "b": (torch.full((4, 2), 2.0), None)}
>>> float(obj.loss(s, t, None))  # the "b" leaf: mean((0 - 2)^2) / mean(2^2)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .errors import OptionError

__all__ = ["BUILTIN", "Objective", "leaves", "split_target"]

BUILTIN = ("distill", "cross_entropy")
LossCallable = Callable[[Any, Any, Any], torch.Tensor]


def leaves(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of an output structure, in order (module docstring)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in leaves(v)]
    return []


def split_target(batch: Any, n_inputs: int) -> Any:
    """What ``batch`` holds after the model's ``n_inputs`` inputs: ``None``, one item, or a
    tuple of several."""
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (tuple, list)):
        return None
    items = tuple(batch)
    if len(items) == 2 and isinstance(items[0], (tuple, list)) and n_inputs > 1:
        items = tuple(items[0]) + (items[1],)
    rest = items[n_inputs:]
    return None if not rest else rest[0] if len(rest) == 1 else rest


def _class_target(leaf: torch.Tensor, target: Any) -> bool:
    """Whether ``target`` labels the rows of ``leaf`` as classes (so ``leaf`` is logits)."""
    if not (isinstance(target, torch.Tensor) and leaf.dim() == 2 and leaf.shape[1] >= 2
            and target.dim() == 1 and target.shape[0] == leaf.shape[0]
            and not target.is_floating_point() and not target.is_complex()
            and target.dtype is not torch.bool and target.numel()):
        return False
    return bool(target.min() >= 0) and bool(target.max() < leaf.shape[1])


def _power(t: torch.Tensor) -> torch.Tensor:
    p = t.detach().to(torch.float64).pow(2).mean()
    return p if float(p) > 0 else torch.ones((), dtype=torch.float64)


class Objective:
    """A loss over a model's outputs against its FP32 teacher's (module docstring).

    ``loss(student, teacher, target)``: the batch-mean loss (differentiable in ``student``);
    ``probe(student, teacher, target, generator)``: the scalar whose gradients the Fisher-type
    criteria square; ``correct(student, teacher, target)``: correct top-1 predictions of a
    classifier (``None`` when the objective sees no class logits).
    """

    def __init__(self, loss: str | LossCallable = "distill", *, temperature: float = 2.0
                 ) -> None:
        if isinstance(loss, str) and loss not in BUILTIN:
            raise OptionError(f"loss {loss!r} is not a built-in objective ({', '.join(BUILTIN)}"
                              "); give one of them or a callable loss(student_out, "
                              "teacher_out, target) -> scalar tensor (the batch mean)")
        if not isinstance(loss, str) and not callable(loss):
            raise OptionError(f"loss must be 'distill', 'cross_entropy' or a callable "
                              f"loss(student_out, teacher_out, target), got "
                              f"{type(loss).__name__}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise OptionError(f"temperature must be a positive number, got {temperature!r}")
        self.kind = loss if isinstance(loss, str) else "custom"
        self.fn = None if isinstance(loss, str) else loss
        self.temperature = float(temperature)
        self.name = self.kind if self.fn is None else getattr(loss, "__name__", "custom")

    @classmethod
    def resolve(cls, spec: Any) -> Objective:
        """``spec`` as an objective: ``None`` -> distillation, a name or a callable."""
        if isinstance(spec, Objective):
            return spec
        return cls("distill" if spec is None else spec)

    @classmethod
    def from_label_loss(cls, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
                        ) -> Objective:
        """A two-argument ``loss_fn(output, target)`` (the criteria's ``loss_fn=``) as an
        objective: unlabelled batches take the teacher's argmax as target."""
        def loss(student: Any, teacher: Any, target: Any) -> torch.Tensor:
            return loss_fn(student, _labels(teacher, target))
        obj = cls(loss)
        obj.name = getattr(loss_fn, "__name__", "loss_fn")
        return obj

    def __repr__(self) -> str:
        return f"<objective {self.name}>"

    # --- the loss ------------------------------------------------------------------------

    def loss(self, student: Any, teacher: Any, target: Any) -> torch.Tensor:
        if self.kind == "cross_entropy":
            return F.cross_entropy(_one_logits(student), _labels(teacher, target))
        if self.kind == "custom":
            value = self.fn(student, teacher, target)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                got = f"a tensor of shape {tuple(value.shape)}" \
                    if isinstance(value, torch.Tensor) else type(value).__name__
                raise OptionError(f"loss {self.name!r} returned {got}; it must return a "
                                  "scalar tensor, the batch mean")
            return value.reshape(())
        pairs = _pairs(student, teacher)
        total = torch.zeros((), dtype=pairs[0][0].dtype)
        for s, t in pairs:
            if _class_target(t, target):
                temp = self.temperature
                total = total + F.kl_div(F.log_softmax(s / temp, -1),
                                         F.log_softmax(t.detach() / temp, -1), log_target=True,
                                         reduction="batchmean") * temp * temp
            else:
                total = total + ((s - t.detach()) ** 2).mean() / _power(t).to(s.dtype)
        return total

    def probe(self, student: Any, teacher: Any, target: Any,
              generator: torch.Generator) -> torch.Tensor:
        """The Gauss-Newton probe of the distillation objective, the loss itself otherwise
        (module docstring)."""
        if self.kind != "distill":
            return self.loss(student, teacher, target)
        pairs = _pairs(student, teacher)
        total = torch.zeros((), dtype=pairs[0][0].dtype, device=pairs[0][0].device)
        for s, t in pairs:
            n = s.shape[0] if s.dim() else 1
            if _class_target(t, target):
                p = F.softmax(t.detach().cpu().to(torch.float64) / self.temperature, -1)
                y = torch.multinomial(p, 1, generator=generator).squeeze(1)
                r = p - F.one_hot(y, p.shape[1]).to(p.dtype)
            else:
                per_sample = max(s.numel() // max(n, 1), 1)
                scale = math.sqrt(2.0 / (per_sample * float(_power(t))))
                r = torch.randn(s.shape, generator=generator, dtype=torch.float64) * scale
            total = total + (s * r.to(s.device, s.dtype)).sum() / n  # r: drawn on the CPU
        return total

    def correct(self, student: Any, teacher: Any, target: Any) -> int | None:
        """Correct top-1 predictions (labels, else the teacher's argmax for
        ``cross_entropy``), or ``None`` where no leaf is class logits."""
        if self.kind == "cross_entropy":
            return int((_one_logits(student).argmax(-1) == _labels(teacher, target)).sum())
        s_leaves, t_leaves = leaves(student), leaves(teacher)
        for s, t in zip(s_leaves, t_leaves):
            if _class_target(t, target):
                return int((s.argmax(-1) == target).sum())
        return None


def _pairs(student: Any, teacher: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    s, t = leaves(student), leaves(teacher)
    if not t:
        raise OptionError(f"the model's output ({type(teacher).__name__}) holds no "
                          "floating-point tensor to distill to; give compile(loss=...) a "
                          "callable loss(student_out, teacher_out, target)")
    if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise OptionError(f"the compressed model's outputs {[tuple(a.shape) for a in s]} do "
                          f"not match the FP32 model's {[tuple(b.shape) for b in t]}")
    return list(zip(s, t))


def _one_logits(out: Any) -> torch.Tensor:
    found = leaves(out)
    if len(found) != 1 or found[0].dim() != 2:
        raise OptionError(f"loss='cross_entropy' needs one (N, classes) tensor of logits as the "
                          f"model's output, got {[tuple(t.shape) for t in found]}; use the "
                          "default loss='distill' or a callable loss")
    return found[0]


def _labels(teacher: Any, target: Any) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        return target
    if target is None:
        with torch.no_grad():
            return _one_logits(teacher).argmax(-1)
    raise OptionError(f"the batch's target is a {type(target).__name__}; the label loss needs "
                      "one tensor of class indices")
