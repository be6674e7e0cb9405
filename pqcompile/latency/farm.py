"""A latency table timed on a farm of boards: every free board of one key on a TVM RPC tracker.

:func:`pqcompile.latency.measure_latency` builds its one-layer programs here, then hands them
to a :class:`Farm`: one thread per free board (at most one per program), each holding one
tracker session on its board and taking the next program from a shared queue as soon as it
has timed one. A board's session ends when the queue is empty; the first failure stops every
thread and is raised as a :class:`~pqcompile.errors.LatencyError` naming the board.
``counts`` says how many programs each board (its ``device_info`` name) timed.

The boards of a key are taken to be alike (the tracker's convention): the figures are cached
under ``tracker key KEY``, whichever board timed them.
"""

from __future__ import annotations

import collections
import gc
import threading
from typing import Any

import numpy as np

from ..errors import LatencyError
from ..runtime.rpc_client import DeployError, _first_line
from ..targets import TargetSpec

__all__ = ["Farm"]


class Farm:
    """The free boards of ``key`` on the tracker at ``tracker`` (a :class:`ServerAddress`)."""

    def __init__(self, tracker: Any, key: str, spec: TargetSpec, session_timeout: float,
                 connect_timeout: float) -> None:
        from ..runtime.tracker import boards

        self.tracker, self.key, self.spec = tracker, key, spec
        self.session_timeout, self.connect_timeout = session_timeout, connect_timeout
        try:
            self.free = boards(tracker, key)[key]
        except DeployError as err:
            raise LatencyError(str(err)) from None
        if self.free == 0:
            raise LatencyError(f"the tracker at {tracker} has no free board under key {key!r}: "
                               f"register some with `pqcompile board --tracker {tracker} --key "
                               f"{key}` (or rpc_server.py --tracker ... on the boards)")
        self.device = f"tracker key {key}"
        self.counts: dict[str, int] = {}

    def run_jobs(self, jobs: list[tuple[str, bytes, list[np.ndarray]]], spec: TargetSpec,
                 timing: dict[str, Any], done: Any) -> None:
        """Time ``jobs`` on the boards in parallel; ``done(shape key, repeats)`` for each
        (called under a lock, one at a time)."""
        queue = collections.deque(jobs)
        lock = threading.Lock()
        errors: list[str] = []
        n = min(self.free, len(jobs))
        start = _Start(n, self.connect_timeout)
        threads = [threading.Thread(target=self._board, daemon=True,
                                    args=(queue, lock, errors, spec, timing, done, start))
                   for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()  # remote objects in reference cycles: every session is closed now
        if errors:
            raise LatencyError(errors[0])
        if queue:
            raise LatencyError(f"{len(queue)} one-layer programs were left untimed: no board "
                               f"of key {self.key!r} took them")

    def _board(self, queue: collections.deque, lock: threading.Lock, errors: list[str],
               spec: TargetSpec, timing: dict[str, Any], done: Any, start: "_Start") -> None:
        """One board's loop: a session from the tracker, then (once every board has its
        session, so each takes a program before any takes a second) programs until none is
        left."""
        from .programs import _Remote
        from ..runtime.tracker import request

        runner = None
        try:
            remote = request(self.tracker, self.key, self.session_timeout, self.connect_timeout)
            runner = _Remote(f"a board of key {self.key!r} (tracker {self.tracker})", spec,
                             self.key, self.session_timeout, self.connect_timeout,
                             self.device, remote=remote)
            remote = None
            start.arrive_and_wait()
            while True:
                with lock:
                    if errors or not queue:
                        return
                    shape_key, library, args = queue.popleft()
                repeats = runner.time(library, spec, args, timing)
                with lock:
                    self.counts[runner.board] = self.counts.get(runner.board, 0) + 1
                    done(shape_key, repeats)
        except Exception as err:  # noqa: BLE001 (TVM raises many types; reported in the caller)
            start.arrive()
            where = runner.board if runner is not None else f"a board of key {self.key!r}"
            with lock:
                errors.append(f"timing on {where} (tracker {self.tracker}) failed: "
                              f"{_first_line(err)}")
        finally:
            if runner is not None:
                runner.close()


class _Start:
    """The boards' start line: each thread arrives once (session open, or failed to open) and
    the open ones wait, at most ``timeout`` seconds, for the rest before taking programs."""

    def __init__(self, n: int, timeout: float):
        self.n, self.timeout = n, timeout
        self.arrived = 0
        self.cond = threading.Condition()

    def arrive(self) -> None:
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()

    def arrive_and_wait(self) -> None:
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.arrived >= self.n, timeout=self.timeout)
