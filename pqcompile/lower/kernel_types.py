"""The kernels' shared vocabulary: the layer shape a conv kernel sees, the instruction-set
flavour and register tile it is built for, and the choice of both for a target.

Every kernel module (:mod:`~pqcompile.lower.kernels`, :mod:`~pqcompile.lower.kernels_conv1x1`,
:mod:`~pqcompile.lower.kernels_planar`, :mod:`~pqcompile.lower.kernels_linear`) imports these;
none of them imports another's kernels through a re-export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Function attribute marking our kernels (also ``tirx.is_scheduled``: tuning leaves them).
KERNEL_ATTR = "pqcompile.kernel"

ISAS = ("vnni", "avx2", "avx2u", "sdot", "neon", "generic")

#: The largest weight magnitude of the ``avx2u`` kernels: an unsigned input byte times such a
#: weight, twice, fits ``vpmaddubsw``'s int16 lanes (2 x 255 x 64 = 32640). Weights of 7 bits
#: or fewer (the quantizer's narrow range, [-63, 63] at 7 bits) always do.
AVX2U_MAX_WEIGHT = 64

#: Accumulator registers a tile may hold (of 32 vector registers: the rest hold operands).
MAX_ACCUMULATORS = 16

#: The work (multiply-accumulates; bytes for packs) below which a kernel runs on the calling
#: thread alone: a parallel region costs a few microseconds (waking the pool, the join),
#: more than a second thread saves on a layer this small (see :func:`parallel_worth`).
PARALLEL_MIN_MACS = 1 << 19
PARALLEL_MIN_BYTES = 1 << 15


def parallel_worth(macs: int = 0, nbytes: int = 0) -> bool:
    """Whether a kernel of ``macs`` multiply-accumulates (or, for a copy, ``nbytes`` bytes)
    gets a parallel region: its outer loop is ``T.parallel`` where this holds, ``T.serial``
    otherwise (the same iterations, the same integers)."""
    return macs >= PARALLEL_MIN_MACS or nbytes >= PARALLEL_MIN_BYTES


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
    """An instruction-set flavour and its register tile.

    - ``vnni`` (x86 AVX-512 VNNI): ``vpdpbusd``, 16 pixels a vector, 4 input channels a step;
    - ``sdot`` (aarch64 ``+dotprod``): ``sdot``, 4 pixels, 4 channels;
    - ``neon`` (aarch64 without dot products): the same 4-channel words as ``sdot``, each
      step two widening multiplies (``smull``/``smull2``: 8 int16 products) and two pairwise
      widening accumulates (``sadalp``: 4 int32 lanes each), so a vector's accumulator is two
      registers of pair sums, added pairwise (``addp``) once before the epilogue;
    - ``avx2`` (x86 with AVX2, without AVX-512 VNNI): the ``sdot`` words and signs (int8 x
      int8, 8 pixels a 256-bit vector), each step four exact instructions
      (:func:`~pqcompile.lower.tir_macros.dot4_macro`: ``vpsignb``, ``vpmaddubsw``,
      ``vpmaddwd``, ``vpaddd``), for weights in the narrow range [-127, 127];
    - ``avx2u`` (the same CPUs, a layer whose weights are within +-64: 7 bits or fewer): the
      ``vnni`` words and signs (uint8 x int8, signed inputs offset by +128), each step three
      instructions (``vpmaddubsw``, ``vpmaddwd`` by ones, ``vpaddd``): no pair of products can
      saturate (2 x 255 x 64 = 32640), so sub-8-bit weights run faster here, not only smaller;
    - ``generic`` (any CPU): one channel a step, widening multiply-adds vectorized by LLVM.
    """

    name: str
    lanes: int   # output pixels per vector
    mr: int      # output channels per register tile
    nr: int      # pixel vectors per register tile

    def __post_init__(self) -> None:
        # TVM places CPU buffers under 1 KiB on the stack (LLVM then keeps them in registers);
        # a larger accumulator tile would live in heap memory, reloaded on every step.
        if self.mr * self.nr * self.lanes * 4 * self.acc_width >= 1024:
            raise ValueError(f"a {self.mr}x{self.nr}x{self.lanes} int32 tile is 1 KiB or more")

    def offset(self, in_dtype: str) -> int:
        """What the kernel adds to each input byte (the dot product's operand type): +128 to
        an int8 input packed as uint8, -128 to a uint8 input packed as int8."""
        packed = self.packed_dtype
        if packed is None or packed == in_dtype:
            return 0
        return 128 if packed == "uint8" else -128

    @property
    def depth(self) -> int:
        """Input channels per dot-product step (and per interleaved scratch word): 4 where
        the inputs are packed in 4-channel words."""
        return 1 if self.packed_dtype is None else 4

    @property
    def packed_dtype(self) -> str | None:
        return {"vnni": "uint8", "sdot": "int8", "neon": "int8", "avx2": "int8",
                "avx2u": "uint8"}.get(self.name)

    @property
    def acc_width(self) -> int:
        """Accumulator registers per output vector (``neon``: two of pair sums)."""
        return 2 if self.name == "neon" else 1

    @property
    def generic_lanes(self) -> int:
        """Lanes of the ``generic`` kernels on this target (depthwise conv, max pool, and the
        linear kernel where there is no 4-byte dot product): ``neon``'s 4 pixels are a word
        each, the generic kernels' int32 lanes are 8 (two registers)."""
        return 8 if self.name == "neon" else self.lanes


def cpu_features(target: Any) -> tuple[set[str], bool]:
    """``(features, aarch64)``: the CPU features LLVM reports for a ``tvm.target.Target``
    (none for a target that is not an LLVM CPU) and whether it compiles for aarch64."""
    from tvm.target import codegen

    keys = dict(target.export())
    host = keys.get("host")
    cpu = target if keys.get("kind") == "llvm" or host is None else host
    try:
        features = set(codegen.llvm_get_cpu_features(cpu))
    except Exception:  # noqa: BLE001 (TVM raises its own errors): not an LLVM CPU target
        return set(), False
    return features, "aarch64" in _triple(target, cpu)


def isa_for(target: Any) -> Isa:
    """The kernel flavour for a ``tvm.target.Target`` (its CPU features as LLVM reports them)."""
    features, aarch64 = cpu_features(target)
    if {"avx512vnni", "avx512bw"} <= features:
        return Isa("vnni", 16, 4, 3)
    if "dotprod" in features:
        return Isa("sdot", 4, 4, 4)
    if "neon" in features and aarch64:
        return Isa("neon", 4, 3, 2)
    if "avx2" in features:
        return Isa("avx2", 8, 4, 2)
    if "neon" in features or "avx512bw" in features:
        return Isa("generic", 16 if "avx512bw" in features else 8, 4, 2)
    return Isa("generic", 8, 4, 2)


def _triple(target: Any, cpu: Any) -> str:
    """The LLVM target triple ``target`` compiles for (the host's where it names none)."""
    from tvm.target import codegen

    for t in (target, cpu):
        triple = t.attrs.get("mtriple") if t.attrs is not None else None
        if triple:
            return str(triple)
    return str(codegen.llvm_get_system_triple())


def fit_isa(isa: Isa, q: Any) -> Isa:
    """``isa`` for a conv layer of int8 weights ``q``: ``neon`` sums two products in int16
    lanes, exact for weights in the quantizer's narrow range [-127, 127]; a layer with a -128
    weight gets the ``generic`` kernels instead; so does ``avx2`` (each weight takes its
    input's sign by ``vpsignb``, which cannot negate -128). On ``avx2``, a layer whose weights
    are within +-:data:`AVX2U_MAX_WEIGHT` gets the three-instruction ``avx2u`` kernels."""
    if isa.name in ("neon", "avx2") and int(q.min()) < -127:
        return Isa("generic", isa.generic_lanes, 4, 2)
    if isa.name == "avx2" and int(np.abs(np.asarray(q, np.int64)).max(initial=0)) \
            <= AVX2U_MAX_WEIGHT:
        return Isa("avx2u", isa.lanes, isa.mr, isa.nr)
    return isa


#: Grid vectors over output vectors from which a conv reads an im2col copy (:func:`im2col`).
IM2COL_RATIO = 1.1
#: The largest im2col copy (bytes).
IM2COL_BYTES = 1 << 20


def im2col(shape: ConvShape, isa: Isa) -> bool:
    """Whether the conv kernel for ``shape`` on ``isa`` computes from an im2col copy of the
    packed input (each tap's 4-channel words of the output pixels, contiguous) rather than
    from the padded grid (output rows x padded input columns: ``KW - 1`` junk columns per
    row computed and dropped). On small maps the junk is a large share of the lanes (3x3 on
    a 4x4 map: a third, on 2x2 half), and the copy is cheap next to the multiplies. Only
    for the aarch64 dot-product layouts (``sdot``, ``neon``) and convs with a pack."""
    if isa.name not in ("sdot", "neon") or (shape.kernel == (1, 1) and shape.stride == 1
                                            and shape.padding == (0, 0)):
        return False
    oh, ow = shape.out_hw
    wq = -(-(shape.width + 2 * shape.padding[1]) // shape.stride)
    tight = -(-(oh * ow) // isa.lanes)
    size = shape.kernel[0] * shape.kernel[1] * -(-shape.channels // 4) * tight * isa.lanes * 4
    return -(-(oh * wq) // isa.lanes) >= IM2COL_RATIO * tight and size <= IM2COL_BYTES \
        and ow <= 32  # a row is one vector copy


def grid_vectors(shape: ConvShape, lanes: int, isa: Isa | None = None) -> int:
    """Pixel vectors of the output grid (output rows x padded input columns), or of the
    output pixels where the kernel reads an im2col copy (:func:`im2col` for ``isa``)."""
    oh, ow = shape.out_hw
    wq = -(-(shape.width + 2 * shape.padding[1]) // shape.stride)
    if isa is not None and im2col(shape, isa):
        wq = ow
    return -(-(oh * wq) // lanes)


def choose_tile(shape: ConvShape, isa: Isa) -> Isa:
    """The register tile for one layer: the fewest computed lanes (output channels padded to
    the tile, pixel vectors padded to the tile), weighted by the loads each dot product
    needs (``(MR + NR) / (MR * NR)`` operand loads per dot product; on ``vnni`` a kernel on
    the padded grid weighs a weight word's broadcast half a pixel vector's load: a pixel
    vector starts at any word, so most cross a cache line. 48 -> 48 3x3 at 56x56, 2 threads:
    3x5 0.145 ms, 4x3 0.137), with at most
    :data:`MAX_ACCUMULATORS` accumulator registers. ``neon`` counts the instructions of a
    pair of steps: ``6 MR NR`` multiplies and pair sums, ``2.5 MR`` for the weights (a
    16-byte load per 4 words, a ``dup`` each), ``3 NR`` input loads, 4 for the loop; it
    keeps both steps' input halves in registers (``4 NR``) beside the ``2 MR NR``
    accumulators: at most 24 of the 32 (16 for a stride-2 grid stepping two channel blocks,
    whose phase addresses cost registers: a 4x2 tile spilled there), the weights are
    broadcast just before use.
    ``avx2`` has 16 registers: ``MR NR`` accumulators, each pixel vector and its
    magnitudes, and 4 temporaries (its step is 4 instructions: loads weigh a quarter)."""
    nv = grid_vectors(shape, isa.lanes, isa)
    o = shape.out_channels
    grid = not (shape.kernel == (1, 1) and shape.stride == 1 and shape.padding == (0, 0))
    load = {"neon": 1 / 3, "avx2": 1 / 4, "avx2u": 1 / 3}.get(isa.name, 0.5)
    # stride-2 phases cost neon registers for their addresses: measured, a 4x2 tile spills
    # where it pairs channel blocks (an odd block, a 3-channel stem, pairs taps and keeps 4x2:
    # mobilenet_v2's stem at 224x224 10.9 M instructions at 4x2, 13.1 M at 2x2)
    neon_regs = 16 if shape.stride == 2 and not im2col(shape, isa) \
        and -(-shape.channels // 4) % 2 == 0 else 24
    best, best_cost = isa, None
    for mr in range(1, 9):
        for nr in range(1, 9):
            if isa.name == "sdot" and mr % 4:  # indexed sdot: 4 channels a weight load
                continue
            if mr * nr * isa.lanes * 4 * isa.acc_width >= 1024 \
                    or mr * nr * isa.acc_width > MAX_ACCUMULATORS \
                    or (isa.name == "neon" and 2 * mr * nr + 4 * nr > neon_regs) \
                    or (isa.name == "avx2" and mr * nr + 2 * nr + 4 > 16) \
                    or (isa.name == "avx2u" and mr * nr + nr + 3 > 16):
                continue
            lanes = -(-o // mr) * mr * -(-nv // nr) * nr
            loads = mr // 4 + nr if isa.name == "sdot" else mr + nr
            if isa.name == "vnni" and grid:  # a weight word is the dot product's broadcast
                loads = mr / 2 + nr  # operand: 4 bytes, never split across cache lines as
                # the grid's pixel vectors are (a tap's words start anywhere)
            cost = lanes * (1.0 + load * loads / (mr * nr))
            if isa.name == "neon":  # a pair of steps: see the doc
                cost = lanes * (6 * mr * nr + 2.5 * mr + 3 * nr + 4) / (6 * mr * nr)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = Isa(isa.name, isa.lanes, mr, nr), cost
    return best


def supported(shape: ConvShape) -> bool:
    return shape.stride in (1, 2) and all(k >= 1 for k in shape.kernel)


#: the module attribute :func:`pqcompile.lower.lower` sets to the kernels' instruction set
KERNEL_ISA_ATTR = "pqcompile_kernel_isa"
#: the module attribute :func:`pqcompile.lower.lower` sets where a table lookup needs more than
#: the kernels' instruction set (``vbmi``: :mod:`~pqcompile.lower.kernels_lut`)
LUT_ISA_ATTR = "pqcompile_lut_isa"
#: the instruction sets a target must have to run kernels of each flavour ("generic": any)
_RUNS_ON = {"vnni": {"vnni"}, "sdot": {"sdot"}, "neon": {"neon", "sdot"}}


def check_kernel_isa(mod: Any, target: Any, target_name: str) -> None:
    """Raise ``ValueError`` when ``mod``'s kernels (lowered for one instruction set) cannot run
    on ``target`` (a ``tvm.target.Target``): LLVM would otherwise abort the whole process on
    an instruction the target lacks (NEON ``smull`` in an x86 build)."""
    attrs = mod.attrs
    lut = str(attrs[LUT_ISA_ATTR]) if attrs is not None and LUT_ISA_ATTR in attrs else None
    if lut is not None:
        from .kernels_lut import lut_flavour

        if lut_flavour(target) != lut:
            raise ValueError(
                f"this module was lowered with {lut!r} table lookups (AVX-512 VBMI), which "
                f"target {target_name!r} lacks; lower the reference for this target "
                f"(pqcompile.lower.lower(reference, target={target_name!r}), or "
                f"compiled.retarget({target_name!r}))")
    lowered = str(attrs[KERNEL_ISA_ATTR]) if attrs is not None and KERNEL_ISA_ATTR in attrs \
        else None
    if lowered is None or lowered not in _RUNS_ON:
        return
    has = isa_for(target).name
    if has not in _RUNS_ON[lowered]:
        raise ValueError(
            f"this module was lowered with {lowered!r} kernels, which target {target_name!r} "
            f"({has!r} kernels) cannot run; lower the reference for this target "
            f"(pqcompile.lower.lower(reference, target={target_name!r}), or "
            f"compiled.retarget({target_name!r}))")
