"""Progress on stderr for the long steps: a step counter bar and numbered stage lines.

>>> import io
>>> out = io.StringIO()
>>> stages = Stages(["analysis", "solve"], stream=out)
>>> with stages("analysis"):
...     pass
>>> out.getvalue().startswith("[1/2] analysis")
True
>>> bar = Progress(4, "qat", stream=out)
>>> bar.update(4, loss=0.5)
>>> "qat 4/4 [####################] loss 0.5" in out.getvalue()
True
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

__all__ = ["Progress", "Stages"]


class Progress:
    """A text progress bar: about ten lines per run, to ``stream`` (stderr)."""

    def __init__(self, total: int, label: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.every = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, step: int, **metrics: float) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        done = int(20 * step / max(self.total, 1))
        info = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"{self.label} {step}/{self.total} [{'#' * done}{'.' * (20 - done)}] {info} "
              f"{time.perf_counter() - self.start:.1f}s", file=self.stream, flush=True)


class Stages:
    """Numbered stage lines with their wall time: ``[2/5] sensitivity (fisher) ... 12.3 s``."""

    def __init__(self, names: Sequence[str], enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.names, self.enabled = list(names), enabled
        self.stream = stream or sys.stderr
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str = "") -> Iterator[None]:
        index = self.names.index(name) + 1
        label = f"[{index}/{len(self.names)}] {name}{f' ({detail})' if detail else ''}"
        if self.enabled:
            print(f"{label} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if self.enabled:
            print(f"{label} done in {self.seconds[name]:.1f} s", file=self.stream, flush=True)
