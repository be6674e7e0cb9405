"""Guest instruction counts of aarch64 artifacts under qemu-user with pqcompile's plugin.

The module fixture runs ``scripts/build_insn_plugin.sh`` (a no-op when the plugin is cached),
like the sysroot fixture, so a fresh Debian machine with root needs nothing by hand. Measured
here: the calls of the 32x32 model after the first count 1,397,661 to 1,399,086 instructions,
in every process, with a fresh bytecode cache or a warm one, and with another count running
beside it (pytest-xdist); 4x the MACs (64x64 input) counted ~4x the instructions. (Counting by
the difference of two processes' totals, as before, gave 0.8 to 19.9 M for the same model:
the processes' start-up differed.)
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pqcompile.assignment import Assignment
from pqcompile.build import compile_assignment
from pqcompile.targets.insn_count import InstructionCountError, count_instructions, find_plugin
from pqcompile.targets.ort_insn_count import count_onnx_instructions, find_ort_site, qemu_cpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers  # noqa: E402

PLUGIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_insn_plugin.sh"
ORT_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_aarch64_ort.sh"
# Calls of one artifact after the first: measured within 0.1% of each other (the second call
# up to ~1,400 instructions more than later ones, which agree to ~10), in any process.
REPRODUCIBLE_RTOL = 2e-3
# Two counts of one ONNX Runtime model (a 0.5 M-instruction inference): measured up to 0.6% apart.
ORT_REPRODUCIBLE_RTOL = 0.02


@pytest.fixture(scope="module")
def plugin(sysroot):
    """QEMU's instruction-count plugin, built by the project script on first use."""
    proc = subprocess.run(["bash", str(PLUGIN_SCRIPT)], capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{PLUGIN_SCRIPT} failed (exit {proc.returncode}); run it by hand as root "
                    f"to see why:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return find_plugin()


def _artifact(size: int, tmp_path_factory) -> Path:
    """Two 3x3 convs (3->16->16 channels), int8, at ``size`` x ``size``, built for 'arm'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, size, size)
    compiled = compile_assignment(model, (x,), Assignment.uniform(["_0", "_2"], 8, 8),
                                  target="arm", calibration=[torch.randn(4, 3, size, size)])
    return compiled.artifact.save(tmp_path_factory.mktemp(f"convs{size}") / "artifact")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _artifact(32, tmp_path_factory)


@pytest.fixture(scope="module")
def small_count(plugin, small):
    return count_instructions(small)


def test_count_is_positive_and_reproducible(small_count, small):
    first, second = small_count, count_instructions(small, runs=(2, 4))
    assert first.runs == (1, 3) and first.arch == "aarch64" and first.target == "arm"
    assert len(first.calls) == 3 and len(second.calls) == 4
    # ~2.8 M MACs in int8: millions of instructions per inference, ~2.5e9 for the process
    assert 1e6 < first.per_inference < 1e8
    assert first.totals[1] > first.totals[0] > 1e9
    assert first.totals[1] - first.totals[0] >= 2 * first.per_inference
    assert first.startup > 100 * first.per_inference
    # the calls after the first agree with each other and across processes
    steady = first.calls[1:] + second.calls[1:]
    assert max(steady) - min(steady) <= REPRODUCIBLE_RTOL * first.per_inference, (first, second)
    assert abs(first.per_inference - second.per_inference) \
        <= REPRODUCIBLE_RTOL * first.per_inference, (first, second)


def test_count_scales_with_work(small_count, tmp_path_factory):
    """4x the pixels is 4x the MACs: 3.5-4.5x the instructions."""
    base = small_count
    bigger = count_instructions(_artifact(64, tmp_path_factory))
    assert 3.5 <= bigger.per_inference / base.per_inference <= 4.5, (base, bigger)


def test_missing_plugin_says_to_run_setup(small, monkeypatch, tmp_path):
    monkeypatch.setenv("PQCOMPILE_INSN_PLUGIN", str(tmp_path / "absent" / "libpqcount.so"))
    with pytest.raises(InstructionCountError, match=r"scripts/setup\.sh"):
        count_instructions(small)


def test_bad_arguments(small):
    with pytest.raises(ValueError, match="0 <= n1 < n2"):
        count_instructions(small, runs=(3, 3))
    with pytest.raises(TypeError, match="artifact directory or an Artifact"):
        count_instructions(np.zeros(3))


# --- ONNX Runtime on aarch64, the peer of benchmarks/insn_count.py ---------------------------


@pytest.fixture(scope="module")
def ort_site(sysroot):
    """ONNX Runtime 1.18.1 for the sysroot, installed by the project script on first use."""
    proc = subprocess.run(["bash", str(ORT_SCRIPT)], capture_output=True, text=True,
                          timeout=900, check=False, env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0:
        pytest.fail(f"{ORT_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return find_ort_site()


def test_ort_int8_and_pqcompile_arm_counts_are_positive_and_deterministic(
        plugin, ort_site, tmp_path):
    """The same two-conv model at 16x16: ONNX Runtime int8 QDQ (quantized on the host) and
    pqcompile int8 for 'arm', both on qemu's Cortex-A72 model, each counted twice. No claim
    about which executes fewer: that is benchmarks/insn_count.py's table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    calib = [torch.randn(4, 3, 16, 16)]
    int8 = peers.ort_int8(peers.export_onnx(model, x, tmp_path / "convs.onnx"), tmp_path, calib)
    cpu = qemu_cpu("arm")
    assert cpu == "cortex-a72"
    ort = [count_onnx_instructions(int8, [x.numpy()], runs=(1, 2), cpu=cpu) for _ in range(2)]
    compiled = compile_assignment(model, (x,), Assignment.uniform(["_0", "_2"], 8, 8),
                                  target="arm", calibration=calib)
    art = compiled.artifact.save(tmp_path / "artifact")
    mine = [count_instructions(art, runs=(1, 2), cpu=cpu) for _ in range(2)]
    # ONNX Runtime's run is not repeatable to the instruction (measured up to 0.6% apart with
    # the former two-process count); pqcompile's program executes the same instructions.
    for (first, second), rtol in ((ort, ORT_REPRODUCIBLE_RTOL), (mine, REPRODUCIBLE_RTOL)):
        assert first.per_inference > 0 and first.totals[1] > first.totals[0] > 0
        assert len(first.calls) == 2 and min(first.calls) > 0
        assert abs(first.per_inference - second.per_inference) \
            <= rtol * first.per_inference, (first, second)
    assert ort[0].target == "onnxruntime (cortex-a72)" and mine[0].target == "arm"


def test_missing_ort_says_to_run_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("PQCOMPILE_AARCH64_ORT", str(tmp_path / "absent"))
    with pytest.raises(InstructionCountError, match=r"scripts/setup\.sh"):
        find_ort_site()
