"""An assignment: what a solver decides and what lowering consumes.

``bits`` maps the name of each compute node (conv, linear, matmul) of the *traced* graph to
its :class:`~pqcompile.meta.BitWidths`; ``masks`` maps a channel-group id to a keep-mask
(``True`` = keep). A group whose channels are all dropped is "0 bits". Layers absent from
``bits`` stay in float; groups absent from ``masks`` keep every channel.

The activation bits of a layer are the bits of its *input* tensor, which is why
``BOPs = MACs x weight bits x activation bits``. Layers that read the same tensor must agree on
them: a tensor is quantized once. :meth:`Assignment.validate` checks that.

>>> a = Assignment.uniform(["conv1", "fc"], weight=4, activation=8)
>>> Assignment.from_json(a.to_json()) == a
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch.fx

from .meta import BitWidths

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Assignment:
    bits: Mapping[str, BitWidths] = field(default_factory=dict)
    masks: Mapping[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, b in self.bits.items():
            if not isinstance(b, BitWidths):
                raise TypeError(f"Assignment.bits[{name!r}] must be BitWidths, got {b!r}")
        for gid, m in self.masks.items():
            arr = np.asarray(m)
            if arr.dtype != bool or arr.ndim != 1:
                raise TypeError(f"Assignment.masks[{gid}] must be a 1-D bool array, got "
                                f"dtype {arr.dtype} with shape {arr.shape}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Assignment):
            return NotImplemented
        return dict(self.bits) == dict(other.bits) and self.masks.keys() == other.masks.keys() \
            and all(np.array_equal(self.masks[k], other.masks[k]) for k in self.masks)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def uniform(cls, layers: Iterable[str], weight: int, activation: int,
                keep_8bit: Iterable[str] = ()) -> "Assignment":
        """The same bits for every layer, except ``keep_8bit`` layers at 8/8 (first/last)."""
        keep = set(keep_8bit)
        return cls({n: BitWidths(8, 8) if n in keep else BitWidths(weight, activation)
                    for n in layers})

    def kept(self, group_id: int, size: int) -> int:
        m = self.masks.get(group_id)
        return size if m is None else int(np.count_nonzero(m))

    def validate(self, gm: torch.fx.GraphModule) -> None:
        """Every named layer exists, and layers reading one tensor share activation bits."""
        nodes = {n.name: n for n in gm.graph.nodes}
        unknown = sorted(set(self.bits) - set(nodes))
        if unknown:
            raise ValueError(f"assignment names layers not in the graph: {unknown[:5]}; "
                             f"layers are fx node names such as {list(nodes)[1:4]}")
        readers: dict[str, list[str]] = {}
        for name in self.bits:
            src = nodes[name].args[0]
            if isinstance(src, torch.fx.Node):
                readers.setdefault(src.name, []).append(name)
        for src, layers in readers.items():
            acts = {self.bits[n].activation for n in layers}
            if len(acts) > 1:
                raise ValueError(
                    f"layers {sorted(layers)} read the same tensor {src!r} but have activation "
                    f"bits {sorted(acts)}: a tensor is quantized once, give them equal bits")

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT_VERSION,
            "bits": {n: [b.weight, b.activation] for n, b in sorted(self.bits.items())},
            "masks": {str(g): np.flatnonzero(~np.asarray(m)).tolist() + [len(m)]
                      for g, m in sorted(self.masks.items())},
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Assignment":
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"assignment format {data.get('format')!r} is not supported "
                             f"(this pqcompile reads format {FORMAT_VERSION})")
        masks = {}
        for g, enc in data["masks"].items():
            *dropped, size = enc
            m = np.ones(size, dtype=bool)
            m[dropped] = False
            masks[int(g)] = m
        return cls({n: BitWidths(*b) for n, b in data["bits"].items()}, masks)


def check_graph_and_assignment(gm: object, assignment: object, where: str) -> None:
    """The argument checks every consumer of a (graph, assignment) pair shares: ``gm`` a
    ``torch.fx.GraphModule`` and ``assignment`` an :class:`Assignment`, else a TypeError
    naming ``where`` (the function called)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"{where} takes a torch.fx.GraphModule (pqcompile.trace), got "
                        f"{type(gm).__name__}: trace the model first")
    if not isinstance(assignment, Assignment):
        raise TypeError(f"{where}: assignment must be a pqcompile Assignment, got "
                        f"{type(assignment).__name__}")
