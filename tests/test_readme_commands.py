"""The README's shell commands, run in order the way a new user runs them, in a fresh directory;
its links to docs/ resolve.

The commands are read from the README's ``bash`` blocks and must equal :data:`COMMANDS` (so the
README and this test move together). Each runs through the installed ``pqcompile`` entry
point, with two bounded-time substitutions: the 224x224 inputs become 32x32 (same models,
same flow, a fraction of the time), and ``pqcompile demo`` (Fashion-MNIST end to end, ~6 min
here) and the set-up lines (``scripts/setup.sh``, which CI runs before the suite) are not run
here. ``pqcompile board ... &`` is started in the background, as the README's ``&`` says, and
the deploy that follows must find its outputs equal to the artifact's reference sample: the
README's MobileNetV2 at 60x fewer BOPs has 2- and 4-bit weights, stored packed.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ENTRY = Path(sys.executable).parent / "pqcompile"

COMMANDS = [
    "pqcompile analyze --model torchvision.models:resnet18 --input-shape 1,3,224,224",
    "pqcompile compile --model torchvision.models:mobilenet_v2 --input-shape 1,3,224,224 "
    "--target arm --budget bops=60x --out mnv2-arm",
    "pqcompile report mnv2-arm",
    "pqcompile board --emulate aarch64 --port 9090 &",
    "pqcompile deploy mnv2-arm --rpc 127.0.0.1:9090",
    "pqcompile demo",
]
NOT_RUN = {"pqcompile demo"}  # the module docstring says why


def readme_commands() -> list[str]:
    """The ``pqcompile ...`` lines of the README's bash blocks, continuations joined and
    comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("#", 1)[0].split())
            if line.startswith("pqcompile "):
                commands.append(line)
    return commands


def test_the_list_matches_the_readme():
    assert readme_commands() == COMMANDS


def _slug(heading: str) -> str:
    """A markdown heading's anchor as GitHub writes it."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve_and_it_stays_a_guide():
    """Every relative link of the README names a file that exists (and a heading there, for
    ``#anchor`` links); the README stays under 300 lines (measurements go to docs/), and every
    docs page with a table says what regenerates it."""
    text = README.read_text()
    assert len(text.splitlines()) < 300
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links to {link}: no heading"
    for page in sorted((ROOT / "docs").glob("*.md")):
        body = page.read_text()
        if "\n|---" in body:
            assert "benchmarks/" in body or "tests/" in body, f"{page.name}: tables, no command"


def _small(command: str) -> list[str]:
    return shlex.split(command.replace("1,3,224,224", "1,3,32,32").rstrip("& "))


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_readme_commands_in_order(tmp_path, sysroot):
    """Every command succeeds (exit 0) in a fresh directory, in the README's order."""
    if not _free(9090):
        pytest.fail("port 9090 (the README's) is taken on this machine; free it to run this")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    board = None
    outputs = {}
    try:
        for command in COMMANDS:
            if command in NOT_RUN:
                continue
            argv = [str(ENTRY), *_small(command)[1:]]
            if command.endswith("&"):
                log = open(tmp_path / "board.log", "wb")  # noqa: SIM115 (closed below)
                board = subprocess.Popen(argv, cwd=tmp_path, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
                deadline = time.monotonic() + 180
                while "listening on 127.0.0.1:9090" not in (tmp_path / "board.log").read_text():
                    assert board.poll() is None and time.monotonic() < deadline, \
                        (tmp_path / "board.log").read_text()
                    time.sleep(0.2)
                continue
            proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env,
                                  timeout=900)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            outputs[argv[1]] = proc
    finally:
        if board is not None:
            board.send_signal(signal.SIGTERM)
            try:
                board.wait(timeout=30)
            finally:
                if board.poll() is None:
                    os.killpg(board.pid, signal.SIGKILL)
                    board.wait()

    assert "random weights" in outputs["analyze"].stderr  # torchvision factories warn
    assert "calibrated on a RANDOM normal tensor of shape (1, 3, 32, 32)" in \
        outputs["compile"].stderr
    manifest = json.loads((tmp_path / "mnv2-arm" / "manifest.json").read_text())
    bits = {layer["weight_bits"] for layer in manifest["layers"]}
    assert manifest["target"]["arch"] == "aarch64" and manifest["prepare_flat"]
    assert bits & {2, 4}, bits  # packed sub-8-bit weights: the path deploy used to fail on
    assert "total:" in outputs["report"].stdout
    deployed = outputs["deploy"].stdout
    assert "outputs: match the reference sample (max abs diff 0, 0 LSB)" in deployed
    assert "aarch64 Linux" in deployed
