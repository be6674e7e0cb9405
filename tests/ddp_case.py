"""The data-parallel case of test_ddp.py: one small CNN, its data, and what is compared.

Run in the test's process (one process) and by torchrun on two gloo processes::

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_case.py OUT.pt

Each run saves (rank 0) the Fisher estimate, the fine-tuned weights and learned ranges of one
QAT run, and ``compile()``'s assignment and integer weights, all on the same global batches.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import pqcompile
from pqcompile import distributed
from pqcompile.assignment import Assignment
from pqcompile.build import analysis
from pqcompile.criteria import FisherTrace
from pqcompile.finetune import qat_finetune

BATCH, BATCHES = 8, 4


def model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1, generator=g)
        model[1].running_var.uniform_(0.5, 1.5, generator=g)
    data = [(torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 4, (BATCH,), generator=g))
            for _ in range(BATCHES)]
    return model, data


def run() -> dict | None:
    """The three data-parallel stages on this process's share; rank 0's results."""
    model, data = model_and_data()
    gm = analysis(model, (data[0][0][:1],))
    fisher = FisherTrace(objective="cross_entropy", min_batches=BATCHES, max_batches=BATCHES)
    fisher.calibrate(gm, data)
    assignment = Assignment.uniform(["_0", "_3", "_7"], 4, 8)
    tuned, amax = qat_finetune(gm, assignment, data, epochs=2, lr=1e-2, distill_from=model,
                               progress=False, calibration_batches=2)
    compiled = pqcompile.compile(model, (data[0][0][:1],), target="host", budget="bops=6x",
                                 data=data, loss="cross_entropy", sensitivity_batches=BATCHES,
                                 finetune={"epochs": 1, "lr": 1e-2}, pareto_points=0)
    if not distributed.builds_here():
        assert compiled is None, "a rank other than 0 returns None"
        return None
    return {"fisher": {k: v.clone() for k, v in fisher.fisher.items()},
            "weight_trace": dict(fisher.weight_trace),
            "activation_trace": dict(fisher.activation_trace),
            "tuned": {k: v.clone() for k, v in tuned.state_dict().items()}, "amax": amax,
            "bits": {k: (v.weight, v.activation) for k, v in compiled.assignment.bits.items()},
            "masks": {k: v.tolist() for k, v in compiled.assignment.masks.items()},
            "params": {k: torch.from_numpy(v.copy()) for k, v in compiled.params.items()},
            "world": distributed.rank_and_size()[1]}


if __name__ == "__main__":
    distributed.init("gloo")
    torch.set_num_threads(1)
    result = run()
    if result is not None:
        torch.save(result, sys.argv[1])
