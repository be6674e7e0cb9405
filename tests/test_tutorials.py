"""Every tutorial script runs to completion (each checks its own results and exits non-zero)."""

import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))


def test_tutorials_exist():
    assert TUTORIALS, "no tutorials found"


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(script):
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=900, cwd=script.parent)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
