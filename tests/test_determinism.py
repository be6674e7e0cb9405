"""Determinism and integrity: the same seed gives the same assignment and byte-identical
artifacts, for data-free and searching solvers and for cross builds; loading an artifact
verifies every file's checksum and never unpickles anything."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from solver_models import digits, trained

import pqcompile
from pqcompile.runtime.artifact import Artifact, ArtifactError

FILES = ("lib.so", "weights.bin", "sample.bin", "manifest.json", "runner.py")


def _compile(seed: int, solver: str = "ilp", target: str = "host", options=None):
    train, test = digits()
    return pqcompile.compile(trained("cnn"), (test[0][0],), target=target, budget="bops=30x",
                             data=train, validation=test[:2], solver=solver, seed=seed,
                             solver_options=options, finetune={"max_batches": 8, "lr": 0.01})


def _same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("target", ["host", "arm"])
def test_same_seed_gives_a_byte_identical_artifact(target, tmp_path):
    first, second = _compile(seed=3, target=target), _compile(seed=3, target=target)
    assert first.assignment == second.assignment
    _same_files(first.save(tmp_path / "a"), second.save(tmp_path / "b"))


def test_a_searching_solver_repeats_its_search():
    opts = {"steps": 20}
    a, b = _compile(seed=5, solver="sbs", options=opts), _compile(seed=5, solver="sbs",
                                                                 options=opts)
    assert a.assignment == b.assignment
    assert a.solution.costs == b.solution.costs


def test_loading_verifies_checksums_and_never_unpickles(tmp_path, monkeypatch):
    c = _compile(seed=3)
    saved = c.save(tmp_path / "art")

    def refuse(*args, **kwargs):
        raise AssertionError("an artifact load unpickled something")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    art = Artifact.load(saved)
    x = digits()[1][0][0].numpy()
    np.testing.assert_array_equal(art(x), c(x))
    blob = bytearray((saved / "weights.bin").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (saved / "weights.bin").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="weights.bin"):
        Artifact.load(saved)
