"""Calibration: run the float graph on user batches and feed the activation observers.

``batches`` is an iterable of input tensors (or of tuples of tensors for a model with several
inputs). Each is checked against the example input recorded at trace time: same number of
inputs, same dims after the batch dim, a floating dtype; a mismatch names the batch index and
the expected shape.

>>> import torch
>>> from pqcompile import trace
>>> gm = trace(torch.nn.ReLU(), (torch.randn(2, 3),))
>>> check_batches(gm, [torch.randn(5, 3)])[0][0].shape
torch.Size([5, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx

from ..meta import EXAMPLE_INPUTS
from .observers import Observer


def _expected(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    return list(EXAMPLE_INPUTS.get(gm).args)


def _fmt(shape) -> str:
    return "(N, " + ", ".join(str(d) for d in shape[1:]) + ")" if len(shape) else "()"


def check_batches(gm: torch.fx.GraphModule, batches: Iterable[Any]
                  ) -> list[tuple[torch.Tensor, ...]]:
    """The batches as tuples of tensors, after checking each against the example inputs."""
    expected = _expected(gm)
    fixed = bool(gm.meta.get("pqc.shape_specialized"))
    if isinstance(batches, torch.Tensor):
        raise TypeError("calib_batches must be an iterable of batches (e.g. a list of tensors "
                        "or a DataLoader yielding inputs), not a single tensor; wrap it: "
                        "[x]")
    out = []
    for i, batch in enumerate(batches):
        items = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(items, (tuple, list)) or not all(
                isinstance(t, torch.Tensor) for t in items):
            raise TypeError(f"calibration batch {i} is {type(batch).__name__}; give a tensor "
                            f"of shape {_fmt(expected[0].shape)} or a tuple of "
                            f"{len(expected)} tensors")
        if len(items) != len(expected):
            raise ValueError(f"calibration batch {i} has {len(items)} inputs; the model takes "
                             f"{len(expected)} (shapes "
                             f"{', '.join(_fmt(e.shape) for e in expected)})")
        for j, (t, e) in enumerate(zip(items, expected)):
            if fixed and tuple(t.shape) != tuple(e.shape):
                raise ValueError(
                    f"calibration batch {i}: input {j} has shape {tuple(t.shape)}; the graph "
                    f"was traced for shape {tuple(e.shape)} exactly (the model branches on "
                    "input shapes, so its trace is specialized to them): give batches of that "
                    "shape")
            if t.dim() != e.dim() or tuple(t.shape[1:]) != tuple(e.shape[1:]) or not t.numel():
                raise ValueError(
                    f"calibration batch {i}: input {j} has shape {tuple(t.shape)}, expected "
                    f"{_fmt(e.shape)} (the example input's shape with any non-zero batch size)")
            if t.is_floating_point() != e.is_floating_point():
                raise ValueError(f"calibration batch {i}: input {j} has dtype {t.dtype}; give "
                                 f"tensors of the example input's kind ({e.dtype})")
        out.append(tuple(t.to(e.dtype) for t, e in zip(items, expected)))
    if not out:
        raise ValueError("calib_batches is empty: give at least one batch, e.g. a list of "
                         f"tensors of shape {_fmt(expected[0].shape)}")
    return out


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, hook: Callable[[torch.fx.Node, Any], None]):
        super().__init__(gm)
        self.hook = hook

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        self.hook(n, value)
        return value


def observe(gm: torch.fx.GraphModule, batches: list[tuple[torch.Tensor, ...]],
            observers: dict[str, Observer]) -> None:
    """Run ``gm`` on every batch; ``observers[node name]`` sees that node's output."""

    def hook(n, value):
        obs = observers.get(n.name)
        if obs is not None:
            obs.observe(value.detach())

    rec = _Recorder(gm, hook)
    with torch.no_grad():
        for batch in batches:
            rec.run(*batch)


def capture(gm: torch.fx.GraphModule, names: set[str]) -> dict[str, Any]:
    """Values of the named nodes on the example inputs (constants and shape arithmetic)."""
    values: dict[str, Any] = {}

    def hook(n, value):
        if n.name in names:
            values[n.name] = value.detach() if isinstance(value, torch.Tensor) else value

    with torch.no_grad():
        _Recorder(gm, hook).run(*_expected(gm))
    return values
