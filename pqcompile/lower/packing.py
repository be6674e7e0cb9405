"""Sub-byte weight storage: weights of 2 to 7 bits packed into bytes, unpacked in-graph.

Layout: the weight is flattened in C order into one little-endian bit stream, element ``i`` in
bits ``[i*bits, (i+1)*bits)`` as ``bits``-bit two's complement, padded with zeros to a whole
number of *groups*: ``lcm(bits, 8)`` bits, i.e. ``8 // bits`` elements in one byte for 2 and 4
bits, 8 elements in 3, 5 or 7 bytes for 3, 5 and 7 bits, 4 elements in 3 bytes for 6 bits.
A weight takes ``bits / 8`` bytes per element (up to the last group's padding), which is what
the cost model (:mod:`pqcompile.passes.cost`) counts. 8-bit weights are stored as int8.

The program unpacks a group at a time: its bytes combined into one integer (int16 for 2/4 bits,
int64 otherwise), shifted right by each element's bit offset, masked and sign extended, all
elementwise ops on constant shapes (no gathers), once per call.

>>> import numpy as np
>>> q = np.array([-7, 7, 3, -1, 0], dtype=np.int8)
>>> p = pack(q, 4)
>>> p.dtype, p.size, unpack(p, 4, q.size).tolist()
(dtype('uint8'), 3, [-7, 7, 3, -1, 0])
>>> q = np.array([3, -4, 1, 0, -1, 2, -3, 3, 1], dtype=np.int8)  # 9 values at 3 bits: 2 groups
>>> pack(q, 3).size, unpack(pack(q, 3), 3, q.size).tolist() == q.tolist()
(6, True)
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax
from tvm.relax import op as R

PACKED_BITS = (2, 3, 4, 5, 6, 7)


def is_packed(bits: int) -> bool:
    """Whether weights of ``bits`` are stored packed (2 to 7 bits; 8 bits are int8)."""
    return bits in PACKED_BITS


def group(bits: int) -> tuple[int, int]:
    """``(elements, bytes)`` of one packing group of ``bits``-bit values."""
    if bits not in PACKED_BITS:
        raise ValueError(f"packing supports {PACKED_BITS}-bit values, got {bits} bits; store "
                         "other widths as int8")
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed ``bits``-bit integers (any shape, C order) into a 1-D uint8 array."""
    per, nbytes = group(bits)
    flat = np.asarray(q).reshape(-1).astype(np.int64)
    lim = 2 ** (bits - 1)
    if flat.size and (flat.min() < -lim or flat.max() >= lim):
        raise ValueError(f"values outside the {bits}-bit range [{-lim}, {lim - 1}]: "
                         f"[{flat.min()}, {flat.max()}]")
    pad = (-flat.size) % per
    codes = (np.concatenate([flat, np.zeros(pad, np.int64)]) & (2 ** bits - 1)).reshape(-1, per)
    words = (codes << (np.arange(per, dtype=np.int64) * bits)).sum(axis=1)  # < 2^56
    return ((words[:, None] >> (np.arange(nbytes, dtype=np.int64) * 8)) & 0xFF) \
        .astype(np.uint8).reshape(-1)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` values as int8."""
    per, nbytes = group(bits)
    by = packed.astype(np.int64).reshape(-1, nbytes)
    words = (by << (np.arange(nbytes, dtype=np.int64) * 8)).sum(axis=1)
    codes = ((words[:, None] >> (np.arange(per, dtype=np.int64) * bits))
             & (2 ** bits - 1)).reshape(-1)[:count]
    return (codes - ((codes >> (bits - 1)) << bits)).astype(np.int8)


def packed_size(count: int, bits: int) -> int:
    """Bytes :func:`pack` uses for ``count`` values."""
    per, nbytes = group(bits)
    return -(-count // per) * nbytes


def emit_unpack(bb: relax.BlockBuilder, packed: relax.Expr, bits: int,
                shape: tuple[int, ...]) -> relax.Expr:
    """Relax ops turning a packed uint8 vector into an int8 tensor of ``shape``.

    Combine each group's bytes into one integer, shift it by ``[0, bits, 2*bits, ...]``, mask,
    flatten, drop the padding, then sign extend (``v - ((v >> (bits - 1)) << bits)``). Groups
    of one byte (2 and 4 bits) stay in 8-bit integers throughout.
    """
    per, nbytes = group(bits)
    count = int(np.prod(shape))
    size = packed_size(count, bits)
    word = "uint8" if nbytes == 1 else "int64"
    if nbytes == 1:
        x = bb.emit(R.expand_dims(packed, 1))
    else:
        by = bb.emit(R.astype(R.reshape(packed, (size // nbytes, nbytes)), word))
        x = bb.emit(R.sum(R.left_shift(by, relax.const(
            np.arange(nbytes, dtype=np.int64)[None, :] * 8, word)), axis=1, keepdims=True))
    x = bb.emit(R.right_shift(x, relax.const(np.arange(per)[None, :].astype(word) * bits, word)))
    x = bb.emit(R.bitwise_and(x, relax.const(2 ** bits - 1, word)))
    x = bb.emit(R.reshape(x, (size // nbytes * per,)))
    if size // nbytes * per != count:
        x = bb.emit(R.strided_slice(x, axes=[0], begin=[0], end=[count]))
    x = bb.emit(R.astype(x, "int8"))
    sign = R.left_shift(R.right_shift(x, relax.const(bits - 1, "int8")),
                        relax.const(bits, "int8"))
    x = bb.emit(R.subtract(x, sign))
    return bb.emit(R.reshape(x, shape))
