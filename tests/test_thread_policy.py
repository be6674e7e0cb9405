"""The thread policy of host artifact calls (pqcompile/runtime/threads.py) on TVM's real pool.

The calls here ask TVM's pool how many threads it runs on and advance the policy's clock by a
cost that depends on the answer (4 units at the pool's full size, 1 at one thread, or the
reverse; a clock of its own, so a loaded machine cannot flip a decision): the adaptive policy
must move to the faster count after a probe and come back when the costs swap, ``fixed`` must
never leave the full pool, and a real artifact must still equal its integer reference on
either count. Nothing here asserts how fast anything runs.
"""

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pqcompile.errors import OptionError
from pqcompile.runtime.artifact import thread_pool_defaults
from pqcompile.runtime.threads import POLICY_ENV, ThreadPolicy


@pytest.fixture(scope="module", autouse=True)
def pool():
    thread_pool_defaults()
    import tvm

    size = int(os.environ["TVM_NUM_THREADS"])
    if size < 2:
        pytest.skip("needs a pool of at least 2 threads (TVM_NUM_THREADS)")
    return tvm.get_global_func("runtime.NumThreads")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_call(pool, slow_at_full: list[bool], seen: list[int], clock: Clock):
    full = int(os.environ["TVM_NUM_THREADS"])

    def call():
        n = int(pool())  # what the policy set TVM's pool to
        seen.append(n)
        clock.now += 4.0 if (n == full) == slow_at_full[0] else 1.0
        return n
    return call


def test_adaptive_moves_to_the_faster_thread_count_and_back(pool):
    full = int(os.environ["TVM_NUM_THREADS"])
    clock = Clock()
    policy = ThreadPolicy("adaptive", probe_every=5, max_probe_every=5, probes=3,
                          clock=clock)
    slow_at_full, seen = [True], []
    call = make_call(pool, slow_at_full, seen, clock)
    for _ in range(12):
        policy.run(call)
    # 5 calls on the full pool, then a probe of 3 on one thread, which wins
    assert seen[:5] == [full] * 5 and seen[5:8] == [1] * 3
    assert policy.threads == 1 and policy.switches == 1
    assert seen[8:] == [1] * 4
    slow_at_full[0] = False  # now the whole pool is the faster
    seen.clear()
    for _ in range(17):  # a probe whose window still holds the fast calls, then one that wins
        policy.run(call)
    assert policy.threads == full and policy.switches == 2
    assert seen[-5:] == [full] * 5


def test_adaptive_stays_when_the_other_count_is_not_faster(pool):
    full = int(os.environ["TVM_NUM_THREADS"])
    clock = Clock()
    policy = ThreadPolicy("adaptive", probe_every=4, probes=2, clock=clock)
    seen = []
    call = make_call(pool, [False], seen, clock)  # the full pool is the fast one
    for _ in range(30):
        policy.run(call)
    assert policy.switches == 0 and policy.threads == full
    probes = seen.count(1)
    assert probes == 2 * 2  # after 4 calls, then after 8 more; the next would wait for 16


def test_fixed_keeps_the_whole_pool(pool, monkeypatch):
    full = int(os.environ["TVM_NUM_THREADS"])
    monkeypatch.setenv(POLICY_ENV, "fixed")
    clock = Clock()
    policy = ThreadPolicy(probe_every=2, clock=clock)
    seen = []
    call = make_call(pool, [True], seen, clock)
    for _ in range(12):
        policy.run(call)
    assert seen == [full] * 12 and policy.switches == 0


def test_bad_policy_names_the_setting(monkeypatch):
    monkeypatch.setenv(POLICY_ENV, "fastest")
    with pytest.raises(OptionError, match=rf"'fastest'.*{POLICY_ENV}.*adaptive, fixed"):
        ThreadPolicy()
    with pytest.raises(OptionError, match="margin"):
        ThreadPolicy("adaptive", margin=1.5)


def test_an_artifact_equals_its_reference_on_either_thread_count(pool):
    """A small conv net through the adaptive policy forced onto each count in turn."""
    from pqcompile.build import analysis, compile_assignment
    from pqcompile.presets import uniform

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 16 * 16, 10)).eval()
    x = torch.randn(1, 3, 16, 16)
    c = compile_assignment(model, (x,), uniform(analysis(model, (x,)), 8), target="host",
                           calibration=[torch.randn(4, 3, 16, 16)])
    art = c.artifact
    counts = []

    class Recording(ThreadPolicy):
        def _configure(self, threads):
            counts.append(threads)
            super()._configure(threads)

    art.thread_policy = Recording("adaptive", probe_every=1, probes=1, margin=1.0)
    for seed in range(6):
        xi = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        got = art(xi.numpy())
        with torch.no_grad():
            np.testing.assert_array_equal(got, c.reference(xi).numpy())
    assert set(counts) == {1, int(os.environ["TVM_NUM_THREADS"])}  # both counts ran


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
