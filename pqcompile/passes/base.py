"""Pass infrastructure: ``Pass``, ``graph_pass``, ``PassResult``, ``PassContext``, ``Pipeline``.

A pass declares the annotation keys it ``requires`` and ``provides`` (and those its rewrite
``invalidates``), so a :class:`Pipeline` rejects a bad order when it is built, before any work.

>>> import torch
>>> from pqcompile import trace, graph_pass, Pipeline
>>> from pqcompile.meta import SHAPE
>>> from pqcompile.passes import ShapeAnalysis
>>> @graph_pass(requires=(SHAPE,))
... def count_relus(gm, ctx):
...     ctx.results["relus"] = sum(n.target is torch.relu for n in gm.graph.nodes)
>>> class M(torch.nn.Module):
...     def forward(self, x):
...         return torch.relu(x) + 1
>>> ctx = PassContext()
>>> gm = Pipeline([ShapeAnalysis(), count_relus])(trace(M(), (torch.randn(2),)), ctx)
>>> ctx.results["relus"]
1
"""

from __future__ import annotations

import difflib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch.fx

from ..errors import PipelineError
from ..meta import EXAMPLE_INPUTS, SOURCE_MODEL, MetaKey

# Provided by pqcompile.trace on every graph it returns.
TRACE_PROVIDES: tuple[MetaKey, ...] = (EXAMPLE_INPUTS, SOURCE_MODEL)
_PROVIDED = "pqc.provided_keys"  # bookkeeping in GraphModule.meta, not an annotation


@dataclass(frozen=True)
class PassInfo:
    name: str
    requires: tuple[MetaKey, ...] = ()
    provides: tuple[MetaKey, ...] = ()
    invalidates: tuple[MetaKey, ...] = ()


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


class PassInstrument:
    """Hooks called around every pass run under a :class:`PassContext`."""

    def before_pass(self, p: "Pass", gm: torch.fx.GraphModule) -> None:
        pass

    def after_pass(self, p: "Pass", result: PassResult) -> None:
        pass


class TimingInstrument(PassInstrument):
    """Records wall time per pass, in seconds, in ``self.timings`` (a list of (name, s)).

    A nested pipeline is timed too and listed after its passes.
    """

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []
        self._starts: list[float] = []

    def before_pass(self, p, gm):
        self._starts.append(time.perf_counter())

    def after_pass(self, p, result):
        self.timings.append((p.info.name, time.perf_counter() - self._starts.pop()))

    def summary(self) -> str:
        width = max((len(n) for n, _ in self.timings), default=4)
        lines = [f"{n:<{width}}  {s * 1e3:10.2f} ms" for n, s in self.timings]
        return "\n".join(lines)


class GraphDumpInstrument(PassInstrument):
    """Writes the graph (readable code and node table) after every pass into ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def after_pass(self, p, result):
        if isinstance(p, Pipeline):  # its last pass already dumped the same graph
            return
        self._count += 1
        gm = result.graph_module
        lines = [f"# after {p.info.name} (modified={result.modified})", gm.code, ""]
        for n in gm.graph.nodes:
            keys = sorted(k for k in n.meta if k.startswith("pqc.") or k == "tensor_meta")
            lines.append(f"{n.name:30s} {n.op:14s} {str(n.target)[:40]:40s} {keys}")
        path = self.directory / f"{self._count:03d}_{p.info.name}.txt"
        path.write_text("\n".join(lines))


@dataclass
class PassContext:
    """Shared state of one pipeline run: instruments, options, and results passes report."""

    instruments: list[PassInstrument] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set ``info`` and implement :meth:`run`.

    ``run`` may mutate the graph module it is given (passes own the graph they receive; the
    user's model is copied once, at trace time) and returns a :class:`PassResult`.
    """

    info: PassInfo = PassInfo("Pass")
    #: A source pass makes the graph (e.g. traces the context's model) and is called with
    #: ``gm=None``; the compile pipeline's first stage is one.
    source: bool = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        if not isinstance(gm, torch.fx.GraphModule) and not (gm is None and self.source):
            raise TypeError(
                f"pass {self.info.name} takes a torch.fx.GraphModule, got {type(gm).__name__}: "
                "call pqcompile.trace(model, example_inputs) first")
        ctx = ctx if ctx is not None else PassContext()
        provided = provided_keys(gm) if gm is not None else set()
        missing = [k for k in self.info.requires if k.name not in provided]
        if missing:
            raise PipelineError(
                f"pass {self.info.name} requires {_names(missing)}, not present on this graph: "
                f"run {_providers(missing)} first (present: {sorted(provided) or 'none'})")
        for inst in ctx.instruments:
            inst.before_pass(self, gm)
        result = self.run(gm, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.info.name}.run returned {type(result).__name__}, "
                            "expected PassResult")
        out = result.graph_module
        keys = provided | set(provided_keys(out))
        keys -= {k.name for k in self.info.invalidates}
        keys |= {k.name for k in self.info.provides}
        out.meta[_PROVIDED] = keys
        for inst in ctx.instruments:
            inst.after_pass(self, result)
        return result

    def __repr__(self) -> str:
        return f"<pass {self.info.name}>"


