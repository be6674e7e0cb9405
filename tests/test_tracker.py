"""Device farms: a TVM RPC tracker and two emulated aarch64 boards on loopback, no mocks.

The tracker is ``pqcompile tracker`` (tvm.rpc.tracker); each board is ``pqcompile board
--emulate aarch64 --tracker ... --key ... --name ...`` (pqcompile/runtime/rpc_server.py run by the
sysroot's Python under qemu-user, registered with the tracker). A deploy through the tracker
checks the outputs against the artifact's reference sample, and a latency table is timed on
both boards at once (each board's count of programs is asserted, never a time).
"""

import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import pqcompile
from pqcompile.build import analysis
from pqcompile.cli import main
from pqcompile.runtime.deploy import deploy
from pqcompile.errors import LatencyError
from pqcompile.latency import measure_latency
from pqcompile.runtime.rpc_client import AddressError
from pqcompile.solvers import build_problem
from pqcompile.runtime.tracker import TrackerError, boards, parse_tracker, request, wait_for_boards

KEY = "emu-a64"


@contextmanager
def _commands(*commands, timeout=180):
    """``python -m pqcompile.cli ARGS`` for each ``(ARGS, pattern)``, all started at once, in
    the background until the block ends (SIGTERM, as Ctrl-C); yields the matches of the
    patterns in their outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for i, (args, _) in enumerate(commands):
                log = Path(tmp, f"out{i}")
                with open(log, "wb") as out:
                    procs.append((subprocess.Popen(
                        [sys.executable, "-m", "pqcompile.cli", *args], stdout=out,
                        stderr=subprocess.STDOUT, start_new_session=True), log))
            deadline, found = time.monotonic() + timeout, []
            for (proc, log), (_, pattern) in zip(procs, commands):
                while not (match := re.search(pattern, log.read_text())):
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                found.append(match)
            yield found
        finally:
            for proc, _ in procs:
                proc.send_signal(signal.SIGTERM)
            for proc, _ in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture(scope="module")
def farm(sysroot):
    """A tracker and two emulated aarch64 boards registered with it under KEY."""
    with ExitStack() as stack:
        (found,) = stack.enter_context(_commands(
            (["tracker", "--port", "0"], r"RPC tracker listening on 127\.0\.0\.1:(\d+)")))
        tracker = f"127.0.0.1:{found.group(1)}"
        stack.enter_context(_commands(*[
            (["board", "--emulate", "aarch64", "--port", "0", "--tracker", tracker, "--key",
              KEY, "--name", name], r"listening on 127\.0\.0\.1:\d+")
            for name in ("board-a", "board-b")]))
        assert wait_for_boards(tracker, KEY, 2, timeout=60) == 2
        yield tracker


def test_tracker_arguments():
    assert parse_tracker("10.0.0.5:9190") == ("10.0.0.5", 9190)
    with pytest.raises(AddressError, match=r"--tracker 'nohost': expected HOST:PORT"):
        parse_tracker("nohost")
    with pytest.raises(TrackerError, match=r"no RPC tracker answers at 127\.0\.0\.1:1 .*"
                                           r"pqcompile tracker --port 1"):
        boards("127.0.0.1:1")
    assert main(["deploy", "somewhere"]) == 2  # neither --rpc nor --tracker


def test_deploy_through_the_tracker(farm, tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    compiled = pqcompile.compile(model, (torch.randn(1, 3, 8, 8),), target="arm",
                                 budget="bops=4x")
    path = compiled.save(tmp_path / "arm")
    with pytest.raises(TrackerError, match=r"no board under key 'nope' \(keys there: "
                                           rf"{KEY}\)"):
        request(farm, "nope")
    result = deploy(path, tracker=farm, key=KEY, repeat=2, number=1)
    assert result.outputs_match is True and result.max_abs_diff == 0.0  # bit-exact
    assert result.remote["machine"] == "aarch64"
    assert result.remote["board"] in ("board-a", "board-b")
    assert result.address.startswith(result.remote["board"])
    assert main(["deploy", str(path), "--tracker", farm, "--key", KEY, "--repeat", "1",
                 "--number", "1", "--json"]) == 0
    assert '"outputs_match": true' in capsys.readouterr().out


def test_latency_table_on_both_boards(farm, tmp_path, monkeypatch):
    monkeypatch.setenv("PQCOMPILE_TUNING_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    gm = analysis(model.eval(), (torch.randn(1, 3, 8, 8),))
    problem = build_problem(gm, None, None, keep_levels=(1.0, 0.5))
    assert wait_for_boards(farm, KEY, 2, timeout=60) == 2  # both free again after the deploy
    table = measure_latency(problem, gm, "arm", tracker=farm, key=KEY, repeat=1,
                            min_repeat_ms=0, cache=False)
    assert table.measured == 4 and table.device == f"tracker key {KEY}"
    assert sum(table.boards.values()) == 4
    assert set(table.boards) == {"board-a", "board-b"}  # the work went to both boards
    assert all(n >= 1 for n in table.boards.values())
    assert {n: sorted(t.points) for n, t in table.layers.items()} == \
        {"_0": [(4, 3), (8, 3)], "_2": [(4, 4), (4, 8)]}
    assert all(ms > 0 for t in table.layers.values() for ms in t.points.values())
    again = type(table).from_dict(table.to_dict())
    assert again.boards == table.boards
    with pytest.raises(LatencyError, match=r"no free board under key 'other'"):
        measure_latency(problem, gm, "arm", rpc=f"other@{farm}", repeat=1, cache=False)
