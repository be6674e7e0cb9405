"""``pqcompile deploy``: real TVM RPC servers on loopback, aarch64 under qemu-user, no mocks.

The aarch64 server is ``pqcompile/runtime/rpc_server.py`` run by the sysroot's Python, which has
TVM and numpy and nothing else (no torch, no pqcompile): what a board has. The sysroot fixture
builds the sysroot when it is missing and fails (never skips) when it cannot.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pqcompile
from pqcompile.lower import lower
from pqcompile.runtime.artifact import Artifact
from pqcompile.cli import main
from pqcompile.runtime.deploy import (
    AddressError,
    OutputMismatchError,
    RemoteLoadError,
    RemoteUnreachableError,
    deploy,
    parse_address,
)
from pqcompile.runtime.rpc_local import local_server


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


@pytest.fixture(scope="module")
def compiled():
    return pqcompile.compile(_model(), (torch.randn(1, 3, 16, 16),), target="arm",
                             budget="bops=8x")


@pytest.fixture(scope="module")
def artifacts(compiled, tmp_path_factory):
    """The model saved for aarch64 and for this machine, plus a copy whose reference sample is
    deliberately one ULP off in one output element."""
    root = tmp_path_factory.mktemp("deploy")
    arm = compiled.save(root / "arm")
    host = compiled.retarget("host").save(root / "host")
    (inputs,), (outputs,) = Artifact.load(arm).reference_sample
    wrong = outputs.copy()
    wrong.flat[3] = np.nextafter(wrong.flat[3], np.float32(np.inf))
    program, params, _ = lower(compiled.reference, target="host")  # the arm one has NEON kernels
    tampered = Artifact.build(program, params, "host",
                              reference_sample=([inputs], [wrong]), sample_tolerance=(0.0, 0.0))
    return {"arm": arm, "host": host, "tampered": tampered.save(root / "tampered"),
            "ulp": float(wrong.flat[3] - outputs.flat[3])}


@pytest.fixture(scope="module")
def mixed_arm(tmp_path_factory):
    """A mixed 2/4/8-bit aarch64 artifact: its 2- and 4-bit weights are stored packed, so the
    board first runs the prepare function that unpacks them."""
    from pqcompile.assignment import Assignment
    from pqcompile.build import compile_assignment
    from pqcompile.meta import BitWidths

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()
    bits = Assignment.uniform(["_0", "_2", "_4", "_8"], 8, 8)
    bits.bits["_2"], bits.bits["_4"] = BitWidths(4, 8), BitWidths(2, 8)
    compiled = compile_assignment(model, (torch.randn(1, 3, 8, 8),), bits, target="arm",
                                  calibration=[torch.randn(4, 3, 8, 8)])
    assert [row["weight_bits"] for row in compiled.layers] == [8, 4, 2, 8]
    path = compiled.save(tmp_path_factory.mktemp("mixed") / "arm")
    assert Artifact.load(path).manifest["prepare"]  # the packed-weights path is exercised
    return path


@pytest.fixture(scope="module")
def aarch64_server(sysroot):
    """The emulated board as a user starts it: ``pqcompile board --emulate aarch64 --port 0``
    (pqcompile.runtime.rpc_local.local_server under the command line); stopped as by Ctrl-C."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp, "out")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pqcompile.cli", "board", "--emulate",
                                     "aarch64", "--port", "0"], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not (found := re.search(r"emulated aarch64 board .* listening on "
                                          r"127\.0\.0\.1:(\d+); deploy with `pqcompile deploy DIR "
                                          r"--rpc 127\.0\.0\.1:\1`", log.read_text())):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            yield parse_address(f"127.0.0.1:{found.group(1)}")
        finally:
            proc.send_signal(signal.SIGTERM)  # as Ctrl-C: the server is stopped with it
            try:
                assert proc.wait(timeout=30) == 0, log.read_text()
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture(scope="module")
def host_server():
    with local_server("host") as address:
        yield address


def _deploy_json(capsys, directory, address, *extra):
    code = main(["deploy", str(directory), "--rpc", f"{address.host}:{address.port}", "--json",
                 "--repeat", "3", "--number", "2", *extra])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_aarch64_under_qemu_outputs_match_exactly(artifacts, aarch64_server, capsys):
    code, data, err = _deploy_json(capsys, artifacts["arm"], aarch64_server)
    assert code == 0, err
    assert data["target"] == "arm" and data["arch"] == "aarch64"
    assert data["remote"]["machine"] == "aarch64" and data["remote"]["tvm"] == "0.27.0.post1"
    assert data["outputs_match"] is True and data["mismatches"] == []
    assert data["max_abs_diff"] == 0.0 and data["max_lsb_diff"] == 0
    latency = data["latency"]
    assert len(latency["per_repeat"]) == 3 and latency["number"] == 2
    assert all(t > 0 for t in latency["per_repeat"])
    assert 0 < latency["min"] <= latency["median"] <= latency["max"] and latency["std"] >= 0
    assert data["upload_bytes"] == (Path(artifacts["arm"]) / "lib.so").stat().st_size
    assert data["upload_s"] > 0 and data["weights_bytes"] > 0


def test_mixed_2_4_8_bit_artifact_on_the_aarch64_server(mixed_arm, aarch64_server, capsys):
    """Packed 2/4-bit weights are unpacked on the board, then the outputs equal the reference
    sample bit for bit."""
    code, data, err = _deploy_json(capsys, mixed_arm, aarch64_server)
    assert code == 0, err
    assert data["arch"] == "aarch64" and data["remote"]["machine"] == "aarch64"
    assert data["outputs_match"] is True and data["max_abs_diff"] == 0.0
    assert data["max_lsb_diff"] == 0 and data["mismatches"] == []
    packed = Artifact.load(mixed_arm).manifest["params"]
    assert data["weights_bytes"] == sum(p["nbytes"] for p in packed)  # uploaded packed


