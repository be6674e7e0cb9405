"""Calibration and quantization-aware fine-tuning (QAT) on the grid of :mod:`pqcompile.quant`.

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
>>> tuned, amax = qat_finetune(gm, a, data, epochs=2, lr=1e-2, progress=False)
>>> sorted(amax)  # the quantized tensors, by producing node
['_0', '_4', 'input_1']
>>> from pqcompile.quant import build_reference
>>> ref = build_reference(tuned, a, [x for x, _ in data], activation_amax=amax)
>>> ref(data[0][0]).shape
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
from .objective import Objective, split_target
from .passes import ChannelGroupAnalysis, FoldBatchNorm, PruneChannels, ShapeAnalysis
from .passes.base import provided_keys
from .progress import Progress
from .quant.calibrate import check_batches, observe
from .quant.observers import Observer, grid, make_observer
from .quant.plan import Plan, make_plan

__all__ = ["FakeQuantWeight", "LsqQuantizer", "Progress", "apply_weight_clips", "calibrate",
           "compressed_graph", "fake_quant_model", "fake_quant_weight", "mse_clip",
           "qat_finetune", "quantizers"]


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


def _inputs(batch: Any, n_inputs: int) -> tuple[torch.Tensor, ...]:
    items = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    return tuple(items[:n_inputs])


def _target(batch: Any, n_inputs: int, where: str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor) or len(batch) != n_inputs + 1:
        raise ValueError(f"{where}: training batches must be (inputs..., target) with "
                         f"{n_inputs} input(s) and a label tensor")
    return batch[n_inputs]


def _optimizer(name: str, params, steps, lr: float, momentum: float, weight_decay: float):
    groups = [{"params": params, "weight_decay": weight_decay},
              {"params": steps, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def _check_args(epochs, lr, temperature, distill_weight, max_batches, calibration_batches):
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if not 0 <= distill_weight <= 1:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ValueError(f"calibration_batches must be a positive int, got "
                         f"{calibration_batches!r}")


def qat_finetune(gm: torch.fx.GraphModule, assignment: Assignment, train_loader: Iterable[Any],
                 *, epochs: int = 1, lr: float = 1e-3, distill_from: nn.Module | None = None,
                 temperature: float = 4.0, seed: int = 0, max_batches: int | None = None,
                 progress: bool = True, distill_weight: float = 0.5, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.0,
                 calibration_batches: int = 8,
                 observer: str | Callable[[], Observer] = "minmax",
                 learn_weight_clip: bool = False, max_grad_norm: float | None = 2.0,
                 objective: Any = None,
                 ) -> tuple[torch.fx.GraphModule, dict[str, float]]:
    """Fine-tune ``gm`` under ``assignment`` with fake quantization (see the module docstring).

    ``gm``: the traced float model (pqcompile.trace or build.analysis; not changed).
    ``train_loader``: ``(inputs, target)`` batches, re-iterated once per epoch, at most
    ``max_batches`` per epoch. The activation ranges start from ``observer`` calibration on the
    first ``calibration_batches`` batches. Loss: cross entropy, or with ``distill_from`` (the
    float teacher, run in eval mode) ``(1 - distill_weight) * CE + distill_weight * T^2 *
    KL(teacher_T || student_T)`` at temperature ``T``. With ``objective`` (an
    :class:`~pqcompile.objective.Objective`, a loss name or a callable ``loss(student_out,
    teacher_out, target)``; what ``compile()`` passes), the loss is that objective against
    the teacher (``distill_from``, else ``gm`` itself): any output structure, labels only where
    the objective reads them; ``temperature`` and ``distill_weight`` then do not apply (the
    objective has its own). The ``"cross_entropy"`` objective is the label loss above. ``learn_weight_clip``: learn each
    layer's per-channel weight range too (LSQ on weights, started at the MSE-optimal clip); the
    returned weights are clamped into it, so the integer program's max-based weight scale
    equals the learned one. ``max_grad_norm``: the gradient norm (weights and steps
    together) is clipped to it before every step (None: no clipping): a heavily pruned model
    starts far from its teacher, and its first distillation gradients (norm ~20 on the
    Fashion-MNIST ResNet-20 with a quarter of some groups pruned) otherwise wreck it to a
    constant prediction. (Learned clipping is off by default: on the Fashion-MNIST ResNet-20
    at 60x fewer BOPs it scored 0.2-0.3 pt below max scaling after 150 steps). SGD (Nesterov momentum) or Adam, the
    learning rate decaying from ``lr`` to 0 along a cosine. Deterministic for a ``seed`` (the
    global RNG is restored afterwards; the loader's own order is the loader's business).

    Returns the fine-tuned float graph (pruned, BN folded, eval mode; the graph to quantize)
    and the learned ``{node: amax}`` of every quantized tensor, for
    ``build_reference(graph, assignment, calib, activation_amax=amax)``.
    """
    _check_args(epochs, lr, temperature, distill_weight, max_batches, calibration_batches)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    work = compressed_graph(gm, assignment)
    n_in = len(EXAMPLE_INPUTS.get(work).args)
    try:
        per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    if max_batches is not None:
        per_epoch = max_batches if per_epoch is None else min(per_epoch, max_batches)
    if per_epoch is None:
        raise ValueError("train_loader has no len(): give max_batches, the batches per epoch")
    if per_epoch == 0:
        raise ValueError("train_loader is empty: give at least one (inputs, target) batch")
    teacher = copy.deepcopy(distill_from).eval() if distill_from is not None else None
    if objective is not None and Objective.resolve(objective).kind == "cross_entropy":
        objective = None  # labels: the cross entropy (+ distillation) below
    if objective is not None:
        objective = Objective.resolve(objective)
        if teacher is None:
            teacher = copy.deepcopy(gm).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        calib = []
        for batch in train_loader:
            calib.append(_inputs(batch, n_in))
            if len(calib) >= calibration_batches:
                break
        fq = fake_quant_model(work, assignment, calibrate(work, assignment, calib, observer),
                              learn_clip=learn_weight_clip)
        steps = [q.step for q in quantizers(fq).values()]
        steps += [m.clip for m in fq.modules()
                  if isinstance(m, FakeQuantWeight) and m.clip is not None]
        opt = _optimizer(optimizer, list(work.parameters()), steps, lr, momentum, weight_decay)
        trained = [p for group in opt.param_groups for p in group["params"]]
        total = epochs * per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
        bar = Progress(total, "qat", progress)
        step, running = 0, None
        for _ in range(epochs):
            fq.train()
            for m in fq.modules():  # an unfoldable BN keeps its running statistics
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            for i, batch in enumerate(train_loader):
                if i >= per_epoch:
                    break
                inputs = _inputs(batch, n_in)
                if objective is not None:
                    with torch.no_grad():
                        t_out = teacher(*inputs)
                    loss = objective.loss(fq(*inputs), t_out, split_target(batch, n_in))
                else:
                    target = _target(batch, n_in, "qat_finetune")
                    logits = fq(*inputs)
                    loss = F.cross_entropy(logits, target)
                if objective is None and teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(*inputs)
                    kd = F.kl_div(F.log_softmax(logits / temperature, -1),
                                  F.log_softmax(t_logits / temperature, -1), log_target=True,
                                  reduction="batchmean") * temperature ** 2
                    loss = (1 - distill_weight) * loss + distill_weight * kd
                if not torch.isfinite(loss):
                    raise ValueError(f"qat_finetune: the loss became {float(loss)} at step "
                                     f"{step}; lower lr (now {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                value = float(loss.detach())
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.update(step, loss=running, lr=sched.get_last_lr()[0])
    apply_weight_clips(fq)
    work.eval()
    return work, {name: q.amax for name, q in quantizers(fq).items()}
