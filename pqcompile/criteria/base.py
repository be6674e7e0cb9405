"""The criterion protocol and the machinery the criteria share.

A criterion answers two questions on one scale:

* ``layer_sensitivity(gm, layer, bit_options) -> {(w_bits, a_bits): value}``: how much worse the
  model gets when ``layer`` (a conv/linear fx node name) runs at those bits;
* ``channel_scores(gm, group) -> np.ndarray``: how much worse it gets when each channel of a
  :class:`~pqcompile.meta.ChannelGroup` is pruned (pruning = quantizing to zero bits).

Values are ``>= 0``, additive over layers, and never smaller at fewer bits. Every criterion
works on a BN-folded, eval-mode copy of the graph (:func:`prepare`), because the folded weights
are what :func:`pqcompile.quant.build_reference` quantizes; the caller's graph is never changed.

Data: a batch is ``(inputs, target)`` with ``inputs`` a tensor (or a tuple of tensors for a
model with several inputs), or bare inputs. The data-driven criteria measure the model by an
:class:`~pqcompile.objective.Objective` (``objective=``; default: distillation to the float
model's own outputs, any output structure, no labels needed; the Fisher-type criteria use its
Gauss-Newton probe, since a distillation loss has a zero gradient at the float model). The
legacy ``loss_fn(output, target)`` (e.g. ``F.cross_entropy`` on labels; unlabelled batches take
the float model's argmax) selects a label objective instead. Losses are batch *means*: the
criteria rely on it to turn batch gradients into per-sample ones.

>>> import torch
>>> from pqcompile import trace
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)),
...            (torch.randn(1, 1, 5, 5),))
>>> [n.op for n in prepare(gm).graph.nodes]  # the BN is folded into the conv
['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..meta import EXAMPLE_INPUTS, ChannelGroup
from ..objective import Objective
from ..passes.fold_bn import FoldBatchNorm
from ..presets import compute_layers
from ..quant.observers import Observer, grid, make_observer
from ..quant.plan import activation_sources, layer_plan
from .running import (  # noqa: F401  (the criteria import these from here)
    LossFn,
    batch_size,
    iterate,
    loss_grads,
    make_objective,
    run_capture,
)

BitOption = tuple[int, int]


class Criterion:
    """Base class: set ``name``, ``needs_data`` and ``units``; override the methods you score.

    ``calibrate(gm, batches)`` collects the statistics a data-driven criterion needs (a no-op
    for data-free ones); afterwards ``layer_sensitivity`` and ``channel_scores`` are cheap.
    """

    name = "criterion"
    needs_data = False
    units = ""
    scores_layers = True
    scores_channels = True

    def calibrate(self, gm: torch.fx.GraphModule, batches: Iterable[Any] | None = None) -> None:
        """Collect statistics on ``batches`` (no-op by default: data-free criteria)."""

    def layer_sensitivity(self, gm: torch.fx.GraphModule, layer: str,
                          bit_options: Iterable[BitOption]) -> dict[BitOption, float]:
        raise NotImplementedError(
            f"criterion {self.name!r} scores channels only; use a layer criterion such as "
            "'weight_error', 'hessian' or 'fisher' for bit widths")

    def channel_scores(self, gm: torch.fx.GraphModule, group: ChannelGroup) -> np.ndarray:
        raise NotImplementedError(
            f"criterion {self.name!r} scores layers only; use a channel criterion such as "
            "'magnitude', 'l1', 'taylor' or 'fisher' for channel importance")

    def __repr__(self) -> str:
        return f"<criterion {self.name}>"


class SecondOrderCriterion(Criterion):
    """What the data-driven second-order criteria (:class:`~pqcompile.criteria.HessianTrace`,
    :class:`~pqcompile.criteria.FisherTrace`) share: the loss, the stopping tolerance, the
    activation observer, the prepared-graph cache and the "calibrated on this graph?" check.
    A subclass sets ``_ranges`` (:class:`ActivationRanges`) in ``calibrate``."""

    needs_data = True
    units = "estimated increase of the mean loss (second order)"

    def __init__(self, *, loss_fn: LossFn | None, tol: float,
                 observer: str | Callable[[], Observer], objective: Any = None) -> None:
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        self.objective = make_objective(loss_fn, objective)
        self.tol, self.observer = tol, observer
        self._cache = PreparedCache()
        self.weight_trace: dict[str, float] = {}
        self.activation_trace: dict[str, float] = {}
        self.converged = False
        self._ranges: ActivationRanges | None = None

    def _check(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """The prepared graph the statistics were collected on (clear errors otherwise)."""
        if self._ranges is None:
            raise ValueError(f"criterion {self.name!r} has no statistics yet: call "
                             "calibrate(gm, batches) first, with (inputs, target) batches")
        if not self._cache.holds(gm):
            raise ValueError(f"criterion {self.name!r} was calibrated on another graph, or the "
                             "graph's weights changed since: call calibrate(gm, batches) again")
        return self._cache.get(gm)

    def _set_traces(self, layers: Sequence[str], weight: Sequence[float],
                    shared: dict[str, list[str]], activation: Sequence[float]) -> None:
        """Store the per-layer traces; an input tensor's trace is split equally among the
        layers reading it (``shared``: :func:`readers`), so layer terms add up to it once."""
        self.weight_trace = dict(zip(layers, (float(t) for t in weight)))
        self.activation_trace = {layer: 0.0 for layer in layers}
        for node, t in zip(shared, activation):
            for layer in shared[node]:
                self.activation_trace[layer] = float(t) / len(shared[node])


# --- the prepared graph ----------------------------------------------------------------------


def prepare(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An eval-mode, BN-folded deep copy of ``gm`` with in-place ops made out-of-place
    (in-place activations would break the double backprop of the Hessian criterion)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"criteria take a torch.fx.GraphModule from pqcompile.trace, got "
                        f"{type(gm).__name__}")
    if not EXAMPLE_INPUTS.has(gm):
        raise ValueError("the graph has no example inputs: build it with pqcompile.trace(model, "
                         "example_inputs) (or pqcompile.build.analysis)")
    work = copy.deepcopy(gm).eval()
    for m in work.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    for n in work.graph.nodes:
        if n.kwargs.get("inplace"):
            n.kwargs = {**n.kwargs, "inplace": False}
    work.recompile()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in work.modules()):
        work = FoldBatchNorm()(work).graph_module
    with torch.no_grad():
        ShapeProp(work).propagate(*EXAMPLE_INPUTS.get(work).args)
    return work


class PreparedCache:
    """The prepared copy of the last graph seen, reused while its parameters are unchanged."""

    def __init__(self) -> None:
        self._ref: Callable[[], Any] = lambda: None
        self._version: tuple = ()
        self._prepared: torch.fx.GraphModule | None = None

    @staticmethod
    def _version_of(gm: torch.fx.GraphModule) -> tuple:
        # _version counts in-place updates, so an optimizer step makes the copy stale.
        return tuple(t._version for t in list(gm.parameters()) + list(gm.buffers()))

    def get(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        if self._ref() is not gm or self._version != self._version_of(gm):
            self._prepared = prepare(gm)
            self._ref, self._version = weakref.ref(gm), self._version_of(gm)
        return self._prepared

    def holds(self, gm: torch.fx.GraphModule) -> bool:
        return self._ref() is gm and self._version == self._version_of(gm)


def layer_module(work: torch.fx.GraphModule, layer: str) -> nn.Module:
    node = next((n for n in work.graph.nodes if n.name == layer), None)
    if node is None or node.op != "call_module" or layer not in compute_layers(work):
        raise ValueError(f"{layer!r} is not a conv/linear layer of the graph; layers are "
                         f"{compute_layers(work)[:6]}")
    return work.get_submodule(node.target)


def input_node(work: torch.fx.GraphModule, layer: str) -> str:
    """Name of the node whose output the layer reads."""
    node = next(n for n in work.graph.nodes if n.name == layer)
    return node.all_input_nodes[0].name


def check_bit_options(bit_options: Iterable[BitOption], where: str) -> list[BitOption]:
    options = [tuple(o) for o in bit_options]
    if not options:
        raise ValueError(f"{where}: bit_options is empty; give (weight bits, activation bits) "
                         "pairs such as [(8, 8), (4, 8), (4, 4)]")
    for o in options:
        if len(o) != 2 or not all(isinstance(b, int) and 2 <= b <= 32 for b in o):
            raise ValueError(f"{where}: bit option {o!r} must be a pair of ints in 2..32 "
                             "(weight bits, activation bits)")
    return options


# --- the quantization grid (the scheme of pqcompile.quant) -------------------------------------


def weight_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel step ``max |w[c]| / (2^(b-1) - 1)`` in float64 (0 for a zero row)."""
    w64 = w.detach().to(torch.float64)
    return w64.reshape(w64.shape[0], -1).abs().amax(dim=1) / (2 ** (bits - 1) - 1)


