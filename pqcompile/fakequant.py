"""The fake-quantized training graph on the grid of :mod:`pqcompile.quant` (QAT's model).

The training graph is the pruned (``assignment.masks``), BN-folded float graph: the very graph
:func:`pqcompile.quant.build_reference` quantizes. BN is folded *before* training (the layers
train with folded weights and biases), so the weights seen in training are those the compiled
program quantizes: no fold-after-training drift, at the price of batch statistics during the
(short) fine-tuning. Into that graph :func:`fake_quant_model` puts

* per-output-channel symmetric narrow-range weights, ``scale[c] = r[c] / (2^(b-1) - 1)``,
  ``q = clamp(floor(w / s + 0.5))``, with straight-through rounding (identity gradient), where
  ``r[c] = max |w[c]|`` or, with learned clipping (``learn_weight_clip=True``), a learned
  range started at the MSE-optimal clip; training ends by clamping the weights into it, so ``max |w[c]|``
  of the returned weights is the learned range and the scheme quantizes them as trained;
* one :class:`LsqQuantizer` per quantized tensor, at the node pqcompile.quant observes (after a
  folded ReLU), with that tensor's bits and signedness (unsigned after a ReLU, else symmetric
  narrow signed; 8 bits where no layer reads it): LSQ (Esser et al. 2020), a learnable step
  initialised from min/max calibration, ``q = clamp(floor(x / s + 0.5), lo, hi)``, gradient
  scale ``1 / sqrt(numel_per_sample * qmax)``.

Everything between quantizers is float, as in the reference's fake-quant view, so after
training ``build_reference(graph, assignment, calib, activation_amax=amax)`` (the learned
ranges) is the integer-exact version of the trained model; they differ only by the int32 bias
and fixed-point multiplier roundings (at most 1 LSB at a tie).

>>> import torch
>>> from torch import nn
>>> from pqcompile import trace
>>> from pqcompile.assignment import Assignment
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
...                       nn.Linear(36, 3)).eval()
>>> gm = trace(model, (torch.randn(1, 1, 5, 5),))
>>> a = Assignment.uniform(["_0", "_4"], 4, 4)
>>> data = [(torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))) for _ in range(4)]
>>> work = compressed_graph(gm, a)
>>> amax = calibrate(work, a, [x for x, _ in data])
>>> sorted(amax)  # the quantized tensors, by producing node
['_0', '_4', 'input_1']
>>> fq = fake_quant_model(work, a, amax)
>>> fq(data[0][0]).shape
torch.Size([8, 3])
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp

from .assignment import Assignment, check_graph_and_assignment
from .meta import CHANNEL_GROUPS, EXAMPLE_INPUTS, KEPT_CHANNELS
from .passes import ChannelGroupAnalysis, FoldBatchNorm, PruneChannels, ShapeAnalysis
from .passes.base import provided_keys
from .quant.calibrate import check_batches, observe
from .quant.observers import Observer, grid, make_observer
from .quant.plan import Plan, make_plan

__all__ = ["FakeQuantWeight", "LsqQuantizer", "apply_weight_clips", "calibrate",
           "compressed_graph", "fake_quant_model", "fake_quant_weight", "mse_clip",
           "quantizers", "weight_scale"]


def compressed_graph(gm: torch.fx.GraphModule, assignment: Assignment) -> torch.fx.GraphModule:
    """A copy of ``gm`` pruned by ``assignment.masks`` (unless already pruned), BN folded,
    shapes propagated: the float graph the assignment quantizes. ``gm`` is not changed."""
    check_graph_and_assignment(gm, assignment, "compressed_graph")
    work = copy.deepcopy(gm).eval()
    if assignment.masks and KEPT_CHANNELS.name not in provided_keys(work):
        if CHANNEL_GROUPS.name not in provided_keys(work):
            work = ChannelGroupAnalysis()(ShapeAnalysis()(work).graph_module).graph_module
        work = PruneChannels(assignment.masks)(work).graph_module
    work = FoldBatchNorm()(work).graph_module
    return ShapeAnalysis()(work).graph_module


def _plan(gm: torch.fx.GraphModule, assignment: Assignment) -> tuple[Plan, torch.fx.GraphModule]:
    shaped = copy.deepcopy(gm)  # the caller's graph keeps its annotations as they are
    with torch.no_grad():
        ShapeProp(shaped).propagate(*EXAMPLE_INPUTS.get(gm).args)
    return make_plan(shaped, Assignment(dict(assignment.bits))), shaped


def _roots(plan: Plan) -> list[str]:
    return [r for r in plan.kind if r in plan.bits]


def calibrate(gm: torch.fx.GraphModule, assignment: Assignment, batches: Iterable[Any],
              observer: str | Callable[[], Observer] = "minmax") -> dict[str, float]:
    """``{node: amax}`` of every quantized tensor of ``gm`` (BN folded), as
    :func:`~pqcompile.quant.build_reference` calibrates them (same plan, observers and batch
    checks): the LSQ initialisation, and a valid ``activation_amax`` for build_reference."""
    plan, shaped = _plan(gm, assignment)
    batches = check_batches(shaped, batches)
    factory = make_observer(observer)
    roots = _roots(plan)
    observers = {plan.observe_at(r): factory() for r in roots}
    observe(shaped, batches, observers)
    out = {}
    for r in roots:
        bits, signed = plan.bits[r], plan.signed[r]
        try:
            # scale() is what the reference uses (an all-zero tensor gets scale 1).
            out[r] = observers[plan.observe_at(r)].scale(bits, signed) * grid(bits, signed)[1]
        except ValueError as exc:
            raise ValueError(f"calibrating node {r!r} ({plan.op[r]}): {exc}") from exc
    return out


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """``floor(v + 0.5)`` (the scheme's rounding) with an identity gradient."""
    return v + (torch.floor(v + 0.5) - v).detach()


class LsqQuantizer(nn.Module):
    """Per-tensor fake quantization with a learnable step (LSQ) on one grid of the scheme."""

    def __init__(self, bits: int, signed: bool, amax: float, numel: int = 1) -> None:
        super().__init__()
        if not (amax > 0 and math.isfinite(amax)):
            raise ValueError(f"LsqQuantizer: amax must be positive and finite, got {amax}")
        self.bits, self.signed = bits, signed
        self.lo, self.hi = grid(bits, signed)
        self.step = nn.Parameter(torch.tensor(float(amax) / self.hi))
        self.grad_scale = 1.0 / math.sqrt(max(numel, 1) * self.hi)

    @property
    def amax(self) -> float:
        return float(self.step.detach().abs()) * self.hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step.abs().clamp_min(1e-12)
        s = (s - s * self.grad_scale).detach() + s * self.grad_scale
        return _round_ste(torch.clamp(x / s, self.lo, self.hi)) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, amax={self.amax:.4g}"


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel ``max |w[c]| / (2^(b-1) - 1)`` (detached; 1 for an all-zero row,
    whose weights quantize to 0 on any grid)."""
    amax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
    return torch.where(amax > 0, amax / (2 ** (bits - 1) - 1), torch.ones_like(amax))


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``q * scale`` on the per-channel symmetric narrow-range grid; gradient straight through."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scale(w, bits).view((-1,) + (1,) * (w.dim() - 1))
    q = torch.clamp(torch.floor(w.detach() / scale + 0.5), -qmax, qmax)
    return w + (q * scale - w).detach()


def mse_clip(w: torch.Tensor, bits: int, grid_points: int = 20) -> torch.Tensor:
    """Per-output-channel clip ``c`` minimizing ``||Q_c(w) - w||^2`` over ``c`` in
    ``[0.5, 1] * max |w[c]|`` (the learned clip's starting point)."""
    flat = w.detach().reshape(w.shape[0], -1)
    amax = flat.abs().amax(dim=1)
    qmax = 2 ** (bits - 1) - 1
    best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for frac in torch.linspace(0.5, 1.0, grid_points + 1).tolist():
        c = amax * frac
        s = torch.where(c > 0, c / qmax, torch.ones_like(c)).unsqueeze(1)
        err = ((torch.clamp(torch.floor(flat / s + 0.5), -qmax, qmax) * s - flat) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, c, best), torch.where(better, err, best_err)
    return best


class FakeQuantWeight(nn.Module):
    """A conv2d/linear layer (shared, not copied) run with fake-quantized weights, and its bias
    on the int32 grid ``s_in * s_w[c]`` of the scheme (``s_in`` from ``input_quantizer``): at
    4 bits that grid is coarse enough to matter, so training sees it too.

    With ``learn_clip`` the per-channel range is learned (LSQ on weights): a parameter ``clip``
    (started at :func:`mse_clip`) and the step ``min(clip, max |w[c]|) / (2^(b-1) - 1)``.
    :meth:`apply_clip` then clamps the weights into that range, so that the scheme's
    max-based weight scale of the clamped weights *is* the learned step: the integer program
    quantizes exactly as training did.
    """

    def __init__(self, layer: nn.Module, bits: int,
                 input_quantizer: LsqQuantizer | None = None, learn_clip: bool = False) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"FakeQuantWeight wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer, self.bits = layer, bits
        self._input = (input_quantizer,)  # a tuple: referenced, not registered as a child
        self.clip = nn.Parameter(mse_clip(layer.weight, bits)) if learn_clip else None
        per_channel = layer.weight[0].numel()
        self.grad_scale = 1.0 / math.sqrt(per_channel * (2 ** (bits - 1) - 1))

    def _range(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
        if self.clip is None:
            return amax
        c = self.clip * self.grad_scale + (self.clip - self.clip * self.grad_scale).detach()
        return torch.minimum(c.abs(), amax)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fake-quantized weight, per-channel scale)``; straight-through to the weight."""
        w = self.layer.weight
        if self.clip is None:
            return fake_quant_weight(w, self.bits), weight_scale(w, self.bits)
        qmax = 2 ** (self.bits - 1) - 1
        r = self._range(w)
        scale = torch.where(r > 0, r / qmax, torch.ones_like(r))
        s = scale.view((-1,) + (1,) * (w.dim() - 1))
        return _round_ste(torch.clamp(w / s, -qmax, qmax)) * s, scale.detach()

    @torch.no_grad()
    def apply_clip(self) -> None:
        """Clamp the layer's weights into the learned range (a no-op without ``learn_clip``)."""
        if self.clip is None:
            return
        w = self.layer.weight
        r = self._range(w).view((-1,) + (1,) * (w.dim() - 1))
        w.copy_(torch.maximum(torch.minimum(w, r), -r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.layer.bias
        wq, scale = self.quantized()
        quantizer = self._input[0]
        if b is not None and quantizer is not None:
            s_b = quantizer.step.detach().abs() * scale
            b = b + (torch.floor(b.detach() / s_b + 0.5) * s_b - b).detach()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, wq, b)
        return F.linear(x, wq, b)


def fake_quant_model(gm: torch.fx.GraphModule, assignment: Assignment,
                     activation_amax: Mapping[str, float], *, learn_clip: bool = False
                     ) -> torch.fx.GraphModule:
    """The fake-quant training graph of ``gm`` (pruned, BN folded) under ``assignment``.

    It *shares* ``gm``'s modules and parameters (training it trains ``gm``); the step sizes are
    its own parameters, initialised from ``activation_amax`` (``{node: amax}`` for every
    quantized tensor, e.g. from :func:`calibrate`). ``learn_clip``: learned per-channel weight
    ranges (:class:`FakeQuantWeight`; call :func:`apply_weight_clips` after training).
    """
    plan, shaped = _plan(gm, assignment)
    roots = _roots(plan)
    missing = [r for r in roots if r not in activation_amax]
    if missing:
        raise ValueError(f"activation_amax lacks the quantized tensors {missing[:6]}; "
                         "calibrate(gm, assignment, batches) gives all of them")
    shapes = {n.name: n.meta.get("tensor_meta") for n in shaped.graph.nodes}
    at = {plan.observe_at(r): r for r in roots}
    graph, env, modules = torch.fx.Graph(), {}, {}
    for n in gm.graph.nodes:
        look = functools.partial(_lookup, env)
        if n.op == "output":
            graph.output(map_arg(n.args[0], look))
            continue
        if plan.kind[n.name] in ("conv", "linear"):
            target = f"pqc_wq_{n.name}"
            source = plan.root[n.all_input_nodes[0].name]
            modules[target] = FakeQuantWeight(gm.get_submodule(n.target),
                                              assignment.bits[n.name].weight,
                                              modules[f"pqc_aq_{source}"],
                                              learn_clip=learn_clip)
            new = graph.create_node("call_module", target, map_arg(n.args, look),
                                    map_arg(n.kwargs, look), name=n.name)
        else:
            new = graph.node_copy(n, look)
            if n.op in ("call_module", "get_attr"):
                modules[n.target] = functools.reduce(getattr, n.target.split("."), gm)
        env[n.name] = new
        if n.name in at:
            r = at[n.name]
            shape = tuple(getattr(shapes[n.name], "shape", (1,)))
            numel = math.prod(shape[1:]) if len(shape) > 1 else 1
            target = f"pqc_aq_{r}"
            modules[target] = LsqQuantizer(plan.bits[r], plan.signed[r],
                                           float(activation_amax[r]), numel)
            env[n.name] = graph.call_module(target, (new,))
    out = torch.fx.GraphModule(modules, graph, "FakeQuantModel")
    out.meta[EXAMPLE_INPUTS.name] = EXAMPLE_INPUTS.get(gm)
    return out


def _lookup(env: dict[str, torch.fx.Node], a: torch.fx.Node) -> torch.fx.Node:
    return env[a.name]


def apply_weight_clips(fq: torch.fx.GraphModule) -> None:
    """Clamp every layer's weights into its learned range (see :class:`FakeQuantWeight`)."""
    for m in fq.modules():
        if isinstance(m, FakeQuantWeight):
            m.apply_clip()


def quantizers(fq: torch.fx.GraphModule) -> dict[str, LsqQuantizer]:
    """``{node: quantizer}`` of a :func:`fake_quant_model`."""
    return {name[len("pqc_aq_"):]: m for name, m in fq.named_children()
            if isinstance(m, LsqQuantizer)}
