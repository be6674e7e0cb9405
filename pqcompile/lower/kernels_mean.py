"""The global average pool of an int8/uint8 NCHW tensor (batch 1) as one kernel: each
channel's sum over the plane, requantized (:class:`~pqcompile.quant.qmodules.QSumPool` with
``dims`` the last two).

TVM's ``sum`` over the cast tensor wrote no vector code here (a squeeze-excite block's pool of
32 x 112 x 112 codes took 0.11 ms, ONNX Runtime's 0.01-0.02 ms); this kernel adds 16 codes a
step into int32 lanes, sums the lanes once a channel and requantizes the sum in int64 with the
reference's multiplier and shift (``clamp((sum * m + 2^(sh-1)) >> sh, lo, hi)``), so the
integers are the reference's.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .kernel_types import KERNEL_ATTR, parallel_worth

if TYPE_CHECKING:
    from tvm import relax

    from ..quant.qmodules import QSumPool
    from .relax_builder import Lowering

#: int32 lanes of the running sums
LANES = 16

@functools.cache  # one kernel per layer shape and constants: TVMScript parsing is slow
def mean_kernel(channels: int, height: int, width: int, in_dt: str, out_dt: str,
                out_shape: tuple[int, ...], mult: int, shift: int, lo: int, hi: int):
    """``kernel(X, Y)``: ``Y[c] = clamp((sum(X[0, c]) * mult + 2^(shift-1)) >> shift, lo, hi)``
    for ``X`` of shape ``(1, channels, height, width)``, ``Y`` of ``out_shape`` (``channels``
    elements: ``(1, C, 1, 1)`` or ``(1, C)``)."""
    from tvm.script import tirx as T

    if in_dt not in ("int8", "uint8") or out_dt not in ("int8", "uint8"):
        raise ValueError(f"the mean kernel takes int8/uint8 codes, got {in_dt} -> {out_dt}")
    if not 1 <= shift <= 62:
        raise ValueError(f"requantization shift {shift} outside [1, 62]")
    C, HW, V = channels, height * width, LANES
    if HW >= (1 << 31) // 256:
        raise ValueError(f"a {height}x{width} plane's sum could overflow int32")
    NV = HW // V
    parallel = parallel_worth(nbytes=C * HW)  # else a parallel region costs more than the sums
    rnd = 1 << (shift - 1)

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((1, C, height, width), in_dt), Y: T.Buffer(out_shape, out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "mean"})
        with T.sblock("root"):
            Xf = T.decl_buffer((C * HW,), in_dt, data=X.data)
            Yf = T.decl_buffer((C,), out_dt, data=Y.data)
            for c in T.parallel(C) if parallel else T.serial(C):
                acc = T.alloc_buffer((V,), "int32", scope="global")
                total = T.alloc_buffer((1,), "int32", scope="global")
                for lane in T.vectorized(V):
                    acc[lane] = 0
                for j in range(NV):
                    for lane in T.vectorized(V):
                        acc[lane] = acc[lane] + T.Cast("int32", Xf[c * HW + j * V + lane])
                total[0] = 0
                for lane in range(V):
                    total[0] = total[0] + acc[lane]
                for e in range(NV * V, HW):
                    total[0] = total[0] + T.Cast("int32", Xf[c * HW + e])
                Yf[c] = T.Cast(out_dt, T.max(T.min(
                    (T.Cast("int64", total[0]) * T.int64(mult) + T.int64(rnd))
                    >> T.int64(shift), T.int64(hi)), T.int64(lo)))

    return kernel


def emit_mean(lw: Lowering, node, module: QSumPool, x) -> relax.Expr | None:
    """A global average pool (batch 1, the last two dims of NCHW int8/uint8) as the kernel of
    :mod:`~pqcompile.lower.kernels_mean`, where the program has kernels; else ``None``."""
    shape = lw.shape(node.all_input_nodes[0])
    if lw.isa is None or len(shape) != 4 or shape[0] != 1 \
            or sorted(d % 4 for d in module.dims) != [2, 3] \
            or str(x.ty.dtype) not in ("int8", "uint8") \
            or module.out.dtype not in ("int8", "uint8"):
        return None
    out_shape = lw.shape(node)
    kernel = mean_kernel(shape[1], shape[2], shape[3], str(x.ty.dtype),
                         module.out.dtype, out_shape, int(module.fp.mult[0]),
                         int(module.fp.shift[0]), module.lo, module.hi)
    lw.kernels[node.name] = "mean"
    return lw.call_kernel(kernel, f"{node.name}_mean", [x], out_shape, module.out.dtype)
