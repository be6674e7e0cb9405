"""Compilation targets as data, their registry, and running code for other CPUs under qemu.

>>> from pqcompile.targets import get_target
>>> spec = get_target("arm-dotprod")
>>> spec.arch, spec.capabilities.supports_dotprod
('aarch64', True)
>>> get_target("riscv/sifive-u74").arch      # any TVM tag works as a name
'riscv64'
"""

from .base import (
    ARCHES,
    ArchInfo,
    Capabilities,
    TargetSpec,
    ToolchainError,
    UnknownTargetError,
    default_channel_multiple,
    elf_arch,
    host_arch,
)
from .emulator import EmulatorError, Sysroot, find_sysroot, run_python, run_vm
from .registry import get_target, list_targets, register_target, unregister_target

__all__ = [
    "ARCHES", "ArchInfo", "Capabilities", "EmulatorError", "Sysroot", "TargetSpec",
    "ToolchainError", "UnknownTargetError", "default_channel_multiple", "elf_arch",
    "find_sysroot", "get_target", "host_arch", "list_targets", "register_target", "run_python",
    "run_vm", "unregister_target",
]
