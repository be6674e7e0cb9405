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
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import PQCompileError
from .arch import (
    ARCHES,
    ArchInfo,
    Capabilities,
    _cpu_part,
    arch_from_triple,
    default_channel_multiple,
    elf_arch,
    host_arch,
)

__all__ = [
    "ARCHES", "ArchInfo", "Capabilities", "TargetSpec", "ToolchainError", "UnknownTargetError",
    "default_channel_multiple", "elf_arch", "host_arch",
]

SPEC_VERSION = 1


class ToolchainError(PQCompileError, RuntimeError):
    """A host tool (cross compiler, emulator) needed for this target is missing or failed."""


class UnknownTargetError(PQCompileError, ValueError):
    """No registered target or TVM tag has this name; the message lists the known ones and how
    to register a target."""


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
