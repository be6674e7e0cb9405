"""The loop of the elementwise kernels over a flat tensor (:mod:`~pqcompile.lower.kernels_lut`,
:mod:`~pqcompile.lower.kernels_quantize`, :mod:`~pqcompile.lower.add32`): whole vectors,
split among parallel tasks where there are several tasks' worth, then the elements after the
last whole vector one by one.
"""

from __future__ import annotations


def flat_macro(n: int, lanes: int, task: int):
    """``flat(Y, A, B, vec, one)``, a TVMScript macro storing into ``Y`` (``n`` elements):
    ``vec(A, B, i)`` (a vector of ``lanes`` elements ``i .. i + lanes``; with ``lanes`` 1 a
    scalar) for every whole vector, ``one(A, B, i)`` for each element after them. ``task``:
    elements a parallel task computes; a tensor of one task's worth or less runs without a
    parallel region (which costs more than a few thousand elements)."""
    from tvm.script import tirx as T

    V = lanes
    NV = n // V                 # whole vectors
    G = max(1, task // V)       # vectors a task
    NT = -(-NV // G)            # tasks

    @T.macro
    def flat(Y, A, B, vec, one):
        if NT > 1:
            for t in T.parallel(NT):
                for g in range(t * G, T.min(t * G + G, NV)):
                    if V == 1:
                        Y[g] = vec(A, B, g)
                    else:
                        Y[T.ramp(g * V, 1, V)] = vec(A, B, g * V)
        else:
            for g in range(NV):
                if V == 1:
                    Y[g] = vec(A, B, g)
                else:
                    Y[T.ramp(g * V, 1, V)] = vec(A, B, g * V)
        for i in range(NV * V, n):
            Y[i] = one(A, B, i)

    return flat
