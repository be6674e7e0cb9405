"""How many of TVM's pool threads a host artifact call uses: the whole pool, or one thread when
that is faster (another process keeping one of the cores busy).

TVM's pool splits every parallel loop statically, one equal part per thread, and the call
waits for the slowest part: when another process holds one of the cores, the thread that shares
it runs its part late (a scheduler time slice, milliseconds, behind the busy process) at every
parallel region, and a 2-thread call gets slower than a 1-thread one. ONNX Runtime's pool gives
work not yet started back to the caller instead of waiting for it; TVM's cannot. So the policy
measures: it runs calls at its current thread count and, every so many calls, a few at
the other one (the whole pool or 1, set with TVM's ``runtime.config_threadpool``, which only
changes how many parts a parallel loop is split into; every 8 to 64 calls), and moves to the other when its probes'
median beats the recent calls' median by ``margin``. On a quiet machine the probes cost a few
slower calls in ``probe_every``; beside a busy process the call keeps the faster setting.

``PQCOMPILE_THREAD_POLICY``: ``adaptive`` (the default) or ``fixed`` (every call on the whole
pool, sized by ``TVM_NUM_THREADS``: TVM's own behaviour). The pool's size itself is set once,
when it starts (:func:`thread_pool_defaults`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import OptionError

POLICY_ENV = "PQCOMPILE_THREAD_POLICY"
POLICIES = ("adaptive", "fixed")
_BIG_CORES = 1  # TVM's ThreadGroup::AffinityMode kBig: all cores, nthreads as given


def thread_pool_defaults() -> None:
    """TVM's thread pool as artifacts run it, for what the environment does not set: sized to
    the CPUs this process may use (``TVM_NUM_THREADS``; TVM's default on x86 is half the
    hardware threads, assuming hyper-threading, which leaves half the cores idle on machines
    without it), its workers not pinned to cores (``TVM_BIND_THREADS=0``; pinned, a worker
    whose core another process is using waits for that core at every parallel region: with a
    second process busy on one of 2 cores, resnet18 took 18.4 ms a call pinned, 4.7 ms not,
    3.4 ms on one thread). The pool reads both when it starts (the first parallel kernel run
    in the process)."""
    if "TVM_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(cores)
    os.environ.setdefault("TVM_BIND_THREADS", "0")


class ThreadPolicy:
    """The thread count of each call of one artifact (see the module docstring).

    ``policy``: ``"adaptive"`` or ``"fixed"`` (default: ``PQCOMPILE_THREAD_POLICY``, else
    adaptive). ``probe_every``: calls at the current setting before a probe, doubled after
    each probe that loses up to ``max_probe_every`` (a quiet machine pays for fewer and fewer
    probes), back to ``probe_every`` after a switch; ``probes``:
    calls a probe times at the other setting; ``margin``: the other setting must take at most
    this fraction of the current one's median to be taken. ``clock``: what calls are timed
    with (seconds).
    """

    def __init__(self, policy: str | None = None, *, probe_every: int = 8,
                 max_probe_every: int = 64, probes: int = 3,
                 margin: float = 0.9, window: int = 8,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        policy = policy or os.environ.get(POLICY_ENV, "adaptive")
        if policy not in POLICIES:
            raise OptionError(f"thread policy {policy!r} (argument or {POLICY_ENV}): use "
                                 f"one of {', '.join(POLICIES)}")
        if probe_every < 1 or probes < 1 or not 0 < margin <= 1:
            raise OptionError(f"ThreadPolicy(probe_every={probe_every}, probes={probes}, "
                                 f"margin={margin}): give probe_every, probes >= 1 and "
                                 f"0 < margin <= 1")
        self.policy, self.probe_every, self.probes, self.margin = (
            policy, probe_every, probes, margin)
        self.max_probe_every = max(probe_every, max_probe_every)
        self._interval = probe_every  # doubles after each probe that loses, up to the max
        self._full: int | None = None  # the pool's size, read on the first call
        self.current: int | None = None
        self._recent: dict[int, deque[float]] = {}
        self._window, self._clock = window, clock
        self._since_probe = 0
        self._probing = 0  # calls of the running probe still to time
        self.switches = 0

    def run(self, call: Callable[[], Any]) -> Any:
        """``call()`` on the thread count the policy picks for it, timed for the next pick."""
        import tvm

        if self._full is None:  # the pool's size (what it reports may be another policy's)
            size = os.environ.get("TVM_NUM_THREADS", "")
            self._full = int(size) if size.isdigit() and int(size) > 0 else \
                int(tvm.get_global_func("runtime.NumThreads")())
            self.current = self._full
            self._recent = {self._full: deque(maxlen=self._window),
                            1: deque(maxlen=self._window)}
        if self.policy == "fixed" or self._full == 1:
            self._configure(self._full)
            return call()
        threads = self._pick()
        self._configure(threads)
        start = self._clock()
        out = call()
        self._recent[threads].append(self._clock() - start)
        if self._probing:
            self._probing -= 1
            if not self._probing:
                self._decide()
        return out

    @property
    def threads(self) -> int | None:
        """The thread count calls run on now (``None`` before the first call)."""
        return self.current

    def _other(self) -> int:
        return 1 if self.current == self._full else self._full

    def _pick(self) -> int:
        if self._probing:
            return self._other()
        self._since_probe += 1
        if self._since_probe > self._interval and len(self._recent[self.current]) >= 3:
            self._since_probe = 0
            self._recent[self._other()].clear()
            self._probing = self.probes
            return self._other()
        return self.current

    def _decide(self) -> None:
        other = self._other()
        mine, theirs = self._recent[self.current], self._recent[other]
        if theirs and statistics.median(theirs) < self.margin * statistics.median(mine):
            self.current = other
            self.switches += 1
            mine.clear()  # the old setting's figures: stale by the next probe
            self._interval = self.probe_every
        else:
            self._interval = min(2 * self._interval, self.max_probe_every)

    @staticmethod
    def _configure(threads: int) -> None:
        """Set before every call (0.25 us): TVM's pool belongs to the calling thread, and
        another artifact's policy may have set it since."""
        import tvm

        tvm.get_global_func("runtime.config_threadpool")(_BIG_CORES, threads)
