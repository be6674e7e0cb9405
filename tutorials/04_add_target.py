"""Add a compilation target: a Cortex-A55-class aarch64 CPU with the dot-product extension.

Targets are data (``pqcompile.targets.TargetSpec``): the TVM/LLVM target to generate code for,
the CPU architecture, the cross compiler that links the library, the emulator that can run it,
and the capabilities the compression passes plan against. This tutorial

1. registers a new target with ``pqcompile.register_target`` (an LLVM target dict for an
   Armv8.2-a Cortex-A55 with ``+neon,+dotprod``);
2. compiles a small CNN for it with ``pqcompile.compile(..., target="cortex-a55")``;
3. reads the target back from the artifact's manifest and checks the library is an aarch64 ELF;
4. runs the aarch64 program under QEMU (``artifact.run_emulated``, needs the sysroot that
   ``scripts/build_aarch64_sysroot.sh`` builds) and checks it equals the host build bit for bit;
5. builds the same program for a TVM tag (``riscv/sifive-u74``, RISC-V) without registering it.

Run: python tutorials/04_add_target.py   (about 22 s; a third of it is importing TVM under QEMU)
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pqcompile
from pqcompile.targets import (
    Capabilities,
    TargetSpec,
    elf_arch,
    find_sysroot,
    get_target,
    list_targets,
)

torch.manual_seed(0)

# --- 1. Describe and register the target -------------------------------------------------------
# tvm_config is what tvm.target.Target() takes: an LLVM target with the aarch64 Linux triple.
# The cross compiler and emulator names are Debian's (pqcompile.targets.ARCHES lists them per
# architecture). Capabilities can be written by hand or derived from what LLVM knows of the CPU.
config = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
          "mattr": ["+neon", "+dotprod"], "num-cores": 4}
spec = TargetSpec(
    name="cortex-a55",
    description="Arm Cortex-A55 (Armv8.2-a, NEON + SDOT/UDOT), e.g. RK3566 / Amlogic S905X3",
    tvm_config=config,
    arch="aarch64",
    cross_compiler="aarch64-linux-gnu-gcc",
    emulator="qemu-aarch64",
    capabilities=Capabilities(simd_bits=128, supports_dotprod=True))
pqcompile.register_target(spec)  # TVM checks the config now; a typo fails here, not later
assert "cortex-a55" in list_targets()
derived = Capabilities.from_tvm_target(spec.tvm_target())  # what LLVM says about this CPU
print(f"registered {spec.name!r}: {spec.description}\n  TVM target: {spec.tvm_target()}\n"
      f"  LLVM reports for cortex-a55: SIMD {derived.simd_bits} bits, dotprod "
      f"{derived.supports_dotprod}, i8mm {derived.supports_i8mm}")
assert derived.supports_dotprod and derived.simd_bits == 128

# --- 2. Compile a model for it ---------------------------------------------------------------
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
example = torch.randn(4, 3, 16, 16)
calibration = [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)) for _ in range(4)]
# Only the build differs per target: the same compile() call, another target name.
compiled = pqcompile.compile(model, (example,), target="cortex-a55", budget="bops=20x",
                             data=calibration, pareto_points=0)
print(compiled.report())
artifact = compiled.artifact

# --- 3. The artifact knows its target ---------------------------------------------------------
manifest = artifact.manifest
print(f"manifest target: {manifest['target']['name']} ({manifest['target']['arch']}), "
      f"linked with {manifest['created_with']['linker']}\n  {manifest['target']['tvm_target']}")
assert manifest["target"]["name"] == "cortex-a55" and artifact.arch == "aarch64"
assert "+dotprod" in manifest["target"]["tvm_target"]
assert artifact.target == spec  # the full spec is stored, so the board's runner knows it too
with tempfile.TemporaryDirectory() as tmp:
    folder = artifact.save(Path(tmp) / "cnn-a55")
    assert elf_arch(folder / "lib.so") == "aarch64"  # a real aarch64 shared library

# --- 4. Run it: under QEMU here (or `python runner.py DIR` on the board) -----------------------
x = torch.randn(4, 3, 16, 16)
host = compiled.retarget("host")  # the same integer program, built for this machine
want = host(x.numpy())
with torch.no_grad():
    assert np.array_equal(want, compiled.reference(x).numpy())  # host == reference, exactly
# scripts/setup.sh installs qemu-user and builds the sysroot; without them this raises an
# EmulatorError saying so.
find_sysroot("aarch64")
got = artifact.run_emulated(x.numpy())  # the artifact's runner.py, under qemu-aarch64
print(f"aarch64 program under QEMU == host program: {np.array_equal(got, want)} "
      f"(logits of image 0: {', '.join(f'{v:.3f}' for v in got[0][:4])}, ...)")
assert np.array_equal(got, want)

# --- 5. Any TVM tag is a target too, no registration needed -----------------------------------
riscv = get_target("riscv/sifive-u74")
print(f"TVM tag {riscv.name!r}: {riscv.arch}, cross compiler {riscv.cross_compiler}")
rv = compiled.retarget(riscv)  # linked by Debian's riscv64 cross gcc (scripts/setup.sh)
with tempfile.TemporaryDirectory() as tmp:
    assert elf_arch(rv.save(Path(tmp) / "cnn-rv") / "lib.so") == "riscv64"
print("built the same program for riscv64:", rv)

pqcompile.targets.unregister_target("cortex-a55")
print("custom target OK")
