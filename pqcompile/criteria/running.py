"""Running a criterion's graph on data: captured values, loss gradients, batches, objective.

Shared by the data-driven criteria (Fisher, Hessian, Taylor, channel Fisher) through
:mod:`pqcompile.criteria.base`, which re-exports these names; the batch format is described
there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..errors import CriterionError
from ..meta import EXAMPLE_INPUTS
from ..objective import Objective

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


class Capture(torch.fx.Interpreter):
    """Runs a graph and keeps the output values of the named nodes (autograd intact).

    With autograd on, a kept float tensor that does not require grad (a model input, or what
    is computed from the inputs and buffers alone: a pad, an input normalization ``(x - mean)
    / std``, a slice of one of several inputs) becomes a leaf that requires grad, and the rest
    of the graph reads a copy of it: the loss is then differentiable with respect to every
    kept tensor, wherever the inputs flow, and in-place ops further on stay legal.
    """

    def __init__(self, gm: torch.fx.GraphModule, names: Iterable[str]) -> None:
        super().__init__(gm)
        self.names = set(names)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            if isinstance(value, torch.Tensor) and value.is_floating_point() \
                    and torch.is_grad_enabled() and not value.requires_grad:
                leaf = value.detach().requires_grad_(True)
                self.values[n.name] = leaf
                return leaf.clone()
            self.values[n.name] = value
        return value


def run_capture(work: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                names: Iterable[str]) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(output, {name: value})``; with autograd on, every value kept is differentiable
    (:class:`Capture`), model inputs included."""
    cap = Capture(work, names)
    out = cap.run(*(x.detach() for x in inputs))
    return out, cap.values


def _reaches_output(work: torch.fx.GraphModule) -> set[str]:
    """Names of the nodes whose value the graph's output depends on."""
    out = next(n for n in reversed(work.graph.nodes) if n.op == "output")
    seen, stack = set(), list(out.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(n.all_input_nodes)
    return seen


def loss_grads(work: torch.fx.GraphModule, criterion: str, loss: torch.Tensor,
               tensors: Sequence[torch.Tensor], owners: Sequence[tuple[str, str]],
               **kwargs: Any) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, tensors, allow_unused=True, **kwargs)`` with errors that
    name the layer: ``owners[i]`` is ``(node, description)`` of ``tensors[i]`` (the layer whose
    weight it is, or the node whose value it is). A gradient is ``None`` only for a tensor the
    output does not depend on (a dead branch: no loss through it); one whose node feeds the
    output but gets no gradient (a ``.detach()``, ``torch.no_grad`` or an op such as ``argmax``
    on the way) raises, since scoring it 0 would let a solver prune a layer that matters.
    """
    advice = ("remove the detach/no_grad/non-differentiable op from the forward (or make that "
              "part a leaf module outside the scored layers), or use a data-free criterion such "
              "as criterion='weight_error'")
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise CriterionError(f"criterion {criterion!r}: the loss does not depend differentiably "
                             f"on any layer (the model's output is detached or computed "
                             f"without autograd); {advice}")
    try:
        grads = torch.autograd.grad(loss, list(tensors), allow_unused=True, **kwargs)
    except RuntimeError as exc:
        names = ", ".join(what for _, what in owners[:4])
        raise CriterionError(f"criterion {criterion!r}: autograd could not differentiate the "
                             f"loss with respect to {names}{', ...' if len(owners) > 4 else ''}"
                             f": {exc}; {advice}") from exc
    reaching = None
    for g, (node, what) in zip(grads, owners):
        if g is None:
            reaching = _reaches_output(work) if reaching is None else reaching
            if node in reaching:
                raise CriterionError(f"criterion {criterion!r}: no gradient reaches the {what} "
                                     f"although the model's output depends on node {node!r}: "
                                     f"something between them is not differentiable; {advice}")
    return grads


def split_batch(work: torch.fx.GraphModule, batch: Any, index: int
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """``(inputs, target or None)`` of one batch (see the module docstring)."""
    n_in = len(EXAMPLE_INPUTS.get(work).args)
    if isinstance(batch, torch.Tensor):
        items: tuple = (batch,)
    elif isinstance(batch, (tuple, list)):
        items = tuple(batch)
        if len(items) == 2 and isinstance(items[0], (tuple, list)):
            items = tuple(items[0]) + (items[1],)
    else:
        raise TypeError(f"batch {index} is {type(batch).__name__}; give (inputs, target) pairs "
                        "or input tensors")
    if len(items) == n_in + 1:
        inputs, target = items[:n_in], items[n_in]
    elif len(items) == n_in:
        inputs, target = items, None
    else:
        raise ValueError(f"batch {index} has {len(items)} items; the model takes {n_in} "
                         f"input(s): give (inputs, target) or bare inputs")
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"batch {index}: inputs must be tensors")
    return tuple(inputs), target


def iterate(work: torch.fx.GraphModule, batches: Iterable[Any] | None, name: str
            ) -> Iterator[tuple[tuple[torch.Tensor, ...], Any, Any]]:
    """``(inputs, target or None, the float model's output)`` of every batch."""
    if batches is None or isinstance(batches, torch.Tensor):
        raise TypeError(f"criterion {name!r} needs data: pass an iterable of (inputs, target) "
                        "batches (a DataLoader, or a list of tuples), not "
                        f"{type(batches).__name__}")
    for i, batch in enumerate(batches):
        inputs, target = split_batch(work, batch, i)
        with torch.no_grad():
            teacher = work(*inputs)
        yield inputs, target, teacher


def batch_size(inputs: tuple[torch.Tensor, ...]) -> int:
    return int(inputs[0].shape[0])


def default_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy on labels: what ``loss_fn=F.cross_entropy`` selects."""
    return F.cross_entropy(output, target)


def make_objective(loss_fn: LossFn | None, objective: Any) -> Objective:
    """The criterion's objective: ``loss_fn`` (a label loss) or ``objective`` (default:
    distillation), not both."""
    if loss_fn is not None and objective is not None:
        raise ValueError("give loss_fn (a label loss) or objective, not both")
    if loss_fn is not None:
        return Objective.from_label_loss(loss_fn)
    return Objective.resolve(objective)
