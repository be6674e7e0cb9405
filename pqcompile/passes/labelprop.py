"""The interpreter of channel label propagation: runs the graph once, applying each op's rule.

The label maps, the rule registry and the helpers the rules use are in
:mod:`pqcompile.passes.labels`; the rules themselves in :mod:`pqcompile.passes.labelmoves` and
:mod:`pqcompile.passes.labelrules`, imported here so that every rule is registered before a
graph runs.

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
from typing import Any

import numpy as np
import torch
import torch.fx

from . import labelmoves, labelrules  # noqa: F401  (register the rules)
from .labels import RULES, LabelState, TInfo, full_labels, ids_of
from .opinfo import Op, classify


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
