"""Progress on stderr for the long steps: a step counter bar and numbered stage lines.

On a terminal the bar redraws one line in place; in a log (not a TTY) it prints about ten
lines per run. :class:`Tracked` wraps a list of batches so every pass over it shows a bar.

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
import io  # noqa: F401 (the doctests use it)
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

__all__ = ["Progress", "StageInstrument", "Stages", "Tracked"]


class Progress:
    """A text progress bar: about ten lines per run, to ``stream`` (stderr)."""

    def __init__(self, total: int, label: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // 10)
        self.start = self.shown = time.perf_counter()

    def update(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        now, last = time.perf_counter(), step == self.total
        if self.live and not last and now - self.shown < 0.1:
            return
        if not self.live and step % self.every and not last:
            return
        self.shown = now
        done = int(20 * step / max(self.total, 1))
        info = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = (f"{self.label} {step}/{self.total} [{'#' * done}{'.' * (20 - done)}] {info} "
                f"{now - self.start:.1f}s")
        if self.live:
            print(f"\r{line}\x1b[K", end="\n" if last else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


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


class StageInstrument:
    """A pass instrument (:class:`pqcompile.passes.PassInstrument`'s hooks) for a pipeline's
    stages: a numbered :class:`Stages` line as each pass of ``stages`` starts and ends, and its
    wall seconds in ``seconds`` (by name; a name given twice adds up). Passes a stage runs
    inside it are not listed. ``detail(pass)``: the text in parentheses after the name.

    >>> out = io.StringIO()
    >>> class Step:
    ...     class info:
    ...         name = "solve"
    >>> step = Step()
    >>> inst = StageInstrument([step], detail=lambda p: "ilp", stream=out)
    >>> inst.before_pass(step, None); inst.after_pass(step, None)
    >>> out.getvalue().startswith("[1/1] solve (ilp) ..."), list(inst.seconds)
    (True, ['solve'])
    """

    def __init__(self, stages: Sequence[Any], detail: Any = None, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self._stages = {id(p) for p in stages}
        self._detail = detail or (lambda p: "")
        self.lines = Stages([p.info.name for p in stages], enabled, stream)
        self.seconds: dict[str, float] = {}
        self._open: dict[int, Any] = {}

    def before_pass(self, p: Any, gm: Any) -> None:
        if id(p) in self._stages and id(p) not in self._open:
            line = self.lines(p.info.name, self._detail(p))
            line.__enter__()
            self._open[id(p)] = line

    def after_pass(self, p: Any, result: Any) -> None:
        if id(p) not in self._open:
            return
        self._open.pop(id(p)).__exit__(None, None, None)
        name = p.info.name
        self.seconds[name] = self.seconds.get(name, 0.0) + self.lines.seconds[name]


class Tracked:
    """A re-iterable list of ``items`` whose every pass shows a :class:`Progress` bar.

    >>> out = io.StringIO()
    >>> batches = Tracked([1, 2, 3], "sensitivity", stream=out)
    >>> sum(batches), len(batches), "sensitivity 3/3" in out.getvalue()
    (6, 3, True)
    """

    def __init__(self, items: Sequence[Any], label: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.items, self.label, self.enabled, self.stream = list(items), label, enabled, stream

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Any) -> Any:
        return self.items[index]

    def __iter__(self) -> Iterator[Any]:
        bar = Progress(len(self.items), self.label, self.enabled, self.stream)
        for i, item in enumerate(self.items):
            yield item
            bar.update(i + 1)
