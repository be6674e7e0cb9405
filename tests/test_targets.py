"""Target specs and registry: built-ins, TVM tags, custom targets, export and toolchain errors."""

import json
import os

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R
from tvm.target import codegen

from pqcompile.targets import (ARCHES, Capabilities, TargetSpec, ToolchainError, elf_arch,
                               get_target, host_arch, list_targets, register_target, run_vm,
                               unregister_target)
from pqcompile.targets.registry import _tvm_tags

BUILTINS = ("host", "arm", "arm-dotprod")


@tvm.script.ir_module
class AddOne:
    @R.function
    def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
        return R.add(x, R.const(1.0, "float32"))


@pytest.fixture
def a55():
    """A user target registered for one test and removed afterwards."""
    spec = TargetSpec(
        name="test-cortex-a55", description="Cortex-A55 board",
        tvm_config={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
                    "mattr": ["+neon", "+dotprod"], "num-cores": 8},
        arch="aarch64", cross_compiler="aarch64-linux-gnu-gcc", emulator="qemu-aarch64",
        capabilities=Capabilities(simd_bits=128, supports_dotprod=True, weight_bits=(4, 8)))
    register_target(spec)
    yield spec
    unregister_target(spec.name)


def test_builtins_are_listed_and_build_tvm_targets():
    assert set(BUILTINS) <= set(list_targets())
    assert list_targets() == sorted(list_targets())
    for name in BUILTINS:
        spec = get_target(name)
        target = spec.tvm_target()
        assert isinstance(target, tvm.target.Target)
        assert target.kind.name == "llvm"
        assert spec.name == name and spec.description


def test_host_target_names_the_detected_cpu():
    spec = get_target("host")
    attrs = spec.tvm_target().attrs
    assert attrs["mcpu"] == str(codegen.llvm_get_system_cpu()) != "native"
    assert int(attrs["num-cores"]) == len(os.sched_getaffinity(0))
    assert spec.arch == host_arch() and spec.cross_compiler is None and spec.emulator is None
    assert spec.capabilities.simd_bits >= 128


@pytest.mark.parametrize("name, mcpu, dotprod", [("arm", "cortex-a72", False),
                                                 ("arm-dotprod", "cortex-a76", True)])
def test_arm_builtins(name, mcpu, dotprod):
    spec = get_target(name)
    target = spec.tvm_target()
    assert target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert target.attrs["mcpu"] == mcpu
    assert "arm_cpu" in target.keys
    assert bool(target.attrs["feature.has_dotprod"]) is dotprod
    assert (spec.arch, spec.cross_compiler, spec.emulator) == (
        "aarch64", "aarch64-linux-gnu-gcc", "qemu-aarch64")
    assert spec.capabilities.supports_dotprod is dotprod
    assert spec.capabilities.simd_bits == 128
    assert spec.capabilities.weight_bits == (2, 4, 8)


@pytest.mark.parametrize("name", BUILTINS)
def test_declared_capabilities_match_llvm(name):
    spec = get_target(name)
    derived = Capabilities.from_tvm_target(spec.tvm_target())
    assert derived == spec.capabilities


@pytest.mark.parametrize("tag, arch, cc, simd, dotprod", [
    ("arm/rasp4b64", "aarch64", "aarch64-linux-gnu-gcc", 128, False),
    ("raspberry-pi/4b-aarch64", "aarch64", "aarch64-linux-gnu-gcc", 128, False),
    ("arm/rk3399", "aarch64", "aarch64-linux-gnu-gcc", 128, False),
    ("riscv/sifive-u74", "riscv64", "riscv64-linux-gnu-gcc", 0, False),
    ("nvidia/jetson-agx-orin-64gb", "aarch64", "aarch64-linux-gnu-gcc", 128, True),
    ("arm/rasp3b", "armv7", "arm-linux-gnueabihf-gcc", 128, False),
])
def test_tvm_tags_resolve_with_arch_and_toolchain(tag, arch, cc, simd, dotprod):
    spec = get_target(tag)
    assert (spec.arch, spec.cross_compiler, spec.emulator) == (arch, cc, ARCHES[arch].emulator)
    assert spec.capabilities.simd_bits == simd
    assert spec.capabilities.supports_dotprod is dotprod
    assert spec.tvm_config == tag
    assert str(spec.tvm_target()) == str(tvm.target.Target(tag))
    assert get_target(tag) is spec  # cached
    assert tag in list_targets(include_tvm_tags=True)
    assert tag not in list_targets()


