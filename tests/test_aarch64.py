"""Real aarch64 execution under qemu-user, and RISC-V cross-linking.

The session fixture runs ``scripts/build_aarch64_sysroot.sh`` (a no-op when the sysroot is
cached), so plain ``pytest`` works on a fresh Debian/Ubuntu machine with root. Nothing here skips:
a missing toolchain fails with the command that installs it.
"""

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from pqcompile.targets import (EmulatorError, elf_arch, find_sysroot, get_target, run_python,
                               run_vm)




@tvm.script.ir_module
class Int8ConvThenFloat:
    """int8 NHWC conv accumulating in int32, then float32 requantize-like scaling and softmax."""

    @R.function
    def main(x: R.Tensor((1, 10, 10, 16), "int8"), w: R.Tensor((3, 3, 16, 32), "int8"),
             scale: R.Tensor((32,), "float32")):
        with R.dataflow():
            acc = R.nn.conv2d(x, w, padding=(1, 1), data_layout="NHWC", kernel_layout="HWIO",
                              out_dtype="int32")
            y = R.nn.relu(R.multiply(R.astype(acc, "float32"), scale))
            p = R.nn.softmax(R.mean(y, axis=[1, 2]), axis=-1)
            out = (acc, y, p)
            R.output(out)
        return out


def _inputs():
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, size=(1, 10, 10, 16), dtype=np.int8)
    w = rng.integers(-128, 128, size=(3, 3, 16, 32), dtype=np.int8)
    scale = rng.uniform(1e-5, 1e-4, size=(32,)).astype(np.float32)
    return [x, w, scale]


def _conv_reference(x, w):
    """NHWC x HWIO int8 conv, stride 1, pad 1, exact in int64."""
    padded = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    return np.einsum("nhwcij,ijco->nhwo", windows, w.astype(np.int64))


def _run_on_host(executable, inputs):
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return [o.numpy() for o in vm["main"](*[tvm.runtime.tensor(a) for a in inputs])]


@pytest.fixture(scope="module")
def host_outputs():
    spec = get_target("host")
    return _run_on_host(tvm.compile(Int8ConvThenFloat, spec.tvm_target()), _inputs())


@pytest.fixture(scope="module")
def arm_libs(sysroot, tmp_path_factory):
    """Libraries for both aarch64 built-ins, cross-linked with aarch64-linux-gnu-gcc."""
    out = tmp_path_factory.mktemp("arm")
    libs = {}
    for name in ("arm", "arm-dotprod"):
        spec = get_target(name)
        libs[name] = spec.export(tvm.compile(Int8ConvThenFloat, spec.tvm_target()),
                                 out / f"{name}.so")
    return libs


def test_host_outputs_match_numpy(host_outputs):
    x, w, scale = _inputs()
    reference = _conv_reference(x, w)
    acc, y, p = host_outputs
    assert acc.dtype == np.int32 and np.abs(reference).max() < 2**31
    np.testing.assert_array_equal(acc, reference)
    np.testing.assert_allclose(y, np.maximum(reference * scale.astype(np.float64), 0), rtol=1e-6)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)


def test_emulator_runs_aarch64_python(sysroot, tmp_path):
    script = tmp_path / "arch.py"
    script.write_text("import platform, sys\nprint(platform.machine(), sys.argv[1])\n")
    assert run_python(script, ["hello"], cwd=tmp_path).split() == ["aarch64", "hello"]


def test_emulator_failure_carries_stderr(sysroot, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("raise SystemExit('deliberate failure 42')\n")
    with pytest.raises(EmulatorError, match="deliberate failure 42") as info:
        run_python(script)
    assert isinstance(info.value, RuntimeError)


def test_missing_sysroot_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PQCOMPILE_AARCH64_SYSROOT", str(tmp_path / "nowhere"))
    with pytest.raises(EmulatorError, match=r"build_aarch64_sysroot\.sh .*nowhere"):
        find_sysroot()


@pytest.mark.parametrize("name", ["arm", "arm-dotprod"])
def test_aarch64_matches_host_and_numpy(name, arm_libs, host_outputs):
    lib = arm_libs[name]
    assert elf_arch(lib) == "aarch64"
    outputs = run_vm(lib, _inputs(), arch="aarch64")
    assert [o.dtype for o in outputs] == [np.int32, np.float32, np.float32]
    acc, y, p = outputs
    x, w, _ = _inputs()
    np.testing.assert_array_equal(acc, host_outputs[0])  # bit-exact integer path
    np.testing.assert_array_equal(acc, _conv_reference(x, w))
    np.testing.assert_allclose(y, host_outputs[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(p, host_outputs[2], rtol=0, atol=1e-5)
    assert float(np.abs(y).max()) > 1.0  # the float path carries real values


def test_dotprod_target_emits_sdot(arm_libs):
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.fail("aarch64-linux-gnu-objdump missing: apt-get install -y "
                    "binutils-aarch64-linux-gnu")

    def count_sdot(lib):
        text = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True,
                              check=True).stdout
        return sum("\tsdot\t" in line for line in text.splitlines())

    assert count_sdot(arm_libs["arm-dotprod"]) > 0
    assert count_sdot(arm_libs["arm"]) == 0


def test_riscv64_cross_link(sysroot, tmp_path):
    spec = get_target("riscv/sifive-u74")
    lib = spec.export(tvm.compile(Int8ConvThenFloat, spec.tvm_target()), tmp_path / "rv.so")
    header = lib.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit ELF
    assert elf_arch(lib) == "riscv64"
    if shutil.which("file"):
        assert "RISC-V" in subprocess.run(["file", str(lib)], capture_output=True, text=True,
                                          check=True).stdout
