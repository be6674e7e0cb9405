"""Per-layer latency tables measured on the target, for latency budgets.

``table.py``: :func:`measure_latency`, :class:`LatencyTable` and :func:`attach_latency` (the
solvers' latency model); ``programs.py``: the one-layer programs and where they run (here, on a
board's RPC server, under qemu-user); ``farm.py``: a table timed on every free board of a
tracker key; ``cache.py``: measured figures kept per target between runs.
"""

from .table import (
    CACHE_FILE,
    LatencyError,
    LatencyTable,
    LayerTable,
    attach_latency,
    cache_path,
    check_where,
    layer_points,
    measure_latency,
)

__all__ = ["CACHE_FILE", "LatencyError", "LatencyTable", "LayerTable", "attach_latency",
           "cache_path", "check_where", "layer_points", "measure_latency"]
