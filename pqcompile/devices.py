"""Where the training side of ``compile()`` runs: ``compile(..., device="cuda")``.

The data-driven stages are float training work: the Fisher sensitivity estimate, the searching
solvers' candidate measurements, QAT fine-tuning and the calibration forward passes that start
it. ``device=`` runs them on a torch device, each on a *copy* of the model (the user's model
and the analyzed graph stay where they are, on the CPU); what comes back (sensitivities,
losses, the fine-tuned weights, activation ranges) comes back to the CPU. The integer
reference, the lowering and the TVM build stay on the CPU, so the artifact is exact whatever
device trained it; ``device="cpu"`` (or ``None``) is the default path, bit for bit.

>>> resolve_device(None) is None
True
>>> resolve_device("cpu")
device(type='cpu')
>>> resolve_device("tpu")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
pqcompile.errors.OptionError: device='tpu' is not a torch device: ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .errors import OptionError

__all__ = ["OnDevice", "is_cpu", "place_criteria", "resolve_device", "to_device"]


def resolve_device(device: Any) -> torch.device | None:
    """``device`` as a :class:`torch.device` (``None`` stays ``None``: the CPU default), after
    checking it exists here; otherwise an :class:`OptionError` naming the argument."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise OptionError(f"device must be None, a device name such as 'cpu' or 'cuda:0', or a "
                          f"torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"device={device!r} is not a torch device: {exc}; give 'cpu', "
                          "'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device={device!r}: cuda requested but "
                              "torch.cuda.is_available() is False (no CUDA GPU or driver "
                              "here, or a CPU-only torch build); pass device='cpu' or None")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"device={device!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return dev
    raise OptionError(f"device={device!r}: {dev.type} requested but torch.{dev.type} is not "
                      "available here; pass device='cpu', 'cuda' or None")


def is_cpu(device: torch.device | None) -> bool:
    """Whether ``device`` is the CPU default (``None`` or ``cpu``): no copies are made."""
    return device is None or device.type == "cpu"


def to_device(obj: Any, device: torch.device | None) -> Any:
    """``obj`` with every tensor in it (tuples, lists, dicts, nested) on ``device``; the same
    object where ``device`` is the CPU default."""
    if is_cpu(device):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, Mapping):
        return type(obj)((k, to_device(v, device)) for k, v in obj.items())
    return obj


class OnDevice:
    """A re-iterable view of ``batches`` whose batches are moved to ``device`` as they are read
    (one at a time: the data set itself stays where it is)."""

    def __init__(self, batches: Iterable[Any], device: torch.device | None) -> None:
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def place_criteria(analysis: Any, device: torch.device | None) -> Any:
    """``analysis`` (a :class:`~pqcompile.passes.sensitivity.SensitivityAnalysis`) with its
    criteria set to estimate on ``device`` where they can (those with a ``device`` attribute:
    :class:`~pqcompile.criteria.FisherTrace`); the others run on the CPU."""
    for crit in (analysis.criterion, analysis.channel_criterion):
        if crit is not None and hasattr(crit, "device"):
            crit.device = device
    return analysis
