"""Embedding tables stored below 8 bits: packed rows, one fixed-point multiplier per row.

An ``nn.Embedding`` table is int8 by default: each entry rounded at the lookup's output scale
(:class:`~pqcompile.quant.qmodules.QEmbedding`). A word-embedding table is most of a small
transformer's weights (MiniLM-L3: 68% of its FP32 bytes), and 8 bits per entry caps the
model's weight reduction near 4x. :func:`set_table_bits` marks tables to store at 4 or 2 bits
(``meta.EMBEDDING_BITS``); the reference then holds :class:`QPackedEmbedding`:

* row ``r`` gets its own scale ``s_r = max|w_r| / qmax`` (symmetric, ``qmax = 2^(b-1) - 1``)
  and codes ``c = clamp(round(w / s_r), -qmax, qmax)``: rows of rare and common words differ
  in range by an order of magnitude, which one scale per table would spend on the widest row;
* the codes are packed ``8 / b`` to a byte (entry ``j`` of a row in byte ``j // (8 / b)`` at bit
  ``(j % (8 / b)) * b``, two's complement);
* the lookup computes the output integers as every requantization does
  (:mod:`pqcompile.quant.fixedpoint`): ``clamp((c * m_r + 2^(sh-1)) >> sh, lo, hi)`` with
  ``m_r * 2^-sh ~ s_r / s_out`` over one shift ``sh`` shared by the table's rows.

The program stores ``rows x ceil(dim * b / 8)`` bytes of codes and an int32 multiplier per row
(:func:`pqcompile.passes.cost.table_bytes`, what the cost model and the solvers' weight-byte
budgets count) and computes the same integers (:mod:`pqcompile.lower.table_lookup`).

>>> import torch
>>> codes = torch.tensor([[-7, 7, 0, 3], [1, -1, -8, 5]])
>>> bool((unpack(pack(codes, 4), 4, 4) == codes).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError
from ..meta import EMBEDDING_BITS, QParams
from .fixedpoint import shared_shift
from .qmodules import QModule

TABLE_OPTIONS = (8, 4, 2)  # the table widths the lowering takes (2 and 4 pack evenly in bytes)


def table_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's ``nn.Embedding`` lookups the integer program gathers (no ``max_norm``):
    those of ids read from the inputs. A lookup of constant ids (BERT's ``position_ids``) is
    computed once when the reference is built and stored by the op that reads it
    (:mod:`pqcompile.passes.stored`): it has no table in the program."""
    from .matmul import quantized_nodes

    looked_up = quantized_nodes(gm)  # lookups of input-derived ids are quantized values
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.name in looked_up:
            m = gm.get_submodule(n.target)
            if isinstance(m, nn.Embedding) and m.max_norm is None:
                out.append(n)
    return out


def check_table_bits(bits: Any) -> None:
    """``bits`` is ``None``, a width of :data:`TABLE_OPTIONS` or ``{name: width}`` (the names
    are checked against the graph by :func:`set_table_bits`)."""
    values = list(bits.values()) if isinstance(bits, Mapping) else [bits]
    for b in values:
        if b is not None and (isinstance(b, bool) or b not in TABLE_OPTIONS):
            raise OptionError(f"table_bits must be None (int8 tables), one of {TABLE_OPTIONS} "
                              f"or {{embedding module path: bits}}, got {bits!r}")


def table_notes(gm: torch.fx.GraphModule) -> list[str]:
    """The report's lines: each table stored below 8 bits."""
    return [f"embedding table {n.target!r}: int{EMBEDDING_BITS.get(n)} codes, a scale per row "
            f"(an int32 multiplier)" for n in table_nodes(gm) if EMBEDDING_BITS.find(n, 8) < 8]


