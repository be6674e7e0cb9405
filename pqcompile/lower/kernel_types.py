"""The kernels' shared vocabulary: the layer shape a conv kernel sees, the instruction-set
flavour and register tile it is built for, and the choice of both for a target.

Every kernel module (:mod:`~pqcompile.lower.kernels`, :mod:`~pqcompile.lower.kernels_conv1x1`,
:mod:`~pqcompile.lower.kernels_planar`, :mod:`~pqcompile.lower.kernels_linear`) imports these;
none of them imports another's kernels through a re-export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Function attribute marking our kernels (also ``tirx.is_scheduled``: tuning leaves them).
KERNEL_ATTR = "pqcompile.kernel"

ISAS = ("vnni", "sdot", "generic")


@dataclass(frozen=True)
class ConvShape:
    """A quantized conv layer, as the kernel sees it (groups = 1, batch 1)."""

    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: int
    padding: tuple[int, int]
    in_dtype: str   # "int8" | "uint8"
    out_dtype: str  # "int8" | "uint8"
    lo: int
    hi: int
    #: every output channel's shift is at least ``tir_macros.NARROW_MIN_SHIFT``: the epilogue
    #: runs on the product's high 32 bits (:func:`~pqcompile.lower.tir_macros.requant_macro`)
    narrow: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (ph, pw), s = self.kernel, self.padding, self.stride
        return (self.height + 2 * ph - kh) // s + 1, (self.width + 2 * pw - kw) // s + 1


@dataclass(frozen=True)
class Isa:
    name: str
    lanes: int   # output pixels per vector
    mr: int      # output channels per register tile
    nr: int      # pixel vectors per register tile

    def __post_init__(self) -> None:
        # TVM places CPU buffers under 1 KiB on the stack (LLVM then keeps them in registers);
        # a larger accumulator tile would live in heap memory, reloaded on every step.
        if self.mr * self.nr * self.lanes * 4 >= 1024:
            raise ValueError(f"a {self.mr}x{self.nr}x{self.lanes} int32 tile is 1 KiB or more")

    def offset(self, in_dtype: str) -> int:
        """What the kernel adds to each input byte (the dot product's operand type)."""
        if self.name == "vnni":
            return 128 if in_dtype == "int8" else 0
        if self.name == "sdot":
            return -128 if in_dtype == "uint8" else 0
        return 0

    @property
    def depth(self) -> int:
        """Input channels per dot-product step (and per interleaved scratch word)."""
        return 4 if self.name in ("vnni", "sdot") else 1

    @property
    def packed_dtype(self) -> str | None:
        return {"vnni": "uint8", "sdot": "int8"}.get(self.name)


def isa_for(target: Any) -> Isa:
    """The kernel flavour for a ``tvm.target.Target`` (its CPU features as LLVM reports them)."""
    from tvm.target import codegen

    keys = dict(target.export())
    host = keys.get("host")
    cpu = target if keys.get("kind") == "llvm" or host is None else host
    try:
        features = set(codegen.llvm_get_cpu_features(cpu))
    except Exception:  # not an LLVM CPU target: no dot products
        features = set()
    if {"avx512vnni", "avx512bw"} <= features:
        return Isa("vnni", 16, 4, 3)
    if "dotprod" in features:
        return Isa("sdot", 4, 4, 4)
    if "neon" in features or "avx512bw" in features:
        return Isa("generic", 16 if "avx512bw" in features else 8, 4, 2)
    return Isa("generic", 8, 4, 2)


def grid_vectors(shape: ConvShape, lanes: int) -> int:
    """Pixel vectors of the output grid (output rows x padded input columns)."""
    oh, _ = shape.out_hw
    wq = -(-(shape.width + 2 * shape.padding[1]) // shape.stride)
    return -(-(oh * wq) // lanes)


def choose_tile(shape: ConvShape, isa: Isa) -> Isa:
    """The register tile for one layer: the fewest computed lanes (output channels padded to
    the tile, pixel vectors padded to the tile), weighted by the loads each dot product
    needs (``(MR + NR) / (MR * NR)`` operand loads per dot product)."""
    nv = grid_vectors(shape, isa.lanes)
    o = shape.out_channels
    best, best_cost = isa, None
    for mr in range(1, 9):
        for nr in range(1, 9):
            if mr * nr * isa.lanes * 4 >= 1024 or mr * nr > 16:
                continue
            lanes = -(-o // mr) * mr * -(-nv // nr) * nr
            cost = lanes * (1.0 + 0.5 * (mr + nr) / (mr * nr))
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = Isa(isa.name, isa.lanes, mr, nr), cost
    return best


def supported(shape: ConvShape) -> bool:
    return shape.stride in (1, 2) and all(k >= 1 for k in shape.kernel)
