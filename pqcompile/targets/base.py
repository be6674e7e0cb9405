"""Compilation targets as data: what to ask TVM for, how to link, what the hardware can do.

A :class:`TargetSpec` bundles the TVM target (a JSON dict or a TVM tag name), the CPU
architecture, the cross compiler that links the exported library, the emulator that can run it,
and the :class:`Capabilities` the compression passes plan against. Behaviour that differs per
architecture is looked up in :data:`ARCHES`, never branched on per target.

>>> spec = TargetSpec(
...     name="cortex-a55",
...     description="Arm Cortex-A55, Armv8.2-a with dotprod",
...     tvm_config={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
...                 "mattr": ["+neon", "+dotprod"]},
...     arch="aarch64",
...     cross_compiler="aarch64-linux-gnu-gcc",
...     emulator="qemu-aarch64",
...     capabilities=Capabilities(simd_bits=128, supports_dotprod=True))
>>> spec.tvm_target().attrs["mcpu"]
'cortex-a55'
>>> TargetSpec.from_dict(spec.to_dict()) == spec
True
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import PQCompileError

__all__ = [
    "ARCHES", "ArchInfo", "Capabilities", "TargetSpec", "ToolchainError", "UnknownTargetError",
    "default_channel_multiple", "elf_arch", "host_arch",
]

SPEC_VERSION = 1
_VALID_WEIGHT_BITS = frozenset(range(1, 9))


class ToolchainError(PQCompileError, RuntimeError):
    """A host tool (cross compiler, emulator) needed for this target is missing or failed."""


class UnknownTargetError(PQCompileError, ValueError):
    """No registered target or TVM tag has this name; the message lists the known ones and how
    to register a target."""


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
# LLVM features whose int8 conv kernels vectorize over pixels, not channels (x86 AVX-512).
_PIXEL_VECTOR_FEATURES = ("avx512f",)
_MAX_CHANNEL_MULTIPLE = 16


def default_channel_multiple(simd_bits: int, pixel_vectors: bool) -> int:
    """The granule pruning rounds kept channels to, from the SIMD width.

    ``pixel_vectors``: the target's int8 conv kernels vectorize over output pixels (int8 dot
    products: Arm ``sdot``, x86 VNNI; and x86 AVX-512), taking input channels as 4-channel
    words (4 int8 per dot-product step) and output channels in tiles of 4
    (:mod:`pqcompile.lower.kernels`): a kept count off a multiple of 4 is zero-padded to it and
    costs as much, and a coarser granule saves nothing. Elsewhere the widening multiply-adds
    accumulate one int32 per vector lane, ``simd_bits / 32`` channels a register (4 on 128-bit
    NEON/SSE, 8 on AVX2), clamped to 1..16: 1 without SIMD (scalar code pads nothing), at
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


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class TargetSpec:
    """One compilation target, as data. See the module docstring for an example.

    ``tvm_config`` is a TVM target JSON dict (``{"kind": "llvm", "mcpu": ...}``) or a TVM tag
    name (``"arm/rasp4b64"``); CLI strings such as ``"llvm -mcpu=..."`` are rejected by TVM.
    ``cross_compiler`` is the gcc that links exported libraries (``None``: the host toolchain);
    ``emulator`` the qemu-user binary that runs them on this machine (``None``: native).
    """

    name: str
    description: str
    tvm_config: Mapping[str, Any] | str
    arch: str
    cross_compiler: str | None = None
    emulator: str | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)

    def __post_init__(self) -> None:
        for attr in ("name", "description"):
            if not isinstance(getattr(self, attr), str):
                raise TypeError(f"TargetSpec.{attr} must be a str, got "
                                f"{type(getattr(self, attr)).__name__}")
        if not self.name:
            raise ValueError("TargetSpec.name must not be empty")
        config = self.tvm_config
        if isinstance(config, Mapping):
            if "kind" not in config:
                raise ValueError(f"target {self.name!r}: tvm_config needs a 'kind' "
                                 f"(e.g. {{'kind': 'llvm', 'mcpu': 'cortex-a72'}}), got "
                                 f"{dict(config)}")
            object.__setattr__(self, "tvm_config", _freeze(config))
        elif not isinstance(config, str) or not config:
            raise TypeError(f"target {self.name!r}: tvm_config must be a TVM target JSON dict or "
                            f"a TVM tag name, got {config!r}")
        elif " " in config:
            raise ValueError(f"target {self.name!r}: {config!r} looks like a CLI target string, "
                             f"which TVM 0.27 rejects; pass a JSON dict such as "
                             f"{{'kind': 'llvm', 'mcpu': 'cortex-a72'}} or a tag name")
        if self.arch not in ARCHES:
            raise ValueError(f"target {self.name!r}: unknown arch {self.arch!r}; known: "
                             f"{', '.join(ARCHES)}")
        for attr in ("cross_compiler", "emulator"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"target {self.name!r}: {attr} must be an executable name or "
                                f"None, got {value!r}")
        if not isinstance(self.capabilities, Capabilities):
            raise TypeError(f"target {self.name!r}: capabilities must be a Capabilities, got "
                            f"{type(self.capabilities).__name__}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def arch_info(self) -> ArchInfo:
        """Toolchain data of this target's architecture."""
        return ARCHES[self.arch]

    def tvm_target(self) -> Any:
        """Build the ``tvm.target.Target``."""
        import tvm

        config = self.tvm_config
        return tvm.target.Target(config if isinstance(config, str) else _thaw(config))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reads it back."""
        config = self.tvm_config
        caps = self.capabilities
        return {
            "version": SPEC_VERSION, "name": self.name, "description": self.description,
            "tvm_config": config if isinstance(config, str) else _thaw(config),
            "arch": self.arch, "cross_compiler": self.cross_compiler, "emulator": self.emulator,
            "capabilities": {
                "simd_bits": caps.simd_bits, "supports_dotprod": caps.supports_dotprod,
                "supports_i8mm": caps.supports_i8mm, "weight_bits": list(caps.weight_bits),
                "supports_int8": caps.supports_int8, "channel_multiple": caps.channel_multiple,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetSpec:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        version = data.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"TargetSpec data has version {version}; this pqcompile reads "
                             f"version {SPEC_VERSION}")
        caps = Capabilities(**data.pop("capabilities", {}))
        return cls(capabilities=caps, **data)

    @classmethod
    def from_tvm(cls, config: Mapping[str, Any] | str, *, name: str | None = None,
                 description: str = "") -> TargetSpec:
        """Derive a spec from a TVM target JSON dict or tag name.

        The architecture comes from the CPU part's ``mtriple`` (LLVM's default triple when it
        has none), the cross compiler and emulator from :data:`ARCHES`, the capabilities from
        LLVM's CPU features.

        >>> TargetSpec.from_tvm("riscv/sifive-u74").cross_compiler
        'riscv64-linux-gnu-gcc'
        """
        import tvm
        from tvm.target import codegen

        frozen = config if isinstance(config, str) else _freeze(config)
        target = tvm.target.Target(config if isinstance(config, str) else _thaw(frozen))
        cpu = _cpu_part(target)
        triple = (cpu.attrs.get("mtriple") if cpu is not None else None) or \
            str(codegen.llvm_get_system_triple())
        try:
            arch = arch_from_triple(str(triple))
        except ValueError as err:
            raise ValueError(f"TVM target {config!r} runs on {triple!r}: {err}") from None
        native = arch == host_arch()
        info = ARCHES[arch]
        # The ARCHES toolchains are GNU/Linux ones: no use for e.g. arm64-apple-macos.
        linux = "linux" in str(triple)
        return cls(name=name or (config if isinstance(config, str) else str(target)),
                   description=description or f"TVM target {config}",
                   tvm_config=frozen, arch=arch,
                   cross_compiler=None if native or not linux else info.cross_compiler,
                   emulator=None if native or not linux else info.emulator,
                   capabilities=Capabilities.from_tvm_target(target))

    def find_cross_compiler(self) -> str | None:
        """Absolute path of the linker for exported libraries; ``None`` means the host default.

        Raises :class:`ToolchainError` naming the Debian package when the compiler is missing.
        """
        info = self.arch_info
        if self.cross_compiler is None:
            if self.arch == host_arch():
                return None
            raise ToolchainError(
                f"target {self.name!r} is {self.arch} but names no cross compiler; register a "
                f"TargetSpec with cross_compiler={info.cross_compiler!r} "
                f"(Debian package {info.cross_compiler_package})")
        path = shutil.which(self.cross_compiler)
        if path is None:
            raise ToolchainError(
                f"cross compiler {self.cross_compiler!r} for target {self.name!r} ({self.arch}) "
                f"is not on PATH; install it with `apt-get install -y "
                f"{info.cross_compiler_package} {info.libc_dev_package}` (Debian/Ubuntu; "
                f"scripts/build_aarch64_sysroot.sh installs the aarch64 and riscv64 ones)")
        return path

    def export(self, artifact: Any, path: str | Path) -> Path:
        """Write a compiled ``tvm.compile`` result (or ``runtime.Module``) as a library.

        ``.so`` files are linked with this target's cross compiler; ``.tar`` files hold the
        object files unlinked. Returns the path written.
        """
        if not callable(getattr(artifact, "export_library", None)):
            raise TypeError(f"export() takes the result of tvm.compile or a tvm.runtime.Module, "
                            f"got {type(artifact).__name__}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".tar":
            artifact.export_library(str(path))
            return path
        from tvm.support import cc

        compiler = self.find_cross_compiler()
        fcompile = cc.cross_compiler(compiler) if compiler is not None else None
        try:
            artifact.export_library(str(path), fcompile=fcompile)
        except RuntimeError as err:
            hint = (f"the cross libc is missing: apt-get install -y "
                    f"{self.arch_info.libc_dev_package}" if "cannot find -lc" in str(err) else
                    f"was the module compiled with get_target({self.name!r}).tvm_target()?")
            raise ToolchainError(
                f"linking {path.name} for target {self.name!r} with "
                f"{compiler or 'the host compiler'} failed; {hint}\n{err}") from err
        built = elf_arch(path)
        if built != self.arch:
            raise ToolchainError(f"{path} was linked for {built}, but target {self.name!r} is "
                                 f"{self.arch}; compile with this target's tvm_target()")
        return path
