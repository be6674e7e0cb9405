"""``pqcompile.compile`` as data: its context, its stages and the registered pipelines.

:func:`compile_context` checks ``compile()``'s arguments into a :class:`CompileContext`;
:func:`get_pipeline` returns a registered pipeline of stages (``"default"``: what
``compile()`` runs); :func:`run_pipeline` runs one on a context with the progress lines and
per-stage timings as a pass instrument, and returns the :class:`~pqcompile.build.Compiled`.
``compile(model, x, **kw)`` is ``run_pipeline(get_pipeline(), compile_context(model, x, **kw))``.
"""

from __future__ import annotations

from ..distributed import builds_here
from ..errors import PipelineError
from ..passes.base import Pipeline
from ..progress import StageInstrument
from .context import CompileContext, compile_context
from .registry import get_pipeline, list_pipelines, register_pipeline, resolve_pipeline
from .stages import Stage, default_stages, graph_assignment

__all__ = ["CompileContext", "Stage", "compile_context", "default_stages", "get_pipeline",
           "graph_assignment", "list_pipelines", "register_pipeline", "resolve_pipeline",
           "run_pipeline"]


def run_pipeline(pipeline: Pipeline, ctx: CompileContext):
    """Run ``pipeline`` on ``ctx`` (numbered stage lines on stderr with ``ctx.progress``) and
    return what its build stage made, with ``.timings``: wall seconds per stage."""
    stages = [p for p in pipeline.passes if not isinstance(p, Stage)
              or (p.applies(ctx) and (builds_here() or not p.builds))]
    detail = lambda p: p.detail(ctx) if isinstance(p, Stage) else ""  # noqa: E731
    instrument = StageInstrument(stages, detail=detail, enabled=ctx.progress)
    ctx.instruments.append(instrument)
    try:
        pipeline(None, ctx)
    finally:
        ctx.instruments.remove(instrument)
    if ctx.compiled is None and not builds_here():
        return None  # a data-parallel rank other than 0: rank 0 builds
    if ctx.compiled is None:
        raise PipelineError(f"pipeline {pipeline.info.name!r} ran to its end without building "
                            f"({' -> '.join(pipeline.names)}): keep the default's 'lower' and "
                            "'build' stages last")
    ctx.compiled.timings = dict(instrument.seconds)
    return ctx.compiled
