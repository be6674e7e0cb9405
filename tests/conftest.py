"""Suite-wide settings.

torch runs single-threaded: the suite's torch work is many small ops, and on two cores shared
with TVM's own thread pool, two torch threads made small convolutions ~10x slower.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from pqcompile.targets import find_sysroot
from pqcompile.targets.emulator import default_sysroot_path

torch.set_num_threads(1)

SYSROOT_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_aarch64_sysroot.sh"


@pytest.fixture(scope="session")
def sysroot():
    """The aarch64 sysroot, built by the project script on first use (a no-op when cached)."""
    dest = os.environ.get("PQCOMPILE_AARCH64_SYSROOT") or str(default_sysroot_path())
    proc = subprocess.run(["bash", str(SYSROOT_SCRIPT), dest], capture_output=True, text=True,
                          timeout=1800, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{SYSROOT_SCRIPT} {dest} failed (exit {proc.returncode}); run it by hand "
                    f"as root to see why:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return find_sysroot("aarch64")
