"""A busy neighbour: another process keeping one core busy while a benchmark times its calls.

A deployed model rarely has the machine to itself. :class:`BusyNeighbour` starts a separate
Python process pinned (``os.sched_setaffinity``) to one of the cores this process may use,
running a tight loop (pure Python arithmetic: it takes the core without competing for memory
bandwidth, or ``kind="numpy"``: small matrix products, which also keep the core's caches
busy) until the context exits. The benchmarked process itself stays unpinned, as a deployed one
would be, so its thread pools decide how they share the remaining core and a half.

On exit the neighbour's CPU time over its wall time is recorded (``busy_fraction``): about 1.0
when it had its core to itself, well below when the timed process took turns on its core (a
figure far below 0.5 means there was no neighbour to speak of, and the scenario did not run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

_LOOPS = {
    "python": "x = 0\nwhile True:\n    x = (x * 1103515245 + 12345) & 0xFFFFFFFF\n",
    "numpy": ("import numpy as np\na = np.random.rand(64, 64)\n"
              "while True:\n    a = a @ a\n    a /= np.abs(a).max()\n"),
}


def neighbour_core() -> int:
    """The core the neighbour takes: the highest-numbered one this process may use."""
    return max(os.sched_getaffinity(0))


class BusyNeighbour:
    """``with BusyNeighbour() as n: ...``: one core kept busy for the duration of the block;
    ``n.record()`` describes it (core, loop, CPU time, busy fraction) once the block is left."""

    def __init__(self, core: int | None = None, kind: str = "python") -> None:
        if kind not in _LOOPS:
            raise ValueError(f"neighbour kind {kind!r}: use one of {sorted(_LOOPS)}")
        if len(os.sched_getaffinity(0)) < 2:
            raise RuntimeError("a busy neighbour needs at least 2 usable cores (one for it)")
        self.core = neighbour_core() if core is None else core
        self.kind = kind
        self._proc: subprocess.Popen | None = None
        self._record: dict[str, Any] = {}

    def __enter__(self) -> BusyNeighbour:
        code = f"import os\nos.sched_setaffinity(0, {{{self.core}}})\n{_LOOPS[self.kind]}"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        self._start = time.perf_counter()
        time.sleep(0.3)  # let it start and take its core
        if self._proc.poll() is not None:
            raise RuntimeError(f"the busy neighbour exited at once (status "
                               f"{self._proc.returncode})")
        return self

    def cpu_seconds(self) -> float:
        """The neighbour's user + system CPU time so far, from /proc."""
        assert self._proc is not None
        fields = open(f"/proc/{self._proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: Any) -> None:
        assert self._proc is not None
        wall = time.perf_counter() - self._start
        try:
            cpu = self.cpu_seconds()
        except OSError:
            cpu = float("nan")
        self._proc.terminate()
        self._proc.wait(timeout=10)
        self._record = {"core": self.core, "kind": self.kind, "wall_s": round(wall, 2),
                        "cpu_s": round(cpu, 2), "busy_fraction": round(cpu / wall, 3)}

    def record(self) -> dict[str, Any]:
        return dict(self._record)
