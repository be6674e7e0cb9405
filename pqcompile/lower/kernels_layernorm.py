"""The fixed-point layer norm (:class:`pqcompile.quant.layernorm.QLayerNorm`) as one kernel.

The reference's int64 arithmetic, row by row (rows split among parallel tasks where there are
enough of them): the row sums of the codes and of their squares, ``W``, the exponent ``e``
(the powers of 4 at most ``W``), the integer square root by the same Newton steps on scalars,
the reciprocal ``R``; then per element the normalized value ``z`` and the per-channel affine
map (int32 multiplier and shift, int64 offset: parameters of the program). Nothing runs in
float. (One Relax op per step, TVM's fused elementwise kernels inlined the per-row Newton
chain into every element and took over ten minutes to compile a two-norm model.)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..quant.layernorm import NEWTON_STEPS, Z_BITS, QLayerNorm
from .kernel_types import KERNEL_ATTR, parallel_worth

if TYPE_CHECKING:
    from tvm import relax

    from .relax_builder import Lowering


@functools.cache  # one kernel per shape and constants: TVMScript parsing is slow
def layer_norm_kernel(shape: tuple[int, ...], in_dt: str, out_dt: str, eps_codes: int,
                      lo: int, hi: int):
    """``kernel(X, M, S, O, Y)``: :class:`~pqcompile.quant.layernorm.QLayerNorm` over the last
    dim of ``X`` (``shape``, integer codes) into ``Y`` (``out_dt`` codes), ``M``/``S`` the
    int32 multipliers and shifts, ``O`` the int64 offsets (rounding half included)."""
    from tvm.script import tirx as T

    N = int(shape[-1])
    rows = int(np.prod(shape[:-1]))
    par = parallel_worth(nbytes=rows * N * 4)

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer(shape, in_dt), M: T.Buffer((N,), "int32"),
               S: T.Buffer((N,), "int32"), O: T.Buffer((N,), "int64"),
               Y: T.Buffer(shape, out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                     KERNEL_ATTR: "layer_norm"})
        with T.sblock("root"):
            Xf = T.decl_buffer((rows * N,), in_dt, data=X.data)
            Yf = T.decl_buffer((rows * N,), out_dt, data=Y.data)
            for r in T.parallel(rows) if par else T.serial(rows):
                # [S1, S2, W, e, Wn, x, R]
                v = T.alloc_buffer((7,), "int64", scope="global")
                v[0] = T.int64(0)
                v[1] = T.int64(0)
                for i in range(N):
                    v[0] = v[0] + T.Cast("int64", Xf[r * N + i])
                    v[1] = v[1] + T.Cast("int64", Xf[r * N + i]) * T.Cast("int64", Xf[r * N + i])
                v[2] = T.max(T.int64(N) * v[1] - v[0] * v[0] + T.int64(eps_codes), T.int64(1))
                v[3] = T.int64(0)
                for j in range(31):
                    if v[2] >= T.shift_left(T.int64(1), T.Cast("int64", 2 * j)):
                        v[3] = v[3] + T.int64(1)
                v[4] = T.shift_left(v[2], T.int64(2) * (T.int64(31) - v[3]))
                v[5] = T.int64(1 << 31)
                for _ in range(NEWTON_STEPS):
                    v[5] = T.shift_right(v[5] + T.floordiv(v[4], v[5]), T.int64(1))
                if v[5] * v[5] > v[4]:
                    v[5] = v[5] - T.int64(1)
                v[6] = T.floordiv(T.int64(1 << 62), v[5])
                for i in range(N):
                    Yf[r * N + i] = T.Cast(out_dt, T.max(T.min(T.shift_right(
                        T.shift_right(
                            (T.int64(N) * T.Cast("int64", Xf[r * N + i]) - v[0]) * v[6]
                            + T.shift_left(T.int64(1), v[3] + T.int64(30 - Z_BITS)),
                            v[3] + T.int64(31 - Z_BITS)) * T.Cast("int64", M[i]) + O[i],
                        T.Cast("int64", S[i])), T.int64(hi)), T.int64(lo)))

    return kernel


def emit_layer_norm(lw: Lowering, node, module: QLayerNorm, q) -> relax.Expr:
    """The layer norm of ``q`` as :func:`layer_norm_kernel`'s call."""
    name, shape = node.name, tuple(int(d) for d in lw.shape(node))
    m = lw.param(f"{name}.mult", module.mult.numpy().astype(np.int32))
    sh = lw.param(f"{name}.shift", module.shift.numpy().astype(np.int32))
    off = lw.param(f"{name}.offset", module.offset.numpy().astype(np.int64))
    kernel = layer_norm_kernel(shape, str(q.ty.dtype), module.out.dtype,
                               int(module.eps_codes), module.lo, module.hi)
    lw.kernels[name] = "layer_norm"
    return lw.call_kernel(kernel, f"{name}_layer_norm", [q, m, sh, off], shape,
                          module.out.dtype)


EMITTERS = {QLayerNorm: emit_layer_norm}
