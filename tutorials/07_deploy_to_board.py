"""Deploy to a board over TVM RPC: check the outputs there against the reference, time it.

A compiled artifact carries a reference sample (inputs and the integer-exact outputs), so the
board itself can prove it computes what the compiler promised. Here a qemu-user aarch64 process
stands in for the board; with a real one only the address changes.

Run: python tutorials/07_deploy_to_board.py
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import pqcompile
from pqcompile.runtime.deploy import deploy
from pqcompile.runtime.rpc_local import local_server

# 1. Compress and compile a small CNN for 64-bit Arm (Cortex-A72 class: a Raspberry Pi 4).
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
compiled = pqcompile.compile(model, (torch.randn(1, 3, 32, 32),), target="arm", budget="bops=8x")
workdir = Path(tempfile.mkdtemp(prefix="pqcompile-tutorial-"))
artifact_dir = compiled.save(workdir / "artifact")
print(f"artifact for {compiled.artifact.arch} in {artifact_dir}")

# 2. On a real board (64-bit Arm Linux with Python): install the runtime and start a server.
#
#        pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0 numpy
#        python rpc_server.py --host 0.0.0.0 --port 9090
#
#    rpc_server.py is pqcompile/runtime/rpc_server.py copied to the board: it needs only TVM, and
#    also tells deploy what the board is (an artifact for another architecture is refused before
#    the upload). TVM's own `python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090` works
#    too. Then, on this machine: `pqcompile deploy ARTIFACT_DIR --rpc BOARD_IP:9090`.
#    The server runs whatever it is sent: keep it on a trusted network.
#
# 3. Here the stand-in: the same server script run by an aarch64 CPython under qemu-user
#    (the sysroot scripts/setup.sh builds). Emulated timings say nothing about a real board.
with local_server("aarch64") as (host, port):
    print(f"aarch64 RPC server (qemu) listening on {host}:{port}")

    # 4. The Python API: upload lib.so, copy the weights, run the reference sample, time it.
    result = deploy(artifact_dir, host, port, repeat=5, number=3)
    print(result.summary())
    assert result.remote is not None and result.remote["machine"] == "aarch64"
    assert result.outputs_match and result.max_abs_diff == 0 and result.max_lsb_diff == 0
    assert len(result.latency.per_repeat) == 5 and result.latency.min > 0

    # 5. The command line, as a CI job would run it: exit 0 when the outputs match, 1 when
    #    they differ, 2 when something else fails (the message says what to do).
    proc = subprocess.run([sys.executable, "-m", "pqcompile.cli", "deploy", str(artifact_dir),
                           "--rpc", f"{host}:{port}", "--repeat", "3", "--number", "2",
                           "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(f"CLI: outputs match: {report['outputs_match']}, median latency "
          f"{report['latency']['median']:.3f} ms over {len(report['latency']['per_repeat'])} "
          f"repeats, lib.so {report['upload_bytes']} bytes uploaded in "
          f"{report['upload_s']:.2f} s")
    assert report["outputs_match"] is True and report["target"] == "arm"
shutil.rmtree(workdir)
print("the board's outputs match the reference sample bit for bit")
