"""The only module where annotation keys are spelled.

Analysis passes write typed records into ``node.meta`` (per node) or ``graph_module.meta``
(per graph); later passes read them back through the same key object, so a missing annotation
fails with a message that names the node and the pass to run, never with a bare ``KeyError``.

>>> import torch
>>> from pqcompile import trace
>>> from pqcompile.passes import ShapeAnalysis
>>> gm = trace(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
>>> gm = ShapeAnalysis()(gm).graph_module
>>> [tuple(SHAPE.get(n).shape) for n in gm.graph.nodes if n.op == "call_module"]
[(1, 2)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch.fx

from .errors import MissingAnnotationError

T = TypeVar("T")

_ALL_KEYS: dict[str, "MetaKey[Any]"] = {}


@dataclass(frozen=True)
class MetaKey(Generic[T]):
    """A typed annotation key.

    ``scope`` is ``"node"`` (stored in ``node.meta``) or ``"graph"`` (stored in
    ``GraphModule.meta``). ``provided_by`` names the pass that writes it, for error messages.
    """

    name: str
    provided_by: str
    doc: str
    scope: str = "node"

    def __post_init__(self) -> None:
        if self.scope not in ("node", "graph"):
            raise ValueError(f"MetaKey {self.name!r}: scope must be 'node' or 'graph'")
        _ALL_KEYS[self.name] = self

    def _store(self, owner: Any) -> dict:
        if self.scope == "node":
            if not isinstance(owner, torch.fx.Node):
                raise TypeError(f"{self.name} is a node annotation; pass a torch.fx.Node")
            return owner.meta
        if not isinstance(owner, torch.fx.GraphModule):
            raise TypeError(f"{self.name} is a graph annotation; pass a torch.fx.GraphModule")
        return owner.meta

    def has(self, owner: Any) -> bool:
        return self.name in self._store(owner)

    def get(self, owner: Any) -> T:
        store = self._store(owner)
        if self.name not in store:
            where = f"node {owner.name!r} ({owner.op} {owner.target})" if self.scope == "node" \
                else "the graph module"
            raise MissingAnnotationError(
                f"{where} has no {self.name} annotation: run {self.provided_by} first "
                f"({self.doc})")
        return store[self.name]

    def find(self, owner: Any, default: T | None = None) -> T | None:
        return self._store(owner).get(self.name, default)

    def set(self, owner: Any, value: T) -> None:
        self._store(owner)[self.name] = value

    def clear(self, owner: Any) -> None:
        self._store(owner).pop(self.name, None)

    def __repr__(self) -> str:
        return f"MetaKey({self.name!r})"


def all_keys() -> dict[str, MetaKey[Any]]:
    """Every annotation key defined so far, by name."""
    return dict(_ALL_KEYS)


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BitWidths:
    """Bits of one layer: ``weight == 0`` is never used for a layer (pruning is per group)."""

    weight: int = 32
    activation: int = 32

    def __post_init__(self) -> None:
        for what, b in (("weight", self.weight), ("activation", self.activation)):
            if not isinstance(b, int) or not 1 <= b <= 32:
                raise ValueError(f"BitWidths.{what} must be an int in 1..32, got {b!r}")


@dataclass(frozen=True)
class NodeCost:
    """Cost of one node at its bit widths.

    ``macs`` counts multiply-accumulates of conv, linear and matmul-like nodes (0 elsewhere);
    ``bops = macs * weight_bits * activation_bits`` (for matmul of two activations, both
    operands count as activations); ``weight_bytes`` is the storage of the node's weights at
    ``weight_bits`` (biases at 32 bits).
    """

    macs: int
    params: int
    weight_bits: int
    activation_bits: int
    bops: int
    weight_bytes: float


@dataclass(frozen=True)
class CostTotals:
    """Sums over the graph, and the FP32 reference (``macs * 32 * 32``)."""

    macs: int
    params: int
    bops: int
    weight_bytes: float
    fp32_bops: int
    fp32_weight_bytes: float

    @property
    def bop_reduction(self) -> float:
        return self.fp32_bops / self.bops if self.bops else float("inf")


@dataclass
class ExampleInputs:
    """The tensors the graph was traced and shape-propagated with."""

    args: tuple = field(default_factory=tuple)


# --- keys ------------------------------------------------------------------------------------

EXAMPLE_INPUTS: MetaKey[ExampleInputs] = MetaKey(
    "pqc.example_inputs", "pqcompile.trace", "the example inputs given at trace time", "graph")

SOURCE_MODEL: MetaKey[str] = MetaKey(
    "pqc.source_model", "pqcompile.trace", "class name of the traced model", "graph")

# fx's own key, so the records interoperate with torch.fx tooling (ShapeProp writes it).
SHAPE: MetaKey[Any] = MetaKey(
    "tensor_meta", "ShapeAnalysis", "shape and dtype of the node's output")

BITS: MetaKey[BitWidths] = MetaKey(
    "pqc.bits", "a solver or set_bits", "weight and activation bit widths of a layer")

COST: MetaKey[NodeCost] = MetaKey(
    "pqc.cost", "CostAnalysis", "MACs, params, BOPs and bytes of the node")

COST_TOTALS: MetaKey[CostTotals] = MetaKey(
    "pqc.cost_totals", "CostAnalysis", "graph totals of MACs, BOPs and bytes", "graph")
