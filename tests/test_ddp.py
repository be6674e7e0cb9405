"""Beyond one CPU: ``compile(device=...)`` and data-parallel Fisher + QAT + compile (gloo).

The data-parallel run is ``torchrun --nproc_per_node 2 tests/ddp_case.py`` on CPU with gloo,
compared with the same case in this process on the same global batches: the Fisher estimate
within 1e-5 relative (float32 gradients summed in another order), the fine-tuned weights within
1e-6, the learned ranges within 1e-4 relative, the same assignment and the same integer
weights and biases (the fixed-point multipliers, from the ranges, within 1e-4 relative).
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pqcompile
from pqcompile.errors import OptionError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_case  # noqa: E402


def _compile(model, data, **kw):
    return pqcompile.compile(model, (data[0][0][:1],), target="host", budget="bops=6x",
                             data=data, sensitivity_batches=4, pareto_points=1,
                             finetune={"epochs": 1, "lr": 1e-2}, **kw)


def test_device_cpu_is_the_default_bit_for_bit_and_cuda_is_checked():
    model, data = ddp_case.model_and_data()
    before = copy.deepcopy(model.state_dict())
    default = _compile(model, data)
    on_cpu = _compile(model, data, device=torch.device("cpu"))
    assert default.assignment.bits == on_cpu.assignment.bits
    assert default.params.keys() == on_cpu.params.keys()
    for k, v in default.params.items():
        assert np.array_equal(v, on_cpu.params[k]), k
    x = data[1][0][:1]
    assert torch.equal(default.reference(x), on_cpu.reference(x))
    if torch.cuda.is_available():
        on_gpu = _compile(model, data, device="cuda")
        assert default.assignment.bits == on_gpu.assignment.bits
        for k, v in default.params.items():
            assert np.array_equal(v, on_gpu.params[k]), k
    else:
        with pytest.raises(OptionError, match=r"device='cuda': cuda requested but "
                                              r"torch\.cuda\.is_available\(\) is False"):
            _compile(model, data, device="cuda")
    with pytest.raises(OptionError, match=r"device='tpu0' is not a torch device"):
        _compile(model, data, device="tpu0")
    for k, v in model.state_dict().items():  # the user's model: not moved, not changed
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k


def test_two_gloo_processes_match_one(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--standalone", str(HERE / "ddp_case.py"), str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(out, weights_only=False)
    torch.set_num_threads(1)
    one = ddp_case.run()
    assert (one["world"], two["world"]) == (1, 2)
    for k, f in one["fisher"].items():
        assert float((f - two["fisher"][k]).abs().max() / f.abs().max()) < 1e-5, k
    for k, t in one["activation_trace"].items():
        assert t == pytest.approx(two["activation_trace"][k], rel=1e-5), k
    for k, w in one["tuned"].items():
        assert float((w - two["tuned"][k]).abs().max()) < 1e-6, k
    for k, a in one["amax"].items():
        assert a == pytest.approx(two["amax"][k], rel=1e-4), k
    assert one["bits"] == two["bits"] and one["masks"] == two["masks"]
    for k, p in one["params"].items():
        q = two["params"][k]
        if k.endswith(".mult"):
            assert float((p.double() - q.double()).abs().max() / p.double().abs().max()) < 1e-4
        else:
            assert torch.equal(p, q), k