def set_table_bits(gm: torch.fx.GraphModule, bits: int | Mapping[str, int] | None
                   ) -> torch.fx.GraphModule:
    """Annotate ``gm``'s embedding tables with their stored bits, in place; returns ``gm``.

    ``bits``: ``None`` (leave them at 8), one width for every table, or ``{name: bits}`` by fx
    node name or module path (``"bert.embeddings.word_embeddings"``); widths in
    :data:`TABLE_OPTIONS`. A table whose rows are too short to pack (``dim * bits`` not a
    multiple of 8) stays at 8 bits when ``bits`` is one width, and is an error when named.
    """
    if bits is None:
        return gm
    nodes = table_nodes(gm)
    if isinstance(bits, Mapping):
        known = {n.name: n for n in nodes} | {str(n.target): n for n in nodes}
        unknown = sorted(set(bits) - set(known))
        if unknown:
            raise OptionError(f"table_bits names {unknown[:4]}, not embedding lookups of the "
                              f"model; its tables are {sorted(str(n.target) for n in nodes)}")
        chosen = {known[k].name: v for k, v in bits.items()}
        named = True
    else:
        chosen, named = {n.name: bits for n in nodes}, False
    for n in nodes:
        if n.name not in chosen:
            continue
        b = chosen[n.name]
        if isinstance(b, bool) or b not in TABLE_OPTIONS:
            raise OptionError(f"table_bits for {n.target!r} must be one of {TABLE_OPTIONS} "
                              f"(bits of a stored embedding entry), got {b!r}")
        dim = gm.get_submodule(n.target).embedding_dim
        if (dim * b) % 8:
            if named:
                raise OptionError(f"table {n.target!r}: rows of {dim} entries do not pack at "
                                  f"{b} bits (dim * bits must be a multiple of 8); use 8")
            b = 8
        EMBEDDING_BITS.set(n, int(b))
    return gm


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-wide codes ``(rows, dim)`` -> uint8 ``(rows, dim * bits / 8)``."""
    per = 8 // bits
    rows, dim = codes.shape
    u = (codes.to(torch.int64) & ((1 << bits) - 1)).reshape(rows, dim // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (u << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint8 ``(..., dim * bits / 8)`` -> the signed codes ``(..., dim)`` as int64."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    v = u - ((u >> (bits - 1)) << bits)  # sign extension
    return v.reshape(*packed.shape[:-1], dim)


def quantize_table(weight: torch.Tensor, bits: int, out: QParams, *, where: str = ""
                   ) -> tuple[torch.Tensor, np.ndarray, int]:
    """``(codes, multipliers, shift)`` of a table at ``bits`` with per-row scales, requantized
    to the output scale ``out.scale`` (module docstring)."""
    w = weight.detach().to(torch.float64)
    qmax = (1 << (bits - 1)) - 1
    amax = w.abs().amax(1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.clamp(torch.floor(w / scale[:, None] + 0.5), -qmax, qmax).to(torch.int64)
    mults, sh = shared_shift((scale / out.scale).tolist(), where=where)
    return codes, np.asarray(mults, dtype=np.int64), sh


class QPackedEmbedding(QModule):
    """Integer ids -> integers through a packed ``bits``-wide table with per-row multipliers
    (module docstring); the compiled lookup computes the same integers."""

    def __init__(self, codes: torch.Tensor, bits: int, mults: np.ndarray, shift: int,
                 out: QParams, lo: int, hi: int) -> None:
        super().__init__(out, lo, hi)
        self.bits, self.dim, self.shift = int(bits), int(codes.shape[1]), int(shift)
        self.register_buffer("packed", pack(codes, bits))
        self.register_buffer("mults", torch.as_tensor(mults, dtype=torch.int64))

    def integers(self, ids: torch.Tensor) -> torch.Tensor:
        codes = unpack(F.embedding(ids, self.packed), self.bits, self.dim)
        acc = codes * F.embedding(ids, self.mults[:, None])
        return torch.clamp((acc + (1 << (self.shift - 1))) >> self.shift, self.lo, self.hi)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.integers(ids).to(torch.float64)
        return (q * self.out.scale).to(torch.float32) if self.fake else q


def packed_lookup(weight: torch.Tensor, bits: int, out: QParams, lo: int, hi: int, *,
                  where: str = "") -> QPackedEmbedding:
    """The reference module of a table stored at ``bits`` (4 or 2)."""
    codes, mults, sh = quantize_table(weight, bits, out, where=where)
    return QPackedEmbedding(codes, bits, mults, sh, out, lo, hi)