class _FunctionPass(Pass):
    def __init__(self, fn: Callable, info: PassInfo) -> None:
        self._fn = fn
        self.info = info
        functools.update_wrapper(self, fn)

    def run(self, gm, ctx):
        out = self._fn(gm, ctx)
        if out is None:
            return PassResult(gm, False)
        if isinstance(out, bool):
            return PassResult(gm, out)
        if isinstance(out, torch.fx.GraphModule):
            return PassResult(out, True)
        return out


def graph_pass(fn: Callable | None = None, *, name: str | None = None,
               requires: Iterable[MetaKey] = (), provides: Iterable[MetaKey] = (),
               invalidates: Iterable[MetaKey] = ()):
    """Turn ``fn(gm, ctx)`` into a :class:`Pass`.

    ``fn`` may return ``None`` (analysis only), a bool (modified), a new ``GraphModule`` or a
    ``PassResult``.
    """

    def wrap(f: Callable) -> Pass:
        info = PassInfo(name or f.__name__, tuple(requires), tuple(provides), tuple(invalidates))
        return _FunctionPass(f, info)

    return wrap(fn) if fn is not None else wrap


def provided_keys(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the annotation keys the passes run so far on ``gm`` have provided."""
    return set(gm.meta.get(_PROVIDED, ()))


def mark_provided(gm: torch.fx.GraphModule, keys: Iterable[MetaKey]) -> None:
    gm.meta[_PROVIDED] = provided_keys(gm) | {k.name for k in keys}


def _names(keys: Sequence[MetaKey]) -> str:
    return ", ".join(k.name for k in keys)


def _providers(keys: Sequence[MetaKey]) -> str:
    return ", ".join(sorted({k.provided_by for k in keys}))


class Pipeline(Pass):
    """An ordered, named list of passes, checked when built.

    ``initial`` lists keys present before the first pass (by default what
    :func:`pqcompile.trace` provides). A pipeline is itself a pass, so pipelines nest. It is
    edited by pass name (:meth:`insert_before`, :meth:`insert_after`, :meth:`replace`,
    :meth:`remove`), each returning a new pipeline checked like this one; ``str()`` lists
    its passes with what each requires and provides.

    >>> from pqcompile.passes import CostAnalysis, ShapeAnalysis
    >>> pipe = Pipeline([ShapeAnalysis(), CostAnalysis()], name="costs")
    >>> pipe.names
    ['ShapeAnalysis', 'CostAnalysis']
    >>> pipe.remove("CostAnalysis").names
    ['ShapeAnalysis']
    """

    def __init__(self, passes: Sequence[Pass], name: str = "pipeline",
                 initial: Iterable[MetaKey] = TRACE_PROVIDES) -> None:
        passes = list(passes)
        for i, p in enumerate(passes):
            if not isinstance(p, Pass):
                raise TypeError(f"{name}: item {i} is {type(p).__name__}, not a Pass; wrap "
                                "functions with @pqcompile.graph_pass")
        initial = tuple(initial)
        have = {k.name for k in initial}
        ran: list[str] = []
        for i, p in enumerate(passes):
            if p.source and i:
                raise PipelineError(f"{name}: pass {p.info.name} makes the graph (a source "
                                    f"pass) and must come first, not after {ran}")
            missing = [k for k in p.info.requires if k.name not in have]
            if missing:
                earlier = f"none of {ran} provides" if ran else "no earlier pass provides"
                raise PipelineError(
                    f"{name}: pass {p.info.name} requires {_names(missing)}, which {earlier}"
                    f" (or a later pass invalidated); put {_providers(missing)} before it")
            have -= {k.name for k in p.info.invalidates}
            have |= {k.name for k in p.info.provides}
            ran.append(p.info.name)
        self.passes = passes
        self.initial = initial
        self.source = bool(passes) and passes[0].source
        requires = tuple(k for p in passes for k in p.info.requires
                         if k in initial)
        provides = tuple(k for p in passes for k in p.info.provides)
        self.info = PassInfo(name, tuple(dict.fromkeys(requires)), tuple(dict.fromkeys(provides)))

    def run(self, gm, ctx):
        modified = False
        for p in self.passes:
            result = p(gm, ctx)
            gm, modified = result.graph_module, modified or result.modified
        return PassResult(gm, modified)

    def __call__(self, gm, ctx=None):  # type: ignore[override]
        return super().__call__(gm, ctx)

    @property
    def names(self) -> list[str]:
        """The passes' names, in order."""
        return [p.info.name for p in self.passes]

    def index(self, name: str) -> int:
        """Position of the pass named ``name``; a :class:`PipelineError` lists the names."""
        for i, p in enumerate(self.passes):
            if p.info.name == name:
                return i
        close = difflib.get_close_matches(name, self.names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PipelineError(f"pipeline {self.info.name!r} has no pass {name!r}.{hint} Its "
                            f"passes: {', '.join(self.names)}")

    def _edit(self, passes: Sequence[Pass]) -> "Pipeline":
        return Pipeline(passes, name=self.info.name, initial=self.initial)

    def insert_before(self, name: str, *passes: Pass) -> "Pipeline":
        """A new pipeline with ``passes`` run just before the pass named ``name``."""
        i = self.index(name)
        return self._edit([*self.passes[:i], *passes, *self.passes[i:]])

    def insert_after(self, name: str, *passes: Pass) -> "Pipeline":
        """A new pipeline with ``passes`` run just after the pass named ``name``."""
        i = self.index(name) + 1
        return self._edit([*self.passes[:i], *passes, *self.passes[i:]])

    def replace(self, name: str, *passes: Pass) -> "Pipeline":
        """A new pipeline with the pass named ``name`` replaced by ``passes``."""
        i = self.index(name)
        return self._edit([*self.passes[:i], *passes, *self.passes[i + 1:]])

    def remove(self, name: str) -> "Pipeline":
        """A new pipeline without the pass named ``name``."""
        return self.replace(name)

    def describe(self) -> str:
        """One line per pass: its position, name, and the keys it requires and provides."""
        width = max((len(n) for n in self.names), default=4)
        lines = [f"pipeline {self.info.name!r}: {len(self.passes)} passes"]
        for i, p in enumerate(self.passes, 1):
            req = ", ".join(k.name for k in p.info.requires) or "-"
            prov = ", ".join(k.name for k in p.info.provides) or "-"
            lines.append(f"{i:3d}. {p.info.name:<{width}}  requires {req}; provides {prov}")
        return "\n".join(lines)

    __str__ = describe

    def __repr__(self) -> str:
        return f"Pipeline({self.info.name}: {' -> '.join(self.names)})"
