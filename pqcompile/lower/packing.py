"""Sub-byte weight storage: 2-bit and 4-bit weights packed into bytes, unpacked in-graph.

Layout: the weight is flattened in C order and padded with zeros to a whole number of bytes;
byte ``j`` holds elements ``j*k .. j*k+k-1`` (``k = 8 // bits``), element ``j*k+i`` in bits
``[i*bits, (i+1)*bits)`` as ``bits``-bit two's complement. Other widths (3, 5, 6, 7) are
stored one value per int8 byte.

>>> import numpy as np
>>> q = np.array([-7, 7, 3, -1, 0], dtype=np.int8)
>>> p = pack(q, 4)
>>> p.dtype, p.size, unpack(p, 4, q.size).tolist()
(dtype('uint8'), 3, [-7, 7, 3, -1, 0])
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R

PACKED_BITS = (2, 4)


def is_packed(bits: int) -> bool:
    """Whether weights of ``bits`` are stored packed (2 and 4 bits)."""
    return bits in PACKED_BITS


def _check(bits: int) -> int:
    if bits not in PACKED_BITS:
        raise ValueError(f"packing supports {PACKED_BITS}-bit values, got {bits} bits; store "
                         "other widths as int8")
    return 8 // bits


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed ``bits``-bit integers (any shape, C order) into a 1-D uint8 array."""
    per = _check(bits)
    flat = np.asarray(q).reshape(-1).astype(np.int64)
    lim = 2 ** (bits - 1)
    if flat.size and (flat.min() < -lim or flat.max() >= lim):
        raise ValueError(f"values outside the {bits}-bit range [{-lim}, {lim - 1}]: "
                         f"[{flat.min()}, {flat.max()}]")
    pad = (-flat.size) % per
    codes = (np.concatenate([flat, np.zeros(pad, np.int64)]) & (2 ** bits - 1)).reshape(-1, per)
    shifts = np.arange(per, dtype=np.int64) * bits
    return (codes << shifts).sum(axis=1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` values as int8."""
    per = _check(bits)
    shifts = np.arange(per, dtype=np.uint8) * bits
    codes = ((packed.astype(np.uint8)[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)
    codes = codes[:count].astype(np.int16)
    return (codes - ((codes >> (bits - 1)) << bits)).astype(np.int8)


def packed_size(count: int, bits: int) -> int:
    """Bytes :func:`pack` uses for ``count`` values."""
    per = _check(bits)
    return -(-count // per)


def emit_unpack(bb: relax.BlockBuilder, packed: relax.Expr, bits: int,
                shape: tuple[int, ...]) -> relax.Expr:
    """Relax ops turning a packed uint8 vector into an int8 tensor of ``shape``.

    Shift each byte by ``[0, bits, 2*bits, ...]``, mask, flatten, drop the padding, then sign
    extend (``v - ((v >> (bits - 1)) << bits)``), all on 8-bit integers.
    """
    per = _check(bits)
    count = int(np.prod(shape))
    nbytes = packed_size(count, bits)
    shifts = relax.const(np.arange(per, dtype=np.uint8)[None, :] * bits, "uint8")
    x = bb.emit(R.right_shift(R.expand_dims(packed, 1), shifts))
    x = bb.emit(R.bitwise_and(x, relax.const(2 ** bits - 1, "uint8")))
    x = bb.emit(R.reshape(x, (nbytes * per,)))
    if nbytes * per != count:
        x = bb.emit(R.strided_slice(x, axes=[0], begin=[0], end=[count]))
    x = bb.emit(R.astype(x, "int8"))
    sign = R.left_shift(R.right_shift(x, relax.const(bits - 1, "int8")),
                        relax.const(bits, "int8"))
    x = bb.emit(R.subtract(x, sign))
    return bb.emit(R.reshape(x, shape))