def weight_error(w: torch.Tensor, bits: int) -> float:
    """``||Q_b(w) - w||^2`` on the per-channel symmetric narrow-range grid of pqcompile.quant."""
    w64 = w.detach().to(torch.float64)
    s = weight_scales(w64, bits)
    s = torch.where(s > 0, s, torch.ones_like(s)).view((-1,) + (1,) * (w64.dim() - 1))
    qmax = 2 ** (bits - 1) - 1
    q = torch.clamp(torch.floor(w64 / s + 0.5), -qmax, qmax)
    return float(((q * s - w64) ** 2).sum())


def activation_qmax(bits: int, signed: bool) -> int:
    return grid(bits, signed)[1]


def monotone(raw: dict[int, float]) -> dict[int, float]:
    """Running max from the most bits down, so fewer bits never look cheaper.

    A coarser grid's rounding error is smaller for an unlucky tensor now and then; a solver
    may assume monotone costs, so the envelope is reported (and documented as such).
    """
    out, top = {}, 0.0
    for b in sorted(raw, reverse=True):
        top = max(top, raw[b])
        out[b] = top
    return out


def combine(options: Sequence[BitOption], w_term: Callable[[int], float],
            a_term: Callable[[int], float]) -> dict[BitOption, float]:
    """``{(w, a): W(w) + A(a)}`` with both terms made monotone over the requested bits."""
    ws = monotone({w: max(float(w_term(w)), 0.0) for w in {o[0] for o in options}})
    acts = monotone({a: max(float(a_term(a)), 0.0) for a in {o[1] for o in options}})
    return {(w, a): ws[w] + acts[a] for w, a in options}