def test_every_tvm_cpu_tag_resolves_or_names_its_architecture():
    tags = _tvm_tags()
    assert len(tags) > 200
    resolved = 0
    for name, target in tags.items():
        try:
            spec = get_target(name)
        except ValueError as err:
            assert "no architecture in pqcompile.targets.ARCHES" in str(err)
            assert target.attrs["mtriple"].startswith("riscv32")  # microcontrollers only
            continue
        resolved += 1
        assert spec.arch in ARCHES
    assert resolved >= len(tags) - 3


def test_unknown_target_lists_names_and_how_to_register():
    with pytest.raises(ValueError) as info:
        get_target("arm/rasp4")
    message = str(info.value)
    for expected in ("'arm/rasp4'", "arm, arm-dotprod, host", "arm/rasp4b64", "TVM tags: ",
                     "register_target(TargetSpec(", "Did you mean"):
        assert expected in message
    assert f"TVM tags: {len(_tvm_tags())}" in message


def test_get_target_type_errors_and_passthrough(a55):
    assert get_target(a55) is a55
    with pytest.raises(TypeError, match="target name or a TargetSpec"):
        get_target(3)


def test_register_custom_target(a55):
    assert get_target("test-cortex-a55") is a55
    assert "test-cortex-a55" in list_targets()
    target = a55.tvm_target()
    assert target.attrs["mcpu"] == "cortex-a55"
    assert bool(target.attrs["feature.has_dotprod"])
    assert a55.capabilities.weight_bits == (4, 8)
    with pytest.raises(ValueError, match="already registered"):
        register_target(a55)
    replaced = TargetSpec.from_dict({**a55.to_dict(), "description": "replaced"})
    assert register_target(replaced, override=True) is get_target("test-cortex-a55")
    assert get_target("test-cortex-a55").description == "replaced"


def test_register_rejects_what_tvm_rejects():
    bad = TargetSpec(name="test-bad", description="", arch="aarch64",
                     tvm_config={"kind": "llvm", "mcpu": "cortex-a72", "no-such-option": 1})
    with pytest.raises(ValueError, match="TVM rejects the tvm_config of target 'test-bad'"):
        register_target(bad)
    assert "test-bad" not in list_targets()
    with pytest.raises(TypeError, match="takes a TargetSpec"):
        register_target({"name": "x"})


def test_unregistering_a_builtin_restores_it():
    original = get_target("arm")
    register_target(TargetSpec.from_tvm("arm/rk3399", name="arm"), override=True)
    assert get_target("arm").tvm_config == "arm/rk3399"
    unregister_target("arm")
    assert get_target("arm") == original
    with pytest.raises(ValueError, match="is not registered"):
        unregister_target("never-registered")


def test_spec_validation_messages():
    base = {"name": "t", "description": "", "tvm_config": {"kind": "llvm"}, "arch": "x86_64"}
    with pytest.raises(ValueError, match="unknown arch 'mips'; known: x86_64, aarch64"):
        TargetSpec(**{**base, "arch": "mips"})
    with pytest.raises(ValueError, match="CLI target string"):
        TargetSpec(**{**base, "tvm_config": "llvm -mcpu=native"})
    with pytest.raises(ValueError, match="needs a 'kind'"):
        TargetSpec(**{**base, "tvm_config": {"mcpu": "cortex-a72"}})
    with pytest.raises(TypeError, match="capabilities must be a Capabilities"):
        TargetSpec(**base, capabilities={"simd_bits": 128})
    with pytest.raises(ValueError, match="weight_bits must be non-empty ints in 1..8"):
        Capabilities(weight_bits=(3, 16))
    with pytest.raises(TypeError, match="simd_bits must be an int"):
        Capabilities(simd_bits=128.0)
    with pytest.raises(TypeError, match="supports_dotprod must be a bool"):
        Capabilities(supports_dotprod="yes")
    assert Capabilities(weight_bits=[8, 4, 4]).weight_bits == (4, 8)


