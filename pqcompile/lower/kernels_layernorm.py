"""The fixed-point layer norm (:class:`pqcompile.quant.layernorm.QLayerNorm`) as one kernel.

The reference's integers, row by row (rows split among parallel tasks where there are enough
of them): the row sums of the codes and of their squares in ``VL`` vector lanes, then across
them; ``W``, the exponent ``e`` (from ``W``'s leading zeros: the powers of 4 at most ``W``),
the integer square root by the same Newton steps on scalars, the reciprocal ``R`` (32-bit);
then per element, in vector lanes, ``d`` (32-bit), the normalized value ``z`` (one 32 x 32 ->
64-bit product, 32-bit result) and the per-channel affine map (int32 multiplier and shift,
int64 offset: parameters of the program; a second 32 x 32 -> 64-bit product), clamped in
32-bit lanes where every channel's shifted sum fits them (:func:`narrow_affine`). The rest of
a row past its ``VL``-element blocks runs the same steps scalar. Nothing runs in float. (One
Relax op per step, TVM's fused elementwise kernels inlined the per-row Newton chain into every
element and took over ten minutes to compile a two-norm model; with the element steps in
scalar int64 the kernel took 19 instructions an element on aarch64, now 8.2.)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..quant.layernorm import NEWTON_STEPS, RECIPROCAL, Z_SHIFT, QLayerNorm, z_bound
from .kernel_types import KERNEL_ATTR, parallel_worth

if TYPE_CHECKING:
    from tvm import relax

    from .relax_builder import Lowering


VL = 16  # elements a vector step (a multiple of every target's int32 vector)


@functools.cache  # one kernel per shape and constants: TVMScript parsing is slow
def layer_norm_kernel(shape: tuple[int, ...], in_dt: str, out_dt: str, eps_codes: int,
                      lo: int, hi: int, narrow: bool = False):
    """``kernel(X, M, S, O, Y)``: :class:`~pqcompile.quant.layernorm.QLayerNorm` over the last
    dim of ``X`` (``shape``, integer codes) into ``Y`` (``out_dt`` codes), ``M``/``S`` the
    int32 multipliers and shifts, ``O`` the int64 offsets (rounding half included).
    ``narrow``: the affine map's shifted sums fit 32 bits, so the clamp runs in 32-bit lanes
    (:func:`narrow_affine`)."""
    from tvm.script import tirx as T

    N = int(shape[-1])
    rows = int(np.prod(shape[:-1]))
    par = parallel_worth(nbytes=rows * N * 4)
    blocks, tail = divmod(N, VL)
    # the lanes' sums of squares: 32-bit for 8-bit codes (at most 2^14 * N / VL < 2^22)
    sq_dt = "int32" if np.dtype(in_dt).itemsize == 1 else "int64"

    def affine(z, M, S, O, i):
        y = T.shift_right(T.Cast("int64", z) * T.Cast("int64", M[i]) + O[i],
                          T.Cast("int64", S[i]))
        if narrow:  # exact: every channel's shifted sum fits 32 bits (narrow_affine)
            return T.Cast(out_dt, T.max(T.min(T.Cast("int32", y), T.int32(hi)), T.int32(lo)))
        return T.Cast(out_dt, T.max(T.min(y, T.int64(hi)), T.int64(lo)))

    @T.macro
    def centered(Xf, d, rr, base, lane):  # d in 32 bits: its product with R one smull
        d[lane] = T.int32(N) * T.Cast("int32", Xf[base + lane]) - rr[0]

    @T.macro
    def normalized(d, v, rr, lane):  # z in 32 bits, in place of d
        d[lane] = T.Cast("int32", T.shift_right(
            T.Cast("int64", d[lane]) * T.Cast("int64", rr[1])
            + T.shift_left(T.int64(1), v[3] + T.int64(Z_SHIFT - 1)), v[3] + T.int64(Z_SHIFT)))

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
                s1 = T.alloc_buffer((VL,), "int32", scope="global")
                s2 = T.alloc_buffer((VL,), sq_dt, scope="global")
                for lane in T.vectorized(VL):
                    s1[lane] = T.int32(0)
                    s2[lane] = T.Cast(sq_dt, 0)
                for jb in range(blocks):  # the row sums in VL lanes, then across them
                    for lane in T.vectorized(VL):
                        s1[lane] = s1[lane] + T.Cast("int32", Xf[r * N + jb * VL + lane])
                        s2[lane] = s2[lane] + T.Cast(sq_dt, T.Cast(
                            "int32", Xf[r * N + jb * VL + lane]) * T.Cast(
                            "int32", Xf[r * N + jb * VL + lane]))
                v[0] = T.int64(0)
                v[1] = T.int64(0)
                for lane in range(VL):
                    v[0] = v[0] + T.Cast("int64", s1[lane])
                    v[1] = v[1] + T.Cast("int64", s2[lane])
                for i in range(tail):
                    v[0] = v[0] + T.Cast("int64", Xf[r * N + blocks * VL + i])
                    v[1] = v[1] + T.Cast("int64", Xf[r * N + blocks * VL + i]) * \
                        T.Cast("int64", Xf[r * N + blocks * VL + i])
                v[2] = T.max(T.int64(N) * v[1] - v[0] * v[0] + T.int64(eps_codes), T.int64(1))
                # e = #{j: W >= 4^j} = ceil(bit length / 2) (W < 2^61: e <= 31)
                v[3] = T.shift_right(T.int64(65) - T.Cast("int64", T.clz(v[2])), T.int64(1))
                v[4] = T.shift_left(v[2], T.int64(2) * (T.int64(31) - v[3]))
                v[5] = T.int64(1 << 31)
                for _ in range(NEWTON_STEPS):
                    v[5] = T.shift_right(v[5] + T.floordiv(v[4], v[5]), T.int64(1))
                if v[5] * v[5] > v[4]:
                    v[5] = v[5] - T.int64(1)
                v[6] = T.floordiv(T.int64(RECIPROCAL), v[5])
                rr = T.alloc_buffer((2,), "int32", scope="global")  # [S1, R] in 32 bits
                rr[0] = T.Cast("int32", v[0])
                rr[1] = T.Cast("int32", v[6])
                d = T.alloc_buffer((VL,), "int32", scope="global")
                for jb in range(blocks):
                    for lane in T.vectorized(VL):
                        centered(Xf, d, rr, r * N + jb * VL, lane)
                    for lane in T.vectorized(VL):
                        normalized(d, v, rr, lane)
                    for lane in T.vectorized(VL):
                        Yf[r * N + jb * VL + lane] = affine(d[lane], M, S, O, jb * VL + lane)
                for i in range(tail):
                    centered(Xf, d, rr, r * N + blocks * VL, i)
                    normalized(d, v, rr, i)
                    Yf[r * N + blocks * VL + i] = affine(d[i], M, S, O, blocks * VL + i)

    return kernel


def narrow_affine(module: QLayerNorm) -> bool:
    """Whether every channel's ``(z m + off) >> sh`` lies within ``[-2^30, 2^30]`` for
    ``|z| <=`` :func:`~pqcompile.quant.layernorm.z_bound` (the bound the module's affine map
    was fitted to): then its 32-bit truncation is exact and the clamp can follow it."""
    bound = z_bound(int(module.mult.numel()))
    return all((bound * abs(int(m)) + abs(int(o))) >> int(s) < 1 << 30 for m, o, s in zip(
        module.mult.tolist(), module.offset.tolist(), module.shift.tolist(), strict=True))


def emit_layer_norm(lw: Lowering, node, module: QLayerNorm, q) -> relax.Expr:
    """The layer norm of ``q`` as :func:`layer_norm_kernel`'s call."""
    name, shape = node.name, tuple(int(d) for d in lw.shape(node))
    m = lw.param(f"{name}.mult", module.mult.numpy().astype(np.int32))
    sh = lw.param(f"{name}.shift", module.shift.numpy().astype(np.int32))
    off = lw.param(f"{name}.offset", module.offset.numpy().astype(np.int64))
    kernel = layer_norm_kernel(shape, str(q.ty.dtype), module.out.dtype,
                               int(module.eps_codes), module.lo, module.hi,
                               narrow_affine(module))
    lw.kernels[name] = "layer_norm"
    return lw.call_kernel(kernel, f"{name}_layer_norm", [q, m, sh, off], shape,
                          module.out.dtype)


EMITTERS = {QLayerNorm: emit_layer_norm}
