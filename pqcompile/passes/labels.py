"""Channel label propagation, the engine of :mod:`pqcompile.passes.groups`.

Every channel a conv or linear layer produces gets a global id. Running the graph once, each
tensor-valued node gets a *label map*: an int64 tensor broadcastable to the node's output whose
entries are ``id + 1`` of the channel found at that position (``0``: data no prunable layer
produced, e.g. graph inputs). The map keeps size 1 along dims where it does not vary, so it is
tiny; the dims where it varies are the node's channel dims. Pure data-movement ops (views,
permutes, cat, split, getitem, channel shuffle) are followed *exactly* by running the op itself
on the label tensor. Rules add ``ties`` (two ids that must be removed together) and ``blocks``
(ids that must not be removed, with a reason naming the node and op).

>>> import torch
>>> from pqcompile import trace
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten()),
...            (torch.randn(1, 3, 2, 2),))
>>> state = propagate(gm, (torch.randn(1, 3, 2, 2),))
>>> state.infos["_1"].lm.tolist()  # 4 channels x 4 positions each after the flatten
[[1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx

from .opinfo import Op, classify

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


# -- the interpreter -------------------------------------------------------------------------
class _Propagator(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, state: LabelState, strict: bool) -> None:
        super().__init__(gm)
        self.state = state
        self.strict = strict

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        op = classify(self.module, n)
        self.state.ops[n.name] = op
        try:
            info = self.rule(n, op, value)
        except Exception as exc:
            if self.strict:
                raise
            self.state.block(ids_of(self.arg_infos(n)),
                             f"node {n.name!r} ({op.name}): channel analysis could not follow "
                             f"it ({type(exc).__name__}: {exc})")
            info = None
        self.state.infos[n.name] = info
        return value

    def rule(self, n: torch.fx.Node, op: Op, value: Any) -> Any:
        if op.kind not in ("output", "getitem") and not has_tensor(value):
            return None
        return RULES[op.kind](self, n, op, value)

    # Helpers the rules use ---------------------------------------------------------------
    def info(self, a: Any) -> Any:
        return self.state.infos.get(a.name) if isinstance(a, torch.fx.Node) else None

    def first(self, n: torch.fx.Node) -> tuple[Any, torch.Tensor | None, TInfo | None]:
        """(source, value, info) of the node's first tensor argument."""
        ts = self.tensor_args(n)
        return ts[0] if ts else (None, None, None)

    def all_ids(self, n: torch.fx.Node) -> np.ndarray:
        return ids_of([i for _, _, i in self.tensor_args(n)])

    def arg_infos(self, n: torch.fx.Node) -> list[Any]:
        return [self.info(a) for a in n.all_input_nodes]

    def tensor_args(self, n: torch.fx.Node) -> list[tuple[Any, torch.Tensor, Any]]:
        """(source node, tensor value, info) of every tensor among the node's args and kwargs."""
        return list(self._walk((n.args, n.kwargs)))

    def _walk(self, a: Any) -> Iterator[tuple[Any, torch.Tensor, Any]]:
        if isinstance(a, torch.fx.Node):
            yield from _pair(a, self.env[a], self.info(a))
        elif isinstance(a, (tuple, list)):
            for x in a:
                yield from self._walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                yield from self._walk(x)
        elif isinstance(a, torch.Tensor):
            yield None, a, None

    def label_args(self, n: torch.fx.Node) -> tuple[Any, Any]:
        """The node's args with every tensor replaced by its full label tensor."""
        def sub(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                return _labels_like(self.env[a], self.info(a))
            if isinstance(a, (tuple, list)):
                return type(a)(sub(x) for x in a)
            if isinstance(a, dict):
                return {k: sub(x) for k, x in a.items()}
            if isinstance(a, torch.Tensor):
                return torch.zeros(a.shape, dtype=torch.int64)
            return a
        return sub(n.args), sub(n.kwargs)

    def where(self, n: torch.fx.Node, op: Op) -> str:
        return f"node {n.name!r} ({op.name})"


def _pair(src: torch.fx.Node, value: Any, info: Any) -> Iterator[tuple[Any, torch.Tensor, Any]]:
    if isinstance(value, torch.Tensor):
        yield src, value, info if isinstance(info, TInfo) else None
    elif isinstance(value, (tuple, list)):
        infos = info if isinstance(info, (tuple, list)) else [None] * len(value)
        for v, i in zip(value, infos):
            yield from _pair(src, v, i)


def _labels_like(value: Any, info: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return full_labels(info if isinstance(info, TInfo) else None, value)
    if isinstance(value, (tuple, list)):
        infos = info if isinstance(info, (tuple, list)) else [None] * len(value)
        return type(value)(_labels_like(v, i) for v, i in zip(value, infos))
    return value


def has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(has_tensor(v) for v in value)
    return False


def propagate(gm: torch.fx.GraphModule, inputs: tuple, strict: bool = False) -> LabelState:
    """Run ``gm`` on ``inputs`` and propagate channel labels through every node.

    ``strict`` re-raises when a rule fails on an unusual call instead of marking the channels
    it touches unprunable.
    """
    from . import labelmoves, labelrules  # noqa: F401  (register the rules)

    state = LabelState(gm)
    owners: dict[int, list[str]] = {}
    for path, m in gm.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(path)
    for paths in owners.values():
        paths = sorted(set(paths))
        for p in paths[1:]:
            state.shared[p] = state.shared[paths[0]] = (
                f"modules {paths[0]!r} and {p!r} share a parameter tensor; pruning one would "
                "change the other")
    with torch.no_grad():
        _Propagator(gm, state, strict).run(*inputs)
    return state
