"""CPU architectures and what a target's hardware offers: toolchains, SIMD width, dot products.

:data:`ARCHES` holds, per architecture, the Debian cross compiler and emulator and the ELF and
LLVM names that identify it; :class:`Capabilities` what the compression passes plan against
(SIMD width, int8 dot products, packable weight bits, the channel granule pruning rounds to),
derived from the CPU features LLVM reports (:meth:`Capabilities.from_tvm_target`). Both are
read by :class:`~pqcompile.targets.base.TargetSpec`.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

_VALID_WEIGHT_BITS = frozenset(range(1, 9))


@dataclass(frozen=True)
class ArchInfo:
    """How pqcompile builds for and runs on one CPU architecture (Debian toolchain names)."""

    name: str
    triple_prefixes: tuple[str, ...]  # first component of an LLVM triple naming this arch
    cross_compiler: str
    cross_compiler_package: str
    libc_dev_package: str  # the cross libc that links against; only "recommended" by the gcc
    emulator: str
    emulator_package: str
    elf_machine: int  # ELF header e_machine


ARCHES: Mapping[str, ArchInfo] = MappingProxyType({
    info.name: info for info in (
        ArchInfo("x86_64", ("x86_64", "amd64"), "x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu",
                 "libc6-dev-amd64-cross", "qemu-x86_64", "qemu-user", 62),
        ArchInfo("aarch64", ("aarch64", "arm64"), "aarch64-linux-gnu-gcc",
                 "gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-aarch64", "qemu-user",
                 183),
        ArchInfo("riscv64", ("riscv64",), "riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu",
                 "libc6-dev-riscv64-cross", "qemu-riscv64", "qemu-user", 243),
        ArchInfo("armv7", ("armv7", "armv7l", "armv7a", "armv8l", "arm"),
                 "arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross",
                 "qemu-arm", "qemu-user", 40),
    )
})

# LLVM feature -> SIMD register width in bits; a target's width is the largest it has.
_SIMD_FEATURE_BITS = {
    "sse2": 128, "avx": 256, "avx2": 256, "avx512f": 512,
    "neon": 128, "sve": 128,
    "v": 128, "zvl128b": 128, "zvl256b": 256, "zvl512b": 512, "zvl1024b": 1024,
}
# LLVM features giving int8 dot products (4 x int8 -> int32 per lane) / int8 matrix multiply.
_DOTPROD_FEATURES = ("dotprod", "avxvnni", "avx512vnni")
_I8MM_FEATURES = ("i8mm",)
# LLVM features whose int8 conv kernels vectorize over pixels, not channels (x86 AVX-512, and
# AVX2: its kernels take the sdot layout's 4-channel words, pqcompile.lower.kernel_types).
_PIXEL_VECTOR_FEATURES = ("avx512f", "avx2")
_MAX_CHANNEL_MULTIPLE = 16


def default_channel_multiple(simd_bits: int, pixel_vectors: bool) -> int:
    """The granule pruning rounds kept channels to, from the SIMD width.

    ``pixel_vectors``: the target's int8 conv kernels vectorize over output pixels (int8 dot
    products: Arm ``sdot``, x86 VNNI; and x86 AVX-512 and AVX2), taking input channels as 4-channel
    words (4 int8 per dot-product step) and output channels in tiles of 4
    (:mod:`pqcompile.lower.kernels`): a kept count off a multiple of 4 is zero-padded to it and
    costs as much, and a coarser granule saves nothing. Elsewhere the widening multiply-adds
    accumulate one int32 per vector lane, ``simd_bits / 32`` channels a register (4 on 128-bit
    NEON/SSE, 8 on 256-bit vectors), clamped to 1..16: 1 without SIMD (scalar code pads nothing), at
    most 16 so wide vector units (RISC-V ``zvl1024b``) do not forbid pruning small layers.

    >>> default_channel_multiple(128, False), default_channel_multiple(256, False)
    (4, 8)
    >>> default_channel_multiple(512, True), default_channel_multiple(0, False)
    (4, 1)
    """
    if pixel_vectors:
        return 4
    return min(max(simd_bits // 32, 1), _MAX_CHANNEL_MULTIPLE)


def arch_from_triple(triple: str) -> str:
    """Map an LLVM target triple (``aarch64-linux-gnu``) to a name in :data:`ARCHES`.

    >>> arch_from_triple("riscv64-unknown-linux-gnu")
    'riscv64'
    """
    prefix = triple.split("-", 1)[0].lower()
    for info in ARCHES.values():
        if prefix in info.triple_prefixes:
            return info.name
    raise ValueError(f"no architecture in pqcompile.targets.ARCHES matches triple {triple!r} "
                     f"(known: {', '.join(ARCHES)}); add an ArchInfo entry for it")


def host_arch() -> str:
    """The architecture of the machine running pqcompile, as a key of :data:`ARCHES`."""
    return arch_from_triple(platform.machine())


def elf_arch(path: str | Path) -> str:
    """Read the architecture an ELF file (shared library, executable) was built for.

    Raises ``ValueError`` for a file that is not ELF or an e_machine unknown to :data:`ARCHES`.
    """
    header = Path(path).read_bytes()[:20]
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    for info in ARCHES.values():
        if info.elf_machine == machine:
            return info.name
    raise ValueError(f"{path}: ELF e_machine {machine} is not in pqcompile.targets.ARCHES")


@dataclass(frozen=True)
class Capabilities:
    """What the target hardware offers the compression passes.

    ``weight_bits`` are the weight bit-widths the lowering can pack for this target;
    ``supports_int8`` says int8 x int8 -> int32 arithmetic is worth using at all;
    ``channel_multiple`` is the granule pruning rounds kept channels to (``compile``'s default
    ``multiple``); left out, it follows :func:`default_channel_multiple` (4 with int8 dot
    products, else ``simd_bits / 32`` clamped to 1..16).
    """

    simd_bits: int = 128
    supports_dotprod: bool = False
    supports_i8mm: bool = False
    weight_bits: tuple[int, ...] = (2, 4, 8)
    supports_int8: bool = True
    channel_multiple: int | None = None  # None: derived; always an int once constructed

    def __post_init__(self) -> None:
        if isinstance(self.simd_bits, bool) or not isinstance(self.simd_bits, int):
            raise TypeError(f"simd_bits must be an int, got {type(self.simd_bits).__name__}")
        if self.simd_bits < 0 or self.simd_bits % 8:
            raise ValueError(f"simd_bits must be a non-negative multiple of 8, got "
                             f"{self.simd_bits}")
        for flag in ("supports_dotprod", "supports_i8mm", "supports_int8"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if isinstance(self.weight_bits, (str, bytes)) or not hasattr(self.weight_bits, "__iter__"):
            raise TypeError(f"weight_bits must be a sequence of ints, got {self.weight_bits!r}")
        bits = tuple(self.weight_bits)
        if not bits or any(isinstance(b, bool) or b not in _VALID_WEIGHT_BITS for b in bits):
            raise ValueError(f"weight_bits must be non-empty ints in 1..8, got {bits}")
        object.__setattr__(self, "weight_bits", tuple(sorted(set(bits))))
        multiple = self.channel_multiple
        if multiple is None:
            multiple = default_channel_multiple(self.simd_bits, self.supports_dotprod)
        elif isinstance(multiple, bool) or not isinstance(multiple, int):
            raise TypeError(f"channel_multiple must be an int (channels; None: derived from "
                            f"simd_bits), got {type(multiple).__name__} {multiple!r}")
        elif not 1 <= multiple <= 64:
            raise ValueError(f"channel_multiple must be in 1..64 (the granule kept channels are "
                             f"rounded to; 1: no rounding), got {multiple}")
        object.__setattr__(self, "channel_multiple", multiple)

    @classmethod
    def from_tvm_target(cls, target: Any) -> Capabilities:
        """Derive capabilities from the CPU features LLVM reports for a ``tvm.target.Target``.

        For a GPU or accelerator target the CPU part is its host.
        """
        from tvm.target import codegen

        cpu = _cpu_part(target)
        features = codegen.llvm_get_cpu_features(cpu) if cpu is not None else set()
        widths = [bits for feat, bits in _SIMD_FEATURE_BITS.items() if feat in features]
        simd = max(widths, default=0)
        dotprod = any(f in features for f in _DOTPROD_FEATURES)
        pixel_vectors = dotprod or any(f in features for f in _PIXEL_VECTOR_FEATURES)
        return cls(simd_bits=simd, supports_dotprod=dotprod,
                   supports_i8mm=any(f in features for f in _I8MM_FEATURES),
                   channel_multiple=default_channel_multiple(simd, pixel_vectors))


def _cpu_part(target: Any) -> Any:
    """The LLVM (CPU) part of a TVM target: itself, its host, or ``None``."""
    if target.kind.name == "llvm":
        return target
    host = target.host
    return host if host is not None and host.kind.name == "llvm" else None
