"""Name -> :class:`TargetSpec` registry: pqcompile's built-ins, user targets and TVM's tags.

Lookup order: targets registered here (built-ins ``host``, ``arm``, ``arm-dotprod`` and anything
added with :func:`register_target`), then any tag TVM registers (``arm/rasp4b64``,
``raspberry-pi/4b-aarch64``, ``riscv/sifive-u74``, ...), whose spec is derived from the tag.

>>> get_target("arm").arch
'aarch64'
>>> get_target("arm/rasp4b64").cross_compiler
'aarch64-linux-gnu-gcc'
>>> "arm-dotprod" in list_targets()
True
"""

from __future__ import annotations

import difflib
import os
import threading
from typing import Any

from .base import ARCHES, Capabilities, TargetSpec, UnknownTargetError, host_arch

__all__ = ["get_target", "list_targets", "register_target", "unregister_target"]

_LOCK = threading.Lock()
_REGISTRY: dict[str, TargetSpec] = {}
_TAG_SPECS: dict[str, TargetSpec] = {}
_BUILTINS_LOADED = False
_BUILTIN_NAMES = ("host", "arm", "arm-dotprod")


def _host_spec() -> TargetSpec:
    import tvm
    from tvm.target import codegen

    try:
        cores = len(os.sched_getaffinity(0))  # the CPUs this process may use (containers)
    except AttributeError:
        cores = os.cpu_count() or 1
    # TVM 0.27 rejects mcpu="native": ask LLVM which CPU this is instead.
    config = {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": cores}
    if "sse4a" in set(codegen.llvm_get_cpu_features(tvm.target.Target(config))):
        # AMD's SSE4a byte inserts (insertq/extrq) are microcoded on recent cores: LLVM picked
        # them for a shuffle that repeats one byte, and a depthwise kernel ran 20x slower
        config["mattr"] = ["-sse4a"]
    arch = host_arch()
    return TargetSpec(
        name="host", description=f"this machine: {arch} {config['mcpu']}, {cores} cores",
        tvm_config=config, arch=arch,
        capabilities=Capabilities.from_tvm_target(tvm.target.Target(config)))


def _arm(mcpu: str, mattr: list[str], caps: Capabilities, name: str, about: str) -> TargetSpec:
    info = ARCHES["aarch64"]
    return TargetSpec(
        name=name, description=about,
        tvm_config={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu,
                    "mattr": mattr, "num-cores": 4},
        arch="aarch64", cross_compiler=info.cross_compiler, emulator=info.emulator,
        capabilities=caps)


def _builtin_specs() -> list[TargetSpec]:
    return [
        _host_spec(),
        # channel_multiple 4 (see default_channel_multiple): 128-bit NEON holds 4 int32
        # accumulators; the sdot kernels take 4-channel words and tile 4 output channels.
        _arm("cortex-a72", ["+neon"], Capabilities(simd_bits=128, channel_multiple=4), "arm",
             "64-bit Arm Linux, Armv8-a NEON (Cortex-A72 class: Raspberry Pi 4, RK3399)"),
        _arm("cortex-a76", ["+neon", "+dotprod"],
             Capabilities(simd_bits=128, supports_dotprod=True, channel_multiple=4),
             "arm-dotprod",
             "64-bit Arm Linux, Armv8.2-a NEON + SDOT/UDOT (Cortex-A76 class: Raspberry Pi 5)"),
    ]


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    with _LOCK:
        if not _BUILTINS_LOADED:
            for spec in _builtin_specs():
                _REGISTRY.setdefault(spec.name, spec)
            _BUILTINS_LOADED = True


def _tvm_tags() -> dict[str, Any]:
    from tvm.target import list_tags

    tags = list_tags()  # None in a runtime-only TVM build
    return {str(name): target for name, target in (tags or {}).items()}


def register_target(spec: TargetSpec, *, override: bool = False) -> TargetSpec:
    """Add ``spec`` under ``spec.name``; checks that TVM accepts its target first.

    Set ``override=True`` to replace a registered target (built-ins included). A name that
    is also a TVM tag shadows the tag.

    >>> from pqcompile.targets import Capabilities, TargetSpec
    >>> spec = register_target(TargetSpec(
    ...     name="doc-a55", description="Cortex-A55",
    ...     tvm_config={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
    ...                 "mattr": ["+neon", "+dotprod"]},
    ...     arch="aarch64", cross_compiler="aarch64-linux-gnu-gcc", emulator="qemu-aarch64",
    ...     capabilities=Capabilities(supports_dotprod=True)))
    >>> get_target("doc-a55") is spec
    True
    >>> unregister_target("doc-a55")
    """
    if not isinstance(spec, TargetSpec):
        raise TypeError(f"register_target takes a TargetSpec, got {type(spec).__name__}")
    _ensure_builtins()
    try:
        spec.tvm_target()
    except Exception as err:  # TVM reports bad configs with several exception types
        raise ValueError(f"TVM rejects the tvm_config of target {spec.name!r}: {err}") from err
    with _LOCK:
        if spec.name in _REGISTRY and not override:
            raise ValueError(f"target {spec.name!r} is already registered; pass override=True "
                             f"to replace it, or pick another name")
        _REGISTRY[spec.name] = spec
    return spec


def unregister_target(name: str) -> None:
    """Remove a target added with :func:`register_target`.

    Removing a built-in name (``host``, ``arm``, ``arm-dotprod``) restores its default spec.
    """
    _ensure_builtins()
    with _LOCK:
        if name not in _REGISTRY:
            raise ValueError(f"target {name!r} is not registered; registered: "
                             f"{', '.join(sorted(_REGISTRY))}")
        del _REGISTRY[name]
        if name in _BUILTIN_NAMES:
            global _BUILTINS_LOADED
            _BUILTINS_LOADED = False


def list_targets(*, include_tvm_tags: bool = False) -> list[str]:
    """Sorted names accepted by :func:`get_target`; TVM's tags only when asked for."""
    _ensure_builtins()
    names = set(_REGISTRY)
    if include_tvm_tags:
        names.update(_tvm_tags())
    return sorted(names)


def get_target(name: str | TargetSpec) -> TargetSpec:
    """Look up a target by pqcompile name or TVM tag; a ``TargetSpec`` is returned as is.
    pqcompile's names match in any case, and ``aarch64``/``arm64`` name ``arm``.

    Raises :class:`UnknownTargetError` (a ``ValueError``) for an unknown name, listing the
    known ones and how to add one.
    """
    if isinstance(name, TargetSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"get_target takes a target name or a TargetSpec, got "
                        f"{type(name).__name__}")
    _ensure_builtins()
    spec = _REGISTRY.get(name) or _TAG_SPECS.get(name)
    if spec is not None:
        return spec
    alias = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if alias in _REGISTRY:  # "ARM", "aarch64", "arm64", " host"
        return _REGISTRY[alias]
    if name.strip().lower() in _GPU_KINDS:
        raise UnknownTargetError(
            f"target {name!r}: pqcompile builds integer programs for CPUs only (Arm and x86 "
            f"kernels); GPU targets are not supported. Use one of {', '.join(sorted(_REGISTRY))} "
            f"or a TVM CPU tag (pqcompile.targets.list_targets(include_tvm_tags=True))")
    tags = _tvm_tags()
    if name in tags:
        spec = TargetSpec.from_tvm(name, name=name, description=f"TVM tag {name}")
        with _LOCK:
            return _TAG_SPECS.setdefault(name, spec)
    raise UnknownTargetError(_unknown_message(name, tags))


# Other names for built-in targets (matched lower-cased): the architecture names users type.
_ALIASES = {"aarch64": "arm", "arm64": "arm", "armv8": "arm", "armv8-a": "arm"}
_GPU_KINDS = ("cuda", "gpu", "nvidia", "rocm", "opencl", "vulkan", "metal", "webgpu")


def _unknown_message(name: str, tags: dict[str, Any]) -> str:
    ours = sorted(_REGISTRY)
    cpu_tags = sorted(n for n, t in tags.items() if t.kind.name == "llvm")
    lowered = {n.lower(): n for n in ours + sorted(tags)}
    close = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=3,
                                                            cutoff=0.6)]
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (
        f"unknown target {name!r}.{hint}\n"
        f"  pqcompile targets: {', '.join(ours)}\n"
        f"  TVM tags: {len(tags)}, of which {len(cpu_tags)} CPU tags: "
        f"{', '.join(cpu_tags[:12])}{', ...' if len(cpu_tags) > 12 else ''}; "
        f"all: pqcompile.targets.list_targets(include_tvm_tags=True)\n"
        f"  To add one: pqcompile.targets.register_target(TargetSpec(name={name!r}, "
        f"description=..., tvm_config={{'kind': 'llvm', 'mtriple': 'aarch64-linux-gnu', "
        f"'mcpu': ...}}, arch='aarch64', cross_compiler='aarch64-linux-gnu-gcc')), or "
        f"TargetSpec.from_tvm(tvm_json_or_tag, name={name!r})")
