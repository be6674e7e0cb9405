"""The peers of ``benchmarks/latency.py`` compute the model they are timed on.

Each builder of ``benchmarks/peers.py`` (torch int8, ONNX Runtime fp32 and int8, TVM fp32, and
the ONNX export of pqcompile's pruned float graph) is run on resnet18 at 64x64 with random
weights and compared with torch fp32 on random inputs: the fp32 ones to float rounding, the
int8 ones by cosine similarity of the logits and by each output lying nearest to its own
input's reference (the logits of a random-weight model share a large input-independent part,
so cosine alone would pass a model that ignores its input). The floors sit below what was
measured (int8: cosine >= 0.989 on resnet18, 0.998 on the pruned graph) and far above a
broken model. Nothing here is timed.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers

SIZE = 64
INT8_MIN_COSINE = 0.95
FP32_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    model = peers.make_model("resnet18", SIZE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE, generator=g)
    calib = [torch.randn(4, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    tests = [torch.randn(1, 3, SIZE, SIZE, generator=g).numpy() for _ in range(6)]
    ref = [peers.torch_fp32(model)(t) for t in tests]
    return model, x, calib, tests, ref


def outputs(fn, tests):
    return [fn(t) for t in tests]


def assert_fp32(ref, out):
    a = peers.agreement(ref, out)
    assert a["rel_max_abs_diff"] < FP32_REL_TOL, a
    assert a["top1_agreement"] == 1.0 and a["matched"] == 1.0, a


def assert_int8(ref, out):
    a = peers.agreement(ref, out)
    assert a["min_cosine"] > INT8_MIN_COSINE, a
    assert a["matched"] == 1.0, a


def test_the_model_depends_on_its_input(setup):
    *_, ref = setup
    a = peers.agreement(ref[:3], ref[3:])
    assert a["matched"] < 1 and a["min_cosine"] < 0.95, a  # else the checks would prove nothing
    assert len({int(r.argmax()) for r in ref}) > 1


def test_the_checks_reject_a_broken_model(setup):
    from latency import check

    *_, ref = setup
    assert peers.matched(ref, ref[::-1]) == 0.0
    constant = [ref[0]] * len(ref)
    assert peers.matched(ref, constant) == pytest.approx(1 / len(ref))
    assert check("int", ref, constant)[1] is not None
    assert check("fp32", ref, [r * 1.01 for r in ref])[1] is not None
    assert check("int", ref, [r + 1e-3 for r in ref])[1] is None


def test_ort_fp32(setup, tmp_path):
    model, x, _, tests, ref = setup
    path = peers.export_onnx(model, x, tmp_path / "m.onnx")
    assert_fp32(ref, outputs(peers.ort_runner(peers.ort_session(path, 1)), tests))


def test_ort_int8(setup, tmp_path):
    model, x, calib, tests, ref = setup
    path = peers.ort_int8(peers.export_onnx(model, x, tmp_path / "m.onnx"), tmp_path, calib)
    session = peers.ort_session(path, 1)
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ around the convs
    assert_int8(ref, outputs(peers.ort_runner(session), tests))


def test_torch_int8(setup):
    model, x, calib, tests, ref = setup
    q = peers.torch_int8(model, x, calib)
    assert any("quantized" in type(m).__module__ for m in q.modules())
    assert_int8(ref, outputs(peers.torch_fp32(q), tests))


def test_tvm_fp32(setup):
    model, x, _, tests, ref = setup
    assert_fp32(ref, outputs(peers.tvm_fp32(model, x), tests))


def test_pruned_graph_in_ort(setup, tmp_path):
    """The kernel-level peers: pqcompile's pruned float graph (the ``graph`` of its
    mixed+pruned build) exported to ONNX Runtime, fp32 and int8."""
    from pqcompile import presets
    from pqcompile.build import analysis, prepare

    model, x, calib, tests, _ = setup
    gm = analysis(model, (x,))
    pruned = prepare(gm, presets.mixed_pruned(gm))
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params < 0.7 * sum(p.numel() for p in model.parameters())
    pref = outputs(peers.torch_fp32(pruned), tests)
    path = peers.export_onnx(pruned, x, tmp_path / "p.onnx")
    assert_fp32(pref, outputs(peers.ort_runner(peers.ort_session(path, 1)), tests))
    q = peers.ort_int8(path, tmp_path, calib)
    assert_int8(pref, outputs(peers.ort_runner(peers.ort_session(q, 1)), tests))
    assert np.isfinite(pref).all()
