"""Quantization-aware fine-tuning (QAT) of a compressed graph (:mod:`pqcompile.fakequant`).

:func:`qat_finetune` trains the pruned, BN-folded float graph through its fake-quantized view
(:func:`~pqcompile.fakequant.fake_quant_model`: straight-through rounding, LSQ activation
steps, optional learned weight clipping), distilling to the float model or on the compile
objective. ``device=`` runs the training on that device (the returned graph is on the CPU);
under ``torch.distributed`` it trains data-parallel (:mod:`pqcompile.distributed`: every rank
reads the same global batches and trains on its contiguous shard, gradients averaged by DDP).

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
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import distributed
from .assignment import Assignment
from .devices import is_cpu, resolve_device, to_device
from .fakequant import (
    FakeQuantWeight,
    LsqQuantizer,
    apply_weight_clips,
    calibrate,
    compressed_graph,
    fake_quant_model,
    fake_quant_weight,
    mse_clip,
    quantizers,
    weight_scale,
)
from .meta import EXAMPLE_INPUTS
from .objective import Objective, split_target
from .progress import Progress
from .quant.observers import Observer

__all__ = ["FakeQuantWeight", "LsqQuantizer", "Progress", "apply_weight_clips", "calibrate",
           "compressed_graph", "fake_quant_model", "fake_quant_weight", "mse_clip",
           "qat_finetune", "quantizers", "weight_scale"]


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
                 objective: Any = None, device: Any = None,
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

    ``device``: where the training runs (a torch device or its name; ``None``: the CPU). The
    activation ranges are calibrated on the CPU (they set the integer grid), the teacher is a
    copy moved there, and the returned graph is back on the CPU. Under ``torch.distributed``
    (several ranks) every rank must read the same batches: each trains on its shard
    (:func:`pqcompile.distributed.shard`) and DDP averages the gradients.

    Returns the fine-tuned float graph (pruned, BN folded, eval mode; the graph to quantize)
    and the learned ``{node: amax}`` of every quantized tensor, for
    ``build_reference(graph, assignment, calib, activation_amax=amax)``.
    """
    _check_args(epochs, lr, temperature, distill_weight, max_batches, calibration_batches)
    device = resolve_device(device)
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
    # the teachers are copies (the caller's models stay where they are), moved to ``device``
    teacher = copy.deepcopy(distill_from).eval() if distill_from is not None else None
    if objective is not None and Objective.resolve(objective).kind == "cross_entropy":
        objective = None  # labels: the cross entropy (+ distillation) below
    if objective is not None:
        objective = Objective.resolve(objective)
        if teacher is None:
            teacher = copy.deepcopy(gm).eval()
    if teacher is not None and not is_cpu(device):
        teacher = teacher.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        calib = []
        for batch in train_loader:
            calib.append(_inputs(batch, n_in))  # whole batches, on the CPU: the grid
            if len(calib) >= calibration_batches:
                break
        fq = fake_quant_model(work, assignment, calibrate(work, assignment, calib, observer),
                              learn_clip=learn_weight_clip)
        steps = [q.step for q in quantizers(fq).values()]
        steps += [m.clip for m in fq.modules()
                  if isinstance(m, FakeQuantWeight) and m.clip is not None]
        if not is_cpu(device):
            fq = fq.to(device)  # shares work's modules: they move with it
        model = distributed.wrap(fq, device)  # DDP under a process group of several ranks
        opt = _optimizer(optimizer, list(work.parameters()), steps, lr, momentum, weight_decay)
        trained = [p for group in opt.param_groups for p in group["params"]]
        total = epochs * per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
        bar = Progress(total, "qat", progress and distributed.builds_here())
        step, running = 0, None
        for _ in range(epochs):
            fq.train()
            for m in fq.modules():  # an unfoldable BN keeps its running statistics
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            for i, batch in enumerate(train_loader):
                if i >= per_epoch:
                    break
                batch = to_device(distributed.shard(batch, "qat_finetune"), device)
                inputs = _inputs(batch, n_in)
                if objective is not None:
                    with torch.no_grad():
                        t_out = teacher(*inputs)
                    loss = objective.loss(model(*inputs), t_out, split_target(batch, n_in))
                else:
                    target = _target(batch, n_in, "qat_finetune")
                    logits = model(*inputs)
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
    if not is_cpu(device):
        work.to("cpu")  # the graph to quantize: the integer reference is built on the CPU
    work.eval()
    return work, {name: q.amax for name, q in quantizers(fq).items()}
