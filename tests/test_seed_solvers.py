"""The four seed methods end to end through ``pqcompile.compile``: each searching solver's
result is fine-tuned, lowered to the integer program and built for the host and for aarch64;
the host program equals its fake-quant reference exactly, and the aarch64 artifact (under
qemu-aarch64) equals the host program bit for bit."""

import numpy as np
import pytest
from solver_models import accuracy, digits, trained

from pqcompile.api import compile

SMALL = {
    "sbs": {"steps": 20},
    "ajpq": {"episodes": 8, "warmup": 4, "hidden": 64},
    "fitcompress": {"fisher_min_batches": 4, "fisher_max_batches": 8, "refresh_every": 4,
                    "refresh_batches": 2},
    "picpq": {"population": 4, "tournament": 2, "cycles": 4},
}


def _compile(name, solver, budget, target="host"):
    train, test = digits()
    return compile(trained(name), (test[0][0],), target=target, budget=budget, data=train,
                   validation=test[:2], solver=solver, solver_options=SMALL[solver],
                   finetune={"max_batches": 10, "lr": 0.01})


@pytest.mark.parametrize("solver", sorted(SMALL))
def test_seed_solver_builds_for_arm_with_integer_parity(solver, sysroot):
    _, test = digits()
    c = _compile("cnn", solver, "bops=30x")
    assert c.solution.solver == solver and c.solution.feasible
    assert c.totals["bop_reduction"] >= 30
    assert c.totals["bops"] == c.solution.costs["bops"]  # the cost model is the built model's
    for x, _ in test[2:5]:
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
    assert accuracy(c.reference, test) >= 0.8
    arm = c.retarget("arm")
    assert arm.arch == "aarch64"
    x = test[2][0].numpy()
    np.testing.assert_array_equal(arm.run_emulated(x), c(x))


@pytest.mark.parametrize("solver", sorted(SMALL))
def test_seed_solver_compiles_a_linear_only_model(solver):
    _, test = digits()
    c = _compile("mlp", solver, "bops=30x")
    assert c.totals["bop_reduction"] >= 30
    for x, _ in test[2:4]:
        np.testing.assert_array_equal(c(x.numpy()), c.reference(x).numpy())
    assert accuracy(c.reference, test) >= 0.8