def test_host_artifact_refused_by_the_aarch64_server(artifacts, aarch64_server, capsys):
    with pytest.raises(RemoteLoadError, match=r"runs on aarch64 .* is for x86_64 \(target "
                                              r"'host'\)"):
        deploy(artifacts["host"], *aarch64_server, repeat=1, number=1)
    code, data, err = _deploy_json(capsys, artifacts["host"], aarch64_server)
    assert code == 2 and data is None
    assert "pqcompile deploy: error:" in err and "--target arm" in err


def test_host_server_python_api_and_text_output(artifacts, host_server, capsys):
    result = deploy(artifacts["host"], *host_server, repeat=4, number=3)
    assert result.outputs_match is True and result.max_abs_diff == 0 and result.max_lsb_diff == 0
    assert result.target == "host" and result.remote["machine"] == os.uname().machine
    assert len(result.latency.per_repeat) == 4 and result.latency.mean > 0
    assert result.latency.median == pytest.approx(np.median(result.latency.per_repeat))
    assert json.loads(json.dumps(result.to_dict()))["latency"]["number"] == 3
    assert main(["deploy", str(artifacts["host"]), "--rpc", str(host_server),
                 "--repeat", "2", "--number", "1"]) == 0
    out = capsys.readouterr().out
    assert "target host" in out and "match the reference sample" in out
    assert re.search(r"latency: mean [0-9.]+ ms, median [0-9.]+ ms, std [0-9.]+ ms", out)
    assert main(["deploy", str(artifacts["host"]), "--rpc", str(host_server), "--quiet",
                 "--repeat", "1", "--number", "1"]) == 0
    assert capsys.readouterr().out == ""


def test_wrong_reference_sample_is_a_mismatch(artifacts, host_server, capsys):
    with pytest.raises(OutputMismatchError, match=r"differ from the artifact's reference sample "
                                                  r"\(max abs diff .*, 1 LSB\)") as info:
        deploy(artifacts["tampered"], *host_server, repeat=1, number=1)
    result = info.value.result
    assert result.outputs_match is False and result.max_lsb_diff == 1
    assert result.max_abs_diff == pytest.approx(artifacts["ulp"], rel=1e-6)
    assert "output 'output' differs from the reference sample" in result.mismatches[0]
    code, data, err = _deploy_json(capsys, artifacts["tampered"], host_server)
    assert code == 1 and data["outputs_match"] is False and data["max_lsb_diff"] == 1
    assert data["latency"]["mean"] > 0  # the CLI still times it
    assert "differ from the reference sample (max abs diff" in err


def test_nothing_listening(artifacts, capsys):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["deploy", str(artifacts["arm"]), "--rpc", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"no RPC server answers at 127.0.0.1:{port}" in err
    assert f"python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}" in err
    assert f"`pqcompile board --emulate aarch64 --port {port}` runs an emulated aarch64" in err
    with pytest.raises(RemoteUnreachableError):
        deploy(artifacts["arm"], "127.0.0.1", port)


def test_malformed_address(artifacts, capsys):
    for bad in ("board", "board:", ":9090", "board:port", "board:70000", "::1:9090"):
        assert main(["deploy", str(artifacts["arm"]), "--rpc", bad]) == 2
        assert "expected HOST:PORT" in capsys.readouterr().err
    with pytest.raises(AddressError):
        parse_address("10.0.0.1")
    assert parse_address("[fe80::1]:9090") == ("fe80::1", 9090)


def test_damaged_artifact(artifacts, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(artifacts["host"]).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "lib.so").write_bytes(b"\0" + (copy / "lib.so").read_bytes()[1:])
    assert main(["deploy", str(copy), "--rpc", "127.0.0.1:9"]) == 2
    assert "lib.so does not match the sha256" in capsys.readouterr().err


@contextmanager
def _stock_server():
    """``python -m tvm.exec.rpc_server`` as on a board: no pqcompile, no board description."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp, "log")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host",
                                     "127.0.0.1", "--port", "9190", "--port-end", "9290"],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not (found := re.search(r"bind to 127\.0\.0\.1:(\d+)", log.read_text())):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            yield "127.0.0.1", int(found.group(1))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_stock_tvm_server(artifacts):
    with _stock_server() as (host, port):
        result = deploy(artifacts["host"], host, port, repeat=2, number=1)
        assert result.outputs_match is True and result.remote is None
        with pytest.raises(RemoteLoadError, match=r"cannot load the artifact's library "
                                                  r"\(target 'arm', built for aarch64\)"):
            deploy(artifacts["arm"], host, port)


def test_nested_tuple_outputs_in_manifest_order(host_server, tmp_path):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "int32"))
    w = relax.Var("w", relax.TensorType((4,), "int32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            total = bb.emit(relax.op.add(x, w))
            prod = bb.emit(relax.op.multiply(x, w))
            out = bb.emit_output(relax.Tuple([total, relax.Tuple([prod, x])]))
        bb.emit_func_output(out)
    x_np, w_np = np.arange(4, dtype="int32"), np.array([5, -6, 7, -8], dtype="int32")
    art = Artifact.build(bb.get(), {"w": w_np}, "host",
                         reference_sample=([x_np], [x_np + w_np, x_np * w_np, x_np]))
    result = deploy(art.save(tmp_path / "tuple"), *host_server, repeat=1, number=1)
    assert result.outputs_match is True and result.max_lsb_diff == 0
