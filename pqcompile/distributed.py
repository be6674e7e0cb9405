"""Data-parallel fine-tuning and Fisher estimation with ``torch.distributed`` (DDP).

Launch the same ``compile()`` on every rank, e.g. on one machine with two processes::

    torchrun --nproc_per_node 2 -m pqcompile.cli compile model.pt --data fashion-mnist \\
        --budget bops=60x --finetune-epochs 1 --ddp -o out

(``--ddp`` starts the process group with the ``gloo`` backend, ``nccl`` with ``--device
cuda``), or from Python: call :func:`init` (or ``torch.distributed.init_process_group``) in the
script torchrun runs, then ``pqcompile.compile(...)`` as usual. The split of the work:

* every rank reads the *same global batches* (the same ``data``, in the same order); the
  sampler is :func:`shard`: rank ``r`` of ``W`` trains on the ``r``-th contiguous ``1/W`` of
  each batch (the batch size must be a multiple of ``W``), so a run on ``W`` processes sees
  what one process sees with the same global batch;
* QAT (:func:`pqcompile.finetune.qat_finetune`) wraps the fake-quant graph in
  ``DistributedDataParallel``: the gradients of the shard means are averaged, i.e. the
  gradient of the global batch mean (the weights agree with one process up to float
  summation order);
* the Fisher estimate (:class:`pqcompile.criteria.FisherTrace`) all-reduces its squared
  gradients the same way (weight and bias gradients averaged before squaring; activation
  traces summed with the shard weights) and gathers the activations its ranges observe: the
  same estimate as one process (with the label or a user loss; the distillation objective's
  Gauss-Newton probe draws its random residuals per rank);
* calibration, the solver and the build read whole batches; rank 0 builds (and the command line
  saves) the artifact, the other ranks return ``None`` from ``compile()`` after fine-tuning.

Without an initialized process group (or with one process) nothing here changes anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .errors import DataError, OptionError

__all__ = ["all_gather", "all_reduce", "builds_here", "init", "rank_and_size", "shard",
           "wrap"]


def rank_and_size() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def builds_here() -> bool:
    """Whether this process builds the artifact (rank 0, or no process group)."""
    return rank_and_size()[0] == 0


def init(backend: str | None = None) -> bool:
    """Start the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
    ... in the environment) unless one is running; ``False`` when not launched by torchrun."""
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    backend = backend or "gloo"
    if backend not in ("gloo", "nccl", "mpi"):
        raise OptionError(f"backend must be 'gloo' (CPU), 'nccl' (CUDA) or 'mpi', got "
                          f"{backend!r}")
    dist.init_process_group(backend)
    return True


def shard(batch: Any, where: str = "data") -> Any:
    """This rank's contiguous part of every batched tensor of ``batch`` (dim 0); ``batch``
    itself without a process group. A batch size that is not a multiple of the world size is
    refused (the shards would weigh unequally in the averaged gradient)."""
    rank, size = rank_and_size()
    if size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        n = batch.shape[0]
        if n % size:
            raise DataError(f"{where}: a batch of {n} samples does not split evenly over "
                            f"{size} data-parallel processes; use a global batch size that is "
                            f"a multiple of {size} (e.g. drop_last=True)")
        part = n // size
        return batch[rank * part:(rank + 1) * part]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard(v, where) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, where) for v in batch)
    if isinstance(batch, Mapping):
        return type(batch)((k, shard(v, where)) for k, v in batch.items())
    return batch


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, in place (no-op without a process group)."""
    if rank_and_size()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' ``tensor`` (equal shapes) concatenated along dim 0, in rank order: the
    whole batch again from its shards."""
    size = rank_and_size()[1]
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, 0)


def wrap(module: torch.nn.Module, device: torch.device | None) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` under a process group of several ranks."""
    if rank_and_size()[1] == 1:
        return module
    ids = [device.index or 0] if device is not None and device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                     broadcast_buffers=False)
