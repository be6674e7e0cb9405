"""The frontend: a ``torch.nn.Module`` and example inputs to an annotated ``torch.fx.GraphModule``.

``tracer.py``: :func:`pqcompile.trace` (symbolic tracing, leaf modules, input checks);
``torch_export.py``: the ``torch.export`` frontend mapped back to module calls;
``shape_trace.py``: tracing with the example inputs' shapes fixed; ``attention.py``: attention
modules traced as the layers they compute.
"""