def test_spec_is_frozen_hashable_and_round_trips_json(a55):
    with pytest.raises(AttributeError):
        a55.name = "other"
    data = json.loads(json.dumps(a55.to_dict()))
    assert data["version"] == 1 and data["tvm_config"]["mattr"] == ["+neon", "+dotprod"]
    again = TargetSpec.from_dict(data)
    assert again == a55 and hash(again) == hash(a55)
    assert len({a55, again, get_target("arm")}) == 2
    with pytest.raises(ValueError, match="version 99"):
        TargetSpec.from_dict({**data, "version": 99})


def test_from_tvm_derives_everything_from_a_json_dict():
    spec = TargetSpec.from_tvm({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                "mcpu": "neoverse-n2", "mattr": ["+neon", "+i8mm", "+dotprod"]},
                               name="n2")
    assert (spec.name, spec.arch, spec.cross_compiler) == ("n2", "aarch64",
                                                          "aarch64-linux-gnu-gcc")
    assert spec.capabilities.supports_i8mm and spec.capabilities.supports_dotprod
    assert spec.capabilities.simd_bits == 128


def test_export_for_host_runs_and_is_native_elf(tmp_path):
    spec = get_target("host")
    lib = spec.export(tvm.compile(AddOne, spec.tvm_target()), tmp_path / "add.so")
    assert elf_arch(lib) == host_arch()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x + 1)
    # The same runner that serves emulated targets runs natively for the host's arch.
    (out,) = run_vm(lib, [x], arch=host_arch())
    np.testing.assert_array_equal(out, x + 1)


def test_export_tar_needs_no_linker(tmp_path):
    spec = TargetSpec.from_dict({**get_target("arm").to_dict(), "cross_compiler": "no-such-gcc"})
    out = spec.export(tvm.compile(AddOne, spec.tvm_target()), tmp_path / "add.tar")
    assert out.stat().st_size > 0


def test_missing_cross_compiler_names_the_debian_package(tmp_path):
    arm = get_target("arm")
    spec = TargetSpec.from_dict({**arm.to_dict(), "name": "test-no-cc",
                                 "cross_compiler": "aarch64-nonexistent-linux-gnu-gcc"})
    executable = tvm.compile(AddOne, spec.tvm_target())
    with pytest.raises(ToolchainError) as info:
        spec.export(executable, tmp_path / "add.so")
    message = str(info.value)
    assert "'aarch64-nonexistent-linux-gnu-gcc'" in message
    assert "apt-get install -y gcc-aarch64-linux-gnu" in message
    assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / "add.so").exists()


def test_foreign_arch_without_cross_compiler_is_refused(tmp_path):
    spec = get_target("apple/m2-gpu")  # aarch64 host part, but not a Linux triple
    assert spec.arch == "aarch64" and spec.cross_compiler is None
    with pytest.raises(ToolchainError, match="names no cross compiler"):
        spec.find_cross_compiler()


def test_export_rejects_non_artifacts(tmp_path):
    with pytest.raises(TypeError, match="result of tvm.compile"):
        get_target("host").export(AddOne, tmp_path / "x.so")


def test_elf_arch_rejects_non_elf(tmp_path):
    path = tmp_path / "x.so"
    path.write_bytes(b"not an elf file at all")
    with pytest.raises(ValueError, match="not an ELF file"):
        elf_arch(path)


def test_host_target_turns_sse4a_off_where_the_cpu_has_it():
    """AMD's SSE4a byte inserts are microcoded on recent cores (a depthwise kernel ran 20x
    slower with them): the host target asks LLVM not to use them, and only where the CPU
    has them."""
    import tvm
    from tvm.target import codegen

    from pqcompile.targets import get_target

    config = dict(get_target("host").tvm_config)
    bare = {k: v for k, v in config.items() if k != "mattr"}
    has = "sse4a" in set(codegen.llvm_get_cpu_features(tvm.target.Target(bare)))
    assert ("-sse4a" in config.get("mattr", [])) == has
    assert "sse4a" not in set(codegen.llvm_get_cpu_features(get_target("host").tvm_target()))
