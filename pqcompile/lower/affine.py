"""The Relax lowering of :class:`pqcompile.quant.affine.QAffine` (a batch norm on integers).

Per channel (axis 1), in int64: ``clamp((q * m + off) >> sh, lo, hi)``, cast to the output's
dtype. ``m`` and ``sh`` are int32 parameters ``<node>.mult`` / ``<node>.shift``, ``off`` the
int64 parameter ``<node>.offset`` (the offset and the rounding half); the elementwise ops fuse
into one loop over the tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax
from tvm.relax import op as R

from ..quant.affine import QAffine

if TYPE_CHECKING:
    from .relax_builder import Lowering


def affine(lw: Lowering, node, module: QAffine, x) -> relax.Expr:
    bb, name = lw.bb, node.name
    view = module.view(len(lw.shape(node)))
    m = lw.param(f"{name}.mult", module.mult.numpy().astype(np.int32))
    sh = lw.param(f"{name}.shift", module.shift.numpy().astype(np.int32))
    off = lw.param(f"{name}.offset", module.offset.numpy().astype(np.int64))
    m = bb.emit(R.reshape(bb.emit(R.astype(m, "int64")), view))
    sh = bb.emit(R.reshape(bb.emit(R.astype(sh, "int64")), view))
    off = bb.emit(R.reshape(off, view))
    y = bb.emit(R.right_shift(R.add(R.multiply(bb.emit(R.astype(x, "int64")), m), off), sh))
    return bb.emit(R.astype(R.clip(y, module.lo, module.hi), module.out.dtype))
