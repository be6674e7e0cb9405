"""Channel label propagation, the engine of :mod:`pqcompile.passes.groups`.

Every channel a conv or linear layer produces gets a global id. Running the graph once, each
tensor-valued node gets a *label map*: an int64 tensor broadcastable to the node's output whose
entries are ``id + 1`` of the channel found at that position (``0``: data no prunable layer
produced, e.g. graph inputs). The map keeps size 1 along dims where it does not vary, so it is
tiny; the dims where it varies are the node's channel dims. Pure data-movement ops (views,
permutes, cat, split, getitem, channel shuffle) are followed *exactly* by running the op itself
on the label tensor. Rules add ``ties`` (two ids that must be removed together) and ``blocks``
(ids that must not be removed, with a reason naming the node and op).

The rules live in :mod:`pqcompile.passes.labelmoves` (data movement) and
:mod:`pqcompile.passes.labelrules` (the rest), registered with :func:`rule`; the interpreter that
runs them is :func:`pqcompile.passes.labelprop.propagate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx

from .opinfo import Op

# kind -> rule(propagator, node, op, value) -> info; filled by pqcompile.passes.labelrules.
RULES: dict[str, Any] = {}


def rule(*kinds: str):
    """Register a propagation rule for the op kinds of :mod:`pqcompile.passes.opinfo`."""
    def wrap(fn):
        for k in kinds:
            RULES[k] = fn
        return fn
    return wrap


class TInfo(NamedTuple):
    """Channel layout of one tensor: label map, the dims it varies along, the grid's shrink dim."""

    lm: torch.Tensor
    dims: tuple[int, ...]
    shrink: int | None = None


@dataclass
class InRecord:
    """The input columns of a conv/linear: labels (id + 1, or 0) along ``dim`` of its input."""

    node: str
    dim: int
    labels: np.ndarray


@dataclass
class LabelState:
    """Everything propagation found; :func:`propagate` returns it."""

    gm: torch.fx.GraphModule
    n_ids: int = 0
    ties_a: list[np.ndarray] = field(default_factory=list)
    ties_b: list[np.ndarray] = field(default_factory=list)
    blocks: list[tuple[np.ndarray, str]] = field(default_factory=list)
    infos: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, InRecord] = field(default_factory=dict)
    ops: dict[str, Op] = field(default_factory=dict)
    params: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)

    # -- ids, ties, blocks ------------------------------------------------------------------
    def new_ids(self, k: int) -> np.ndarray:
        ids = np.arange(self.n_ids, self.n_ids + k, dtype=np.int64)
        self.n_ids += k
        return ids

    def param_ids(self, module_path: str, what: str, k: int) -> np.ndarray:
        """Ids of a module's weight rows/columns, shared by every call of the module."""
        key = (module_path, what)
        if key not in self.params:
            self.params[key] = self.new_ids(k)
            if module_path in self.shared:
                self.block(self.params[key], self.shared[module_path])
        return self.params[key]

    def tie(self, a: Any, b: Any) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(b, np.int64))
        if a.size:
            self.ties_a.append(a.ravel().copy())
            self.ties_b.append(b.ravel().copy())

    def block(self, ids: Any, reason: str) -> None:
        ids = np.unique(np.asarray(ids, np.int64).ravel())
        if ids.size:
            self.blocks.append((ids, reason))

    def tie_labels(self, labels: np.ndarray, ids: np.ndarray, reason: str) -> None:
        """Tie position-aligned ``labels`` (id + 1 or 0) to ``ids``; ids meeting a 0 are fixed."""
        labels = np.asarray(labels, np.int64)
        ok = labels > 0
        self.tie(labels[ok] - 1, ids[ok])
        self.block(ids[~ok], reason)

    def producer_info(self, k: int, ndim: int, dim: int) -> tuple[TInfo, np.ndarray]:
        ids = self.new_ids(k)
        shape = [1] * ndim
        shape[dim] = k
        return TInfo(torch.from_numpy(ids + 1).reshape(shape), (dim,)), ids


# -- label maps --------------------------------------------------------------------------------
def collapse(lab: torch.Tensor) -> torch.Tensor:
    """Shrink ``lab`` to size 1 along every dim where it does not vary."""
    for d in range(lab.dim()):
        if lab.shape[d] > 1:
            first = lab.narrow(d, 0, 1)
            if torch.equal(lab, first.expand_as(lab)):
                lab = first
    return lab


def make_info(lab: torch.Tensor, shrink: int | None = None) -> TInfo | None:
    if not bool((lab != 0).any()):
        return None
    lm = collapse(lab)
    dims = tuple(d for d in range(lm.dim()) if lm.shape[d] > 1)
    return TInfo(lm, dims, shrink)


def full_labels(info: TInfo | None, value: torch.Tensor) -> torch.Tensor:
    """The label map expanded to the tensor's shape (zeros for a tensor without channels)."""
    if info is None:
        return torch.zeros(value.shape, dtype=torch.int64)
    # A copy: rules run ops (some in place) on these tensors.
    return info.lm.expand(value.shape).clone(memory_format=torch.contiguous_format)


def ids_of(info: Any) -> np.ndarray:
    """All channel ids present in an info structure (tensor info, tuple of them, or None)."""
    out = [ids_of(i) for i in info] if isinstance(info, (tuple, list)) else []
    if isinstance(info, TInfo):
        v = info.lm.numpy().ravel()
        out.append(np.unique(v[v > 0]) - 1)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def labels_along(info: TInfo | None, dim: int, size: int) -> np.ndarray | None:
    """Labels along ``dim`` (length ``size``); ``None`` if channels also vary along other dims."""
    if info is None:
        return np.zeros(size, np.int64)
    dim = dim % info.lm.dim()
    if any(d != dim for d in info.dims):
        return None
    lab = info.lm.reshape(-1) if info.lm.shape[dim] == size else info.lm.reshape(1)
    return np.broadcast_to(lab.numpy(), (size,)).astype(np.int64)


def describe(src: Any) -> str:
    """Where a tensor without prunable channels comes from, for unprunable reasons."""
    if not isinstance(src, torch.fx.Node):
        return "a constant tensor"
    if src.op == "placeholder":
        return f"graph input {src.name!r}"
    if src.op == "get_attr":
        return f"constant {src.target!r}"
    return f"node {src.name!r}, which carries no prunable channels"


def size_args(n: torch.fx.Node) -> list | None:
    """The per-dim size arguments of a view/reshape/expand node (ints and nodes), if explicit."""
    rest = list(n.args[1:])
    for key in ("size", "shape"):
        if key in n.kwargs:
            rest = [n.kwargs[key]]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    if not all(isinstance(s, (int, torch.fx.Node)) for s in rest):
        return None
    return rest
