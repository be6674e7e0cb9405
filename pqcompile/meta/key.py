"""The typed annotation key (:class:`MetaKey`) and the registry of every key defined; the
keys themselves are spelled in :mod:`pqcompile.meta` only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch.fx

from ..errors import MissingAnnotationError

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

