"""A 256-entry byte table applied to an int8/uint8 tensor: the integer elementwise ops
(:class:`~pqcompile.quant.lut.QLut`: SiLU, sigmoid, hardswish, GELU, tanh ...) as one kernel.

TVM's ``take`` on ``astype(q, int32) - offset`` ran as two passes over the tensor (the cast
wrote int32 indices, four bytes an element, and the gather read them), about a third of
efficientnet_b0's int8 time on an AVX-512 host. Here the table is stored rotated
(:func:`rotated_table`), so that an input code's raw byte is its index, and each flavour
looks up whole vectors where the instruction set has a byte table lookup:

- ``vbmi`` (x86 with AVX-512 VBMI): 64 codes a step, two ``vpermi2b`` (each a lookup in 128
  table bytes held in two registers, indexed by the low 7 bits) and a blend on the index's
  top bit;
- ``neon`` (aarch64): 16 codes a step, ``tbl`` in the table's first 64 bytes (four registers)
  and three ``tbx`` in the next 64-byte quarters, the index lowered by 64 each time (``tbl`` /
  ``tbx`` leave a lane of an index of 64 or more at zero / unchanged);
- ``scalar`` (any other CPU): a byte load per code, the loop as LLVM compiles it.

The integers are the reference's (``table[q - offset]``) by construction; the tests compare
every code of both dtypes on every flavour the machine can run.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .kernel_types import KERNEL_ATTR, cpu_features
from .tir_flat import flat_macro

#: Lookup flavours (module doc).
FLAVOURS = ("vbmi", "neon", "scalar")
#: Bytes a parallel task looks up (smaller tensors run in one task: a parallel region costs
#: more than a few thousand lookups).
TASK_BYTES = 1 << 14


def lut_flavour(target: Any) -> str:
    """The lookup flavour for a ``tvm.target.Target`` (its CPU features as LLVM reports
    them)."""
    features, aarch64 = cpu_features(target)
    if {"avx512vbmi", "avx512bw"} <= features:
        return "vbmi"
    if "neon" in features and aarch64:
        return "neon"
    return "scalar"


def rotated_table(table: np.ndarray, offset: int) -> np.ndarray:
    """``table`` (indexed by ``q - offset``) reindexed by the code's raw byte ``q & 255``:
    entry ``u`` is ``table[((u ^ 128) if signed else u)]`` for an int8 input (offset -128),
    ``table[u]`` for a uint8 one (offset 0)."""
    table = np.asarray(table)
    if table.shape != (256,):
        raise ValueError(f"a lookup table has 256 entries, got shape {table.shape}")
    if offset not in (0, -128):
        raise ValueError(f"table offset {offset}: expected 0 (uint8 input) or -128 (int8)")
    u = np.arange(256)
    codes = np.where(u >= 128, u - 256, u) if offset == -128 else u
    return np.ascontiguousarray(table[codes - offset])


def _intrin(name: str, dtype: str, *args):
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), *args, dtype=dtype)


def _vector_lookup(flavour: str, Tb, u):
    """The looked-up bytes of the index vector ``u`` (int8 x 64 / x 16) in the rotated table
    ``Tb`` (an int8 view of 256 bytes)."""
    from tvm.script import tirx as T

    if flavour == "vbmi":
        t = [Tb.vload([64 * k], "int8x64") for k in range(4)]
        vperm = "llvm.x86.avx512.vpermi2var.qi.512"
        low = _intrin(vperm, "int8x64", t[0], u, t[1])
        high = _intrin(vperm, "int8x64", t[2], u, t[3])
        return T.Select(u < T.broadcast(T.int8(0), 64), high, low)
    t = [Tb.vload([16 * k], "int8x16") for k in range(16)]
    r = _intrin("llvm.aarch64.neon.tbl4", "int8x16", *t[:4], u)
    for q in range(1, 4):
        # the index lowered by 64 q, wrapping (64 q as an int8: 64, -128, -64): a lane below
        # 64 q lands at 192 or more
        r = _intrin("llvm.aarch64.neon.tbx4", "int8x16", r, *t[4 * q:4 * q + 4],
                    u - T.broadcast(T.int8((64 * q + 128) % 256 - 128), 16))
    return r


@functools.cache  # one kernel per shape and dtypes: TVMScript parsing is slow
def lut_kernel(shape: tuple[int, ...], in_dt: str, out_dt: str, flavour: str):
    """``kernel(X, Tb, Y)``: ``Y = Tb[X & 255]`` for ``X`` of ``shape`` (``in_dt``) and the
    rotated table ``Tb`` (256 ``out_dt`` codes, :func:`rotated_table`)."""
    from tvm.script import tirx as T

    if flavour not in FLAVOURS:
        raise ValueError(f"lookup flavour {flavour!r}: expected one of {FLAVOURS}")
    for name, dt in (("input", in_dt), ("output", out_dt)):
        if dt not in ("int8", "uint8"):
            raise ValueError(f"a table lookup's {name} is int8 or uint8, got {dt}")
    n = int(np.prod(shape))
    lanes = {"vbmi": 64, "neon": 16, "scalar": 1}[flavour]
    flat = flat_macro(n, lanes, TASK_BYTES)

    def one(Xf, Tf, i):  # the code at i, looked up
        return Tf[T.Cast("int32", T.Cast("uint8", Xf[i]))]

    def vec(Xf, Tf, i):  # the codes i .. i + lanes
        if lanes == 1:
            return one(Xf, Tf, i)
        return _vector_lookup(flavour, Tf, Xf.vload([i], f"int8x{lanes}"))

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer(shape, in_dt), Tb: T.Buffer((256,), out_dt),
               Y: T.Buffer(shape, out_dt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: "lut"})
        with T.sblock("root"):
            Xf = T.decl_buffer((n,), "int8", data=X.data)
            Yf = T.decl_buffer((n,), "int8", data=Y.data)
            Tf = T.decl_buffer((256,), "int8", data=Tb.data)
            flat(Yf, Xf, Tf, vec, one)

    return kernel