def input_signedness(work: torch.fx.GraphModule, layers: Sequence[str], plan=None
                     ) -> dict[str, bool]:
    """Whether each layer's input tensor is stored signed (False after a ReLU), as quant does."""
    plan = plan or layer_plan(work, layers)
    return {layer: plan.signed[src]
            for layer, src in activation_sources(work, layers, plan).items()}


def observe_nodes(work: torch.fx.GraphModule, layers: Sequence[str], plan=None
                  ) -> dict[str, str]:
    """The node whose value quant observes for each layer's input (its domain root's
    folded ReLU, if any): calibration ranges then match the compiled program's."""
    plan = plan or layer_plan(work, layers)
    return {layer: plan.observe_at(src)
            for layer, src in activation_sources(work, layers, plan).items()}


class ActivationRanges:
    """Calibration ranges of the layers' inputs, with the observers of pqcompile.quant."""

    def __init__(self, work: torch.fx.GraphModule, layers: Sequence[str],
                 observer: str | Callable[[], Observer] = "minmax") -> None:
        plan = layer_plan(work, layers)
        self.at = observe_nodes(work, layers, plan)
        self.signed = input_signedness(work, layers, plan)
        factory = make_observer(observer)
        self.observers = {node: factory() for node in set(self.at.values())}

    @property
    def nodes(self) -> set[str]:
        return set(self.observers)

    def update(self, values: dict[str, torch.Tensor]) -> None:
        for node, obs in self.observers.items():
            obs.observe(values[node].detach())

    def step(self, layer: str, bits: int) -> float:
        """The activation quantization step ``amax / qmax`` of the layer's input at ``bits``."""
        signed = self.signed[layer]
        return self.observers[self.at[layer]].amax(bits, signed) / activation_qmax(bits, signed)


def readers(work: torch.fx.GraphModule, layers: Sequence[str]) -> dict[str, list[str]]:
    """Input node -> the layers reading it: a shared tensor's activation term is split
    among them, so summing the layers' sensitivities counts its quantization noise once."""
    out: dict[str, list[str]] = {}
    for layer in layers:
        out.setdefault(input_node(work, layer), []).append(layer)
    return out


def out_rows(work: torch.fx.GraphModule, group: ChannelGroup,
             per_row: Callable[[str, nn.Module], np.ndarray | None]) -> np.ndarray:
    """Per-channel sum over the group's producers (``out`` members) of ``per_row(node,
    module)`` (one value per output row of that layer; None: the member is skipped)."""
    scores = np.zeros(group.size)
    names = {n.name: n for n in work.graph.nodes}
    for m in group.members:
        if m.role != "out" or m.node not in names or names[m.node].op != "call_module":
            continue
        rows = per_row(m.node, work.get_submodule(names[m.node].target))
        if rows is not None:
            scores += np.asarray(rows, dtype=np.float64)[np.asarray(m.index)].sum(axis=1)
    return scores
