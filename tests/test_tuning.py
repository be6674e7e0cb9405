"""The tuning database: tune once, reuse on every later build for the target, same integers."""

import numpy as np
import pytest
import torch
from torch import nn

from pqcompile import presets
from pqcompile.runtime.artifact import Artifact
from pqcompile.build import analysis, compile_assignment
from pqcompile.tuning import apply, database_dir, tune


@pytest.fixture()
def private_db(tmp_path, monkeypatch):
    monkeypatch.setenv("PQCOMPILE_TUNING_DIR", str(tmp_path / "tuning"))
    return tmp_path / "tuning"


def _compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = analysis(model, (x,))
    return compile_assignment(model, (x,), presets.uniform(gm, 8),
                              calibration=[torch.randn(4, 3, 8, 8)]), x


def test_databases_are_per_target(private_db):
    host, arm = database_dir("host"), database_dir("arm")
    assert host != arm and host.parent == arm.parent == private_db
    assert database_dir("host", "/somewhere") == database_dir("arm", "/somewhere")


def test_tune_once_then_reuse_with_the_same_integers(private_db):
    compiled, x = _compiled()
    assert compiled.artifact.manifest["tuning"]["scheduled_kernels"] == 0  # empty database
    first = tune(compiled.program, "host", trials=8)
    # the functions no kernel covers: the flatten, the dequantization (and the input's
    # quantization where the CPU has no FMA)
    assert first.tasks >= 2 and first.reused == 0 and 1 <= first.tuned <= first.tasks
    assert first.trials <= 8 and (private_db / database_dir("host").name / "records.json").exists()
    again = tune(compiled.program, "host", trials=0)
    assert again.reused == first.tuned and again.tuned == 0 and again.trials == 0
    scheduled, count = apply(compiled.program, "host")
    assert count == first.tuned
    # every later build for the target reuses the records, and computes the same integers
    rebuilt = Artifact.build(compiled.program, compiled.params, "host",
                             **compiled._build_kwargs)
    assert rebuilt.manifest["tuning"]["scheduled_kernels"] == first.tuned
    np.testing.assert_array_equal(rebuilt(x.numpy()), compiled.reference(x).numpy())
    # another target has its own (empty) database
    assert apply(compiled.program, "arm")[1] == 0


def test_bad_trials():
    compiled, _ = _compiled()
    with pytest.raises(ValueError, match="trials must be an int >= 0"):
        tune(compiled.program, "host", trials=-1)
