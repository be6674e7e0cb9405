"""Registered compile pipelines, and how ``compile(pipeline=..., passes=...)`` picks one.

``get_pipeline("default")`` is what ``pqcompile.compile`` runs (as TVM's
``relax.get_pipeline``): a :class:`~pqcompile.passes.Pipeline` of named stages
(:mod:`pqcompile.pipeline.stages`), printable (``print(pipeline)``: each stage with what it
requires and provides) and edited by name into a new one::

    pipe = pqcompile.get_pipeline().insert_after("solve", my_pass)
    compiled = pqcompile.compile(model, x, budget="bops=40x", pipeline=pipe)

>>> get_pipeline().names[:4]
['trace', 'shapes', 'groups', 'costs']
>>> "default" in list_pipelines()
True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence

from ..errors import OptionError, PipelineError
from ..passes.base import Pass, Pipeline
from .stages import default_stages

_PIPELINES: dict[str, Callable[[], Pipeline]] = {}


def register_pipeline(name: str, make: Callable[[], Pipeline] | Pipeline, *,
                      overwrite: bool = False) -> None:
    """Register ``make`` (a function returning a :class:`Pipeline`, called on every
    :func:`get_pipeline`, or a pipeline itself) under ``name``."""
    if not isinstance(name, str) or not name:
        raise OptionError(f"a pipeline's name must be a non-empty str, got {name!r}")
    if name in _PIPELINES and not overwrite:
        raise OptionError(f"pipeline {name!r} is already registered; pass overwrite=True to "
                          "replace it")
    if isinstance(make, Pipeline):
        fixed = make
        make = lambda: fixed  # noqa: E731 (a pipeline is immutable: edits return new ones)
    if not callable(make):
        raise OptionError(f"register_pipeline({name!r}, ...) takes a Pipeline or a function "
                          f"returning one, got {type(make).__name__}")
    _PIPELINES[name] = make


def list_pipelines() -> list[str]:
    """The registered pipelines' names."""
    return sorted(_PIPELINES)


def get_pipeline(name: str = "default") -> Pipeline:
    """The registered pipeline ``name`` (fresh stages: editing it changes no other)."""
    if name not in _PIPELINES:
        close = difflib.get_close_matches(str(name), list(_PIPELINES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"unknown pipeline {name!r}.{hint} Registered: "
                          f"{', '.join(list_pipelines())} (pqcompile.list_pipelines(); add one "
                          "with pqcompile.register_pipeline)")
    pipeline = _PIPELINES[name]()
    if not isinstance(pipeline, Pipeline):
        raise OptionError(f"pipeline {name!r}'s factory returned {type(pipeline).__name__}, "
                          "not a pqcompile Pipeline")
    return pipeline


def resolve_pipeline(pipeline: Pipeline | str | None,
                     passes: Mapping[str, Pass | Sequence[Pass]] | None) -> Pipeline:
    """The pipeline ``compile()`` runs: ``pipeline`` (a :class:`Pipeline` or a registered
    name; ``None``: ``"default"``) with ``passes`` inserted: ``{"after:solve": my_pass,
    "before:prune": [a, b]}``. Every error comes before any stage runs."""
    if pipeline is None:
        pipeline = "default"
    if isinstance(pipeline, str):
        pipeline = get_pipeline(pipeline)
    if not isinstance(pipeline, Pipeline):
        raise OptionError(f"pipeline must be a pqcompile Pipeline or a registered name such as "
                          f"'default', got {type(pipeline).__name__}")
    if not pipeline.source:
        raise OptionError(f"pipeline {pipeline.info.name!r} starts with "
                          f"{pipeline.names[:1] or 'nothing'}, not a pass that makes the graph "
                          "from the model: keep the default's 'trace' stage first")
    if passes is None:
        return pipeline
    if not isinstance(passes, Mapping):
        raise OptionError(f"passes must be a dict of where -> pass(es), e.g. "
                          f"{{'after:solve': my_pass}}, got {type(passes).__name__}")
    for where, extra in passes.items():
        place, _, name = str(where).partition(":")
        if place not in ("before", "after") or not name:
            raise OptionError(f"passes: key {where!r} must be 'before:STAGE' or 'after:STAGE' "
                              f"with a stage of the pipeline ({', '.join(pipeline.names)})")
        items = list(extra) if isinstance(extra, (list, tuple)) else [extra]
        bad = [p for p in items if not isinstance(p, Pass)]
        if bad:
            raise OptionError(f"passes[{where!r}]: {type(bad[0]).__name__} is not a Pass; wrap "
                              "a function with @pqcompile.graph_pass")
        try:
            edit = pipeline.insert_before if place == "before" else pipeline.insert_after
            pipeline = edit(name, *items)
        except PipelineError as exc:
            raise PipelineError(f"passes[{where!r}]: {exc}") from None
    return pipeline


def _default() -> Pipeline:
    return Pipeline(default_stages(), name="default", initial=())


register_pipeline("default", _default)

